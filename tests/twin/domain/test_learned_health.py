"""The learned maintenance models inside the twin: RUL per engine cycle, AI4I failure risk per
process, and the AI4I model as the what-if hazard."""

import json
import time

import numpy as np
import pytest

from manufacturing.maintenance import quick as maintenance
from twin.domain.health import MODES
from twin.domain.learned_health import AI4IModelHealth, StreamingRULHealth, learned_health_models
from twin.domain.plant import Plant
from twin.domain.whatif import MillPlan, simulate_mill

PLANT = Plant.from_yaml()


@pytest.fixture(scope="module")
def rul_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rul")
    maintenance.train_quick_rul_model(folder, num_units=16, max_epochs=1, seed=0)
    return folder


@pytest.fixture(scope="module")
def rul_life_folder(tmp_path_factory):
    """A model whose features read the whole life (regime history, running means), as the MoE recipe's."""
    folder = tmp_path_factory.mktemp("rul-life")
    maintenance.train_quick_rul_model(folder, num_units=16, max_epochs=1, seed=0, life_features=True)
    return folder


@pytest.fixture(scope="module")
def ai4i_folder(tmp_path_factory):
    from manufacturing.maintenance.ai4i import AI4IFailureModel, LightGBMParams, generate_ai4i, split_rows

    folder = tmp_path_factory.mktemp("ai4i")
    train, val = split_rows(generate_ai4i(1500, seed=0), seed=0)
    AI4IFailureModel(seed=0, progress=False, max_epochs=2, lightgbm=LightGBMParams(n_estimators=40)).fit(
        train, val_frame=val).save(folder)
    return folder


def engine_cycles(n, start=1):
    from deploy.edge.sources import SimulatedEngine

    ticks = list(SimulatedEngine(seed=4, life_cycles=n + start))[start - 1:]
    return ticks


def test_streaming_rul_matches_the_predictor_and_restarts_a_life(rul_folder):
    from manufacturing.maintenance.streaming import StreamingRULPredictor

    health = StreamingRULHealth.from_dir(rul_folder)
    reference = StreamingRULPredictor.from_dir(rul_folder)
    engine = PLANT.machines["engine-1"]
    ours, theirs = [], []
    for tick in engine_cycles(40):
        ours.append(health.update(engine, tick).rul)
        theirs.append(reference.update("u", {("s_" + k[1:] if k[0] == "s" and k[1:].isdigit() else
                                              k.replace("setting", "setting_")): v for k, v in tick.items()}))
    assert np.allclose(ours, theirs) and health.rul_sd is not None and health.rul_sd > 0
    first = health.update(engine, engine_cycles(1)[0])  # cycle 1 again: a new life, not an error
    assert first is not None and first.source == "rul-model"
    assert health.update(engine, {"cycle": 2, "s2": 1.0}) is None, "incomplete cycles give no estimate"


def test_ai4i_model_scores_rows_and_drives_the_what_if(ai4i_folder):
    health = AI4IModelHealth.from_dir(ai4i_folder)
    health.min_interval_s = 0.0  # score every row here
    mill = PLANT.machines["mill-1"]
    values = {"product_type": "L", "air_temperature": 300.0, "process_temperature": 310.0,
              "rotational_speed": 1500.0, "torque": 40.0, "tool_wear": 20.0}
    calm = health.update(mill, values)
    hot = health.update(mill, dict(values, rotational_speed=2800.0, torque=70.0))  # ~20 kW: power failure
    assert set(calm.mode_probs) == set(MODES) and hot.failure_prob > calm.failure_prob
    assert health.update(mill, {"torque": 40.0}) is None
    throttled = AI4IModelHealth(health.model, min_interval_s=60.0)
    assert throttled.update(mill, values) is not None and throttled.update(mill, values) is None
    result = simulate_mill(values, MillPlan(hazard="model", runs=40, horizon_hours=24), model=health.hazard)
    assert 0.0 <= result["failure_probability"] <= 1.0 and result["plan"]["hazard"] == "model"


def test_learned_health_models_by_folder(rul_folder, ai4i_folder):
    models, hazard = learned_health_models(rul_model=rul_folder, ai4i_model=ai4i_folder)
    assert isinstance(models["engine"], StreamingRULHealth) and isinstance(models["mill"], AI4IModelHealth)
    assert hazard is not None
    defaults, none = learned_health_models()
    assert none is None and type(defaults["mill"]).__name__ == "AI4IRuleHealth"


@pytest.mark.parametrize("model", ["rul_folder", "rul_life_folder"])
def test_a_restarted_twin_rebuilds_the_rul_windows_from_history(model, request, tmp_path):
    from tests.services import free_port
    from twin.service import TwinConfig, TwinService

    folder = request.getfixturevalue(model)
    ticks = engine_cycles(50)
    config = TwinConfig(broker_port=free_port(), db=str(tmp_path / "twin.db"), rul_model=str(folder))
    # 45 stored cycles, more than the 30 of a window: a whole-life model must get all of them back.
    assert StreamingRULHealth.from_dir(folder).history_needed == (None if model == "rul_life_folder" else 30)

    def feed(service, seqs):
        for seq in seqs:
            raw = json.dumps({"timestamp": int(time.time() * 1000), "seq": seq % 256, "serial": seq,
                              "metrics": [{"name": k, "value": v} for k, v in ticks[seq].items()]}).encode()
            service.ingest("spBv1.0/plant1/DDATA/edge-cell-1/engine-1", raw)
        service.wait_health()  # learned models score on the twin's health thread
        return service.state.devices["engine-1"].health.rul

    uninterrupted = TwinService(config=TwinConfig(**{**vars(config), "db": str(tmp_path / "other.db")})).start()
    expected = feed(uninterrupted, range(50))
    uninterrupted.stop()
    first = TwinService(config=config).start()
    feed(first, range(45))
    first.stop()
    restarted = TwinService(config=config).start()
    try:
        assert restarted.state.devices["engine-1"].health is not None, "health is back before new data"
        assert feed(restarted, range(45, 50)) == pytest.approx(expected, abs=1e-4)
    finally:
        restarted.stop()
