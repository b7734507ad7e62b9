"""User-settable values are refused with ValueError also under `python -O`, which strips asserts."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each case: a statement that must raise ValueError. Run in one -O interpreter (torch imports once).
CASES = {
    "MoEConfig top_k=0": "MoEConfig(top_k=0)",
    "TabularMoEConfig no feature": "TabularMoEConfig(num_numeric=0)",
    "TabularMoEConfig num_layers=0": "TabularMoEConfig(num_numeric=3, num_layers=0)",
    "TabularMoEConfig categorical level 0": "TabularMoEConfig(num_numeric=1, categorical_cardinalities=[0])",
    "AWQConfig grid_size=0": "AWQConfig(grid_size=0)",
    "AWQConfig scheme": "AWQConfig(scheme='int4')",
    "SelfAttention heads": "SelfAttention(hidden_size=10, num_heads=3)",
    "MoELayer input width": "MoELayer(MoEConfig(num_experts=4, hidden_size=8, intermediate_size=8))(torch.zeros(2, 5))",
    "TabularMoE categorical missing":
        "TabularMoE(TabularMoEConfig(num_numeric=1, categorical_cardinalities=[3]))(torch.zeros(2, 1))",
}

SCRIPT = """
import json, sys
import torch
from core.blocks import SelfAttention, TabularMoE, TabularMoEConfig
from core.config import MoEConfig
from core.moe import MoELayer
from core.quantization import AWQConfig

results = {}
for name, statement in json.loads(sys.argv[1]).items():
    try:
        exec(statement)
        results[name] = "accepted"
    except Exception as error:
        results[name] = type(error).__name__
print(json.dumps({"optimize": sys.flags.optimize, "results": results}))
"""


def test_bad_configs_raise_value_error_under_python_O():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-O", "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["optimize"] == 1  # asserts really were stripped
    assert report["results"] == {name: "ValueError" for name in CASES}
