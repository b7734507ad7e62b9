"""Maintenance configs and arguments are refused with ValueError also under `python -O`."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Each case: a statement that must raise ValueError (MaintenanceDataError is one). One -O interpreter.
CASES = {
    "RULNetConfig kind": "RULNetConfig(kind='gru')",
    "RULNetConfig window vs patch": "RULNetConfig(kind='moe', window=30, patch=4)",
    "RULNetConfig members=0": "RULNetConfig(members=0)",
    "FeatureConfig min_trend": "FeatureConfig(min_trend=1.5)",
    "generate_cmapss num_units=0": "generate_cmapss(0)",
    "split_units val_fraction": "split_units(np.arange(10), val_fraction=1.0)",
    "split_units one unit": "split_units(np.zeros(5))",
    "build_windows scattered unit": "build_windows(np.zeros((3, 2), np.float32), np.array([1, 2, 1]), window=2)",
}

SCRIPT = """
import json, sys
import numpy as np
from manufacturing.maintenance.features import FeatureConfig
from manufacturing.maintenance.generator import generate_cmapss
from manufacturing.maintenance.models import RULNetConfig
from manufacturing.maintenance.split import split_units
from manufacturing.maintenance.windows import build_windows

results = {}
for name, statement in json.loads(sys.argv[1]).items():
    try:
        exec(statement)
        results[name] = "accepted"
    except ValueError:
        results[name] = "ValueError"
    except Exception as error:
        results[name] = type(error).__name__
print(json.dumps({"optimize": sys.flags.optimize, "results": results}))
"""


def test_bad_values_raise_value_error_under_python_O():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-O", "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["optimize"] == 1  # asserts really were stripped
    assert report["results"] == {name: "ValueError" for name in CASES}
