"""The serving app with a real saved model (a core TabularMoE checkpoint): answers under concurrency, 503 when
full, 422 naming fields, and `moeworks serve` under gunicorn."""

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from deploy.serving.app import create_app
from deploy.serving.base import AdapterOptions
from deploy.serving.batcher import BatcherConfig
from deploy.serving.families.tabular import TorchAdapter
from tests.deploy.serving.served import Served


def instance(i):
    return {"numeric": [0.1 * i, -0.2, 0.3, 1.0, -1.5], "categorical": [i % 3, i % 4]}


def make_client(checkpoint, **batcher):
    config = BatcherConfig(**{"max_wait_s": 0.002, "default_timeout_s": 10.0, **batcher})
    return TestClient(create_app(lambda: TorchAdapter.from_path(checkpoint), batcher_config=config, max_request_rows=8))


def test_concurrent_requests_get_their_own_answers_and_share_batches(checkpoint):
    reference = TorchAdapter.from_path(checkpoint)
    expected = reference.predict({"numeric": np.array([instance(i)["numeric"] for i in range(48)], np.float32),
                                  "categorical": np.array([instance(i)["categorical"] for i in range(48)])})
    with make_client(checkpoint) as client:
        assert client.get("/readyz").status_code == 200
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: client.post("/v1/predict", json={"instances": [instance(i)]}),
                                    range(48)))
        metrics = client.get("/metrics").text
    version = reference.version
    for i, answer in enumerate(answers):
        assert answer.status_code == 200
        body = answer.json()
        assert body["model_version"] == version
        assert body["predictions"][0]["logits"] == pytest.approx(float(expected["logits"][i, 0]), abs=1e-5)
    batches = float(metrics.split("moeworks_batch_rows_count ")[1].split()[0])
    assert batches < 48, "some requests shared a forward pass"
    for name in ("moeworks_queue_seconds", "moeworks_request_latency_seconds", "moeworks_requests_rejected"):
        assert name in metrics


def _openmp_threads() -> int:
    """omp_get_max_threads() of the calling OS thread, from the OpenMP runtime torch ships with."""
    library = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not library.is_file():
        pytest.skip("torch is not built with its own libgomp here")
    return ctypes.CDLL(str(library)).omp_get_max_threads()


def test_model_runs_with_the_configured_torch_threads_in_the_batcher_thread(checkpoint):
    # A fresh thread starts with OpenMP's default team (OMP_NUM_THREADS or every core); configure
    # something else, so that a setting that never reached the batcher's thread fails the test.
    seen = []
    probe = threading.Thread(target=lambda: seen.append(_openmp_threads()))
    probe.start()
    probe.join()
    configured = 2 if seen[0] == 1 else 1

    class Recording(TorchAdapter):
        def predict(self, inputs):
            seen.append((threading.current_thread().name, _openmp_threads()))  # before torch runs anything
            return super().predict(inputs)

    config = BatcherConfig(max_wait_s=0.002, default_timeout_s=10.0)
    app = create_app(lambda: Recording.from_path(checkpoint, AdapterOptions(threads=configured)), batcher_config=config,
                     warm_up=False)
    with TestClient(app) as client:
        assert client.post("/v1/predict", json={"instances": [instance(1)]}).status_code == 200
    assert seen[1:] == [("dynamic-batcher", configured)]


def test_full_queue_answers_503_with_retry_after(checkpoint):
    with make_client(checkpoint, max_queue_rows=3, min_batch_size=1, initial_batch_size=1) as client:
        batcher = client.app.state.serving.batcher
        batcher.stop()  # a stalled worker: the queue fills and stays full
        payload = {"instances": [instance(0)]}
        for _ in range(3):
            batcher.submit(client.app.state.serving.adapter.parse(payload)[0])
        answer = client.post("/v1/predict", json=payload)
        assert answer.status_code == 503
        assert int(answer.headers["Retry-After"]) >= 1
        assert answer.json()["model_version"]
        assert 'moeworks_requests_rejected_total{reason="queue_full"} 1.0' in client.get("/metrics").text
        batcher.start()


@pytest.mark.parametrize("payload, loc", [
    ({"instances": [{"categorical": [0, 0]}]}, ["body", "instances", 0, "numeric"]),
    ({"instances": [{"numeric": [1, 2], "categorical": [0, 0]}]}, ["body", "instances", 0, "numeric"]),
    ({"instances": [instance(0), {**instance(1), "numeric": ["a"] * 5}]}, ["body", "instances", 1, "numeric", 0]),
    ({"instances": [{**instance(0), "categorical": [0, 4]}]}, ["body", "instances", 0, "categorical", 1]),
    ({"instances": [{**instance(0), "extra": 1}]}, ["body", "instances", 0, "extra"]),
    ({"instances": []}, ["body", "instances"]),
    ({"instances": [instance(0)], "timeout_ms": -5}, ["body", "timeout_ms"]),
    ({"rows": []}, ["body", "rows"]),
    ({"timeout_ms": 5}, ["body", "instances"]),
])
def test_malformed_request_gets_422_naming_the_field(checkpoint, payload, loc):
    with make_client(checkpoint) as client:
        answer = client.post("/v1/predict", json=payload)
        assert answer.status_code == 422
        assert answer.json()["detail"][0]["loc"] == loc
        assert client.post("/v1/predict", content=b"{not json").status_code == 422


def test_health_readiness_and_model_info(checkpoint):
    with make_client(checkpoint) as client:
        assert client.get("/healthz").json()["status"] == "alive"
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model_version"].startswith("sha256:")
        info = client.get("/v1/model").json()
        assert info["inputs"]["numeric"]["row_shape"] == [5]
        assert info["runtime"] == "torch+fp32"


def test_moeworks_serve_runs_under_gunicorn(checkpoint):
    with Served(checkpoint, ready_s=60) as server:
        answer = server.post({"instances": [instance(1), instance(2)]})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == 2
