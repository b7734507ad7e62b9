"""Build, verify and inspect partner bundles.

A bundle is a folder: model.onnx (raw fields in, the product's outputs out), card.json (the model
card, also inside model.onnx's metadata_props), test_vectors.json (inputs with missing values and
extremes, and moeworks' own outputs for them), manifest.json (SHA-256 of each file) and, when signed,
model.sig (OpenSSF model-signing, EC key). `build` refuses to write a bundle whose graph does not
reproduce moeworks on its own test vectors.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd

from core.bundle_signing import (
    SIGNATURE,
    BundleIntegrityError,
    check_manifest,
    sign,
    verify_signature,
    write_manifest,
)
from deploy.bundle.archive import SUFFIX, extracted, is_archive, write_archive
from deploy.bundle.card import CARD_KEY, credit_card, has_network
from deploy.bundle.credit_features import BundleError
from deploy.bundle.credit_graph import credit_graph

MODEL, CARD, VECTORS = "model.onnx", "card.json", "test_vectors.json"
COVERED = ("credit scorecard, lightgbm, moe, sequence and ensembles of them (finance train; taiwan, gmsc), RUL lstm "
           "and moe (maintenance train), AI4I failure model (its LightGBM or MoE backend), defect detector "
           "(defects train)")
MAX_MODEL_BYTES = 512 << 20  # a bundle's graph above this is not one we made
SAMPLE_ROWS = 24


def _sample_rows(spec, rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Plausible records within each field's allowed range (when no training data is given)."""
    columns: dict[str, np.ndarray] = {}
    for f in spec.fields:
        low = f.min if f.min is not None else -5e4
        high = f.max if f.max is not None else low + 5e5
        if f.kind == "int" and high - low <= 200:
            values = rng.integers(int(low), int(high) + 1, n).astype(np.float64)
        else:
            values = np.round(low + (high - low) * rng.random(n) ** 3, 2)  # skewed to small, as amounts are
            if f.kind == "int":
                values = np.floor(values)
        if not f.required:
            values[rng.random(n) < 0.2] = np.nan
        columns[f.name] = values
    return pd.DataFrame(columns)


def _edge_rows(spec) -> pd.DataFrame:
    """All missing, all zero, all at their minimum, all at their maximum (1e12 where unbounded),
    and each field missing alone in an otherwise typical row."""
    names = [f.name for f in spec.fields]
    rows = [{n: np.nan for n in names}, {n: 0.0 for n in names},
            {f.name: (f.min if f.min is not None else -1e12) for f in spec.fields},
            {f.name: (f.max if f.max is not None else 1e12) for f in spec.fields}]
    typical = {f.name: (f.min if f.min is not None else 0.0) + 1.0 for f in spec.fields}
    rows += [{**typical, name: np.nan} for name in names]
    return pd.DataFrame(rows, columns=names)


def test_records(scorer, training: pd.DataFrame | None) -> pd.DataFrame:
    from finance.data import dataset_spec

    spec = dataset_spec(scorer.dataset)
    sample = (training[[f.name for f in spec.fields]].iloc[:SAMPLE_ROWS].astype(np.float64).reset_index(drop=True)
              if training is not None else _sample_rows(spec, np.random.default_rng(0), SAMPLE_ROWS))
    frame = pd.concat([sample, _edge_rows(spec)], ignore_index=True)
    if has_network(scorer.model_, ("sequence",)):  # moeworks refuses these records (the graph: pd NaN, decision -1)
        limit = frame["LIMIT_BAL"]
        frame.loc[~(limit > 0), "LIMIT_BAL"] = 1.0
    frame.insert(0, spec.id_column, np.arange(len(frame)))
    return frame


def _json_number(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def expected_outputs(scorer, frame: pd.DataFrame) -> dict[str, Any]:
    """moeworks' own outputs for the vectors (finance.load_model(dir).score), as the graph names them."""
    scored = scorer.score(frame, reasons="all")
    index = {n: j for j, n in enumerate(scorer.pipeline_.feature_names_)}
    k = min(scorer.policy_.reason_count, int(scorer.pipeline_.families_.max()) + 1)
    reasons = [[index[c] for c in codes.split("|")] + [-1] * (k - len(codes.split("|"))) if codes else [-1] * k
               for codes in scored["reason_codes"]]
    return {"pd": scored["pd"].tolist(), "points": scored["points"].tolist(),
            "decision": (scored["decision"] == "decline").astype(int).tolist(), "reasons": reasons}


def run_graph(model_path: Path | bytes, inputs: dict[str, list]) -> dict[str, np.ndarray]:
    """Run a bundle graph on JSON-style inputs (lists; None = missing; strings for string inputs)."""
    import onnxruntime as ort

    source = model_path if isinstance(model_path, bytes) else str(model_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():
        values = inputs[spec.name]
        if spec.type == "tensor(string)":
            feeds[spec.name] = np.array(values, dtype=object).reshape(-1, 1)
        elif spec.type == "tensor(uint8)":  # (N, H, W, 3) frames of the defect detector
            feeds[spec.name] = np.asarray(values, dtype=np.uint8)
        else:  # (N,) lists are [N, 1] inputs; (N, T) lists of lists (RUL cycles) stay as they are
            array = np.array(values, dtype=object)
            array = np.where(array == None, np.nan, array).astype(np.float64)  # noqa: E711 (elementwise)
            feeds[spec.name] = array.reshape(-1, 1) if array.ndim == 1 else array
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def compare(got: dict[str, np.ndarray], expected: dict[str, Any], tolerances: dict[str, float]) -> list[str]:
    """What differs between the graph's outputs and the expected ones (empty: conformant).
    A tolerance of 0 means identical (decisions, reason codes)."""
    problems = []
    for name, values in expected.items():
        want = np.asarray(values)
        have = np.asarray(got[name])
        if have.size != want.size:  # e.g. a detection more or less
            problems.append(f"{name} has shape {list(have.shape)}, expected {list(want.shape)}")
            continue
        have = have.reshape(want.shape)
        tolerance = float(tolerances[name])
        if want.size == 0:
            continue
        if tolerance == 0:
            if not np.array_equal(have, want):
                problems.append(f"{name} differs in {int((have != want).reshape(len(want), -1).any(1).sum())} rows")
        else:
            error = float(np.max(np.abs(have - want)))
            if not error <= tolerance + 1e-12:
                problems.append(f"{name} differs by {error:.3g} > {tolerance:g}")
    return problems


def _credit(model_dir: Path, training_data: Path | None) -> tuple:
    """(proto, card, inputs, expected) of a saved credit model."""
    from finance import load_model
    from finance.data import load_records

    scorer = load_model(model_dir)
    data_sha256 = training = None
    if training_data is not None:
        data_sha256 = _sha256_path(training_data)
        training = load_records(scorer.dataset, training_data).frame
    proto = credit_graph(scorer)
    k = int(proto.graph.output[3].type.tensor_type.shape.dim[1].dim_value)
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    operators = {n.op_type for n in proto.graph.node}
    card = credit_card(scorer, opsets=opsets, operators=operators, data_sha256=data_sha256, k=k)
    frame = test_records(scorer, training)
    inputs = {c: [_json_number(v) for v in frame[c].to_numpy(np.float64)] for c in frame.columns[1:]}
    return proto, card, inputs, expected_outputs(scorer, frame)


def _ai4i(model_dir: Path, training_data: Path | None, backend: str) -> tuple:
    from deploy.bundle.ai4i_graph import ai4i_graph
    from deploy.bundle.card import ai4i_card, ai4i_test_rows
    from manufacturing.maintenance.ai4i import NUMERIC_INPUTS, AI4IFailureModel, read_ai4i

    model = AI4IFailureModel.load(model_dir)
    training = read_ai4i(training_data) if training_data is not None else None
    proto = ai4i_graph(model, backend=backend)
    operators = {n.op_type for n in proto.graph.node}
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    card = ai4i_card(model, opsets=opsets, operators=operators, backend=backend,
                     data_sha256=_sha256_path(training_data) if training_data is not None else None)
    frame = ai4i_test_rows(training)
    inputs = {"Type": frame["Type"].astype(str).tolist(),
              **{n: [float(v) for v in frame[n].to_numpy(np.float64)] for n in NUMERIC_INPUTS}}
    scored = model.predict_proba(frame, backend=backend)
    return proto, card, inputs, {name: scored[name].tolist() for name in scored.columns}


def _rul(model_dir: Path, training_data: Path | None) -> tuple:
    from deploy.bundle.card import rul_card, rul_test_engines
    from deploy.bundle.rul_graph import rul_fields, rul_graph
    from manufacturing.maintenance.cmapss import read_cmapss
    from manufacturing.maintenance.rul import RULEstimator

    estimator = RULEstimator.load(model_dir)
    proto = rul_graph(estimator)
    operators = {n.op_type for n in proto.graph.node}
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    card = rul_card(estimator, opsets=opsets, operators=operators,
                    data_sha256=_sha256_path(training_data) if training_data is not None else None)
    frame = rul_test_engines(estimator, read_cmapss(training_data) if training_data is not None else None)
    expected = estimator.predict(frame)
    units = expected["unit"].tolist()
    longest = int(frame.groupby("unit").size().max())
    inputs = {}
    for name in rul_fields(estimator):  # (engines, cycles), the front padded with missing values
        rows = [frame.loc[frame["unit"] == u, name].tolist() for u in units]
        inputs[name] = [[None] * (longest - len(r)) + r for r in rows]
    return proto, card, inputs, {"rul": [[float(v)] for v in expected["rul"]]}


def _defects(model_dir: Path, training_data: Path | None, options: DetectorOptions) -> tuple:
    """(proto, card, inputs, expected) of a `defects train` folder: its YOLO stage, and with `moe_stage` its
    MoE second stage in the same graph."""
    from deploy.bundle.defects_card import defects_card, inspector_outputs, stage_parity, stage_tolerances, test_frames
    from deploy.bundle.defects_graph import IMAGE, defects_graph
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.pipeline import DefectInspector, InspectionConfig
    from manufacturing.defects.workflow import DETECTOR_FILE, MOE_FILE

    stage = None
    if options.moe_stage is not None:
        from manufacturing.defects.errors import DefectDataError
        from manufacturing.defects.moe_stage import CropMoEClassifier

        if options.moe_stage.suffix != ".pt":
            raise BundleError(f"--moe-stage takes the stage's checkpoint (moe_stage.pt, as `defects train` writes "
                              f"it), not {options.moe_stage.name}: the graph exports its network itself")
        try:
            stage, names = CropMoEClassifier.load(options.moe_stage)
        except DefectDataError as error:
            raise BundleError(str(error)) from None
    config = InspectionConfig() if options.conf is None else InspectionConfig(conf=options.conf)
    inspector = DefectInspector(detector=YoloDetector.load(model_dir / DETECTOR_FILE), second_stage=stage,
                                calibration=options.calibration_for(model_dir), config=config)
    if stage is not None and names != list(inspector.detector.names):
        raise BundleError(f"{options.moe_stage}: the MoE stage's classes {names} are not the detector's "
                          f"{list(inspector.detector.names)}")
    cal = inspector.calibration
    proto = defects_graph(inspector.detector, conf=config.conf, iou=config.iou, max_det=config.max_det,
                          mm_per_pixel=(cal.mm_per_pixel_x, cal.mm_per_pixel_y), min_size_mm=cal.min_size_mm,
                          stage=stage)
    operators = {n.op_type for n in proto.graph.node}
    opsets = {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import}
    frames = test_frames(inspector, model_dir, training_data)
    outputs = inspector_outputs(inspector, frames)
    card = defects_card(inspector, model_dir, opsets=opsets, operators=operators,
                        data_sha256=_sha256_path(training_data) if training_data is not None else None,
                        moe_stage_present=(model_dir / MOE_FILE).is_file(), stage_file=options.moe_stage,
                        parity=stage_parity(run_graph(proto.SerializeToString(), {IMAGE: frames}), outputs),
                        tolerances=stage_tolerances(outputs, (cal.mm_per_pixel_x, cal.mm_per_pixel_y))
                        if stage is not None else None)
    expected = {name: values.tolist() for name, values in outputs.items()}
    return proto, card, {IMAGE: frames.tolist()}, expected


@dataclass(frozen=True)
class DetectorOptions:
    """Build options of a defect detector bundle (`bundle build --conf/--calibration/--mm-per-pixel`)."""

    conf: float | None = None  # score threshold (default InspectionConfig's)
    calibration: Path | None = None  # JSON/YAML (default: the model folder's calibration.json/.yaml, else 0.1 mm/px)
    mm_per_pixel: float | None = None  # overrides the calibration's scale
    moe_stage: Path | None = None  # the MoE second stage's checkpoint (moe_stage.pt): put in the graph

    def __post_init__(self) -> None:
        if self.conf is not None and not 0.0 < self.conf < 1.0:
            raise BundleError(f"--conf must lie in (0, 1), got {self.conf}")
        if self.mm_per_pixel is not None and not (math.isfinite(self.mm_per_pixel) and self.mm_per_pixel > 0):
            raise BundleError(f"--mm-per-pixel must be a positive number, got {self.mm_per_pixel}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.conf, self.calibration, self.mm_per_pixel, self.moe_stage))

    def calibration_for(self, model_dir: Path):
        import dataclasses

        from manufacturing.defects.calibration import Calibration

        source = self.calibration or next((model_dir / f"calibration.{ext}" for ext in ("json", "yaml", "yml")
                                           if (model_dir / f"calibration.{ext}").is_file()), None)
        cal = Calibration.from_file(source) if source is not None else Calibration()
        if self.mm_per_pixel is not None:
            cal = dataclasses.replace(cal, mm_per_pixel_x=self.mm_per_pixel, mm_per_pixel_y=self.mm_per_pixel)
        return cal


def build_bundle(model_dir: Path, out: Path, *, sign_key: Path | None = None, training_data: Path | None = None,
                 archive: bool = False, detector: DetectorOptions | None = None,
                 backend: str | None = None) -> dict[str, Any]:
    """Write the bundle of the model in model_dir (a credit, RUL, AI4I failure model or defect detector)
    to out (a new or empty folder; with `archive`, a new .tar.gz file holding that folder's files).
    `detector`: the defect detector's options (refused for other models). `backend`: which of an AI4I
    model's backends the graph carries (lightgbm, the default, or moe); other models refuse it."""
    detector = detector or DetectorOptions()
    if archive:
        if not is_archive(out):
            raise BundleError(f"an archive's name ends in {SUFFIX}: {out.name}")
        if out.exists():
            raise BundleError(f"{out} exists")
        with tempfile.TemporaryDirectory(prefix="moeworks-bundle-", dir=out.parent) as work:
            result = build_bundle(model_dir, Path(work) / "bundle", sign_key=sign_key, training_data=training_data,
                                  detector=detector, backend=backend)
            partial = out.with_name(out.name + ".partial")
            write_archive(Path(result["bundle"]), partial)
            partial.replace(out)  # a half-written archive never carries the archive's name
        return {**result, "bundle": str(out), "archive": True}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder")
    if sign_key is not None:
        if not sign_key.is_file():
            raise BundleError(f"no such key file: {sign_key}")
        if out.resolve() in sign_key.resolve().parents:
            raise BundleError("the signing key must not lie inside the bundle folder")
    is_detector = (model_dir / "detector.pt").is_file()
    if detector.given and not is_detector:
        raise BundleError("--conf, --calibration, --mm-per-pixel and --moe-stage apply to defect detectors only")
    is_ai4i = (model_dir / "ai4i.json").is_file()
    if backend is not None and not is_ai4i:
        raise BundleError("a backend is chosen for AI4I failure models only (lightgbm or moe)")
    if is_detector:
        proto, card, inputs, expected = _defects(model_dir, training_data, detector)
    elif is_ai4i:
        proto, card, inputs, expected = _ai4i(model_dir, training_data, backend or "lightgbm")
    elif (model_dir / "model.pt").is_file() and (model_dir / "model.json").is_file():
        proto, card, inputs, expected = _rul(model_dir, training_data)
    elif (model_dir / "scorer.json").is_file():
        proto, card, inputs, expected = _credit(model_dir, training_data)
    else:
        raise BundleError(f"{model_dir} is no model folder a bundle covers: {COVERED}")
    operators = {n.op_type for n in proto.graph.node}
    card["graph"] = {"nodes": len(proto.graph.node), "operators": sorted(operators)}
    onnx.helper.set_model_props(proto, {CARD_KEY: json.dumps(card, sort_keys=True)})
    model_bytes = proto.SerializeToString()
    tolerances = card["runtime"]["tolerances"]
    problems = compare(run_graph(model_bytes, inputs), expected, tolerances)
    if problems:
        raise BundleError("the graph does not reproduce moeworks on the test vectors: " + "; ".join(problems))
    rows = len(next(iter(inputs.values())))

    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / MODEL).write_bytes(model_bytes)
        (out / CARD).write_text(json.dumps(card, indent=1, sort_keys=True))
        # dtypes: the inputs that are not float64 (the detector's uint8 frames), for partners that must say so
        dtypes = {i.name: "uint8" for i in proto.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.UINT8}
        (out / VECTORS).write_text(json.dumps({"rows": rows, "inputs": inputs, "expected": expected,
                                               "tolerances": tolerances, **({"dtypes": dtypes} if dtypes else {})}))
        manifest = write_manifest(out)
        if sign_key is not None:
            sign(out, sign_key)
    except BaseException:  # a half-written bundle must not look like a bundle
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {"bundle": str(out), "family": card["model"]["family"], "version": card["model"]["version"],
            "signed": sign_key is not None, "files": manifest["files"], "nodes": card["graph"]["nodes"],
            "test_vectors": rows}


def _sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def verify_bundle(bundle: Path, *, key: Path | None = None) -> dict[str, Any]:
    """Check the manifest, the signature (with key) and that the graph reproduces its test vectors;
    a .tar.gz is checked member by member, unpacked to a temporary folder and checked as a folder."""
    if is_archive(bundle):
        with extracted(bundle) as folder:
            return {**verify_bundle(folder, key=key), "bundle": str(bundle), "archive": True}
    if not bundle.is_dir():
        raise BundleIntegrityError(f"{bundle} is not a bundle folder")
    if key is not None:
        verify_signature(bundle, key)
    manifest = check_manifest(bundle)
    for name in (MODEL, CARD, VECTORS):
        if name not in manifest["files"]:
            raise BundleIntegrityError(f"the bundle has no {name}")
    if (bundle / MODEL).stat().st_size > MAX_MODEL_BYTES:
        raise BundleIntegrityError(f"{MODEL} is larger than {MAX_MODEL_BYTES >> 20} MiB")
    vectors = json.loads((bundle / VECTORS).read_text())
    problems = compare(run_graph(bundle / MODEL, vectors["inputs"]), vectors["expected"], vectors["tolerances"])
    if problems:
        raise BundleIntegrityError("the graph does not reproduce its test vectors: " + "; ".join(problems))
    return {"bundle": str(bundle), "manifest": "ok", "files": len(manifest["files"]),
            "signature": "verified" if key is not None else (
                "present, not checked (no --key)" if (bundle / SIGNATURE).is_file() else "unsigned"),
            "test_vectors": vectors["rows"]}


def inspect_bundle(bundle: Path) -> dict[str, Any]:
    """The card, the graph's inputs/outputs and the files, read without running anything."""
    if is_archive(bundle):
        with extracted(bundle) as folder:
            return {**inspect_bundle(folder), "bundle": str(bundle), "archive": True}
    if not (bundle / CARD).is_file() or not (bundle / MODEL).is_file():
        raise BundleIntegrityError(f"{bundle} is not a bundle folder (no {CARD} or {MODEL})")
    if (bundle / CARD).stat().st_size > 16 << 20:
        raise BundleIntegrityError(f"{CARD} is larger than 16 MiB")
    card = json.loads((bundle / CARD).read_text())
    return {"bundle": str(bundle), "card": card, "signed": (bundle / SIGNATURE).is_file(),
            "files": sorted(p.name for p in bundle.iterdir())}
