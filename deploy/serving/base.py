"""What every served model family shares: the adapter interface, its options, request checks.

An adapter knows its input fields (to validate requests before they reach the model), runs a
batch of rows, and splits the result back per request. The server and the batcher see only this
interface. A model family (deploy/serving/families/) is one `ModelAdapter` subclass that says how
to recognise its files (`recognise`) and how to build itself from them (`from_path`: load,
quantize, compile); `deploy.serving.registry` asks the families in turn. Families import this
module, never the registry, so there is no import cycle.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from deploy.serving.limits import RequestRefused


@dataclass(frozen=True)
class InputField:
    """One named input: dtype and the shape of a single row (the batch axis is implicit)."""

    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]
    high: tuple[int, ...] | None = None  # integer codes: column j must lie in [0, high[j])
    allow_nan: bool = False  # True where NaN means "missing" and the model imputes it (credit features)
    # True where fewer steps than row_shape[0] are accepted and padded in front with copies of the
    # first step (RUL windows: an engine younger than the window, "no change before the record began").
    pad_first_axis: bool = False


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


QUANTIZE_SCHEMES = ("none", "int8_dynamic", "int8_weight_only", "int8_static")


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

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_SCHEMES:
            raise ValueError(f"quantize={self.quantize!r}: unknown scheme; one of {list(QUANTIZE_SCHEMES)}")
        if not 1 <= self.calibration_rows <= 1_000_000:
            raise ValueError(f"calibration_rows={self.calibration_rows}: must lie in [1, 1000000]")
        if not 1 <= self.threads <= 1024:
            raise ValueError(f"threads={self.threads}: must lie in [1, 1024]")
        if not 0 <= self.conf <= 1:
            raise ValueError(f"conf={self.conf}: a score threshold in [0, 1]")


@dataclass(frozen=True)
class ModelPath:
    """A path as the families see it when recognising a model: the metadata of a checkpoint or an
    ONNX file is read once here (on first use) and shared by every family that asks."""

    path: Path

    @cached_property
    def checkpoint(self) -> dict[str, Any] | None:
        """The metadata of a weights-only checkpoint: any file but a folder or an .onnx (None then).

        Read weights-only: a file that is a full pickle (an ultralytics checkpoint, or a crafted
        file) is refused with ValueError, never unpickled.
        """
        if not self.path.is_file() or self.path.suffix == ".onnx":
            return None
        from core.trainer import CheckpointError, read_checkpoint

        try:
            return read_checkpoint(self.path)["metadata"]
        except CheckpointError as error:
            raise ValueError(f"{error}; serve a moeworks checkpoint, model folder or .onnx export") from None

    @cached_property
    def onnx(self) -> dict[str, str] | None:
        """The metadata properties of an .onnx file (None for anything else); ValueError if unreadable."""
        if not self.path.is_file() or self.path.suffix != ".onnx":
            return None
        import onnx

        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as error:  # noqa: BLE001 - onnx raises DecodeError and others for a broken file
            raise ValueError(f"{self.path}: not a readable ONNX model ({error})") from None
        return {p.key: p.value for p in proto.metadata_props}


class ModelAdapter(ABC):
    """Validate requests, run batches, split results. Subclasses set `fields` and implement `predict`.

    A family is a subclass that also names itself (`family`, `describes`), recognises its files
    (`recognise`), checks the options before anything loads (`check_options`) and builds itself
    (`from_path`, where loading, quantizing and compiling happen; `__init__` only stores the parts,
    keyword-only). `fallback` families (any other .onnx) are asked after every specific one.
    """

    family: ClassVar[str]  # the name the registry lists
    describes: ClassVar[str]  # what it serves, in a few words (the registry's refusal lists them)
    fallback: ClassVar[bool] = False

    name: str
    version: str
    runtime: str
    fields: list[InputField]
    options: AdapterOptions

    @classmethod
    @abstractmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        """True where `candidate` is this family's model (a folder or a file); False otherwise.
        ValueError (one line) for a file that cannot be read safely (a pickled .pt)."""

    @classmethod
    @abstractmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        """Refuse options this family cannot apply to `path` (ValueError, one line), before loading."""

    @classmethod
    @abstractmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None) -> ModelAdapter:
        """Load (and quantize, compile) the model at `path` into an adapter ready to `predict`."""

    @classmethod
    def start_loading(cls, path: str | Path, options: AdapterOptions | None) -> tuple[Path, AdapterOptions]:
        """`from_path`'s first step in every family: the default options, the family's refusals
        (`check_options`) before anything loads, and torch's threads for the loading thread (the
        batcher's thread gets them again in `prepare_thread`)."""
        import torch

        path, options = Path(path), options or AdapterOptions()
        cls.check_options(path, options)
        torch.set_num_threads(options.threads)
        return path, options

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
        import torch

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
