"""Benchmark: the sequence Transformer, the credit issue's LightGBM and their blend on Taiwan's
six-month histories, side by side (same splits, same feature pipeline, same evaluation).

Protocol (as benchmarks/credit.py): per seed, a stratified 80/20 split of the Taiwan file (the 20%
test part is never seen in training), and inside the 80% a further 80/20 train/validation split.
LightGBM reads the 214 pipeline features; the sequence model the six monthly tokens and the static
fields; `sequence-ensemble` blends the two fitted models' log-odds with a logistic regression on the
validation split. Test AUC, KS, recall at 80% approval, and scoring speed (one application end to
end, with reason codes; batch rows/s).

    python -m benchmarks.credit_sequence --data ../shared/data [--seeds 0 --seeds 1] [--json]

Training and timing can run apart: with `--models DIR` the fitted scorers are saved under DIR, and a
second run with the same DIR loads them and only evaluates and times, so that run alone can hold the
shared benchmark lock (`flock /tmp/moeworks-bench.lock python -m benchmarks.credit_sequence ...`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import add_data_argument
from finance.data import load_taiwan
from finance.evaluation import credit_metrics, scoring_speed
from finance.models import FitData
from finance.scorer import CreditScorer, split_records
from finance.sequence.credit_model import SequenceEnsembleModel

MODELS = ("lightgbm", "sequence", "sequence-ensemble")


def use_attribution(scorer: CreditScorer, attribution: str | None) -> None:
    """Set the reason-code attribution of the scorer's sequence model(s), e.g. on loaded scorers."""
    if attribution is None:
        return
    for model in [scorer.model_, *getattr(scorer.model_, "members_", [])]:
        if hasattr(model, "classifier_"):
            model.classifier_.attribution = attribution


def one_split(records, seed: int, console: Console, models: Path | None = None,
              attribution: str | None = None) -> dict[str, dict[str, float]]:
    dataset = records.dataset
    fit_part, test = split_records(records, valid_share=0.2, seed=seed)
    train, valid = split_records(fit_part, valid_share=0.2, seed=seed)
    saved = None if models is None else models / f"{dataset}-seed{seed}"
    if saved is not None and all((saved / name / "scorer.json").is_file() for name in MODELS):
        console.print(f"seed {seed}: scorers loaded from {saved}")
        return evaluate({name: CreditScorer.load(saved / name) for name in MODELS}, test, seed, console, attribution)
    scorers = {}
    for name in ("lightgbm", "sequence"):
        with console.status(f"seed {seed}: training {name} on {len(train):,} rows"):
            scorers[name] = CreditScorer(dataset=dataset, model_name=name, seed=seed).fit(
                *train.xy, eval_set=[valid.xy])
    base = scorers["lightgbm"]
    started = time.perf_counter()
    valid_data = FitData(base.pipeline_.transform(valid.frame), valid.frame)
    blend = SequenceEnsembleModel.from_fitted([base.model_, scorers["sequence"].model_], valid_data, valid.target,
                                              feature_names=base.pipeline_.feature_names_, dataset=dataset)
    scorers["sequence-ensemble"] = CreditScorer(dataset=dataset, model_name="sequence-ensemble", seed=seed).fit(
        *train.xy, eval_set=[valid.xy], fitted_model=blend)
    members_seconds = scorers["lightgbm"].train_seconds_ + scorers["sequence"].train_seconds_
    scorers["sequence-ensemble"].train_seconds_ = members_seconds + time.perf_counter() - started
    if saved is not None:
        for name, scorer in scorers.items():
            scorer.save(saved / name)
    return evaluate(scorers, test, seed, console, attribution)


def evaluate(scorers: dict[str, CreditScorer], test, seed: int, console: Console,
             attribution: str | None = None) -> dict[str, dict[str, float]]:
    rows = {}
    for name, scorer in scorers.items():
        use_attribution(scorer, attribution)
        metrics = credit_metrics(test.target, scorer.predict_pd(test.frame), approval_rate=0.8)
        speed = scoring_speed(scorer, test.frame, single_runs=100, batch_rows=4000)
        rows[name] = {**metrics, **speed, "train_seconds": scorer.train_seconds_, "summary": scorer.model_.summary()}
    console.print(f"seed {seed}: " + ", ".join(f"{n} AUC {r['auc']:.4f}" for n, r in rows.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_argument(parser)
    parser.add_argument("--dataset", default="taiwan", choices=("taiwan", "generated"),
                        help="taiwan (real) or generated (GENERATED population)")
    parser.add_argument("--rows", type=int, default=30_000, help="generated applicants when --dataset generated")
    parser.add_argument("--seeds", type=int, action="append",
                        help="one split and training per seed (repeatable; default 0)")
    parser.add_argument("--models", type=Path, default=None,
                        help="save the fitted scorers here; load them if already there")
    parser.add_argument("--attribution", default=None, choices=("occlusion", "integrated-gradients"),
                        help="sequence reason codes (default: the model's own, occlusion)")
    add_output_arguments(parser, None)  # None: runs/benchmarks/credit_sequence_DATASET.json
    args = parser.parse_args()
    data, dataset, rows, seeds, models = args.data, args.dataset, args.rows, args.seeds or [0], args.models
    attribution, out, as_json = args.attribution, args.out, args.json
    torch.set_num_threads(1)
    console = Console(stderr=as_json, width=120)  # tables stay whole in logs
    if dataset == "generated":
        import tempfile

        from finance.data import load_generated
        from finance.generate import GeneratorConfig, generate

        records = load_generated(generate(Path(tempfile.mkdtemp()) / "generated", GeneratorConfig(n_applicants=rows)))
        console.print(f"{rows:,} GENERATED applicants (not real data)")
    else:
        records = load_taiwan(data / "taiwan_credit_default")
    started, measured_on = time.perf_counter(), {**machine(), "device": "cpu"}
    out = out or Path(f"runs/benchmarks/credit_sequence_{dataset}.json")
    runs = [{"seed": seed, "models": one_split(records, seed, console, models, attribution)} for seed in seeds]
    summary = {"dataset": dataset, "rows": len(records), "seeds": seeds, "machine": measured_on,
               "attribution": attribution or "occlusion", "models": {}}
    for name in MODELS:
        pick = lambda key, n=name: np.array([r["models"][n][key] for r in runs])  # noqa: E731
        summary["models"][name] = {
            "auc": float(pick("auc").mean()), "auc_std": float(pick("auc").std()), "ks": float(pick("ks").mean()),
            "recall_at_approval": float(pick("recall_at_approval").mean()),
            "auc_per_seed": pick("auc").round(4).tolist(), "p99_ms": float(pick("latency_p99_ms").mean()),
            "rows_per_s": float(pick("batch_rows_per_s").mean()), "train_seconds": float(pick("train_seconds").mean())}
    lightgbm_auc = summary["models"]["lightgbm"]["auc"]
    for row in summary["models"].values():
        row["auc_vs_lightgbm"] = row["auc"] / lightgbm_auc
    summary["runs"], summary["seconds"] = runs, time.perf_counter() - started
    table = Table(title=f"{dataset}, test AUC over {len(seeds)} split(s) - {describe(summary['machine'])}")
    for column in ("model", "AUC", "+/-", "KS", "recall@80%", "AUC / LightGBM", "p99 ms", "rows/s", "train s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, m in summary["models"].items():
        table.add_row(name, f"{m['auc']:.4f}", f"{m['auc_std']:.4f}", f"{m['ks']:.4f}",
                      f"{m['recall_at_approval']:.3f}", f"{m['auc_vs_lightgbm']:.4f}", f"{m['p99_ms']:.1f}",
                      f"{m['rows_per_s']:,.0f}", f"{m['train_seconds']:.0f}")
    console.print(table)
    console.print(f"results written to {out}")
    write_results(summary, out, as_json=as_json, last_line={
        "dataset": dataset, "seeds": seeds, "machine": measured_on,
        **{f"{n}_auc": m["auc"] for n, m in summary["models"].items()},
        **{f"{n}_ks": m["ks"] for n, m in summary["models"].items()}})


if __name__ == "__main__":
    main()
