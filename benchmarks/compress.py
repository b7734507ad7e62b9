"""Edge RUL model: the MoE seed ensemble distilled into one small LSTM, then pruned and hashed;
and the teacher's own experts pruned and hashed. C-MAPSS, the standard validation protocol.

Each model folder is made by the `moeworks` command printed beside it (so every figure here has
its command), then measured in one process, side by side: parameters, model.pt bytes, ONNX FP32
and INT8 (onnxruntime dynamic quantization) bytes, single-window CPU latency (PyTorch eager, ORT
FP32, ORT INT8; median over rounds that alternate the models), and RMSE / NASA score on the
held-back engines cut at random cycles (the teacher's split and cuts: every model is scored on
the same 100 cuts of FD001's 20 held-back engines), for PyTorch and the INT8 ONNX file.

    nice -n 10 python -m benchmarks.compress --subsets FD001 --json

Training is kept short on the shared 2-core CPU (teacher 15 epochs, student 20, fine-tuning 5-10);
`--reuse` measures folders made by an earlier run instead of training them again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import add_output_arguments, describe, machine, write_results
from benchmarks.fixtures import CREDIT_FOLDERS, DATA_ROOT, REPO, add_data_argument

CLI = [sys.executable, "-m", "deploy.cli"]


def steps(args, subset: str, root: Path) -> list[tuple[str, list[str]]]:
    """(folder name, the moeworks command that makes it) in the order they depend on each other."""
    data = str(args.data)
    fine = str(args.epochs)
    return [
        ("teacher", ["maintenance", "train", "--subset", subset, "--data", data, "--kind", "moe",
                     "--epochs", str(args.teacher_epochs)]),
        ("student", ["compress", "distill", "--model", str(root / "teacher"), "--data", data,
                     "--hidden", str(args.hidden), "--epochs", str(args.student_epochs)]),
        # The student's fine-tuning after pruning or hashing is guided by the MoE it was distilled from.
        ("student_pruned", ["compress", "prune", "--model", str(root / "student"), "--data", data,
                            "--teacher", str(root / "teacher"), "--ratio", str(args.ratio), "--l1-epochs", "5",
                            "--steps", str(args.prune_steps), "--alpha", str(args.prune_alpha), "--epochs", fine]),
        ("student_hashed", ["compress", "hash", "--model", str(root / "student"), "--data", data,
                            "--teacher", str(root / "teacher"), "--compression", "8", "--epochs", fine]),
        ("teacher_hashed_experts", ["compress", "hash", "--model", str(root / "teacher"), "--data", data,
                                    "--compression", "8", "--epochs", str(args.teacher_fine_epochs)]),
        ("teacher_pruned_experts", ["compress", "prune", "--model", str(root / "teacher"), "--data", data,
                                    "--keep-experts", "4", "--epochs", str(args.teacher_fine_epochs)]),
    ]


def tabular_steps(args, root: Path) -> list[tuple[str, str, list[str]]]:
    """(dataset, folder name, the moeworks command that makes it) for the credit and AI4I MoEs."""
    taiwan = str(DATA_ROOT / CREDIT_FOLDERS["taiwan"])
    ai4i = str(DATA_ROOT / "ai4i2020")
    out = []
    for dataset, data, source in (("taiwan", taiwan, ["finance", "train", "--dataset", "taiwan", "--data", taiwan,
                                                      "--kind", "moe"]),
                                  ("ai4i", ai4i, ["maintenance", "ai4i-train", "--data", ai4i])):
        folder = str(root / f"{dataset}_source")
        out += [(dataset, f"{dataset}_source", source),
                (dataset, f"{dataset}_distilled", ["compress", "distill", "--model", folder, "--data", data,
                                                   "--experts", "4", "--hidden", "16", "--epochs", "30"]),
                (dataset, f"{dataset}_pruned_experts", ["compress", "prune", "--model", folder, "--data", data,
                                                        "--keep-experts", str(args.tabular_keep), "--epochs", "15"]),
                (dataset, f"{dataset}_hashed_experts", ["compress", "hash", "--model", folder, "--data", data,
                                                        "--compression", "8", "--epochs", "15"])]
    return out


def measure_tabular(folders: dict[str, tuple[str, Path]], onnx_dir: Path, args) -> list[dict]:
    """Network parameters, ONNX FP32 bytes, batch-1 latency (torch, ORT FP32) and the validation
    metric (credit: AUC; AI4I: the MoE backend's failure PR-AUC) of each folder, on the source's
    validation rows (every compressed folder is scored on the rows its source held back)."""
    from core.onnx_export import inference_session
    from finance.scorer import load_model
    from manufacturing.maintenance.ai4i import AI4IFailureModel, read_ai4i, split_rows
    from manufacturing.maintenance.export import export_ai4i_onnx

    onnx_dir.mkdir(parents=True, exist_ok=True)
    rows, runners = [], {}
    ai4i_rows = read_ai4i(DATA_ROOT / "ai4i2020")
    for name, (dataset, folder) in folders.items():
        if dataset == "taiwan":
            scorer = load_model(folder)
            net = scorer.model_.module_.net
            path = scorer.model_.export_onnx(onnx_dir / f"{name}.onnx")
            metric, value = "val_auc", scorer.validation_metrics_["auc"]
            module = scorer.model_.module_.eval()
            example = {"features": np.zeros((1, len(scorer.pipeline_.feature_names_)), dtype=np.float32)}
            def eager(w, m=module):
                return m(torch.from_numpy(w["features"]))
        else:
            model = AI4IFailureModel.load(folder)
            net = model.moe_.eval()
            path = export_ai4i_onnx(model, onnx_dir / name)["moe"]
            _, val = split_rows(ai4i_rows, seed=model.seed)
            metric, value = "val_moe_failure_pr_auc", model.evaluate(val)["moe"]["failure_pr_auc"]
            numeric, codes = model.moe_inputs(val.iloc[:1])
            example = {"numeric": numeric.numpy(), "type_code": codes.numpy()}
            def eager(w, m=net):
                return m(torch.from_numpy(w["numeric"]), torch.from_numpy(w["type_code"]))
        session = inference_session(path, threads=1)
        runners[name] = {"torch": eager, "ort_fp32": lambda w, s=session: s.run(None, w)}
        details = json.loads((folder / "compression.json").read_text()) if (folder / "compression.json").is_file() \
            else (model.metrics_.get("compression", {}) if dataset == "ai4i" else {})
        rows.append({"dataset": dataset, "model": name, "parameters": sum(p.numel() for p in net.parameters()),
                     "expert_values": sum(p.numel() for n, p in net.named_parameters() if ".experts." in n),
                     "onnx_fp32_bytes": path.stat().st_size, metric: value, "metric": metric,
                     "method": details.get("method"), "folder": str(folder), "example": example})
    samples: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for _ in range(args.latency_rounds):
            for row in rows:
                for runtime, run in runners[row["model"]].items():
                    samples.setdefault((row["model"], runtime), []).append(
                        latency_ms(run, row["example"], args.latency_calls))
    for row in rows:
        del row["example"]
        for runtime in ("torch", "ort_fp32"):
            row[f"latency_ms_{runtime}"] = float(np.median(samples[(row["model"], runtime)]))
            row[f"latency_best_ms_{runtime}"] = float(np.min(samples[(row["model"], runtime)]))
    return rows


def make(name: str, command: list[str], folder: Path, args, console: Console) -> str:
    full = ["nice", "-n", "10", *CLI, *command, "--out", str(folder), "--json"]
    shown = "moeworks " + shlex.join([*command, "--out", str(folder)])
    if folder.is_dir() and args.reuse:
        console.print(f"{name}: reusing {folder} (made by: {shown})")
        return shown
    console.print(f"{name}: {shown}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(full, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return shown


def latency_ms(run, window, rounds: int) -> float:
    run(window)  # warm-up
    started = time.perf_counter()
    for _ in range(rounds):
        run(window)
    return (time.perf_counter() - started) / rounds * 1e3


def measure(folders: dict[str, Path], onnx_dir: Path, args, subset: str, console: Console) -> list[dict]:
    from core.compress.hashed import hashed_parameters
    from core.onnx_export import inference_session
    from core.quantization import quantize_onnx
    from manufacturing.maintenance.cmapss import find_file, read_cmapss
    from manufacturing.maintenance.compress import split_like_source
    from manufacturing.maintenance.export import RUL_INPUT, export_rul_onnx
    from manufacturing.maintenance.metrics import rul_metrics
    from manufacturing.maintenance.rul import RULEstimator
    from manufacturing.maintenance.split import truncate_units

    teacher = RULEstimator.load(folders["teacher"])
    frame = read_cmapss(find_file(args.data, "train", subset))
    data = split_like_source(teacher, frame)
    cut, true_rul = truncate_units(data.val, seed=data.protocol.seed, cuts_per_unit=data.protocol.cuts_per_unit)
    rows, runners = [], {}
    for name, folder in folders.items():
        estimator = RULEstimator.load(folder)
        windows = estimator._windows(cut, last_only=True).gather()
        predicted = estimator.predict_windows(windows)
        pool, virtual = hashed_parameters(estimator.model_)
        experts = sum(p.numel() for n, p in estimator.model_.named_parameters() if ".experts." in n)
        fp32 = export_rul_onnx(RULEstimator.load(folder), onnx_dir / f"{name}.onnx")
        int8 = quantize_onnx(fp32, onnx_dir / f"{name}.int8.onnx", op_types=["MatMul", "Gemm", "LSTM"])
        sessions = {kind: inference_session(path, threads=1) for kind, path in (("fp32", fp32), ("int8", int8))}
        int8_rul = sessions["int8"].run(None, {RUL_INPUT: windows.numpy()})[0]
        metrics, metrics_int8 = (rul_metrics(p, true_rul, cap=estimator.net.rul_cap) for p in (predicted, int8_rul))
        model = estimator.model_.eval()
        runners[name] = {
            "torch": lambda w, model=model: model(torch.from_numpy(w)),
            "ort_fp32": lambda w, s=sessions["fp32"]: s.run(None, {RUL_INPUT: w}),
            "ort_int8": lambda w, s=sessions["int8"]: s.run(None, {RUL_INPUT: w}),
        }
        rows.append({"subset": subset, "model": name, "kind": estimator.net_.kind,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "expert_parameters": experts,  # values stored for the experts (their pools where hashed)
                     "hashed_values": pool, "virtual_weights": virtual,
                     "pt_bytes": (folder / "model.pt").stat().st_size,
                     "onnx_fp32_bytes": fp32.stat().st_size, "onnx_int8_bytes": int8.stat().st_size,
                     "val_rmse": metrics["rmse"], "val_score": metrics["score"],
                     "val_rmse_int8": metrics_int8["rmse"], "val_score_int8": metrics_int8["score"],
                     "engines": metrics["engines"], "folder": str(folder)})
    window = windows[:1].numpy()  # one window, (1, 30, features): what an edge device scores per cycle
    samples: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for _ in range(args.latency_rounds):  # alternate the models so that load changes hit them alike
            for name, by_runtime in runners.items():
                for runtime, run in by_runtime.items():
                    samples.setdefault((name, runtime), []).append(latency_ms(run, window, args.latency_calls))
    for row in rows:
        for runtime in ("torch", "ort_fp32", "ort_int8"):
            row[f"latency_ms_{runtime}"] = float(np.median(samples[(row["model"], runtime)]))
            # the best round: what the model costs when the shared cores are least contended
            row[f"latency_best_ms_{runtime}"] = float(np.min(samples[(row["model"], runtime)]))
    console.print(f"{subset}: measured {len(rows)} models on {len(true_rul)} validation cuts")
    return rows


def ratios(rows: list[dict]) -> dict[str, dict]:
    """Each target of issue 20, as measured: the figure, the bound, met or not."""
    by = {r["model"]: r for r in rows}
    out = {}
    teacher, student = by["teacher"], by.get("student")
    if student:
        out["distilled student"] = {
            "params_share": student["parameters"] / teacher["parameters"],
            "speedup_torch": teacher["latency_ms_torch"] / student["latency_ms_torch"],
            "speedup_torch_best": teacher["latency_best_ms_torch"] / student["latency_best_ms_torch"],
            "speedup_ort_fp32": teacher["latency_ms_ort_fp32"] / student["latency_ms_ort_fp32"],
            "speedup_ort_fp32_best": teacher["latency_best_ms_ort_fp32"] / student["latency_best_ms_ort_fp32"],
            "rmse_ratio": student["val_rmse"] / teacher["val_rmse"]}
        out["distilled student"]["met"] = bool(out["distilled student"]["params_share"] <= 0.10
                                               and out["distilled student"]["speedup_torch"] >= 3
                                               and out["distilled student"]["speedup_torch_best"] >= 3
                                               and out["distilled student"]["rmse_ratio"] <= 1.05)
    for name, base, key in (("pruned student", "student", "student_pruned"),
                            ("pruned experts", "teacher", "teacher_pruned_experts")):
        if key in by and base in by:
            share = by[key]["parameters"] / by[base]["parameters"]
            loss = by[key]["val_rmse"] / by[base]["val_rmse"] - 1
            out[name] = {"params_share": share, "rmse_change": loss, "met": bool(share <= 0.5 and loss < 0.01)}
    for name, base, key in (("hashed experts", "teacher", "teacher_hashed_experts"),
                            ("hashed student", "student", "student_hashed")):
        if key in by and base in by:
            fewer = by[key]["virtual_weights"] / max(by[key]["hashed_values"], 1)
            loss = by[key]["val_rmse"] / by[base]["val_rmse"] - 1
            out[name] = {"hashed_weights_fewer": fewer, "rmse_change": loss, "met": bool(fewer >= 8 and loss < 0.02)}
    return out


def table(rows: list[dict]) -> Table:
    result = Table(title="Edge RUL: parameters, sizes, single-window CPU latency (1 thread), validation RMSE / score")
    for column in ("subset", "model", "params", "model.pt kB", "ONNX FP32 kB", "ONNX INT8 kB", "torch ms (best)",
                   "ORT FP32 ms (best)", "ORT INT8 ms (best)", "RMSE", "score", "RMSE INT8", "score INT8"):
        result.add_column(column, justify="right")
    for r in rows:
        result.add_row(r["subset"], r["model"], f"{r['parameters']:,}", f"{r['pt_bytes'] / 1e3:.0f}",
                       f"{r['onnx_fp32_bytes'] / 1e3:.0f}", f"{r['onnx_int8_bytes'] / 1e3:.0f}",
                       *(f"{r[f'latency_ms_{k}']:.3f} ({r[f'latency_best_ms_{k}']:.3f})"
                         for k in ("torch", "ort_fp32", "ort_int8")), f"{r['val_rmse']:.2f}", f"{r['val_score']:.0f}",
                       f"{r['val_rmse_int8']:.2f}", f"{r['val_score_int8']:.0f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, under="cmapss", what="C-MAPSS folder")
    parser.add_argument("--subsets", type=lambda s: s.split(","), default=["FD001"])
    parser.add_argument("--runs", type=Path, default=Path("runs/compress"), help="where the model folders go")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", type=int, default=20)
    parser.add_argument("--teacher-fine-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs of the student's pruning/hashing")
    parser.add_argument("--hidden", type=int, default=64, help="the student LSTM's hidden units")
    parser.add_argument("--ratio", type=float, default=0.4,
                        help="share of the student's channels pruned (0.4 of 64 hidden units: ~55%% of its parameters)")
    parser.add_argument("--prune-steps", type=int, default=1, help="the student's pruning in this many steps, "
                                                                     "fine-tuned after each")
    parser.add_argument("--prune-alpha", type=float, default=0.5,
                        help="weight of the MoE teacher's outputs in the pruned student's fine-tuning "
                             "(1: the teacher only)")
    parser.add_argument("--tabular", action="store_true", help="also the credit (Taiwan) and AI4I MoEs: distilled, "
                                                                   "experts pruned, experts hashed")
    parser.add_argument("--tabular-keep", type=int, default=8, help="experts kept of the tabular MoEs' 16")
    parser.add_argument("--reuse", action="store_true", help="measure existing folders instead of training them")
    parser.add_argument("--latency-rounds", type=int, default=15)
    parser.add_argument("--latency-calls", type=int, default=20, help="calls timed per round")
    add_output_arguments(parser, Path("runs/bench/compress.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the edge case: one core per model
    console = Console(stderr=args.json, width=220)
    results = {"command": " ".join(sys.argv), "rows": [], "targets": {}, "commands": {}}
    for subset in [s for s in args.subsets if s]:
        root = args.runs / subset
        folders = {}
        for name, command in steps(args, subset, root):
            results["commands"][f"{subset}/{name}"] = make(name, command, root / name, args, console)
            folders[name] = root / name
        results["machine"] = machine()  # the load when the measured part starts
        console.print(f"machine: {describe(results['machine'])}")
        rows = measure(folders, root / "onnx", args, subset, console)
        results["rows"] += rows
        results["targets"][subset] = ratios(rows)
    if args.tabular:
        folders = {}
        for dataset, name, command in tabular_steps(args, args.runs / "tabular"):
            results["commands"][f"tabular/{name}"] = make(name, command, args.runs / "tabular" / name, args, console)
            folders[name] = (dataset, args.runs / "tabular" / name)
        results["tabular_machine"] = machine()
        results["tabular_rows"] = measure_tabular(folders, args.runs / "tabular" / "onnx", args)
        for row in results["tabular_rows"]:
            console.print({k: v for k, v in row.items() if k != "folder"})
    console.print(table(results["rows"]))
    console.print_json(json.dumps(results["targets"]))
    write_results(results, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
