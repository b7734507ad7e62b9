"""`moeworks bundle build|verify|inspect`: signed partner bundles (see deploy/bundle/build.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from deploy.cli import output
from deploy.cli.errors import UserInputError

app = typer.Typer(help="Partner bundles: one ONNX graph from raw fields to decisions, a model card, test "
                       "vectors and a signed manifest.", no_args_is_help=True)


def _fail(message: str) -> None:
    raise UserInputError(message)


@app.command("build")
def build(model: Path = typer.Option(..., help="a saved model folder: credit (finance train), RUL or AI4I "
                                                 "(maintenance train), defect detector (defects train)"),
          out: Path = typer.Option(..., help="the bundle folder to write (new or empty)"),
          sign_key: Path | None = typer.Option(None, help="EC private key (PEM) to sign the bundle with; "
                                                          "it is read, never copied into the bundle"),
          training_data: Path | None = typer.Option(None, help="the training file (credit CSV, C-MAPSS, AI4I) "
                                                               "or image folder (defects), to record its SHA-256 "
                                                               "and draw test vectors from it"),
          archive: bool = typer.Option(False, "--archive", help="write OUT as one .tar.gz of the bundle's files "
                                                               "(verify and inspect take it as they take a folder)"),
          conf: float | None = typer.Option(None, help="defect detector: score threshold (default 0.25)"),
          calibration: Path | None = typer.Option(None, help="defect detector: JSON/YAML with mm_per_pixel(_x/_y) "
                                                             "and min_size_mm (default: the model folder's "
                                                             "calibration.json/.yaml, else 0.1 mm/px)"),
          mm_per_pixel: float | None = typer.Option(None, help="defect detector: camera scale (overrides the "
                                                               "calibration's)"),
          moe_stage: Path | None = typer.Option(None, "--moe-stage", help="defect detector: its MoE second stage "
                                                                          "(moe_stage.pt) to put in the graph, as "
                                                                          "`defects predict --moe-stage` (default: "
                                                                          "YOLO alone)"),
          backend: str | None = typer.Option(None, help="AI4I failure models: the backend the graph carries, "
                                                          "lightgbm (default) or moe"),
          json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout")) -> None:
    """Build a bundle of MODEL in OUT; refuses one whose graph does not reproduce moeworks."""
    from deploy.bundle.build import DetectorOptions, build_bundle
    from deploy.bundle.credit_features import BundleError
    from finance.errors import CreditDataError
    from manufacturing.defects.errors import DefectDataError
    from manufacturing.maintenance.errors import MaintenanceDataError

    try:
        options = DetectorOptions(conf=conf, calibration=calibration, mm_per_pixel=mm_per_pixel, moe_stage=moe_stage)
        result = build_bundle(model, out, sign_key=sign_key, training_data=training_data, archive=archive,
                              detector=options, backend=backend)
    except (BundleError, CreditDataError, MaintenanceDataError, DefectDataError, OSError) as error:
        _fail(str(error).splitlines()[0])
    except ValueError as error:  # e.g. a key file that is not an EC private key in PEM
        _fail(f"cannot sign with {sign_key}: {str(error).splitlines()[0]}")
    if json_out:
        output.emit("bundle.build", {"model": str(model), "out": str(out), **result})
    else:
        output.note(f"wrote {result['family']} bundle {out} ({result['nodes']} graph nodes, "
                    f"{result['test_vectors']} test vectors, {'signed' if result['signed'] else 'unsigned'})")


@app.command("verify")
def verify(bundle: Path = typer.Argument(..., help="the bundle folder or .tar.gz"),
           key: Path | None = typer.Option(None, help="the publisher's EC public key (PEM); without it only "
                                                      "the manifest hashes are checked"),
           json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout")) -> None:
    """Check every file's hash, the signature (with --key) and the test vectors; exit 2 on any difference."""
    from core.bundle_signing import BundleIntegrityError
    from deploy.bundle.build import verify_bundle

    if key is not None and not key.is_file():
        _fail(f"no such key file: {key}")
    try:
        result = verify_bundle(bundle, key=key)
    except (BundleIntegrityError, OSError, ValueError) as error:
        _fail(str(error).splitlines()[0])
    if json_out:
        output.emit("bundle.verify", {"bundle": str(bundle), **result})
    else:
        output.note(f"{bundle}: manifest ok, signature {result['signature']}, "
                    f"{result['test_vectors']} test vectors reproduced")


@app.command("inspect")
def inspect(bundle: Path = typer.Argument(..., help="the bundle folder or .tar.gz"),
            json_out: bool = typer.Option(False, "--json", help="print one JSON object on stdout")) -> None:
    """Show the bundle's model card: inputs, outputs, version, metrics, protected attributes."""
    from core.bundle_signing import BundleIntegrityError
    from deploy.bundle.build import inspect_bundle

    try:
        result = inspect_bundle(bundle)
    except (BundleIntegrityError, OSError, ValueError) as error:
        _fail(str(error).splitlines()[0])
    if json_out:
        output.emit("bundle.inspect", {"bundle": str(bundle), **result})
        return
    card = result["card"]
    typer.echo(f"{card['model']['family']} {card['model']['version']} ({card['model']['dataset']}), "
               f"{'signed' if result['signed'] else 'unsigned'}", err=True)
    for field in card["inputs"]:
        protected = f" [protected: {field['protected_attribute']}]" if field["protected_attribute"] else ""
        typer.echo(f"  in  {field['name']}: {field['unit']} {field['allowed_range']}{protected}", err=True)
    for item in card["outputs"]:
        typer.echo(f"  out {item['name']}: {item['type']}  {item['meaning']}", err=True)
    typer.echo(f"  validation AUC {card['validation_metrics'].get('auc')}, opsets {card['runtime']['onnx_opsets']}, "
               f"onnxruntime >= {card['runtime']['min_onnxruntime']}", err=True)
