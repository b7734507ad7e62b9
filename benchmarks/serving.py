"""Serving benchmark: a loopback load generator against `moeworks serve` in several configurations.

For each model (a tabular MoE trained on generated data, the MoE Transformer sequence classifier,
the credit MoE scorer with --credit-data, and any checkpoint passed with --checkpoint), one server
is started per configuration (started one by one, then all up at once, each on its own port) and
each is driven by `--clients` concurrent closed-loop clients for `--seconds` in total, in `--rounds`
interleaved slices so that drifts in the machine's other load fall on every configuration alike:

  1. eager-fp32-1     the original: eager FP32, one request per forward pass
  2. fp32-batched     FP32 + dynamic batching (isolates what batching alone does)
  3. int8-batched     AWQ INT8 (torchao int8 dynamic) + dynamic batching
  4. int8-batched-fused  the same + fused kernels (torch.compile over the dense parts)
  5. fp32-batched-fused  FP32 + batching + fused kernels (isolates fusion)
  and, with --configs, the model exported to ONNX and served by onnxruntime:
  6. ort-int8-batched        onnxruntime quantize_dynamic INT8 + batching, basic graph optimisations
  7. ort-int8-batched-fused  the same with ORT's extended fusions (GELU, bias, LayerNorm, MatMul+Add)
  8. ort-fp32-batched-fused  the ONNX export in FP32 with the fusions (isolates INT8)
  9. ort-sparse-*            the same three over the sparse-dispatch export (core.sparse_export):
                             only the chosen experts run, and INT8 reaches the expert weights
 10. ort-int8-static-batched the detector's static INT8 file from `defects export`
--models rul / defects add the RUL LSTM (manufacturing/maintenance) and the YOLO defect detector
(manufacturing/defects), served through their verticals' exports; --rul-model / --defects-model
serve folders trained beforehand (so no training runs while the bench lock is held).

Reported per configuration: QPS, p50/p99 latency, the server's CPU use (cores busy), its CPU time
per request (robust to other load on a shared machine) and the whole machine's CPU; ratios against
configuration 1. Server logs (with torch.compile recompilations, TORCH_LOGS=recompiles) are kept
beside the models. Before the load runs, the INT8 accuracy change is measured on the same models
(AUC for the trained tabular and credit models; relative output error otherwise).

    python -m benchmarks.serving --credit-data ../shared/data/taiwan_credit_default --json
    python -m benchmarks.serving --configs eager-fp32-1,fp32-batched,ort-int8-batched,ort-int8-batched-fused

--overload (a separate run): the tabular MoE served with its default 2 s deadline, first at its
capacity (requests of --overload-rows rows each: the answered rate of as many closed-loop clients
as fill the 2,048-row queue bound), then offered open-loop Poisson arrivals at 1x, 2x and 3x that capacity, with
admission control on (the default) and off (`--admission-headroom 0`, the old behaviour), side by
side. Reported per level: the share of 503s and 504s, the p99 latency of the admitted requests
against their deadline, a /healthz probe's p99 (10 probes a second on their own connection), and
the load client's own CPU (cores busy: a saturated client would understate the load).

    nice python -m benchmarks.serving --overload --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import REPO, build_tabular
from benchmarks.serving_models import MODEL_KIND, SequenceMoEClassifier, SequenceMoEConfig, register
from core.trainer import save_checkpoint
from deploy.synthetic import segmented_classification

CONFIGS = {
    "eager-fp32-1": ["--no-batching"],
    "fp32-batched": [],
    "int8-batched": ["--quantize", "int8_dynamic"],
    "int8-batched-fused": ["--quantize", "int8_dynamic", "--fuse"],
    "fp32-batched-fused": ["--fuse"],  # isolates what fusion does without INT8
    # The same model exported to ONNX and run by onnxruntime (quantize_dynamic INT8; --fuse turns on
    # ORT's extended graph fusions: GELU, bias, LayerNorm, MatMul+Add). "ort-" configs export the
    # MoE layers' static path (every expert over every token); "ort-sparse-" configs export the
    # sparse top-k dispatch of core.sparse_export (gather, expert MLP, scatter per expert).
    "ort-int8-batched": ["--quantize", "int8_dynamic"],
    "ort-int8-batched-fused": ["--quantize", "int8_dynamic", "--fuse"],
    "ort-fp32-batched-fused": ["--fuse"],  # isolates what INT8 does on the static graph (RUL: its export)
    # The defect detector's INT8 is the static QDQ file of `moeworks defects export` (an export folder).
    "ort-int8-static-batched": ["--quantize", "int8_static"],
    "ort-sparse-fp32-batched-fused": ["--fuse"],  # isolates what INT8 does on the sparse graph
    "ort-sparse-int8-batched": ["--quantize", "int8_dynamic"],
    "ort-sparse-int8-batched-fused": ["--quantize", "int8_dynamic", "--fuse"],
}
# The ONNX dispatch each ONNX configuration serves.
ONNX_CONFIGS = {"ort-int8-batched": "static", "ort-int8-batched-fused": "static",
                "ort-fp32-batched-fused": "static", "ort-int8-static-batched": "static",
                "ort-sparse-fp32-batched-fused": "sparse", "ort-sparse-int8-batched": "sparse",
                "ort-sparse-int8-batched-fused": "sparse"}
DEFAULT_CONFIGS = "eager-fp32-1,fp32-batched,int8-batched,int8-batched-fused,fp32-batched-fused"


@dataclass
class LoadResult:
    config: str
    requests: int
    errors: int
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    server_cpu_cores: float  # CPU seconds of the server processes per wall second
    cpu_ms_per_request: float  # server CPU time per answered request
    machine_cpu_percent: float  # all cores, all processes (the load generator included)
    startup_s: float


# --- models ------------------------------------------------------------------------------------

def build_sequence(out: Path, seed: int = 0) -> tuple[Path, dict]:
    """A MoE Transformer classifier (2 blocks, 16 experts top-2, width 128, 16 steps); untrained."""
    torch.manual_seed(seed)
    config = SequenceMoEConfig(num_features=8)
    model = SequenceMoEClassifier(config).eval()
    path = save_checkpoint(out / "sequence_moe.pt", model, config=config, extra={"model_kind": MODEL_KIND})
    rng = np.random.default_rng(seed)
    np.savez(out / "sequence_moe.calibration.npz",
             features=rng.standard_normal((512, 16, 8)).astype(np.float32))
    held_out = {"features": torch.from_numpy(rng.standard_normal((2000, 16, 8)).astype(np.float32))}
    return path, {"held_out": held_out, "metric": None, "metric_name": "relative output error"}


def build_credit(out: Path, data: Path, model_dir: Path | None, seed: int = 0) -> tuple[Path, dict]:
    """The credit MoE scorer (finance) on the Taiwan data: trained here unless `model_dir` is given.

    Its INT8 gate is the AUC on the scorer's own validation split (the seeded split it was fitted
    with), FP32 against AWQ INT8 of the MoE network, computed here.
    """
    from sklearn.metrics import roc_auc_score

    from core.quantization import AWQConfig, AWQQuantizer
    from finance.data import load_records
    from finance.models.moe import MoEModelConfig
    from finance.scorer import load_model as load_scorer
    from finance.scorer import split_records, train_scorer

    records = load_records("taiwan", data)
    if model_dir is None:
        scorer = train_scorer(records, "moe", seed=seed, model_config=MoEModelConfig(max_epochs=8))
        model_dir = out / "credit_moe"
        scorer.save(model_dir)
    scorer = load_scorer(model_dir)
    train, valid = split_records(records, seed=scorer.seed)
    x_train = scorer.pipeline_.transform(train.frame).astype(np.float32)
    x_valid = torch.from_numpy(scorer.pipeline_.transform(valid.frame).astype(np.float32))
    np.savez(model_dir.with_suffix(".calibration.npz"), features=x_train[:512])
    module = scorer.model_.module_.eval()
    with torch.inference_mode():
        standardised = module.standardise(torch.from_numpy(x_train[:512]))
        quantizer = AWQQuantizer(AWQConfig(scheme="int8_dynamic")).fit(
            module.net, [(standardised[s:s + 128],) for s in range(0, 512, 128)])
        int8_net = quantizer.transform(module.net)
        z = module.standardise(x_valid)
        fp32, int8 = module.net(z)[0][:, 0].numpy(), int8_net(z)[0][:, 0].numpy()
    base, quant = roc_auc_score(valid.target, fp32), roc_auc_score(valid.target, int8)
    accuracy = {"metric": "AUC (scorer's validation split)", "fp32": float(base), "int8": float(quant),
                "relative_change": float((quant - base) / base),
                "relative_output_error": float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32))}
    return model_dir, {"accuracy": accuracy, "held_out": {"features": x_valid.numpy()},
                       "metric": lambda scores: float(roc_auc_score(valid.target, scores))}


def build_rul(out: Path, model_dir: Path | None = None, seed: int = 0) -> tuple[Path, dict]:
    """The RUL LSTM of manufacturing/maintenance (a `maintenance train` folder), trained here on
    generated engines unless `model_dir` is given; its gate is the RMSE on generated held-out engines."""
    from manufacturing.maintenance.generator import generate_cmapss
    from manufacturing.maintenance.quick import train_quick_rul_model
    from manufacturing.maintenance.rul import RULEstimator
    from manufacturing.maintenance.windows import build_windows

    if model_dir is None:
        model_dir = out / "rul_lstm"
        train_quick_rul_model(model_dir, kind="lstm", num_units=60, max_epochs=8, seed=seed)
    estimator = RULEstimator.load(model_dir)
    test = generate_cmapss(40, num_regimes=estimator.features.num_regimes, seed=seed + 11)
    windows = build_windows(estimator.normalizer_.transform(test), test["unit"].to_numpy(), window=estimator.net.window)
    cycles_left = (test.groupby("unit")["cycle"].transform("max") - test["cycle"]).to_numpy()[windows.cycle_row]
    truth = np.minimum(cycles_left, estimator.net.rul_cap)
    held = windows.gather(np.arange(0, len(windows), 7))
    truth = truth[np.arange(0, len(windows), 7)]

    def rmse(predicted):
        return float(np.sqrt(np.mean((np.asarray(predicted) - truth) ** 2)))

    accuracy = {"metric": "RMSE (cycles, generated held-out engines)", "fp32": rmse(estimator.predict_windows(held)),
                "note": "INT8 runs through the ONNX export: see onnx_accuracy"}
    return model_dir, {"accuracy": accuracy, "held_out": {"window": held.numpy()}, "metric": rmse}


def build_defects(out: Path, run_dir: Path | None = None, seed: int = 0) -> tuple[Path, dict]:
    """The YOLO defect detector of manufacturing/defects (a `defects train` run folder, YOLO alone),
    trained here briefly on generated surfaces at 160 px unless `run_dir` is given."""
    from manufacturing.defects.synthetic import SyntheticConfig, write_synthetic_voc
    from manufacturing.defects.train import DetectorConfig
    from manufacturing.defects.workflow import TrainJob, train_job

    voc = write_synthetic_voc(out / "defects_voc", SyntheticConfig(images=48, size=160, seed=seed))
    if run_dir is None:
        run_dir = out / "defects_run"
        train_job(voc, run_dir, TrainJob(detector=DetectorConfig(imgsz=160, epochs=3, batch=8, workers=0),
                                         train_moe=False), verbose=False)
    return run_dir, {"voc": voc}


def export_for_serving(path: Path, dispatch: str = "static", voc: Path | None = None) -> Path:
    """The served model as ONNX beside it, MoE layers exported with `dispatch` (static or sparse),
    carrying the same version. RUL and defects models go through their verticals' exports
    (`voc`: the images that calibrate the detector's static INT8)."""
    import onnx

    from core.onnx_export import export_onnx
    from deploy.serving.families.credit import CreditAdapter
    from deploy.serving.registry import REGISTRY

    if (path / "model.json").is_file():  # a RUL folder: the vertical's own export (its LSTM has no MoE)
        from manufacturing.maintenance.export import export_model_folder

        (exported,) = export_model_folder(path, path.parent / f"{path.name}_export")
        return Path(exported)
    if (path / "detector.pt").is_file():  # a defects run: the vertical's export, FP32 and static INT8
        from manufacturing.defects.workflow import export_job

        export_job(path / "detector.pt", path.parent / f"{path.name}_export", voc, int8=True)
        return path.parent / f"{path.name}_export"
    adapter = REGISTRY.from_path(path)
    stem = path.stem if path.is_file() else path.name
    target = path.parent / f"{stem}{'.sparse' if dispatch == 'sparse' else ''}.onnx"
    if isinstance(adapter, CreditAdapter):
        example = torch.zeros(4, len(adapter.scorer.pipeline_.feature_names_))
        export_onnx(adapter.scorer.model_.probability_module(), (example,), target, input_names=["features"],
                    output_names=["probability"], moe_dispatch=dispatch)
        extra = {"nan_means_missing": "features"}
    else:
        example = adapter.example(4, seed=0)
        export_onnx(adapter.model, tuple(torch.from_numpy(example[f.name]) for f in adapter.fields), target,
                    input_names=[f.name for f in adapter.fields], output_names=["logits", "aux"],
                    moe_dispatch=dispatch)
        extra = {}
        if any(f.high for f in adapter.fields):
            extra["config"] = json.dumps({"categorical_cardinalities": list(adapter.fields[-1].high)})
    proto = onnx.load(str(target))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({"version": adapter.version, "name": adapter.name, **extra})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))
    return target


def accuracy_gate(path: Path, calibration: Path, spec: dict) -> dict:
    """FP32 vs AWQ INT8 (the server's recipe, in process) on held-out rows."""
    from deploy.serving.optimise import awq_int8, torch_batches
    from deploy.serving.registry import REGISTRY

    model = REGISTRY.from_path(path).model
    with np.load(calibration) as data:
        arrays = {k: data[k][:512] for k in data.files}
    quantized = awq_int8(model, torch_batches(arrays), scheme="int8_dynamic")
    with torch.inference_mode():
        fp32 = model(**spec["held_out"])[0].squeeze(-1).numpy()
        int8 = quantized(**spec["held_out"])[0].squeeze(-1).numpy()
    result = {"relative_output_error": float(np.linalg.norm(int8 - fp32) / np.linalg.norm(fp32))}
    if spec["metric"] is not None:
        base, quant = spec["metric"](fp32), spec["metric"](int8)
        result.update({"fp32": base, "int8": quant, "relative_change": (quant - base) / base})
    return result


def onnx_accuracy_gate(onnx_path: Path, spec: dict) -> dict:
    """FP32 vs onnxruntime dynamic INT8 (the server's ONNX recipe) of one exported file on held-out rows."""
    from deploy.serving.base import AdapterOptions
    from deploy.serving.families.onnx import OnnxAdapter

    rows = {name: np.asarray(value) for name, value in spec["held_out"].items()}
    work = Path(tempfile.mkdtemp(prefix="moeworks-onnx-gate-"))
    fp32 = OnnxAdapter.from_path(onnx_path)
    int8 = OnnxAdapter.from_path(onnx_path, AdapterOptions(quantize="int8_dynamic"), work_dir=work)
    first = fp32.outputs[0]
    base, quant = fp32.predict(rows)[first].reshape(len(next(iter(rows.values()))), -1)[:, 0], \
        int8.predict(rows)[first].reshape(len(next(iter(rows.values()))), -1)[:, 0]
    result = {"output": first, "relative_output_error": float(np.linalg.norm(quant - base) / np.linalg.norm(base))}
    if spec.get("metric") is not None:
        b, q = spec["metric"](base), spec["metric"](quant)
        result.update({"fp32": b, "int8": q, "relative_change": (q - b) / b})
    return result


def request_bodies(path: Path, count: int = 256, seed: int = 0) -> list[bytes]:
    """`count` distinct one-row JSON requests that fit the model's inputs."""
    from deploy.serving.families.credit import CreditAdapter
    from deploy.serving.families.defects import encode_image
    from deploy.serving.registry import REGISTRY

    adapter = REGISTRY.from_path(path)
    rows = adapter.example(count, seed=seed)
    if isinstance(adapter, CreditAdapter):  # a credit scorer: raw applications within the field rules
        return [json.dumps({"instances": [{k: v[i].item() if hasattr(v[i], "item") else v[i]
                                           for k, v in rows.items()}]}).encode() for i in range(count)]

    def value(array: np.ndarray):
        return encode_image(array) if array.dtype == np.uint8 and array.ndim == 3 else array.tolist()

    return [json.dumps({"instances": [{k: value(v[i]) for k, v in rows.items()}]}).encode() for i in range(count)]


# --- the load generator ------------------------------------------------------------------------

async def _client(port: int, bodies: list[bytes], stop_at: float, latencies: list[float], errors: list[int],
                  rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            body = bodies[rng.randrange(len(bodies))]
            head = (f"POST /v1/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            started = time.perf_counter()
            writer.write(head + body)
            header = await reader.readuntil(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(status)
    finally:
        writer.close()


async def _load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[float], list[int], float]:
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, bodies, started + seconds, latencies, errors, random.Random(i))
                           for i in range(clients)))
    return latencies, errors, time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """One `moeworks serve` process for one configuration, on its own port, logging to a file."""

    def __init__(self, name: str, path: Path, calibration: Path, extra: list[str], *, threads: int) -> None:
        self.name, self.port = name, _free_port()
        # `moeworks serve` with the benchmark's sequence family registered (benchmarks/serving_models.py)
        command = [sys.executable, "-m", "benchmarks.serving_models", "serve", "--model", str(path), "--port",
                   str(self.port), "--threads", str(threads), *extra]
        if "--quantize" in extra:
            command += ["--calibration", str(calibration)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_COMPILE_THREADS": "1",
               "TORCH_LOGS": "recompiles"}
        self.log_path = path.parent / f"{path.stem}.{name}.log"
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.startup_s = float("nan")

    def wait_ready(self, timeout_s: float = 900) -> None:
        import httpx

        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    self.startup_s = time.perf_counter() - self.started
                    return
            except httpx.TransportError:
                pass
            if time.perf_counter() - self.started > timeout_s:
                raise RuntimeError(f"{self.name}: server not ready after {timeout_s} s")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        return _server_cpu_seconds(psutil.Process(self.process.pid))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(servers: list[Server], bodies: list[bytes], *, clients: int, seconds: float,
            rounds: int) -> list[LoadResult]:
    """Load each server in turn, `rounds` times, `seconds / rounds` each: slow drifts in the
    machine's other load then fall on every configuration alike."""
    slice_s = seconds / rounds
    latencies: dict[str, list[float]] = {s.name: [] for s in servers}
    errors = dict.fromkeys(latencies, 0)
    wall = dict.fromkeys(latencies, 0.0)
    cpu = dict.fromkeys(latencies, 0.0)
    machine: dict[str, list[float]] = {s.name: [] for s in servers}
    for server in servers:  # warm the connection paths and the allocator
        asyncio.run(_load(server.port, bodies, clients, min(2.0, slice_s)))
    for _ in range(rounds):
        for server in servers:
            cpu_before = server.cpu_seconds()
            psutil.cpu_percent(None)
            got, failed, elapsed = asyncio.run(_load(server.port, bodies, clients, slice_s))
            machine[server.name].append(psutil.cpu_percent(None))
            cpu[server.name] += server.cpu_seconds() - cpu_before
            latencies[server.name] += got
            errors[server.name] += len(failed)
            wall[server.name] += elapsed
    results = []
    for server in servers:
        name = server.name
        ms = np.asarray(latencies[name]) * 1000 if latencies[name] else np.asarray([np.nan])
        answered = len(latencies[name])
        results.append(LoadResult(name, answered, errors[name], wall[name], answered / wall[name],
                                  float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                                  cpu[name] / wall[name], 1000 * cpu[name] / max(1, answered),
                                  float(np.mean(machine[name])), server.startup_s))
    return results


# --- overload: admission control at 1x, 2x, 3x capacity ------------------------------------------

async def _request(pool: list, port: int, method: str, path: str, body: bytes = b"") -> tuple[int, float]:
    """One HTTP/1.1 request on an idle pooled connection (a new one when none is idle)."""
    reader, writer = pool.pop() if pool else await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {len(body)}\r\n\r\n"
    started = time.perf_counter()
    writer.write(head.encode() + body)
    header = await reader.readuntil(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    seconds = time.perf_counter() - started
    pool.append((reader, writer))
    return status, seconds


async def _closed_loop(port: int, bodies: list[bytes], clients: int, seconds: float) -> float:
    """Answered requests per second with `clients` closed-loop clients (the capacity)."""
    answered = 0
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal answered
        pool: list = []
        while time.perf_counter() < stop_at:
            status, _ = await _request(pool, port, "POST", "/v1/predict", bodies[i % len(bodies)])
            answered += status == 200
            i += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return answered / (time.perf_counter() - started)


async def _open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at `rate` per second for `seconds`, each on an idle or new connection, and
    a /healthz probe every 0.1 s on its own connection. Returns statuses, latencies, probe times."""
    rng = random.Random(seed)
    pool: list = []
    results: list[tuple[int, float]] = []
    probes: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def one(body: bytes) -> None:
        try:
            results.append(await _request(pool, port, "POST", "/v1/predict", body))
        except (OSError, asyncio.IncompleteReadError):
            results.append((0, float("nan")))

    async def prober() -> None:
        probe_pool: list = []
        while time.perf_counter() < stop_at:
            try:
                status, took = await asyncio.wait_for(_request(probe_pool, port, "GET", "/healthz"), 10)
                probes.append(took if status == 200 else float("inf"))
            except (TimeoutError, OSError):
                probes.append(float("inf"))
                probe_pool.clear()
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(prober())]
    process = psutil.Process()
    cpu_before, wall_before = sum(process.cpu_times()[:2]), time.perf_counter()
    next_at = time.perf_counter()
    while next_at < stop_at:
        next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(bodies[rng.randrange(len(bodies))])))
    await asyncio.gather(*tasks)
    client_cores = (sum(process.cpu_times()[:2]) - cpu_before) / (time.perf_counter() - wall_before)
    for _, writer in pool:
        writer.close()
    return {"results": results, "probes": probes, "client_cores": client_cores}


def _summarise(level: float, rate: float, run: dict, deadline_s: float) -> dict:
    statuses = np.array([s for s, _ in run["results"]])
    seconds = np.array([t for _, t in run["results"]])
    admitted = seconds[(statuses == 200) | (statuses == 504)]  # answered after being queued
    ok = seconds[statuses == 200]
    probes = np.array(run["probes"])
    return {"load": level, "offered_per_s": rate, "requests": int(len(statuses)),
            "share_503": float(np.mean(statuses == 503)), "share_504": float(np.mean(statuses == 504)),
            "other_errors": int(np.sum(~np.isin(statuses, (200, 503, 504)))),
            "answered_per_s": float(len(ok) / max(1e-9, run.get("seconds", 1.0))),
            "admitted_p50_s": float(np.percentile(admitted, 50)) if len(admitted) else float("nan"),
            "admitted_p99_s": float(np.percentile(admitted, 99)) if len(admitted) else float("nan"),
            "deadline_s": deadline_s,
            "healthz_p99_ms": float(np.percentile(probes, 99) * 1000) if len(probes) else float("nan"),
            "healthz_max_ms": float(probes.max() * 1000) if len(probes) else float("nan"),
            "client_cores": run["client_cores"]}


def overload(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json, width=170)
    work = Path(tempfile.mkdtemp(prefix="moeworks-overload-"))
    with console.status("building the tabular MoE"):
        path, _ = build_tabular(work)
    rng = np.random.default_rng(0)
    numeric, segment, _ = segmented_classification(args.overload_rows * 16, seed=1)
    bodies = [json.dumps({"instances": [{"numeric": numeric[j].tolist(), "categorical": [int(segment[j])]}
                                        for j in range(i * args.overload_rows, (i + 1) * args.overload_rows)]}).encode()
              for i in range(16)]
    rng.shuffle(bodies)
    deadline_s = 2.0
    variants = {"admission": [], "no-admission": ["--admission-headroom", "0"]}
    results: dict = {"machine": machine(), "load_average_at_start": os.getloadavg(), "rows_per_request":
                     args.overload_rows, "seconds_per_level": args.overload_seconds, "deadline_s": deadline_s,
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "variants": {}}
    for name, extra in variants.items():
        server = Server(name, path, path.with_suffix(".calibration.npz"), ["--max-wait-ms", "4", *extra],
                        threads=args.threads)
        try:
            server.wait_ready()
            with console.status(f"{name}: capacity"):
                asyncio.run(_closed_loop(server.port, bodies, 2, 2.0))  # warm the paths
                # As many closed-loop clients as fill the queue bound (2048 rows) without a 503: saturated.
                capacity = asyncio.run(_closed_loop(server.port, bodies, max(1, 2048 // args.overload_rows),
                                                    args.overload_seconds))
            levels = []
            for level in (1.0, 2.0, 3.0):
                with console.status(f"{name}: {level:.0f}x capacity ({capacity * level:.1f} requests/s)"):
                    run = asyncio.run(_open_loop(server.port, bodies, capacity * level, args.overload_seconds,
                                                 seed=int(level)))
                    run["seconds"] = args.overload_seconds
                    levels.append(_summarise(level, capacity * level, run, deadline_s))
                    time.sleep(deadline_s)  # let the backlog drain between levels
        finally:
            server.stop()
        results["variants"][name] = {"capacity_per_s": capacity, "levels": levels}
    results["load_average_at_end"] = os.getloadavg()
    table = Table(title=f"overload: {args.overload_rows}-row requests, {deadline_s:.0f} s deadline, "
                        f"{args.overload_seconds:.0f} s per level ({describe(results['machine'])})")
    for column in ("variant", "capacity req/s", "load", "offered req/s", "503 share", "504 share", "answered req/s",
                   "admitted p50 s", "admitted p99 s", "p99 <= deadline", "/healthz p99 ms", "/healthz max ms",
                   "client cores"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, entry in results["variants"].items():
        for r in entry["levels"]:
            table.add_row(name, f"{entry['capacity_per_s']:.1f}", f"{r['load']:.0f}x", f"{r['offered_per_s']:.1f}",
                          f"{r['share_503']:.0%}", f"{r['share_504']:.0%}", f"{r['answered_per_s']:.1f}",
                          f"{r['admitted_p50_s']:.2f}", f"{r['admitted_p99_s']:.2f}",
                          "yes" if r["admitted_p99_s"] <= deadline_s else "no", f"{r['healthz_p99_ms']:.1f}",
                          f"{r['healthz_max_ms']:.1f}", f"{r['client_cores']:.2f}")
    console.print(table)
    write_results(results, args.out.with_name("serving_overload.json"), as_json=args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tabular,sequence",
                        help="comma list: tabular, sequence, rul (maintenance LSTM), defects (YOLO detector)")
    parser.add_argument("--rul-model", type=Path, default=None, help="a `maintenance train` folder to serve as rul")
    parser.add_argument("--defects-model", type=Path, default=None,
                        help="a `defects train` run folder to serve as defects (trained briefly here otherwise)")
    parser.add_argument("--credit-data", type=Path, default=None,
                        help="Taiwan credit data folder: adds the credit MoE scorer (finance) to the run")
    parser.add_argument("--credit-model", type=Path, default=None,
                        help="a saved credit MoE scorer folder to serve instead of training one")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="another saved model to serve (needs --calibration-file alongside)")
    parser.add_argument("--calibration-file", type=Path, action="append", default=[])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured load per configuration")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the seconds are split into")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the server")
    add_output_arguments(parser, REPO / "runs" / "bench" / "serving.json")
    parser.add_argument("--overload", action="store_true",
                        help="admission control at 1x, 2x, 3x capacity instead of the configurations")
    parser.add_argument("--overload-rows", type=int, default=256, help="--overload: rows per request")
    parser.add_argument("--overload-seconds", type=float, default=15.0, help="--overload: seconds per load level")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register()  # the sequence model is served (and loaded here for its gates) as a family of its own
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the `finally`s: stop the servers
    if args.overload:
        overload(args)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=args.json, width=170)  # the table is wide; logs are not terminals
    work = Path(tempfile.mkdtemp(prefix="moeworks-serving-"))
    builders = {"tabular": build_tabular, "sequence": build_sequence,
                "rul": lambda out: build_rul(out, args.rul_model),
                "defects": lambda out: build_defects(out, args.defects_model)}
    models: list[tuple[str, Path, Path, dict | None]] = []
    for key in filter(None, args.models.split(",")):
        with console.status(f"building {key} model"):
            path, spec = builders[key](work)
        models.append((key, path, path.with_suffix(".calibration.npz"), spec))
    if args.credit_data is not None:
        with console.status("credit: loading the Taiwan data, training/loading the MoE scorer, INT8 AUC gate"):
            path, spec = build_credit(work, args.credit_data, args.credit_model)
        models.append(("credit", path, path.with_suffix(".calibration.npz"), spec))
    if len(args.checkpoint) != len(args.calibration_file):
        parser.error("one --calibration-file per --checkpoint")
    for path, calibration in zip(args.checkpoint, args.calibration_file, strict=True):
        models.append((path.stem, path, calibration, None))

    results: dict = {"machine": machine(), "load_average_at_start": os.getloadavg(),
                     "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds,
                     "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "models": {}}
    for key, path, calibration, spec in models:
        entry: dict = {"configs": {}}
        if spec is not None and "accuracy" in spec:
            entry["accuracy"] = spec["accuracy"]
        elif spec is not None and "metric_name" in spec:
            with console.status(f"{key}: INT8 accuracy"):
                entry["accuracy"] = accuracy_gate(path, calibration, spec)
                entry["accuracy"]["metric"] = spec["metric_name"]
        bodies = request_bodies(path)
        names = list(filter(None, args.configs.split(",")))
        onnx_paths: dict[str, Path] = {}
        for dispatch in sorted({ONNX_CONFIGS[n] for n in names if n in ONNX_CONFIGS}):
            with console.status(f"{key}: exporting to ONNX ({dispatch} MoE dispatch)"):
                onnx_paths[dispatch] = export_for_serving(path, dispatch, (spec or {}).get("voc"))
            export_record = onnx_paths[dispatch] / "export.json"
            if export_record.is_file():  # the detector's export: parity of FP32 and INT8 ONNX against PyTorch
                record = json.loads(export_record.read_text())
                entry.setdefault("onnx_accuracy", {})[dispatch] = {
                    "metric": "max |PyTorch - onnxruntime| on generated images", "fp32": record["parity"],
                    "int8_static": record.get("int8_difference")}
            if spec is not None and "held_out" in spec:
                with console.status(f"{key}: onnxruntime INT8 accuracy ({dispatch})"):
                    entry.setdefault("onnx_accuracy", {})[dispatch] = onnx_accuracy_gate(onnx_paths[dispatch], spec)
        servers: list[Server] = []
        try:
            for name in names:  # one at a time: concurrent start-ups (compiling) would starve each other
                with console.status(f"{key}: starting {name}"):
                    served = onnx_paths[ONNX_CONFIGS[name]] if name in ONNX_CONFIGS else path
                    servers.append(Server(name, served, calibration, CONFIGS[name], threads=args.threads))
                    servers[-1].wait_ready()
            with console.status(f"{key}: {args.clients} clients, {len(servers)} configs x {args.rounds} rounds"):
                measured = measure(servers, bodies, clients=args.clients, seconds=args.seconds, rounds=args.rounds)
        finally:
            for server in servers:
                server.stop()
        for result in measured:
            entry["configs"][result.config] = asdict(result)
        results["models"][key] = entry

        table = Table(title=f"{key}: {args.clients} clients x {args.seconds:.0f} s on loopback "
                            f"({describe(results['machine'])})")
        for column in ("config", "QPS", "x QPS", "p50 ms", "p99 ms", "p99 / base", "server cores",
                       "CPU ms/req", "req/s per core", "x per core", "machine CPU %", "errors", "start s"):
            table.add_column(column, justify="left" if column == "config" else "right")
        base = entry["configs"].get("eager-fp32-1")
        for name, r in entry["configs"].items():
            qps_ratio = f"{r['qps'] / base['qps']:.2f}" if base else "-"
            p99_ratio = f"{base['p99_ms'] / r['p99_ms']:.2f}x lower" if base else "-"
            table.add_row(name, f"{r['qps']:.0f}", qps_ratio, f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", p99_ratio,
                          f"{r['server_cpu_cores']:.2f}", f"{r['cpu_ms_per_request']:.2f}",
                          f"{1000 / r['cpu_ms_per_request']:.0f}",
                          f"{base['cpu_ms_per_request'] / r['cpu_ms_per_request']:.2f}" if base else "-",
                          f"{r['machine_cpu_percent']:.0f}", str(r["errors"]),
                          f"{r['startup_s']:.0f}")
        console.print(table)
        if "accuracy" in entry:
            console.print(f"{key} INT8 accuracy: {json.dumps(entry['accuracy'])}")
        for dispatch, gate in entry.get("onnx_accuracy", {}).items():
            console.print(f"{key} onnxruntime INT8 accuracy ({dispatch} export): {json.dumps(gate)}")

    results["load_average_at_end"] = os.getloadavg()
    console.print(f"results: {args.out}")
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
