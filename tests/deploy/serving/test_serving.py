"""The serving app with a real saved model: answers under concurrency, 503 when full, 422 naming fields."""

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.trainer import save_checkpoint
from deploy.serving.adapters import AdapterOptions, OnnxAdapter, TorchAdapter, load_adapter
from deploy.serving.app import create_app
from deploy.serving.batcher import BatcherConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = TabularMoEConfig(num_numeric=5, categorical_cardinalities=[3, 4], embedding_dim=2, moe=MoEConfig(
        num_experts=4, top_k=2, hidden_size=16, intermediate_size=32))
    return save_checkpoint(tmp_path_factory.mktemp("serving") / "tiny.pt", TabularMoE(config), config=config)


def instance(i):
    return {"numeric": [0.1 * i, -0.2, 0.3, 1.0, -1.5], "categorical": [i % 3, i % 4]}


def make_client(checkpoint, **batcher):
    config = BatcherConfig(**{"max_wait_s": 0.002, "default_timeout_s": 10.0, **batcher})
    return TestClient(create_app(lambda: TorchAdapter(checkpoint), batcher_config=config, max_request_rows=8))


def test_concurrent_requests_get_their_own_answers_and_share_batches(checkpoint):
    reference = TorchAdapter(checkpoint)
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
    app = create_app(lambda: Recording(checkpoint, AdapterOptions(threads=configured)), batcher_config=config,
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


def test_onnx_int8_adapter_serves_the_same_model(checkpoint, tmp_path):
    from core.onnx_export import export_onnx

    torch_adapter = TorchAdapter(checkpoint)
    rows = torch_adapter.example(16, seed=3)
    path = export_onnx(torch_adapter.model, tuple(torch.from_numpy(rows[f.name]) for f in torch_adapter.fields),
                       tmp_path / "tiny.onnx", input_names=["numeric", "categorical"],
                       output_names=["logits", "aux"],
                       metadata={"version": "tiny-1", "config": {"categorical_cardinalities": [3, 4]}})
    onnx_adapter = load_adapter(path, AdapterOptions(quantize="int8_dynamic"))
    assert isinstance(onnx_adapter, OnnxAdapter) and onnx_adapter.runtime == "onnxruntime+int8_dynamic"
    assert onnx_adapter.fields[1].high == (3, 4)
    got, want = onnx_adapter.predict(rows)["logits"], torch_adapter.predict(rows)["logits"]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98
    split = onnx_adapter.run_batch([{k: v[:5] for k, v in rows.items()}, {k: v[5:] for k, v in rows.items()}])
    np.testing.assert_allclose(np.concatenate([s["logits"] for s in split]), got, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_moeworks_serve_runs_under_gunicorn(checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    server = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", str(checkpoint), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"instances": [instance(1), instance(2)]})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["predictions"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=20)
