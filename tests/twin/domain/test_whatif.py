"""AI4I failure rules against the real data, and the what-if Monte Carlo."""

import numpy as np
import pandas as pd
import pytest

from twin.domain.health import ai4i_rule_flags
from twin.domain.whatif import EnginePlan, MillPlan, SimulationError, simulate_engine, simulate_mill

START = {"product_type": "L", "air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0,
         "torque": 40.0, "tool_wear": 100.0}


def test_documented_rules_reproduce_the_ai4i_failure_labels(data_root):
    a = pd.read_csv(data_root / "ai4i2020" / "ai4i2020.csv.gz", encoding="utf-8-sig")
    flags = ai4i_rule_flags(a["Type"].to_numpy(), a["Air temperature [K]"].to_numpy(),
                            a["Process temperature [K]"].to_numpy(), a["Rotational speed [rpm]"].to_numpy(),
                            a["Torque [Nm]"].to_numpy(), a["Tool wear [min]"].to_numpy())
    for mode in ("HDF", "PWF", "OSF"):
        assert (flags[mode] == a[mode].astype(bool)).all(), mode
    twf = a["TWF"].astype(bool)
    assert flags["TWF"][twf].mean() > 0.9  # tool wear failures fall in the 200-240 min window


def test_mill_what_if_has_a_spread_and_responds_to_the_plan():
    base = simulate_mill(START, MillPlan(runs=400, seed=1, horizon_hours=24 * 30))
    q = base["time_to_failure_hours"]
    assert q["p10"] < q["p50"] < q["p90"], "Monte Carlo answers carry a spread"
    assert sum(p > 0.02 for p in base["modes"].values()) >= 3, base["modes"]
    # 65 Nm at 1,500 rpm draws ~10.2 kW: over the 9,000 W power limit at once
    hard = simulate_mill(START, MillPlan(torque_nm=65.0, runs=400, seed=1, horizon_hours=24 * 30))
    assert hard["most_likely_mode"] == "PWF" and hard["time_to_failure_hours"]["p50"] < q["p50"]
    # a tool change at 150 min prevents tool wear and overstrain failures, so the machine lasts longer
    planned = simulate_mill(START, MillPlan(tool_change_min=150.0, runs=400, seed=1, horizon_hours=24 * 30))
    assert planned["modes"]["TWF"] == planned["modes"]["OSF"] == 0.0 and planned["tool_changes_mean"] > 0
    assert planned["time_to_failure_hours"]["mean"] > q["mean"]
    assert simulate_mill(START, MillPlan(runs=400, seed=1, horizon_hours=24 * 30)) == base, "same seed, same answer"


def test_simulated_power_failure_rate_matches_the_data(data_root):
    a = pd.read_csv(data_root / "ai4i2020" / "ai4i2020.csv.gz", encoding="utf-8-sig")
    typical = {"product_type": "L", "air_temperature": 300.0, "process_temperature": 310.0,
               "rotational_speed": float(a["Rotational speed [rpm]"].median()),
               "torque": float(a["Torque [Nm]"].mean()), "tool_wear": 0.0}
    one_process = simulate_mill(typical, MillPlan(runs=40_000, seed=0, processes_per_hour=1, shifts_per_day=1,
                                                  horizon_hours=1))
    assert one_process["steps_simulated"] == 1
    assert abs(one_process["modes"]["PWF"] - a["PWF"].mean()) < 0.004


def test_low_speed_with_small_temperature_difference_fails_by_heat_dissipation():
    hot = dict(START, process_temperature=308.0)  # difference 8 K, under 8.6 K
    result = simulate_mill(hot, MillPlan(speed_rpm=1300.0, runs=200, seed=0, horizon_hours=48))
    assert result["most_likely_mode"] == "HDF" and result["failure_probability"] > 0.9


def test_mill_plan_errors():
    with pytest.raises(SimulationError, match="shifts_per_day"):
        MillPlan(shifts_per_day=4)
    with pytest.raises(SimulationError, match="no value yet for tool_wear"):
        simulate_mill({k: v for k, v in START.items() if k != "tool_wear"}, MillPlan())
    with pytest.raises(SimulationError, match="learned AI4I model"):
        simulate_mill(START, MillPlan(hazard="model"))


def test_mill_model_hazard_uses_the_given_model():
    def always(rows):
        n = len(rows["Torque [Nm]"])
        modes = np.zeros((n, 5))
        modes[:, 3] = 1.0
        return np.full(n, 1.0), modes
    result = simulate_mill(START, MillPlan(hazard="model", runs=50), model=always)
    assert result["failure_probability"] == 1.0 and result["modes"]["OSF"] == 1.0


def test_engine_what_if_scales_with_duty():
    base = simulate_engine(100.0, 15.0, EnginePlan(cycles_per_day=4, runs=4000))
    harsh = simulate_engine(100.0, 15.0, EnginePlan(cycles_per_day=8, severity=1.25, runs=4000))
    assert abs(base["days_to_failure"]["p50"] - 25.0) < 1.0
    assert abs(harsh["days_to_failure"]["p50"] - 10.0) < 0.5
    assert base["days_to_failure"]["p10"] < base["days_to_failure"]["p90"]
    with pytest.raises(SimulationError, match="no RUL estimate"):
        simulate_engine(None, 15.0, EnginePlan())
    with pytest.raises(SimulationError, match="rul_sd"):
        simulate_engine(80.0, None, EnginePlan())
