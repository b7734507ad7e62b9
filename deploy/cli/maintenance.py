"""`moeworks maintenance ...`: RUL on C-MAPSS-format files, failures on AI4I 2020.

Registered on `deploy.cli.manufacturing.maintenance_app`. Bad input (MaintenanceDataError) prints one
line naming the file, row and field and exits with code 2 (deploy/cli/main.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError

SUBSET_HELP = "FD001, FD002, FD003 or FD004 (FD002/FD004: six operating regimes)"
JSON = typer.Option(False, "--json", help="print the result as one JSON object on stdout (tables on stderr)")


def _data_folder(data: Path | None, name: str) -> Path:
    from manufacturing.maintenance.errors import MaintenanceDataError

    if data is not None:
        return data
    root = os.environ.get("MOEWORKS_DATA")
    if root:
        return Path(root) / name
    raise MaintenanceDataError(f"no data: pass --data DIR or set MOEWORKS_DATA (a folder holding {name}/)")


def _print_metrics(title: str, metrics: dict, as_json: bool, *, command: str, result: dict | None = None) -> None:
    """The metrics as a table (stderr with --json), and with --json `result` (default: the metrics) as
    the run's JSON object under `command`'s schema."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float | int) and not isinstance(value, bool):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    output.console(as_json=as_json).print(table)
    if as_json:
        output.emit(command, metrics if result is None else result)


def _threads() -> None:
    import torch

    # Two cores shared with other jobs: one intra-op thread is faster than two fighting.
    torch.set_num_threads(int(os.environ.get("MOEWORKS_THREADS", "1")))


def register(app: typer.Typer) -> None:
    """Add the maintenance commands to `app`."""

    @app.command()
    def train(subset: str = typer.Option("FD001", help=SUBSET_HELP),
              data: Path | None = typer.Option(None, help="folder with train_FD00x.txt[.gz] (default: "
                                                           "$MOEWORKS_DATA/cmapss)"),
              kind: str = typer.Option("lstm", help="what to train: lstm or moe"),
              out: Path = typer.Option(Path("runs/maintenance/model"), help="model folder to write"),
              generated: bool = typer.Option(False, help="train on generated run-to-failure data instead"),
              epochs: int = typer.Option(40, help="most epochs (early stopping on validation engines)"),
              windows_per_epoch: int | None = typer.Option(None, help="random windows per epoch (0: all; "
                                                                      "default: the model kind's recipe)"),
              members: int | None = typer.Option(None, help="seeded nets averaged (default: the model kind's "
                                                             "recipe: lstm 1, moe 3)"),
              val_fraction: float = typer.Option(0.2, help="share of engines held back for validation"),
              cuts: int = typer.Option(5, help="random cuts per validation engine"),
              seed: int = typer.Option(0),
              as_json: bool = JSON):
        """Train an LSTM or MoE RUL model; validate on held-back engines cut at random cycles."""
        from manufacturing.maintenance.cmapss import SUBSET_REGIMES, SUBSETS, find_file, read_cmapss
        from manufacturing.maintenance.errors import MaintenanceDataError
        from manufacturing.maintenance.generator import generate_cmapss
        from manufacturing.maintenance.models import default_net_config
        from manufacturing.maintenance.protocol import ProtocolConfig, train_and_validate
        from manufacturing.maintenance.rul import RULEstimator, default_feature_config, default_train_config

        _threads()
        if subset not in SUBSETS:
            raise MaintenanceDataError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}",
                                       field="subset")
        if kind not in ("lstm", "moe"):
            raise UserInputError(f"--kind: unknown model kind {kind!r}; expected lstm or moe")
        if generated:
            frame = generate_cmapss(100, num_regimes=SUBSET_REGIMES[subset], seed=seed)
            output.note(f"training on GENERATED run-to-failure data (100 engines, {SUBSET_REGIMES[subset]} "
                        "regime(s)), not NASA's")
        else:
            frame = read_cmapss(find_file(_data_folder(data, "cmapss"), "train", subset))
        estimator = RULEstimator(
            net=default_net_config(kind, **({} if members is None else {"members": members})),
            features=default_feature_config(kind, SUBSET_REGIMES[subset]),
            train=default_train_config(kind, max_epochs=epochs, seed=seed, progress=output.show_progress(as_json),
                                       **({} if windows_per_epoch is None
                                          else {"windows_per_epoch": windows_per_epoch or None})))
        estimator, metrics = train_and_validate(
            estimator, frame, ProtocolConfig(val_fraction=val_fraction, cuts_per_unit=cuts, seed=seed))
        metrics = {"subset": subset, "model": kind, "generated": generated, **metrics}  # as model.json keeps them
        estimator.save(out, metrics=metrics)
        _print_metrics(f"{kind} on {subset}: validation engines cut at random cycles (model in {out})",
                       metrics, as_json, command="maintenance.train",
                       result={**metrics, "model": str(out), "kind": kind, "data": None if generated else str(data)})

    @app.command()
    def evaluate(model: Path = typer.Option(..., help="model folder from `maintenance train`"),
                 data: Path = typer.Option(..., help="C-MAPSS test file (test_FD00x.txt[.gz]; was --test)"),
                 rul: Path = typer.Option(..., help="true RUL file (RUL_FD00x.txt[.gz])"),
                 predictions: Path | None = typer.Option(None, help="write per-engine predictions (CSV)"),
                 as_json: bool = JSON):
        """RMSE and NASA score on the last cycle of each test engine (true RUL capped at the model's cap;
        `rmse_uncapped` against the raw file)."""
        from manufacturing.maintenance.cmapss import read_cmapss, read_rul
        from manufacturing.maintenance.protocol import score_test
        from manufacturing.maintenance.rul import RULEstimator

        _threads()
        estimator = RULEstimator.load(model)
        metrics, table = score_test(estimator, read_cmapss(data), read_rul(rul), source=str(data))
        if predictions is not None:
            predictions.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(predictions, index=False)
        _print_metrics(f"{estimator.net.kind} RUL on {data.name} (last cycle of each engine)", metrics, as_json,
                       command="maintenance.evaluate",
                       result={"model": str(model), "kind": estimator.net.kind, "data": str(data), "rul": str(rul),
                               "predictions": None if predictions is None else str(predictions), **metrics})

    @app.command()
    def adapt(model: Path = typer.Option(..., help="RUL model folder from `maintenance train` (the base)"),
              data: Path = typer.Option(..., help="run-to-failure file of the new engines (C-MAPSS format, "
                                                  "train_FD00x.txt[.gz] layout)"),
              out: Path = typer.Option(..., help="model folder to write (a normal RUL model folder)"),
              method: str = typer.Option("lora", help="lora (adapter of a few % of the parameters) or full "
                                                      "(fine-tune every weight)"),
              units: int | None = typer.Option(None, help="use only the first N engines of --data"),
              rank: int = typer.Option(16, help="LoRA rank (the design guide's 16; capped at an eighth of each "
                                                "layer's width)"),
              learning_rate: float | None = typer.Option(None, help="default: 1e-2 for lora, 1e-4 for full "
                                                                    "(see manufacturing/maintenance/adapt.py)"),
              grad_accumulation: int = typer.Option(4, help="micro-batches per optimizer step (the guide's 4-8)"),
              epochs: int = typer.Option(30, help="most epochs (early stopping on held-back new engines)"),
              seed: int = typer.Option(0),
              as_json: bool = JSON):
        """Adapt a RUL model to new engines (a new fault mode or line) with LoRA or full fine-tuning."""
        from core.lora import LoRAConfig
        from manufacturing.maintenance.adapt import RULAdaptConfig, adapt_rul, save_adapted
        from manufacturing.maintenance.cmapss import read_cmapss
        from manufacturing.maintenance.errors import MaintenanceDataError
        from manufacturing.maintenance.rul import RULEstimator

        _threads()
        if out.exists() and not out.is_dir():
            raise MaintenanceDataError(f"--out {out} is a file; give a folder", field="out")
        if out.resolve() == model.resolve():
            raise MaintenanceDataError("--out is the base model's folder; write the adapted model to a new one",
                                       field="out")
        if units is not None and units < 2:
            raise MaintenanceDataError(f"--units must be >= 2 (one engine is held back), got {units}", field="units")
        try:
            config = RULAdaptConfig(method=method, learning_rate=learning_rate, grad_accumulation=grad_accumulation,
                                    max_epochs=epochs, seed=seed, progress=output.show_progress(as_json),
                                    lora=LoRAConfig(rank=rank))
        except ValueError as error:
            raise MaintenanceDataError(str(error)) from None
        base = RULEstimator.load(model)
        if not data.is_file():
            raise MaintenanceDataError("no such file", source=str(data))
        frame = read_cmapss(data)
        if units is not None:
            frame = frame[frame["unit"].isin(sorted(frame["unit"].unique())[:units])]
        adaptation = adapt_rul(base, frame, config)
        save_adapted(adaptation, out)
        metrics = {"model": str(out), "base_model": str(model), "data": str(data), **adaptation.metrics}
        _print_metrics(f"{method} adaptation of {model} to {data.name}: held-back new engines cut at random "
                       f"cycles (model in {out})", metrics, as_json, command="maintenance.adapt")

    @app.command()
    def generate(out: Path = typer.Option(Path("runs/maintenance/generated"), help="folder to write"),
                 subset: str = typer.Option("FD001", help="name used for the files (train_<subset>.txt, ...)"),
                 regimes: int = typer.Option(1, help="operating regimes, 1 or up to 6"),
                 train_units: int = typer.Option(100), test_units: int = typer.Option(100),
                 seed: int = typer.Option(0), as_json: bool = JSON):
        """Write GENERATED run-to-failure data in the C-MAPSS layout (train, test cut at random cycles, RUL)."""
        from manufacturing.maintenance.generator import write_generated_dataset

        paths = write_generated_dataset(out, subset=subset, train_units=train_units, test_units=test_units,
                                        num_regimes=regimes, seed=seed)
        output.say(f"GENERATED (not NASA's) data written: {', '.join(str(p) for p in paths.values())}",
                   as_json=as_json)
        if as_json:
            output.emit("maintenance.generate", {"out": str(out), "files": {k: str(p) for k, p in paths.items()},
                                                 "subset": subset, "generated": True})

    @app.command("export")
    def export_command(model: Path = typer.Option(..., help="RUL model folder or AI4I model folder"),
                       out: Path = typer.Option(..., help="folder for the .onnx file(s)"),
                       data: Path | None = typer.Option(None, help="C-MAPSS or AI4I file whose rows check parity "
                                                                   "(default: generated rows; was --test)"),
                       as_json: bool = JSON):
        """Export to ONNX and check PyTorch/LightGBM vs onnxruntime on real rows."""
        from manufacturing.maintenance.export import export_model_folder

        _threads()
        differences = export_model_folder(model, out, data)
        for path, difference in differences.items():
            output.say(f"{path}: max |framework - onnxruntime| = {difference:.3g}", as_json=as_json)
        if as_json:
            output.emit("maintenance.export", {"model": str(model), "out": str(out),
                                               "data": None if data is None else str(data),
                                               "files": {str(p): float(d) for p, d in differences.items()}})

    @app.command("ai4i-train")
    def ai4i_train(data: Path | None = typer.Option(None, help="ai4i2020.csv[.gz] or its folder "
                                                                "(default: $MOEWORKS_DATA/ai4i2020)"),
                   out: Path = typer.Option(Path("runs/maintenance/ai4i"), help="model folder to write"),
                   alert_rate: float = typer.Option(0.05, help="share of machines flagged for recall@alert"),
                   epochs: int = typer.Option(60, help="most epochs of the MoE network (early stopping)"),
                   trees: int = typer.Option(400, help="boosting rounds of each LightGBM model"),
                   seed: int = typer.Option(0),
                   as_json: bool = JSON):
        """Train LightGBM and a small MoE network for machine failure and its five modes."""
        from manufacturing.maintenance.ai4i import AI4IFailureModel, LightGBMParams, read_ai4i, split_rows

        _threads()
        frame = read_ai4i(_data_folder(data, "ai4i2020"))
        train_rows, val_rows = split_rows(frame, seed=seed)
        model = AI4IFailureModel(seed=seed, progress=output.show_progress(as_json), max_epochs=epochs,
                                 lightgbm=LightGBMParams(n_estimators=trees)).fit(train_rows, val_frame=val_rows)
        metrics = model.evaluate(val_rows, alert_rate=alert_rate)
        from core.row_fingerprint import RowFingerprint, SplitFingerprint

        # which rows it was fitted and validated on, so that ai4i-evaluate can say when it sees them again;
        # written before model.save so that the folder's MANIFEST.json seals it with the rest
        out.mkdir(parents=True, exist_ok=True)
        RowFingerprint(SplitFingerprint.build(_ai4i_hashes(train_rows)),
                       SplitFingerprint.build(_ai4i_hashes(val_rows))).save(out)
        model.save(out, metrics=metrics)
        _print_metrics(f"AI4I failure on {len(val_rows)} validation rows (model in {out}; "
                       f"default scorer: {model.default_backend_})", _flat(metrics), as_json,
                       command="maintenance.ai4i-train",
                       result={"model": str(out), "data": str(_data_folder(data, "ai4i2020")), **_flat(metrics)})

    @app.command("ai4i-evaluate")
    def ai4i_evaluate(model: Path = typer.Option(..., help="model folder from `maintenance ai4i-train`"),
                      data: Path = typer.Option(..., help="AI4I csv (the original columns, labels included)"),
                      alert_rate: float = typer.Option(0.05, help="share of machines flagged for recall@alert"),
                      as_json: bool = JSON):
        """PR-AUC, ROC-AUC and recall at a fixed alert rate for failure and each mode, both scorers."""
        from manufacturing.maintenance.ai4i import AI4IFailureModel, read_ai4i

        _threads()
        from core.row_fingerprint import RowFingerprint

        loaded = AI4IFailureModel.load(model)
        rows = read_ai4i(data)
        metrics = _flat(loaded.evaluate(rows, alert_rate=alert_rate))
        fingerprint = RowFingerprint.load(model)
        if fingerprint is None:
            metrics.update(share_in_training=None, share_in_validation=None)
            output.note("note: this model folder records no training rows (saved before row fingerprints)")
        else:
            hashes = _ai4i_hashes(rows)
            (train, exact), (valid, _) = fingerprint.train.share(hashes), fingerprint.valid.share(hashes)
            metrics.update(share_in_training=train, share_in_validation=valid, share_exact=exact)
            if train or valid:
                output.warn(f"warning: {train or 0:.1%} of these rows were used to train the model and "
                            f"{valid or 0:.1%} to validate it; metrics on them overstate how it does on new data")
        _print_metrics(f"AI4I failure on {data.name}", metrics, as_json, command="maintenance.ai4i-evaluate",
                       result={"model": str(model), "data": str(data), **metrics})


def _ai4i_hashes(rows):
    """64-bit hashes of AI4I rows' inputs (type and the five process readings; ids and labels left out)."""
    from core.row_fingerprint import row_hashes
    from manufacturing.maintenance.ai4i import INPUTS

    return row_hashes(rows, [(name, name == "Type") for name in INPUTS])


def _flat(metrics: dict) -> dict:
    """{'lightgbm': {'failure_pr_auc': ..}} -> {'lightgbm_failure_pr_auc': ..} for tables and JSON lines."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
