"""The serving part of `moeworks demo`: INT8 the demo model, then serve a burst through the batcher."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from sklearn.metrics import roc_auc_score

from core.quantization import AWQConfig, AWQQuantizer
from deploy.serving.batcher import BatcherConfig, DynamicBatcher, QueueFull
from deploy.serving.families.tabular import TorchAdapter
from deploy.synthetic import segmented_classification


def run_serving_demo(checkpoint: Path, *, rows: int, seed: int = 0, requests: int = 400,
                     console: Console | None = None) -> dict[str, float]:
    """`checkpoint` is the core demo's model, trained on `segmented_classification(rows, seed)`
    (first 80% of rows); its last 20% are the held-out rows used here. All data is generated."""
    console = console or Console()
    console.rule("[bold]serving: AWQ INT8 and dynamic batching on the demo model (generated data)")
    numeric, segment, label = segmented_classification(rows, seed=seed)
    split = int(0.8 * rows)
    adapter = TorchAdapter.from_path(checkpoint)
    held_out = {"numeric": torch.from_numpy(numeric[split:]), "categorical": torch.from_numpy(segment[split:, None])}
    calibration = [{"numeric": torch.from_numpy(numeric[s:s + 256]),
                    "categorical": torch.from_numpy(segment[s:s + 256, None])} for s in range(0, 1024, 256)]
    quantizer = AWQQuantizer(AWQConfig()).fit(adapter.model, calibration)
    int8 = quantizer.transform(adapter.model)
    with torch.inference_mode():
        auc_fp32 = roc_auc_score(label[split:], adapter.model(**held_out)[0].squeeze(-1).numpy())
        auc_int8 = roc_auc_score(label[split:], int8(**held_out)[0].squeeze(-1).numpy())
    alphas = np.array([r["alpha"] for r in quantizer.report()])
    console.print(f"AWQ searched {len(alphas)} layers (median alpha {np.median(alphas):.2f}); validation AUC "
                  f"fp32 {auc_fp32:.4f} -> int8 {auc_int8:.4f} ({(auc_int8 - auc_fp32) / auc_fp32:+.3%} relative)")

    sizes: list[int] = []
    batcher = DynamicBatcher(adapter.run_batch, config=BatcherConfig(max_wait_s=0.002),
                             on_batch=lambda report: sizes.append(report.rows))
    instances = [{"numeric": numeric[split + i:split + i + 1], "categorical": segment[split + i:split + i + 1, None]}
                 for i in range(requests)]
    refusals = 0

    def ask(instance):
        # a well-behaved client: a refusal (full queue, or admission control's "not before your deadline",
        # likelier on a busy machine) is retried after the wait the batcher suggests, as HTTP clients do
        # with 503 + Retry-After
        nonlocal refusals
        while True:
            try:
                return batcher.submit(instance).result(timeout=30)
            except QueueFull as refused:
                refusals += 1
                time.sleep(min(refused.retry_after_s, 0.25))

    started = time.perf_counter()
    with batcher, ThreadPoolExecutor(32) as clients:
        answers = list(clients.map(ask, instances))
    seconds = time.perf_counter() - started
    direct = adapter.predict({"numeric": numeric[split:split + requests],
                              "categorical": segment[split:split + requests, None]})["logits"]
    same = np.allclose(np.concatenate([a["logits"] for a in answers]), direct, atol=1e-5)
    console.print(f"{requests} concurrent one-row requests in {seconds:.2f} s through {len(sizes)} forward passes "
                  f"(mean {np.mean(sizes):.1f} rows, max {max(sizes)}; {refusals} refusals retried); each got its own "
                  f"row's answer: {same}. "
                  f"Serve it over HTTP with `moeworks serve --model {checkpoint}`.")
    return {"auc_fp32": float(auc_fp32), "auc_int8": float(auc_int8), "forward_passes": len(sizes)}
