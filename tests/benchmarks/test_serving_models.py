"""The serving benchmark's own model family: `python -m benchmarks.serving_models serve` is
`moeworks serve` with the sequence MoE registered, gunicorn workers included."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving_models import MODEL_KIND, SequenceMoEClassifier, SequenceMoEConfig
from core import MoEConfig
from core.trainer import save_checkpoint
from tests.deploy.serving.served import Served

REPO = Path(__file__).resolve().parents[2]


def test_config_refuses_an_empty_sequence():
    with pytest.raises(ValueError, match="need >= 1 feature and >= 1 token"):
        SequenceMoEConfig(num_features=0)


def test_the_benchmark_serves_its_sequence_model_which_moeworks_serve_does_not_know(tmp_path):
    config = SequenceMoEConfig(num_features=3, num_tokens=4, num_layers=1,
                               moe=MoEConfig(num_experts=2, top_k=1, hidden_size=8, intermediate_size=16))
    path = save_checkpoint(tmp_path / "seq.pt", SequenceMoEClassifier(config), config=config,
                           extra={"model_kind": MODEL_KIND})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", "--model", str(path)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "known families: credit" in refused.stderr
    with Served(path, module="benchmarks.serving_models", ready_s=120) as server:
        answer = server.post({"instances": [{"features": [[0.5, -1, 2]] * 4}] * 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "seq" and body["runtime"] == "torch+fp32" and len(body["predictions"]) == 2
    assert 0 < body["predictions"][0]["probability"] < 1
