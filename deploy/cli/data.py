"""`moeworks data check`: the three-level data check (rules, domains, labels) of any dataset the
product reads, an HTML report and a JSON summary, and with --fix a cleaned copy of the input."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from deploy.cli import output

app = typer.Typer(help="Data quality: rules, domains and label checks before data becomes training data.",
                  no_args_is_help=True)

DATASETS = ("taiwan", "gmsc", "generated", "ai4i", "cmapss", "neu_det")


def _table(dataset: str, path: Path, detector=None):
    """The dataset's adapter (each lives beside its loader; imported here so that --help stays instant)."""
    if dataset in ("taiwan", "gmsc", "generated"):
        from finance.data_quality import credit_table

        return credit_table(dataset, path)
    if dataset == "ai4i":
        from manufacturing.maintenance.data_quality import ai4i_table

        return ai4i_table(path)
    if dataset == "cmapss":
        from manufacturing.maintenance.data_quality import cmapss_table

        return cmapss_table(path)
    from manufacturing.defects.data_quality import defects_table

    return defects_table(path, detector=detector)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@app.command("check")
def check(data: Path = typer.Option(..., help="the file or folder to check, in the dataset's own format"),
          dataset: str = typer.Option(..., help=f"one of {', '.join(DATASETS)}"),
          out: Path = typer.Option(..., help="folder for report.html, summary.json, findings.csv (and --fix's copy)"),
          model: Path | None = typer.Option(None, help="a model folder: leakage against the rows it was trained "
                                                       "and validated on (its row fingerprint); for neu_det, the "
                                                       "detector whose embeddings the image domains are found on"),
          reference: Path | None = typer.Option(None, help="the training data the checked data is compared with: "
                                                           "leakage, ranges, domain coverage"),
          fix: bool = typer.Option(False, help="write a cleaned copy (same format and columns) into --out/cleaned "
                                               "and --out/removed.csv; the input is never changed"),
          json_output: bool = typer.Option(False, "--json",
                                           help="print the summary as one JSON object on stdout")) -> None:
    """Check data in three levels (rules, domains, labels) and write a report."""
    from core.data_quality.check import REMOVED_CHECKS, run_check
    from core.data_quality.report import write_report
    from core.data_quality.table import DataCheckError

    if dataset not in DATASETS:
        raise DataCheckError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if not data.exists():
        raise DataCheckError(f"--data {data}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise DataCheckError(f"--out {out} is a file; give a folder")
    source, target = data.resolve(), out.resolve()
    if _inside(target, source if source.is_dir() else source.parent) and fix:
        raise DataCheckError(f"--out {out} lies inside the input's folder; --fix writes outside the input")

    def say(text: str) -> None:
        output.note(text)

    fingerprint, detector = None, None
    if model is not None and dataset == "neu_det":
        from manufacturing.defects.data_quality import load_detector

        detector = load_detector(model)  # checked against its folder's manifest before it is read
    elif model is not None:
        from core.model_files import verify_manifest
        from core.row_fingerprint import RowFingerprint

        if not model.is_dir():
            raise DataCheckError(f"--model {model}: not a folder")
        verify_manifest(model)  # a changed or planted file refuses the folder before anything is read
        fingerprint = RowFingerprint.load(model)
    say(f"reading {data} as {dataset}")
    table = _table(dataset, data, detector)
    reference_table = _table(dataset, reference, detector) if reference is not None else None
    result = run_check(table, reference=reference_table, fingerprint=fingerprint, progress=say)
    if model is not None and fingerprint is None and detector is None:
        result.summary["notes"].append(f"the model folder {model} has no row fingerprint: no leakage check against it")
    if fix:
        result.summary["fix"] = _write_fix(table, result, target, REMOVED_CHECKS)
    paths = write_report(result, target)
    result.summary["outputs"] = {name: str(path) for name, path in paths.items()}
    (target / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    rules = result.summary["rules"]
    say(f"{table.source}: {len(table)} rows; schema {rules['schema']}, duplicates {rules['duplicate']}, "
        f"contradictions {rules['contradiction']}, near duplicates {rules['near_duplicate']}, "
        f"unseen domain {result.summary['domains']['unseen']}, label issues {result.summary['labels']['issues']}; "
        f"report {paths['report']}")
    if json_output:
        output.emit("data.check", {"data": str(data), "dataset": dataset, "out": str(out),
                                   "model": None if model is None else str(model), **result.summary})


def _write_fix(table, result, out: Path, removed_checks) -> dict:
    """The kept rows in the input's format under out/cleaned, and out/removed.csv (row, name, checks, details)."""
    cleaned = out / "cleaned"
    cleaned.mkdir(parents=True, exist_ok=True)
    kept = table.raw[~result.remove]
    written = table.write(kept, cleaned)
    findings = result.findings[result.findings["check"].isin(removed_checks)]
    findings = findings[result.remove[findings["row"].to_numpy() - 1]]
    removed = findings.groupby(["row", "name"], sort=True).agg(checks=("check", "; ".join),
                                                                details=("detail", " | ".join)).reset_index()
    removed_path = out / "removed.csv"
    removed.to_csv(removed_path, index=False)
    if len(removed) + len(kept) != len(table):  # every row is either written or listed with its reason
        raise RuntimeError(f"--fix lost rows: {len(kept)} kept + {len(removed)} removed != {len(table)}")
    return {"written": str(written), "rows_kept": int(len(kept)), "rows_removed": int(len(removed)),
            "removed_list": str(removed_path)}
