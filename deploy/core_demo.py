"""The engine's part of `moeworks demo`: train a small tabular MoE on generated segmented data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from core import MoEConfig
from core.blocks import TabularMoE, TabularMoEConfig
from core.trainer import Trainer, TrainerConfig, data_fingerprint, load_checkpoint, save_checkpoint
from deploy.synthetic import segmented_classification


def _batches(numeric, segment, label, batch_size, seed):
    def epoch_batches(epoch: int):
        order = np.random.default_rng(seed + epoch).permutation(len(label))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield numeric[idx], segment[idx], label[idx]
    return epoch_batches


def run_core_demo(out_dir: Path, *, rows: int = 20_000, epochs: int = 8, seed: int = 0,
                  console: Console | None = None) -> dict[str, float]:
    console = console or Console()
    console.rule("[bold]core: MoE engine on generated segmented data")
    numeric, segment, label = segmented_classification(rows, seed=seed)
    split = int(0.8 * rows)
    t_num, t_seg, t_y = (torch.from_numpy(a[:split]) for a in (numeric, segment, label))
    v_num, v_seg, v_y = (torch.from_numpy(a[split:]) for a in (numeric, segment, label))
    config = TabularMoEConfig(
        num_numeric=numeric.shape[1], categorical_cardinalities=[4],
        moe=MoEConfig(num_experts=16, top_k=2, hidden_size=32, intermediate_size=64))
    torch.manual_seed(seed)
    model = TabularMoE(config)

    def loss_fn(m, batch):
        logits, aux = m(batch[0], batch[1][:, None])
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), batch[2]) + aux

    def evaluate(m):
        logits, _ = m(v_num, v_seg[:, None])
        return {"val_loss": F.binary_cross_entropy_with_logits(logits.squeeze(-1), v_y).item(),
                "val_auc": roc_auc_score(v_y.numpy(), logits.squeeze(-1).numpy())}

    batch_size = 256
    trainer = Trainer(TrainerConfig(learning_rate=3e-3, grad_accumulation=1, max_epochs=epochs,
                                    monitor="val_auc", mode="max", seed=seed))
    result = trainer.fit(model, _batches(t_num, t_seg, t_y, batch_size, seed),
                         steps_per_epoch=-(-split // batch_size), loss_fn=loss_fn, evaluate_fn=evaluate)
    checkpoint = save_checkpoint(out_dir / "core_demo_moe.pt", model, config=config,
                                 metrics=result.best_metrics,
                                 data_fingerprint=data_fingerprint(numeric, segment, label))
    reloaded, _ = load_checkpoint(checkpoint, lambda c: TabularMoE(TabularMoEConfig(**c)))
    with torch.no_grad():
        same = torch.equal(reloaded(v_num, v_seg[:, None])[0], model(v_num, v_seg[:, None])[0])
        load = model.layers[0](model.norms[0](model.input(torch.cat(
            [v_num, model.embeddings[0](v_seg)], dim=-1)))).expert_load
    baseline = LogisticRegression(max_iter=1000).fit(
        np.column_stack([numeric[:split], np.eye(4)[segment[:split]]]), label[:split])
    baseline_auc = roc_auc_score(label[split:], baseline.predict_proba(
        np.column_stack([numeric[split:], np.eye(4)[segment[split:]]]))[:, 1])

    table = Table(title="Tabular MoE (16 experts, top-2) vs logistic regression, generated data")
    table.add_column("model")
    table.add_column("validation AUC", justify="right")
    table.add_row("logistic regression", f"{baseline_auc:.4f}")
    table.add_row(f"MoE (best of {result.epochs_run} epochs: {result.best_epoch})",
                  f"{result.best_metrics['val_auc']:.4f}")
    console.print(table)
    busiest = load.float() / load.sum()
    console.print(f"training took {result.seconds:.1f} s on {rows:,} generated rows; "
                  f"layer-1 expert load: max {busiest.max():.1%}, min {busiest.min():.1%} of assignments")
    console.print(f"checkpoint: {checkpoint} (reloads to identical scores: {same})")
    return {"moe_auc": result.best_metrics["val_auc"], "logistic_auc": float(baseline_auc),
            "seconds": result.seconds}
