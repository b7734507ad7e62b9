"""`moeworks compress distill|prune|hash`: a smaller model folder from a trained one.

Each command reads a model folder (`--model`), the training data it was trained on (`--data`),
fine-tunes the compressed model on the same engines, validates it on the same held-back engines,
and writes an ordinary model folder (`--out`, sealed by MANIFEST.json after every file is
written) that `evaluate`, `serve`, `export` and `bundle` take as they take the source. Supported:
RUL folders (`maintenance train`: distill, channel or expert pruning, hashing), credit folders
(`finance train`: distill from any kind, the ensemble included, into a small MoE; expert pruning
and hashing of a `moe` folder) and AI4I folders (`maintenance ai4i-train`: the same for its MoE
backend), and the defect detector's folders (`defects train`, or the shipped weights folder):
channel pruning of the YOLO detector then fine-tuning (`compress prune --data VOC`;
manufacturing.defects.pruning). Any other folder is refused with one line (exit 2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError

app = typer.Typer(help="Compress a trained model: distil it into a small student, prune channels or experts, "
                       "or hash its weights.", no_args_is_help=True)

MAX_MODEL_JSON_BYTES = 4 << 20  # a RUL model.json is a few kB; more is not one of ours


class CompressError(UserInputError):
    """A model folder or option `compress` cannot take; one line."""


SUPPORTED = ("RUL (`maintenance train`), credit (`finance train`) and AI4I (`maintenance ai4i-train`) "
             "model folders, and defect detector folders (`prune` only)")


def detector_file(model: Path) -> Path | None:
    """The detector file of a defect detector folder: its detector.pt (`defects train`), or the one .pt
    of a folder that holds a single one (the shipped weights folder); None for any other folder."""
    if (model / "detector.pt").is_file():
        return model / "detector.pt"
    files = sorted(model.glob("*.pt"))
    return files[0] if len(files) == 1 else None


def folder_kind(model: Path) -> str:
    """"rul", "credit", "ai4i" or "detector" by the file that marks each folder; anything else is refused."""
    if not model.is_dir():
        raise CompressError(f"--model {model}: no such model folder")
    if (model / "scorer.json").is_file():
        return "credit"
    if (model / "ai4i.json").is_file():
        return "ai4i"
    if (model / "model.json").is_file():
        return "rul"
    if detector_file(model) is not None:
        return "detector"
    raise CompressError(f"--model {model}: compress takes {SUPPORTED}; this folder is not one")


def _rul_source(model: Path):
    """Load `model` if it is a RUL model folder; otherwise refuse with the reason."""
    from manufacturing.maintenance.rul import RULEstimator

    summary = model / "model.json"
    if not model.is_dir():
        raise CompressError(f"--model {model}: no such model folder")
    kind = None
    if summary.is_file() and summary.stat().st_size <= MAX_MODEL_JSON_BYTES:
        try:
            content = json.loads(summary.read_text(encoding="utf-8"))
            kind = content.get("net", {}).get("kind") if isinstance(content, dict) and "normalizer" in content else None
        except (UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            kind = None
    if kind not in ("lstm", "moe"):
        raise CompressError(f"--model {model}: compress takes {SUPPORTED}; this folder is not one")
    return RULEstimator.load(model)


def _out_folder(out: Path, model: Path) -> Path:
    if out.resolve() == model.resolve():
        raise CompressError("--out must be a new folder, not the --model folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"--out {out}: exists and is not an empty folder; give a new one")
    return out


def _training_frame(data: Path | None, subset: str | None, source):
    from manufacturing.maintenance.cmapss import SUBSETS, find_file, read_cmapss

    subset = subset or source.metadata_.get("metrics", {}).get("subset")
    if subset not in SUBSETS:
        raise CompressError(f"--subset: give one of {', '.join(SUBSETS)} (the model folder does not record it)")
    if data is None:
        root = os.environ.get("MOEWORKS_DATA")
        if not root:
            raise CompressError("no data: pass --data (the C-MAPSS training file or folder the model was trained on) "
                                "or set MOEWORKS_DATA")
        data = Path(root) / "cmapss"
    return subset, read_cmapss(data if data.is_file() else find_file(data, "train", subset))


def _finish(estimator, metrics: dict, out: Path, model: Path, subset: str, method: str, as_json: bool) -> None:
    from core.model_files import file_sha256
    from deploy.cli.maintenance import _print_metrics

    metrics = {"subset": subset, "model": estimator.net.kind, "method": method, "source": str(model),
               "source_manifest_sha256": file_sha256(model / "MANIFEST.json"),
               "parameters": estimator.metadata_["parameters"],
               "source_parameters": estimator.metadata_["compression"]["source_parameters"], **metrics,
               "train_seconds": estimator.metadata_["train_seconds"]}
    estimator.save(out, metrics=metrics)  # writes model.pt and model.json, then seals the folder
    _print_metrics(f"{method}: {model} -> {out} ({metrics['parameters']:,} parameters, "
                   f"source {metrics['source_parameters']:,})", metrics, as_json, command=f"compress.{method}",
                   result={**metrics, "model": str(out), "kind": estimator.net.kind, "source": str(model)})


def _fine_tune_config(epochs: int, seed: int, as_json: bool):
    from manufacturing.maintenance.compress import FineTuneConfig

    try:
        return FineTuneConfig(epochs=epochs, seed=seed, progress=output.show_progress(as_json))
    except ValueError as error:
        raise CompressError(str(error)) from None


MODEL = typer.Option(..., help="trained model folder: RUL (`maintenance train`), credit (`finance train`), "
                                "AI4I (`maintenance ai4i-train`) or, for prune, a defect detector folder "
                                "(`defects train`, or one holding a single detector .pt)")
OUT = typer.Option(..., help="new folder for the compressed model")
DATA = typer.Option(None, help="the data the model was trained on: the C-MAPSS training file or folder "
                               "(default: $MOEWORKS_DATA/cmapss), the credit records, ai4i2020.csv "
                               "(default: $MOEWORKS_DATA/ai4i2020), or the detector's VOC folder")
SUBSET = typer.Option(None, help="FD001-FD004 (default: the one the model folder records)")
JSON = typer.Option(False, "--json", help="print the metrics as one JSON object on stdout")
TEACHER = typer.Option(None, help="model folder whose outputs guide fine-tuning (e.g. the MoE a student was "
                                  "distilled from; default: the --model folder itself)")
GUIDE_ALPHA = typer.Option(0.5, help="weight of the teacher's outputs in fine-tuning (0: the true labels only)")
SEED = typer.Option(0)


def _teacher(teacher: Path | None, model: Path):
    if teacher is None:
        return None
    if teacher.resolve() == model.resolve():
        return None  # the default: the source guides itself
    return _rul_source(teacher)


def _source(model: Path, out: Path):
    """What every command does first: set the threads, load the --model folder, check --out (in this order)."""
    from deploy.cli.maintenance import _threads

    _threads()
    source = _rul_source(model)
    _out_folder(out, model)
    return source


def _tabular(kind: str, method: str, model: Path, out: Path, data: Path | None, subset: str | None,
             teacher: Path | None, *, alpha: float, epochs: int, seed: int, as_json: bool, **options) -> None:
    """compress for credit and AI4I folders: their TabularMoE network (core.compress.tabular)."""
    from core.compress.tabular import TabularFineTuneConfig
    from deploy.cli.maintenance import _threads

    _threads()
    if subset is not None:
        raise CompressError("--subset is for RUL folders (a C-MAPSS subset); this is a " + kind + " folder")
    _out_folder(out, model)
    if teacher is not None and teacher.resolve() != model.resolve() and folder_kind(teacher) != kind:
        raise CompressError(f"--teacher {teacher}: give a {kind} model folder, as --model is")
    try:
        config = TabularFineTuneConfig(epochs=epochs, alpha=alpha, seed=seed, progress=output.show_progress(as_json),
                                       monitor="val_auc" if kind == "credit" else "val_loss")
    except ValueError as error:
        raise CompressError(str(error)) from None
    same = teacher is None or teacher.resolve() == model.resolve()
    if kind == "credit":
        from deploy.cli.finance import _records
        from finance.compress import compress_scorer, save_compressed
        from finance.scorer import load_model

        source = load_model(model)
        guide = None if same else load_model(teacher)
        if data is None:
            raise CompressError("--data: give the labelled records the model was trained on (file or folder in the "
                                "dataset's original format)")
        scorer, metrics = compress_scorer(source, _records(source.dataset, data), method, config=config,
                                          teacher=guide, **options)
        save_compressed(scorer, metrics, out)
        shown = {k: v for k, v in metrics.items() if k != "routing"}
        title = (f"{method}: {model} -> {out} ({metrics['parameters']:,} network parameters; validation AUC "
                 f"{metrics['source_auc']:.4f} -> {metrics['auc']:.4f})")
    else:
        from core.row_fingerprint import RowFingerprint
        from deploy.cli.maintenance import _data_folder, _flat
        from manufacturing.maintenance.ai4i import AI4IFailureModel, read_ai4i
        from manufacturing.maintenance.ai4i_compress import compress_ai4i

        source = AI4IFailureModel.load(model)
        guide = None if same else AI4IFailureModel.load(teacher)
        compressed, evaluation, details = compress_ai4i(source, read_ai4i(_data_folder(data, "ai4i2020")), method,
                                                        config=config, teacher=guide, **options)
        out.mkdir(parents=True, exist_ok=True)
        fingerprint = RowFingerprint.load(model)
        if fingerprint is not None:  # the same training and validation rows as the source's
            fingerprint.save(out)
        compressed.save(out, metrics={**evaluation, "compression": details})
        shown = {**_flat(evaluation), **{k: v for k, v in details.items() if k != "routing"}}
        metrics = {**shown, "routing": details.get("routing")} if "routing" in details else shown
        title = (f"{method}: {model} -> {out} ({details['parameters']:,} MoE parameters, source "
                 f"{details['source_parameters']:,}; default backend {compressed.default_backend_})")
    from deploy.cli.maintenance import _print_metrics

    _print_metrics(title, shown, as_json, command=f"compress.{method}",
                   result={**metrics, "model": str(out), "kind": kind, "source": str(model)})


def _not_for_detector(kind: str, method: str) -> None:
    if kind == "detector":
        raise CompressError(f"compress {method}: a defect detector folder takes `compress prune` (channel pruning) "
                            "only")


def _detector(model: Path, out: Path, data: Path | None, split_file: Path | None, *, ratio: float | None, epochs: int,
              seed: int, as_json: bool, **unused) -> None:
    """compress prune for a defect detector folder: torch-pruning's channel removal on the YOLO graph,
    then fine-tuning by `defects train`'s trainer on the detector's split (workflow.prune_job)."""
    from deploy.cli.maintenance import _print_metrics
    from manufacturing.defects.workflow import PruneJob, prune_job

    given = [option for option, value in unused.items() if value]
    if given:
        raise CompressError(f"--{given[0].replace('_', '-')} is not for a defect detector folder (it takes --data, "
                            "--ratio, --epochs, --split-file, --seed)")
    _out_folder(out, model)
    if data is None:
        raise CompressError("--data: give the VOC folder the detector was trained on (e.g. NEU-DET)")
    if split_file is not None and not split_file.is_file():
        raise CompressError(f"--split-file {split_file}: no such split file")
    try:
        job = PruneJob(epochs=epochs, seed=seed, **({} if ratio is None else {"ratio": ratio}))
    except ValueError as error:
        raise CompressError(str(error)) from None
    with output.third_party_output_to(out / "logs" / "compress.log"):
        result = prune_job(detector_file(model), data, out, job, split_file=split_file)
    shown = {k: v for k, v in result.items() if k not in ("ultralytics_val",)}
    shown.update({f"val_{k}": v for k, v in (result.get("ultralytics_val") or {}).items()})
    _print_metrics(f"prune: {model} -> {out} ({result['parameters']:,} parameters, source "
                   f"{result['source_parameters']:,})", shown, as_json, command="compress.prune",
                   result={**result, "model": str(out), "kind": "detector"})


@app.command("distill")
def distill_command(model: Path = MODEL, out: Path = OUT, data: Path | None = DATA, subset: str | None = SUBSET,
                    hidden: int = typer.Option(32, help="the student's hidden units (RUL: its LSTM's; credit and "
                                                        "AI4I: its MoE's width)"),
                    layers: int = typer.Option(1, help="the student's layers (LSTM or MoE layers)"),
                    experts: int = typer.Option(4, help="credit and AI4I: the student MoE's experts"),
                    intermediate: int | None = typer.Option(None, help="credit and AI4I: each expert's inner "
                                                                       "width (default: twice --hidden)"),
                    alpha: float = typer.Option(0.5, help="weight of the teacher's soft targets (1 - alpha: the "
                                                          "true labels)"),
                    epochs: int = typer.Option(15, help="most epochs (early stopping on the validation part)"),
                    seed: int = SEED, as_json: bool = JSON):
    """Distil the model (the RUL MoE seed ensemble, a credit ensemble, ...) into one small student:
    an LSTM for RUL, a small MoE for credit and AI4I."""
    from manufacturing.maintenance.compress import distill

    kind = folder_kind(model)
    _not_for_detector(kind, "distill")
    if kind != "rul":
        if not (1 <= hidden <= 1024 and 1 <= layers <= 8 and 1 <= experts <= 1024
                and (intermediate is None or 1 <= intermediate <= 4096)):
            raise CompressError("--hidden must be in [1, 1024], --layers in [1, 8], --experts in [1, 1024] and "
                                "--intermediate in [1, 4096]")
        _tabular(kind, "distill", model, out, data, subset, None, alpha=alpha, epochs=epochs, seed=seed,
                 as_json=as_json, student={"num_experts": experts, "hidden_size": hidden,
                                           "intermediate_size": intermediate or 2 * hidden, "num_layers": layers})
        return
    source = _source(model, out)
    if not 0 <= alpha <= 1:
        raise CompressError(f"--alpha must be in [0, 1], got {alpha}")
    subset, frame = _training_frame(data, subset, source)
    student, metrics = distill(source, frame, hidden_size=hidden, num_layers=layers, alpha=alpha,
                               config=_fine_tune_config(epochs, seed, as_json))
    _finish(student, metrics, out, model, subset, "distill", as_json)


@app.command("prune")
def prune_command(model: Path = MODEL, out: Path = OUT, data: Path | None = DATA, subset: str | None = SUBSET,
                  ratio: float | None = typer.Option(None, help="lstm models and the defect detector: share of "
                                                               "channels removed per layer (default: lstm 0.5; "
                                                               "detector 0.35, which leaves ~47% of YOLO11n's "
                                                               "parameters)"),
                  l1: float = typer.Option(1e-6, help="lstm models: L1 penalty on the weights before removal "
                                                      "(times the sum of |w|, beside an MSE on RUL/cap near 0.003)"),
                  l1_epochs: int = typer.Option(5, help="lstm models: epochs of L1-regularised training"),
                  steps: int = typer.Option(1, help="lstm models: remove the channels in this many equal steps, "
                                                    "fine-tuning (--epochs) after each (iterative pruning)"),
                  keep_experts: int | None = typer.Option(None, help="moe models: experts kept per layer "
                                                                     "(default: half)"),
                  merge: bool = typer.Option(False, help="moe models: merge dropped experts into the nearest kept "
                                                         "one instead of dropping them"),
                  epochs: int = typer.Option(10, help="most fine-tuning epochs after the removal"),
                  teacher: Path | None = TEACHER, alpha: float = GUIDE_ALPHA,
                  split_file: Path | None = typer.Option(None, help="defect detector: the split.json whose 'train' "
                                                                    "images fine-tune it and 'val' images validate "
                                                                    "(default: the folder's split.json, else the "
                                                                    "seeded 8:2 split `defects train` makes)"),
                  seed: int = SEED, as_json: bool = JSON):
    """Remove channels (LSTM/MLP, the YOLO defect detector: torch-pruning) or the least-routed experts (MoE:
    RUL, credit, AI4I), then fine-tune."""
    from manufacturing.maintenance.compress import prune

    kind = folder_kind(model)
    if kind == "detector":
        _detector(model, out, data, split_file, ratio=ratio, epochs=epochs, seed=seed, as_json=as_json,
                  subset=subset, keep_experts=keep_experts, merge=merge, teacher=teacher,
                  steps=steps != 1, l1_epochs=l1_epochs != 5)
        return
    if split_file is not None:
        raise CompressError("--split-file is for a defect detector folder")
    if kind != "rul":
        _tabular(kind, "prune", model, out, data, subset, teacher, alpha=alpha, epochs=epochs, seed=seed,
                 as_json=as_json, keep_experts=keep_experts, mode="merge" if merge else "drop")
        return
    source = _source(model, out)
    if not 0 <= l1 <= 1 or not 0 <= l1_epochs <= 1000:
        raise CompressError("--l1 must be in [0, 1] and --l1-epochs in [0, 1000]")
    subset, frame = _training_frame(data, subset, source)
    pruned, metrics = prune(source, frame, **({} if ratio is None else {"ratio": ratio}), l1=l1, l1_epochs=l1_epochs,
                            steps=steps,
                            keep_experts=keep_experts,
                            merge=merge, teacher=_teacher(teacher, model), alpha=alpha,
                            config=_fine_tune_config(epochs, seed, as_json))
    _finish(pruned, metrics, out, model, subset, "prune", as_json)


@app.command("hash")
def hash_command(model: Path = MODEL, out: Path = OUT, data: Path | None = DATA, subset: str | None = SUBSET,
                 compression: float = typer.Option(8.0, help="virtual weights per stored value (moe: the experts' "
                                                             "weights; lstm: every weight matrix)"),
                 epochs: int = typer.Option(10, help="most fine-tuning epochs"),
                 teacher: Path | None = TEACHER, alpha: float = GUIDE_ALPHA,
                 seed: int = SEED, as_json: bool = JSON):
    """Share weights through a hash (HashedNets): `compression` times fewer stored values, then fine-tune
    (credit and AI4I: the experts' weights)."""
    from manufacturing.maintenance.compress import hash_model

    kind = folder_kind(model)
    _not_for_detector(kind, "hash")
    if kind != "rul":
        _tabular(kind, "hash", model, out, data, subset, teacher, alpha=alpha, epochs=epochs, seed=seed,
                 as_json=as_json, compression=compression)
        return
    source = _source(model, out)
    subset, frame = _training_frame(data, subset, source)
    hashed, metrics = hash_model(source, frame, compression=compression, teacher=_teacher(teacher, model),
                                 alpha=alpha, config=_fine_tune_config(epochs, seed, as_json))
    _finish(hashed, metrics, out, model, subset, "hash", as_json)
