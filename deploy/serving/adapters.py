"""Model adapters: one interface in front of a PyTorch checkpoint or an ONNX file.

An adapter knows its input fields (to validate requests before they reach the model), runs a
batch of rows, and splits the result back per request. The server and the batcher see only this
interface, so a new model kind (the credit scorer, RUL, defects) is a new adapter or a new entry in
`deploy.serving.models.LOADERS`, not a change to the server.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from deploy.serving.limits import RequestRefused
from deploy.serving.models import InputField, load_model


class InvalidRequest(RequestRefused):
    """A request that does not fit the model's inputs (422); `loc` names the field (and row)."""

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(422, loc, message)


REQUEST_KEYS = ("instances", "timeout_ms")


def request_instances(payload: Any, *, max_rows: int) -> list:
    """The `instances` list of a JSON body {"instances": [...]}, checked for shape and size."""
    if not isinstance(payload, dict):
        raise InvalidRequest(["body"], "expected a JSON object with an `instances` list")
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise InvalidRequest(["body", unknown[0]], f"unknown key; a request has {list(REQUEST_KEYS)}")
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidRequest(["body", "instances"], "expected a non-empty list of objects")
    if len(instances) > max_rows:
        raise InvalidRequest(["body", "instances"], f"{len(instances)} instances; at most {max_rows} per request")
    return instances


_NONE = type(None)


def strict_numbers(raw: Any, ndim: int, loc: list[str | int], *, allow_none: bool = False) -> np.ndarray:
    """Nested lists of JSON numbers (`ndim` levels; 0: one number) as float64, type by type.

    numpy would take `true` as 1.0 and "1.5" as 1.5; here a boolean, a string or an object is
    refused, naming the field and the position of the first offender. None (JSON null) becomes
    NaN where `allow_none` (missing, imputed by the model).
    """
    items = [raw]
    for _ in range(ndim):
        if not all(type(x) is list for x in items):
            raise InvalidRequest(loc, f"expected {ndim}-level nested lists of numbers")
        items = [y for x in items for y in x]
    allowed = {int, float, _NONE} if allow_none else {int, float}
    kinds = set(map(type, items))
    if not kinds <= allowed:
        at = next(i for i, x in enumerate(items) if type(x) not in allowed)
        bad = items[at]
        what = ("a boolean" if isinstance(bad, bool) else "a string" if isinstance(bad, str)
                else "null" if bad is None else "a list (nested too deep)" if isinstance(bad, list) else "an object")
        raise InvalidRequest(loc + ([at] if ndim else []), f"expected a number, got {what}")
    try:
        return np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):  # ragged lists
        raise InvalidRequest(loc, "expected a rectangular array of numbers") from None


def example_rows(fields: list[InputField], rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` generated rows for `fields`: standard normal floats, uniform valid integer codes."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in fields:
        shape = (rows, *spec.row_shape)
        if spec.dtype.kind in "iu":
            high = np.asarray(spec.high if spec.high is not None else (2,) * spec.row_shape[-1])
            out[spec.name] = (rng.random(shape) * high).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def file_version(path: Path) -> str:
    """A content version for a model file: the first 12 hex digits of its sha256."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@dataclass
class AdapterOptions:
    # torch: int8_dynamic | int8_weight_only (AWQ + torchao); ONNX: int8_dynamic | int8_static (onnxruntime)
    quantize: Literal["none", "int8_dynamic", "int8_weight_only", "int8_static"] = "none"
    fuse: bool = False  # torch: torch.compile the dense parts; ONNX: ORT's extended graph fusions
    calibration: Path | None = None  # .npz of named input arrays for AWQ / static quantization
    calibration_rows: int = 512  # generated rows when no calibration file is given
    threads: int = 1  # intra-op threads of the runtime: one core per worker process
    camera: Path | None = None  # defects: calibration file (mm per pixel, min size mm); None: the 0.1 mm/px default
    conf: float = 0.25  # defects: score threshold of reported boxes (the inspector's default)


class ModelAdapter(ABC):
    """Validate requests, run batches, split results. Subclasses set `fields` and implement `predict`."""

    name: str
    version: str
    runtime: str
    fields: list[InputField]
    options: AdapterOptions

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named arrays with `rows` rows each -> named outputs with `rows` rows each."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model_version": self.version, "runtime": self.runtime,
                "inputs": {f.name: {"dtype": f.dtype.name, "row_shape": list(f.row_shape)} for f in self.fields}}

    def instance_schema(self) -> dict[str, Any]:
        """JSON Schema of one instance (the OpenAPI document shows it; schemathesis generates from it)."""
        properties = {}
        for spec in self.fields:
            limit = float(np.finfo(spec.dtype).max) if spec.dtype.kind == "f" else None
            leaf: dict[str, Any] = {"type": "integer", "minimum": 0} if spec.dtype.kind in "iu" else \
                {"type": "number", "minimum": -limit, "maximum": limit}
            if spec.allow_nan:
                leaf = {"anyOf": [leaf, {"type": "null"}]}
            for size in reversed(spec.row_shape):
                leaf = {"type": "array", "items": leaf, "minItems": size, "maxItems": size}
            properties[spec.name] = leaf
        return {"type": "object", "properties": properties, "required": [f.name for f in self.fields],
                "additionalProperties": False}

    def parse(self, payload: Any, *, max_rows: int = 256) -> tuple[dict[str, np.ndarray], int]:
        """JSON body {"instances": [{field: value, ...}, ...]} -> (named arrays, rows)."""
        instances = request_instances(payload, max_rows=max_rows)
        known = {f.name for f in self.fields}
        if all(type(i) is dict and i.keys() == known for i in instances):
            fast = {spec.name: self._column(instances, spec) for spec in self.fields}
            if all(v is not None for v in fast.values()):
                return fast, len(instances)
        # Something is off somewhere: row by row, so that the answer names the first offender.
        columns: dict[str, list[np.ndarray]] = {f.name: [] for f in self.fields}
        for row, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise InvalidRequest(["body", "instances", row], "expected an object of named inputs")
            unknown = sorted(set(instance) - known)
            if unknown:
                raise InvalidRequest(["body", "instances", row, unknown[0]],
                                     f"unknown input; this model reads {sorted(known)}")
            for spec in self.fields:
                columns[spec.name].append(self._value(instance, spec, row))
        return {name: np.stack(values) for name, values in columns.items()}, len(instances)

    @staticmethod
    def _column(instances: list[dict], spec: InputField) -> np.ndarray | None:
        """One field of every row at once, or None when any row breaks a rule (then `_value` row by
        row finds and names it). The same rules as `_value`, in a few vectorised passes: validating
        256 rows one by one cost about as much CPU as computing them."""
        if spec.pad_first_axis or spec.allow_nan:
            return None  # padding and nulls are per row: the row-by-row path handles them
        items = [i[spec.name] for i in instances]
        for _ in range(len(spec.row_shape)):
            if not all(type(x) is list for x in items):
                return None
            items = [y for x in items for y in x]
        if not set(map(type, items)) <= {int, float}:
            return None
        try:
            value = np.asarray([i[spec.name] for i in instances], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if value.shape != (len(instances), *spec.row_shape):
            return None
        if spec.dtype.kind == "f" and (np.abs(value) > float(np.finfo(spec.dtype).max)).any():
            return None
        if spec.dtype.kind in "iu":
            if (value != np.round(value)).any():
                return None
            if spec.high is not None and ((value < 0) | (value >= np.asarray(spec.high))).any():
                return None
        return value.astype(spec.dtype)

    @staticmethod
    def _value(instance: dict[str, Any], spec: InputField, row: int) -> np.ndarray:
        loc: list[str | int] = ["body", "instances", row, spec.name]
        if spec.name not in instance:
            raise InvalidRequest(loc, "field required")
        raw = instance[spec.name]
        ndim = len(spec.row_shape)
        if spec.pad_first_axis and type(raw) is list and len(raw) > spec.row_shape[0]:
            raise InvalidRequest(loc, f"expected 1 to {spec.row_shape[0]} steps, got {len(raw)}")
        if ndim and type(raw) is list and len(raw) != spec.row_shape[0] and not spec.pad_first_axis:
            raise InvalidRequest(loc, f"expected shape {list(spec.row_shape)}, got {len(raw)} items")
        value = strict_numbers(raw, ndim, loc, allow_none=spec.allow_nan)
        if spec.pad_first_axis and value.ndim == len(spec.row_shape) and value.shape[1:] == spec.row_shape[1:] \
                and 1 <= value.shape[0] < spec.row_shape[0]:
            value = np.concatenate([np.repeat(value[:1], spec.row_shape[0] - value.shape[0], axis=0), value])
        if value.shape != spec.row_shape:
            steps = f"1 to {spec.row_shape[0]} steps of " if spec.pad_first_axis else ""
            raise InvalidRequest(loc, f"expected shape {steps}{list(spec.row_shape)}, got {list(value.shape)}")
        if spec.dtype.kind == "f":  # a float32 input would turn 1e39 into infinity: refused, not rounded
            limit = float(np.finfo(spec.dtype).max)
            bad = np.flatnonzero(np.abs(value) > limit)
            if bad.size:
                where = loc + [int(bad[0])] if value.ndim else loc
                raise InvalidRequest(where, f"{value.flat[int(bad[0])]:g} is outside the {spec.dtype.name} "
                                            f"range (+-{limit:.4g})")
        if spec.dtype.kind in "iu":
            if (value != np.round(value)).any():
                raise InvalidRequest(loc, "expected integer codes")
            if spec.high is not None:
                bad = np.flatnonzero((value < 0) | (value >= np.asarray(spec.high)))
                if bad.size:
                    j = int(bad[0])
                    raise InvalidRequest(loc + [j], f"code {int(value.flat[j])} outside [0, {spec.high[j]})")
        return value.astype(spec.dtype)

    def prepare_thread(self) -> None:
        """Apply the runtime's per-thread settings in the thread about to run `predict`.

        torch.set_num_threads reaches OpenMP and MKL only in the calling OS thread (torch applies
        it lazily elsewhere, and not before an LSTM or GEMM call that goes straight to MKL). Set
        only where the model was loaded, a fresh thread ran the RUL LSTM on an OpenMP team of
        every core: 25 ms CPU and 66 ms per one-row request against 0.35 ms and 0.8 ms (measured,
        2-core machine under load). onnxruntime sessions carry their own thread counts.
        """
        torch.set_num_threads(self.options.threads)

    def warm_up_sizes(self, max_rows: int) -> list[int]:
        """Batch sizes to run before taking traffic: torch.compile keeps separate graphs for 1 row
        (and for expert slices of 1), then one dynamic graph from 2 up."""
        return sorted({1, 2, 3, 7, 16, max_rows})

    def example(self, rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Generated inputs that fit the fields (warm-up; calibration when no file is given)."""
        return example_rows(self.fields, rows, seed=seed)

    def run_batch(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """The batcher's call: concatenate the requests' rows, predict once, split per request."""
        if len(requests) == 1:
            return [self.predict(requests[0])]
        joined = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        outputs = self.predict(joined)
        bounds = np.cumsum([len(next(iter(r.values()))) for r in requests])[:-1]
        split = {name: np.split(value, bounds) for name, value in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(requests))]


def _load_calibration(options: AdapterOptions, adapter: ModelAdapter) -> dict[str, np.ndarray]:
    if options.calibration is None:
        return adapter.example(options.calibration_rows, seed=1)
    with np.load(options.calibration) as data:
        missing = [f.name for f in adapter.fields if f.name not in data]
        if missing:
            raise ValueError(f"{options.calibration}: calibration arrays missing {missing}")
        return {f.name: data[f.name].astype(f.dtype) for f in adapter.fields}


class TorchAdapter(ModelAdapter):
    """A saved core checkpoint (see deploy.serving.models) run by PyTorch, optionally INT8 and fused."""

    def __init__(self, path: str | Path, options: AdapterOptions | None = None) -> None:
        from core.fused import fuse_model
        from core.quantization import AWQConfig, AWQQuantizer, compile_quantized

        self.options = options = options or AdapterOptions()
        path = Path(path)
        torch.set_num_threads(options.threads)
        loaded = load_model(path)
        self.fields = loaded.fields
        self.name = loaded.metadata.get("name", path.stem)
        self.version = loaded.metadata.get("version") or file_version(path)
        model = loaded.model.eval()
        variant = ["torch", "fp32"]
        if options.quantize in ("int8_dynamic", "int8_weight_only"):
            arrays = _load_calibration(options, self)
            batches = [{k: torch.from_numpy(v[s:s + 128]) for k, v in arrays.items()}
                       for s in range(0, len(next(iter(arrays.values()))), 128)]
            with torch.no_grad():
                model = AWQQuantizer(AWQConfig(scheme=options.quantize)).fit(model, batches).transform(model)
            if not options.fuse:  # torchao's int8 kernels want torch.compile; fuse_model compiles them anyway
                model = compile_quantized(model)
            variant[1] = options.quantize
        elif options.quantize != "none":
            raise ValueError(f"quantize={options.quantize!r} is not a PyTorch scheme (int8_dynamic, int8_weight_only)")
        if options.fuse:
            model = fuse_model(model)
            variant.append("fused")
        self.model = model
        self.runtime = "+".join(variant)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].float().numpy()
        out = {"logits": logits}
        if logits.shape[-1] == 1:
            out["probability"] = 1 / (1 + np.exp(-logits))
        return out


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
              "tensor(double)": np.float64}


class OnnxAdapter(ModelAdapter):
    """An ONNX file run by onnxruntime; optionally quantized to INT8 at load (dynamic or QDQ static)."""

    def __init__(self, path: str | Path, options: AdapterOptions | None = None, *,
                 work_dir: Path | None = None, quantize_ops: list[str] | None = None) -> None:
        import onnx
        import onnxruntime as ort

        from core.onnx_export import available_providers
        from core.quantization import quantize_onnx

        self.options = options = options or AdapterOptions()
        path = Path(path)
        proto = onnx.load(str(path), load_external_data=False)
        metadata = {p.key: p.value for p in proto.metadata_props}
        self.name = metadata.get("name", path.stem)
        self.version = metadata.get("version") or file_version(path)
        highs = self._categorical_bounds(metadata)
        # Inputs whose NaN means "missing" (the graph imputes it), as the exporter declared them.
        missing = set(filter(None, metadata.get("nan_means_missing", "").split(",")))
        self.fields = []
        for value in proto.graph.input:
            tensor = value.type.tensor_type
            elem = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim][1:]
            if any(d is None for d in dims):
                raise ValueError(f"{path}: input {value.name} has a dynamic non-batch axis {dims}; not servable")
            self.fields.append(InputField(value.name, np.dtype(elem), tuple(dims), high=highs.get(value.name),
                                          allow_nan=value.name in missing and np.dtype(elem).kind == "f"))
        run_path, variant = path, "fp32"
        if options.quantize in ("int8_dynamic", "int8_static"):
            work_dir = work_dir or path.parent
            run_path = work_dir / f"{path.stem}.{options.quantize}.onnx"
            mode = "dynamic" if options.quantize == "int8_dynamic" else "static"
            calibration = _load_calibration(options, self) if mode == "static" else None
            quantize_onnx(path, run_path, mode=mode, calibration=calibration, op_types=quantize_ops)
            variant = options.quantize
        elif options.quantize != "none":
            raise ValueError(f"quantize={options.quantize!r} is not an ONNX scheme (int8_dynamic, int8_static)")
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
        # ORT's fused kernels (GELU, bias+GELU, LayerNorm, MatMul+Add, attention) are its "extended"
        # and layout levels: `fuse` turns them on; without it only basic graph clean-ups run.
        level = ort.GraphOptimizationLevel
        session_options.graph_optimization_level = level.ORT_ENABLE_ALL if options.fuse else level.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(str(run_path), sess_options=session_options,
                                            providers=available_providers())
        # Per-row outputs only (a scalar auxiliary loss is not an answer).
        self.outputs = [o.name for o in self.session.get_outputs() if len(o.shape) >= 1]
        self.runtime = f"onnxruntime+{variant}" + ("+fused" if options.fuse else "")

    @staticmethod
    def _categorical_bounds(metadata: dict[str, str]) -> dict[str, tuple[int, ...]]:
        """`categorical` code ranges from a TabularMoE config saved in the file's metadata, if any."""
        try:
            config = json.loads(metadata.get("config", "{}"))
        except json.JSONDecodeError:
            return {}
        cards = config.get("categorical_cardinalities") if isinstance(config, dict) else None
        return {"categorical": tuple(cards)} if cards else {}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, inputs)
        out = dict(zip(self.outputs, values, strict=True))
        if "logits" in out and out["logits"].ndim == 2 and out["logits"].shape[-1] == 1:
            out["probability"] = 1 / (1 + np.exp(-out["logits"].astype(np.float64)))
        return out


def _checkpoint_kind(path: Path) -> str | None:
    """metadata["kind"] of a weights-only checkpoint of ours (None when it names none).

    Read weights-only: a .pt that is a full pickle (an ultralytics checkpoint, or a crafted file)
    is refused with ValueError, never unpickled.
    """
    from core.trainer import CheckpointError, read_checkpoint

    try:
        kind = read_checkpoint(path)["metadata"].get("kind")
    except CheckpointError as error:
        raise ValueError(f"{error}; serve a moeworks checkpoint, model folder or .onnx export") from None
    return kind if isinstance(kind, str) else None


def check_model_path(path: str | Path) -> None:
    """What `moeworks serve` checks before starting workers: a model folder matches its MANIFEST.json,
    a file matches its folder's manifest (when there is one), and a .pt is a weights-only checkpoint.
    ValueError with one line otherwise."""
    from core.model_files import verify_file, verify_manifest

    path = Path(path)
    if path.is_dir():
        verify_manifest(path)
        return
    verify_file(path)
    if path.suffix != ".onnx":
        _checkpoint_kind(path)


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - onnx raises DecodeError and others for a broken file
        raise ValueError(f"{path}: not a readable ONNX model ({error})") from None
    return {p.key: p.value for p in proto.metadata_props}


def load_adapter(path: str | Path, options: AdapterOptions | None = None) -> ModelAdapter:
    """An adapter by what `path` is.

    Folders: a credit scorer (scorer.json; any `finance train` model, raw application fields), a RUL
    model (`moeworks maintenance train`: model.pt + model.json), a defects run or export folder
    (detector.pt / detector.onnx). Files: an .onnx
    (the RUL or detector export by its metadata, any other ONNX by its inputs), a YOLO checkpoint
    (the weights-only detector.pt of `defects train`), or a core checkpoint. A .pt that is not
    weights-only (an ultralytics checkpoint, a crafted pickle) is refused, never unpickled.
    """
    from deploy.serving.credit import CreditAdapter
    from deploy.serving.defects import DefectsAdapter, is_defects_folder
    from deploy.serving.maintenance import RULAdapter, is_rul_folder

    path = Path(path)
    if path.is_dir():
        if (path / "scorer.json").is_file():
            return CreditAdapter(path, options)
        if is_rul_folder(path):
            return RULAdapter(path, options)
        if is_defects_folder(path):
            return DefectsAdapter(path, options)
        raise ValueError(f"{path}: not a model folder (credit scorer, RUL model or defects run/export)")
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path} (a checkpoint, an .onnx file or a model folder)")
    if path.suffix == ".onnx":
        metadata = _onnx_metadata(path)
        if "normalizer" in metadata and "net" in metadata:
            return RULAdapter(path, options)
        if "names" in metadata and "imgsz" in metadata:
            return DefectsAdapter(path, options)
        return OnnxAdapter(path, options)
    if path.name == "model.pt" and is_rul_folder(path.parent):
        return RULAdapter(path.parent, options)
    from manufacturing.defects.detector import DETECTOR_KIND

    if _checkpoint_kind(path) == DETECTOR_KIND:  # refuses a full pickle: nothing is unpickled
        return DefectsAdapter(path, options)
    return TorchAdapter(path, options)


def row_to_json(outputs: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """One row of outputs as JSON values: a one-element vector becomes a number; rows of object
    arrays (a list of defects) are JSON values already and pass as they are."""
    answer = {}
    for name, value in outputs.items():
        item = value[row]
        if value.dtype == object:
            answer[name] = item
            continue
        item = item.tolist()
        if isinstance(item, list) and len(item) == 1:
            item = item[0]
        if isinstance(item, float) and not math.isfinite(item):
            item = None
        answer[name] = item
    return answer
