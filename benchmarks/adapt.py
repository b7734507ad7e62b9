"""Adaptation from little data: LoRA (core.lora) against training from scratch and full fine-tuning.

(a) New fault mode: the MoE RUL model trained on FD001 (one fault mode) adapted to FD003 (a second
    one) from 10, 20 and 40 FD003 engines. FD003's 100 training engines are split once (seeded):
    40 test engines never used for adaptation, cut 5 times each at random cycles as the official
    test set is (the `maintenance train` protocol), and a pool from which the first 10 / 20 / 40
    adapt. Inside each adaptation set 20% of the engines are held back for early stopping, the
    same engines for all three methods. Scored: RMSE (true RUL capped at 125) on the test cuts.
(b) New credit segment: the Taiwan MoE trained on clients with graduate-school and university
    education (EDUCATION 1, 2; 80/20 split for early stopping) adapted to the high-school segment
    (EDUCATION 3) from 10%, 25% and 50% of its labelled rows. The segment is split once (seeded,
    stratified) in halves: the test half is never used, the other half gives the adaptation rows
    (stratified samples of 10% / 25% / 50% of the segment's rows). From scratch trains the whole
    `finance train` recipe (pipeline and MoE) on the same rows with the same 80/20 split inside
    them as the adaptation uses. Scored: AUC on the test half.

LoRA and full fine-tuning share the adaptation recipe (accumulation 4, micro-batches of 64, early
stopping on the held-back part of the adaptation data) and differ in which weights train and in
the learning rate: 1e-4 for full fine-tuning (the top of the design guide's range), and for LoRA
the rate that scored best on the held-back part at the smallest size among 1e-4, 1e-3, 1e-2
(RUL: 1e-2; credit: 1e-4; the figures are in the adapt modules' configs). The base models are one
net each (the RUL recipe's seed ensemble of 3 would triple the CPU time) and are saved to
--models-dir for reuse. Keep it short on the shared 2-core box:

    nice -n 10 python -m benchmarks.adapt --json
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
from core import lora
from finance.adapt import CreditAdaptConfig, adapt_scorer
from finance.data import load_records
from finance.scorer import CreditScorer, load_model, train_scorer
from manufacturing.maintenance.adapt import RULAdaptConfig, adapt_rul
from manufacturing.maintenance.cmapss import find_file, read_cmapss
from manufacturing.maintenance.metrics import rul_metrics
from manufacturing.maintenance.models import default_net_config
from manufacturing.maintenance.rul import RULEstimator, default_feature_config, default_train_config
from manufacturing.maintenance.split import split_units, truncate_units


def rul_estimator(epochs: int, seed: int) -> RULEstimator:
    return RULEstimator(net=default_net_config("moe", members=1), features=default_feature_config("moe", 1),
                        train=default_train_config("moe", max_epochs=epochs, seed=seed, progress=False))


def rul_experiment(args, console: Console) -> list[dict]:
    cmapss = args.data / "cmapss"
    fd001, fd003 = read_cmapss(find_file(cmapss, "train", "FD001")), read_cmapss(find_file(cmapss, "train", "FD003"))
    base_dir = args.models_dir / f"rul_fd001_seed{args.seed}"
    if (base_dir / "model.pt").is_file():
        base = RULEstimator.load(base_dir)
    else:
        console.print("[rul] training the FD001 base (one MoE net) ...")
        train_units, val_units = split_units(fd001["unit"].to_numpy(), val_fraction=0.2, seed=args.seed)
        base = rul_estimator(args.base_epochs, args.seed).fit(fd001[fd001["unit"].isin(train_units)],
                                                              val_frame=fd001[fd001["unit"].isin(val_units)])
        base.save(base_dir)
    units = np.random.default_rng(args.seed).permutation(np.unique(fd003["unit"]))
    test_units, pool = units[:40], units[40:]
    test_cut, true_rul = truncate_units(fd003[fd003["unit"].isin(test_units)], seed=args.seed, cuts_per_unit=5)

    def score(estimator: RULEstimator) -> float:
        return rul_metrics(estimator.predict(test_cut)["rul"].to_numpy(), true_rul, cap=125.0)["rmse"]

    rows = [{"experiment": "rul", "engines": 0, "method": "FD001 base, no adaptation", "rmse": score(base),
             "trained_share": 0.0, "seconds": 0.0}]
    for engines in args.engines:
        chosen = pool[:engines]
        fit_units, stop_units = split_units(chosen, val_fraction=0.2, seed=args.seed)
        fit, stop = fd003[fd003["unit"].isin(fit_units)], fd003[fd003["unit"].isin(stop_units)]
        started = time.perf_counter()
        scratch = rul_estimator(args.scratch_epochs, args.seed).fit(fit, val_frame=stop)
        rows.append({"experiment": "rul", "engines": engines, "method": "from scratch", "rmse": score(scratch),
                     "trained_share": 1.0, "seconds": time.perf_counter() - started})
        for method in ("full", "lora"):
            config = RULAdaptConfig(method=method, max_epochs=args.adapt_epochs, seed=args.seed,
                                    learning_rate=args.rul_lora_lr if method == "lora" else args.full_lr)
            adapted = adapt_rul(base, fit, config, val_frame=stop)
            rows.append({"experiment": "rul", "engines": engines,
                         "method": "LoRA" if method == "lora" else "full fine-tuning",
                         "rmse": score(adapted.estimator), "trained_share": adapted.metrics["trained_share"],
                         "seconds": adapted.metrics["train_seconds"], "best_epoch": adapted.metrics["best_epoch"]})
        console.print(rows[-3:])
    return rows


def credit_experiment(args, console: Console) -> list[dict]:
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    records = load_records("taiwan", args.data / "taiwan_credit_default")
    education = records.frame["EDUCATION"].to_numpy()
    base_dir = args.models_dir / f"taiwan_grad_univ_seed{args.seed}"
    if (base_dir / "scorer.json").is_file():
        base = load_model(base_dir)
    else:
        console.print("[credit] training the graduate-school + university base MoE ...")
        base = train_scorer(records.take(np.flatnonzero(np.isin(education, [1, 2]))), "moe", seed=args.seed)
        base.save(base_dir)
    segment = records.take(np.flatnonzero(education == 3))
    pool_idx, test_idx = train_test_split(np.arange(len(segment)), test_size=0.5, random_state=args.seed,
                                          stratify=segment.target)
    pool, test = segment.take(np.sort(pool_idx)), segment.take(np.sort(test_idx))

    def auc(scorer: CreditScorer) -> float:
        return float(roc_auc_score(test.target, scorer.predict_pd(test.frame)))

    rows = [{"experiment": "credit", "share": 0.0, "rows": 0, "method": "base, no adaptation", "auc": auc(base),
             "trained_share": 0.0, "seconds": 0.0}]
    for share in args.shares:
        size = round(share * len(segment))
        chosen = pool if size >= len(pool) else pool.take(np.sort(train_test_split(
            np.arange(len(pool)), train_size=size, random_state=args.seed, stratify=pool.target)[0]))
        started = time.perf_counter()
        scratch = train_scorer(chosen, "moe", seed=args.seed)
        rows.append({"experiment": "credit", "share": share, "rows": len(chosen), "method": "from scratch",
                     "auc": auc(scratch), "trained_share": 1.0, "seconds": time.perf_counter() - started})
        for method in ("full", "lora"):
            config = CreditAdaptConfig(method=method, max_epochs=args.adapt_epochs, seed=args.seed,
                                       learning_rate=args.lora_lr if method == "lora" else args.full_lr)
            adapted = adapt_scorer(base, chosen, config)
            rows.append({"experiment": "credit", "share": share, "rows": len(chosen),
                         "method": "LoRA" if method == "lora" else "full fine-tuning", "auc": auc(adapted.scorer),
                         "trained_share": adapted.metrics["trained_share"],
                         "seconds": adapted.metrics["train_seconds"], "best_epoch": adapted.metrics["best_epoch"]})
        console.print(rows[-3:])
    return rows


def verdicts(rows: list[dict], key: str, size: str, higher_is_better: bool) -> list[dict]:
    """Per size: LoRA at least as good as from scratch, within 3% of full fine-tuning, <= 5% trained."""
    out = []
    for value in sorted({r[size] for r in rows if r[size]}):
        by = {r["method"]: r for r in rows if r[size] == value}
        lora_, scratch, full = by["LoRA"][key], by["from scratch"][key], by["full fine-tuning"][key]
        sign = 1 if higher_is_better else -1
        out.append({size: value, "lora": lora_, "scratch": scratch, "full": full,
                    "beats_scratch": sign * (lora_ - scratch) >= 0,
                    "within_3pct_of_full": sign * (lora_ - full) >= -0.03 * abs(full),
                    "lora_share_ok": by["LoRA"]["trained_share"] <= 0.05})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(parser)
    parser.add_argument("--models-dir", type=Path, default=Path("runs/bench/adapt"))
    parser.add_argument("--experiments", default="rul,credit")
    parser.add_argument("--engines", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20, 40])
    parser.add_argument("--shares", type=lambda s: [float(x) for x in s.split(",")], default=[0.10, 0.25, 0.50])
    parser.add_argument("--base-epochs", type=int, default=25)
    parser.add_argument("--scratch-epochs", type=int, default=25)
    parser.add_argument("--adapt-epochs", type=int, default=25)
    parser.add_argument("--rul-lora-lr", type=float, default=RULAdaptConfig(method="lora").learning_rate)
    parser.add_argument("--lora-lr", type=float, default=CreditAdaptConfig.learning_rate, help="credit LoRA")
    parser.add_argument("--full-lr", type=float, default=RULAdaptConfig(method="full").learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, Path("benchmarks/results/adapt.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console(stderr=args.json)
    env = machine()
    rows: list[dict] = []
    if "rul" in args.experiments:
        rows += rul_experiment(args, console)
    if "credit" in args.experiments:
        rows += credit_experiment(args, console)
    results = {"machine": env, "args": {k: str(v) for k, v in vars(args).items()},
               "lora_defaults": vars(lora.LoRAConfig()), "rows": rows,
               "verdicts": {"rul": verdicts([r for r in rows if r["experiment"] == "rul"], "rmse", "engines", False),
                            "credit": verdicts([r for r in rows if r["experiment"] == "credit"], "auc", "share", True)}}
    for name, key, size in (("rul", "rmse", "engines"), ("credit", "auc", "share")):
        part = [r for r in rows if r["experiment"] == name]
        if not part:
            continue
        table = Table(title=f"{name}: {key} by adaptation size ({describe(env)})")
        for column in (size, "method", key, "trained_share", "seconds"):
            table.add_column(column)
        for r in part:
            table.add_row(str(r[size]), r["method"], f"{r[key]:.4f}", f"{r['trained_share']:.2%}",
                          f"{r['seconds']:.0f}")
        console.print(table)
    console.print(results["verdicts"])
    write_results(results, args.out, as_json=args.json, last_line=results["verdicts"])


if __name__ == "__main__":
    main()
