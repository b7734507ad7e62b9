"""Every `finance train` model kind served from its folder: raw application fields in, the answers
of `finance.load_model(dir).score` out (bit for bit for the row-by-row models), under concurrent
requests that share batches; raw-field mistakes get a 422 naming row and field."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deploy.serving.app import create_app
from deploy.serving.batcher import BatcherConfig
from deploy.serving.registry import REGISTRY
from tests.deploy.serving.served import Served

KINDS = ("scorecard", "lightgbm", "moe", "sequence", "ensemble")
EXACT = ("scorecard", "lightgbm", "ensemble")  # features, trees, WoE and the blend run row by row


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    """Tiny models of every kind, trained on 3,000 generated applicants; 24 held-out applications."""
    from core.trainer import TrainerConfig
    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate
    from finance.models.ensemble import EnsembleConfig
    from finance.models.gbdt import LightGBMConfig
    from finance.models.moe import MoEModelConfig
    from finance.scorer import CreditScorer, split_records
    from finance.sequence.credit_model import SequenceModelConfig
    from finance.sequence.estimator import SequenceTrainingConfig

    root = tmp_path_factory.mktemp("credit")
    records = load_generated(generate(root / "data", GeneratorConfig(n_applicants=3000, seed=1)))
    train, valid = split_records(records.take(np.arange(2976)), valid_share=0.3, seed=0)
    configs = {
        "scorecard": None, "lightgbm": LightGBMConfig(max_rounds=30, early_stopping_rounds=10),
        "moe": MoEModelConfig(num_experts=4, hidden_size=16, intermediate_size=32, max_epochs=2, patience=1),
        "sequence": SequenceModelConfig(training=SequenceTrainingConfig(batch_size=128, trainer=TrainerConfig(
            learning_rate=2e-3, grad_accumulation=1, max_epochs=1, patience=1, monitor="val_auc", mode="max",
            progress=False))),
        "ensemble": EnsembleConfig(members=["lightgbm", "scorecard"], cross_fit=False)}
    folders = {name: CreditScorer(dataset="generated", model_name=name, model_config=config)
               .fit(*train.xy, eval_set=[valid.xy]).save(root / name) for name, config in configs.items()}
    return folders, records.frame.iloc[2976:].reset_index(drop=True)


def as_json(frame):
    """Rows as a client sends them: the CSV's columns by name, numbers as JSON numbers, missing as null."""
    return [{k: (None if isinstance(v, float) and v != v else v.item() if hasattr(v, "item") else v)
             for k, v in row.items()} for row in frame.to_dict("records")]


def client_for(folder):
    config = BatcherConfig(max_wait_s=0.005, default_timeout_s=30.0)
    return TestClient(create_app(lambda: REGISTRY.from_path(folder), batcher_config=config))


@pytest.mark.parametrize("kind", KINDS)
def test_credit_folder_served_from_raw_fields_as_finance_score(credit, kind):
    from finance import load_model

    folders, frame = credit
    expected = load_model(folders[kind]).score(frame, reasons="all")
    rows = as_json(frame)
    bodies = [{"instances": rows[i:i + 3]} for i in range(0, len(rows), 3)]  # 8 requests of 3, batched together
    with client_for(folders[kind]) as client:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda body: client.post("/v1/predict", json=body), bodies))
        info = client.get("/v1/model").json()
    assert info["model"] == kind and info["inputs"]["monthly_income"]["type"] == "number"
    got = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == expected["model_version"].iloc[0]
        got += answer.json()["predictions"]
    pd_ = np.array([p["pd"] for p in got])
    assert [p["id"] for p in got] == frame["applicant_id"].tolist()
    if kind in EXACT:
        np.testing.assert_array_equal(pd_, expected["pd"].to_numpy())
        assert [p["points"] for p in got] == expected["points"].tolist()
        assert [p["reason_codes"] for p in got] == expected["reason_codes"].tolist()
        assert [p["reason_1"] for p in got] == expected["reason_1"].tolist()
        assert [p["decision"] for p in got] == expected["decision"].tolist()
    else:  # networks run the batch as one matrix: equal to float rounding
        np.testing.assert_allclose(pd_, expected["pd"].to_numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change, loc_field, words", [
    ({"monthly_income": True}, "monthly_income", "boolean"),
    ({"monthly_income": "4000"}, "monthly_income", "string"),
    ({"monthly_income": 1e39}, "monthly_income", "float32"),
    ({"monthly_income": -5.0}, "monthly_income", "below the minimum"),
    ({"age": None}, "age", "missing"),
    ({"housing": "castle"}, "housing", "unknown level"),
    ({"housing": 3}, "housing", "expected a string"),
    ({"num_credit_lines": 2.5}, "num_credit_lines", "whole number"),
    ({"salary": 100}, "salary", "unknown field"),
])
def test_raw_field_mistakes_get_422_naming_row_and_field(credit, change, loc_field, words):
    folders, frame = credit
    rows = as_json(frame.iloc[:3])
    rows[2] = {**rows[2], **change}
    with client_for(folders["lightgbm"]) as client:
        answer = client.post("/v1/predict", json={"instances": rows})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", "instances", 2, loc_field] and words in detail["msg"], detail


def test_moeworks_serve_boots_a_lightgbm_folder_with_tokens(credit, tmp_path):
    """The folder that used to end in 'Worker failed to boot', under gunicorn with --auth-file."""
    from finance import load_model
    from twin.auth import create_token

    folders, frame = credit
    tokens = tmp_path / "tokens.json"
    token = create_token(tokens, role="operator", name="loan system")
    body = {"instances": as_json(frame.iloc[:2])}
    with Served(folders["lightgbm"], "--auth-file", str(tokens), ready_s=120) as server:
        assert server.post(body).status_code == 401
        answer = server.post(body, headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    expected = load_model(folders["lightgbm"]).score(frame.iloc[:2], reasons="all")
    assert [p["pd"] for p in answer.json()["predictions"]] == expected["pd"].tolist()


def test_quantizing_a_credit_folder_is_refused_in_one_line(credit):
    folders, _ = credit
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", "--model", str(folders["moe"]), "--quantize",
                           "int8_dynamic"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "FP32" in done.stderr


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_500_on_a_credit_folder(credit, mode):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    folders, _ = credit
    app = create_app(lambda: REGISTRY.from_path(folders["lightgbm"]),
                     batcher_config=BatcherConfig(max_wait_s=0.002, default_timeout_s=10.0))
    seen = []
    with TestClient(app):
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        (operation,) = [r.ok() for r in schema.get_all_operations() if r.ok().path == "/v1/predict"]

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def call(case):
            response = case.call()
            seen.append(response.status_code)
            assert response.status_code in (200, 413, 422, 503, 504), (case.body, response.text)

        call()
    assert 200 in seen if mode == "positive" else 422 in seen
