"""What several benchmark scripts build or load the same way: where the real data lives, the credit
datasets' folders, the tabular MoE served and quantized, the detector timings on NEU-DET images,
and the MQTT load every twin benchmark offers. Scripts import from here and from `common`, never
from each other."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The real datasets (PROVENANCE.md in each): MOEWORKS_DATA, else the shared folder beside the checkout.
DATA_ROOT = Path(os.environ.get("MOEWORKS_DATA", REPO.parent / "shared" / "data"))
# Credit datasets by name, and their folders under DATA_ROOT.
CREDIT_FOLDERS = {"taiwan": "taiwan_credit_default", "gmsc": "give_me_some_credit"}


def add_data_argument(parser: argparse.ArgumentParser, *, under: str = "", what: str = "real-data root") -> None:
    """`--data`: the real-data root (or one dataset's folder `under` it), the same default everywhere."""
    parser.add_argument("--data", type=Path, default=DATA_ROOT / under if under else DATA_ROOT,
                        help=f"{what} (default: {'$MOEWORKS_DATA or ../shared/data'}{'/' + under if under else ''})")


def add_mqtt_load_arguments(parser: argparse.ArgumentParser, *, nodes_help: str | None = None) -> None:
    """The load the twin benchmarks offer their broker: a measured window after a warm-up, devices
    spread over edge nodes, publisher processes."""
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=50, help=nodes_help)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")


def fit_tabular(model, x, c, y, *, rows: int, epochs: int, batch: int) -> None:
    """Train a TabularMoE in place on the first `rows` rows, in order: binary cross-entropy plus the router's
    auxiliary loss, AdamW at lr 3e-3. x (N, num_numeric) float, c (N, 1) long, y (N,) float in {0, 1}."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for start in range(0, rows, batch):
            logits, aux = model(x[start:start + batch], c[start:start + batch])
            loss = F.binary_cross_entropy_with_logits(logits.squeeze(-1), y[start:start + batch]) + aux
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def build_tabular(out: Path, seed: int = 0) -> tuple[Path, dict]:
    """Train a TabularMoE (16 experts, top-2) on generated segmented data; returns checkpoint + AUCs
    (what benchmarks.serving serves and benchmarks.quantization quantizes)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from core import MoEConfig
    from core.blocks import TabularMoE, TabularMoEConfig
    from core.trainer import save_checkpoint
    from deploy.synthetic import segmented_classification

    numeric, segment, label = segmented_classification(24_000, seed=seed)
    x, c, y = torch.from_numpy(numeric), torch.from_numpy(segment)[:, None], torch.from_numpy(label)
    config = TabularMoEConfig(num_numeric=numeric.shape[1], categorical_cardinalities=[4], moe=MoEConfig(
        num_experts=16, top_k=2, hidden_size=64, intermediate_size=128))
    torch.manual_seed(seed)
    model = TabularMoE(config)
    fit_tabular(model, x, c, y, rows=20_000, epochs=4, batch=256)
    model.eval()
    path = save_checkpoint(out / "tabular_moe.pt", model, config=config, extra={"model_kind": "tabular_moe"})
    np.savez(out / "tabular_moe.calibration.npz", numeric=numeric[:512], categorical=segment[:512, None])
    held_out = {"numeric": x[20_000:], "categorical": c[20_000:]}
    return path, {"held_out": held_out, "labels": label[20_000:],
                  "metric": lambda scores: float(roc_auc_score(label[20_000:], scores)), "metric_name": "AUC"}


def detector_latency_ms(detector, images, repeats: int) -> float:
    """Median wall time of one image through a detector's network alone (`raw`: batch 1, its
    preprocessing untimed, which is why this is not `common.time_calls`); any object with `raw(batch)`
    and `imgsz` (YoloDetector, the ONNX sessions of benchmarks.defects_int8)."""
    from manufacturing.defects.detector import to_input

    times = []
    for i in range(repeats):
        batch, _ = to_input([images[i % len(images)]], detector.imgsz)
        started = time.perf_counter()
        detector.raw(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[2:] if len(times) > 4 else times)  # first calls warm caches


def detector_throughput(detector, images, batch_size: int, rounds: int) -> float:
    """Images per second through a detector's network at `batch_size` (preprocessed batches; median of rounds)."""
    from manufacturing.defects.detector import to_input

    from .common import time_calls

    batches = [to_input(images[s:s + batch_size], detector.imgsz)[0]
               for s in range(0, len(images) - batch_size + 1, batch_size)]
    detector.raw(batches[0])  # warm-up: the first call of a shape allocates
    timing = time_calls(lambda _: [detector.raw(batch) for batch in batches], repeats=rounds)
    return statistics.median(len(batches) * batch_size / seconds for seconds in timing.samples_s)
