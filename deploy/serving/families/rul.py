"""Serving the RUL models of manufacturing/maintenance: a `maintenance train` folder or its ONNX export.

A request carries one engine's recent cycles in raw units, the C-MAPSS columns the model reads:
`cycles` (up to `window` rows of [setting_1, setting_2, setting_3, <the model's sensors>], oldest
first; /v1/model lists the columns). The adapter normalises them with the model's own fitted
normaliser (per operating regime, as in training), pads a short history in front with copies of
its first cycle (as the training windows do), and answers `rul` in cycles. A model trained with
regime-history features (the MoE recipe) also reads `regime_cycles`: the cycles the engine has
run in each operating regime (normaliser order), up to and including the last cycle sent; one with
running-mean features reads it and `regime_sensor_sums`: each of the model's sensors, in raw
units, summed over the cycles run in each regime (regimes x sensors, same cycles). Both are
counters an engine controller keeps; the server turns them into the training features exactly.
The network runs in PyTorch (the folder) or onnxruntime (the export, optionally INT8, LSTM weights
included).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from deploy.serving.base import AdapterOptions, InputField, ModelAdapter, ModelPath, file_version
from deploy.serving.optimise import check_onnx_options

if TYPE_CHECKING:
    from manufacturing.maintenance.features import ConditionNormalizer

SETTINGS = ["setting_1", "setting_2", "setting_3"]


# Models with regime-history features also read, per request, the cycles the engine has run in
# each operating regime up to and including the last cycle sent (its controller's counters).
HISTORY_FIELD = "regime_cycles"
SUMS_FIELD = "regime_sensor_sums"  # models with running-mean features: raw sensor sums per regime


def _window_history(regime: np.ndarray, totals: np.ndarray, regimes: int) -> np.ndarray:
    """(batch, window) regime per row, (batch, regimes) totals at the last row -> (batch * window,
    regimes) counts at each row. Rows older than the engine (the padding of a young engine, age
    below 1) take the first real row's counts, as the training windows pad; counts are floored at 0."""
    one_hot = np.eye(regimes)[regime]  # (batch, window, regimes)
    later = np.flip(np.cumsum(np.flip(one_hot, 1), 1), 1) - one_hot  # cycles sent after each row
    counts = np.maximum(totals[:, None, :] - later, 0)
    age = counts.sum(-1)  # (batch, window)
    first = np.argmax(age >= 1, axis=1)  # the first real row (0 when every row is real)
    rows = np.maximum(np.arange(regime.shape[1])[None, :], first[:, None])
    return np.take_along_axis(counts, rows[..., None], axis=1).reshape(-1, regimes)


def _window_running(normalised: np.ndarray, sums: np.ndarray, age: np.ndarray) -> np.ndarray:
    """(batch, window, sensors) normalised rows, (batch, sensors) their sums over the engine's life
    up to the last row, (batch,) its age in cycles -> (batch * window, sensors) the running mean at
    each row. Rows older than the engine (padding) take the first real row's mean, as training pads."""
    window = normalised.shape[1]
    later = np.flip(np.cumsum(np.flip(normalised, 1), 1), 1) - normalised  # sums over the rows after each
    count = age[:, None] - (window - 1 - np.arange(window))[None, :]  # (batch, window) cycles up to each row
    means = (sums[:, None, :] - later) / np.maximum(count, 1)[..., None]
    first = np.argmax(count >= 1, axis=1)  # the first real row (0 when every row is real)
    rows = np.maximum(np.arange(window)[None, :], first[:, None])
    return np.take_along_axis(means, rows[..., None], axis=1).reshape(-1, normalised.shape[-1])


def is_rul_folder(path: Path) -> bool:
    """A `moeworks maintenance train` output: model.pt beside a model.json that names the net."""
    try:
        return (path / "model.pt").is_file() and "net" in json.loads((path / "model.json").read_text())
    except (OSError, ValueError):
        return False


class RULAdapter(ModelAdapter):
    """RUL from raw cycles. Input `cycles` (<= window, 3 + sensors) float32; output `rul` (cycles)."""

    family = "rul"
    describes = "a `maintenance train` folder, its model.pt or its .onnx export"

    def __init__(self, *, run: Callable[[np.ndarray], np.ndarray], normalizer: ConditionNormalizer,
                 fields: list[InputField], columns: list[str], output: str, name: str, version: str, runtime: str,
                 options: AdapterOptions) -> None:
        """run: (batch, window, features) float32 model windows -> (batch,) RUL in cycles."""
        self._run, self.normalizer, self.fields, self.columns, self.output = run, normalizer, fields, columns, output
        self.name, self.version, self.runtime, self.options = name, version, runtime, options

    @classmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        path = candidate.path
        if path.is_dir():
            return is_rul_folder(path)
        if path.name == "model.pt":
            return is_rul_folder(path.parent)
        metadata = candidate.onnx
        return metadata is not None and "normalizer" in metadata and "net" in metadata

    @classmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        if path.is_dir() or path.name == "model.pt":
            if options.quantize != "none" or options.fuse:
                raise ValueError(f"{path}: INT8 and fusion of a RUL model run through its ONNX export "
                                 "(`moeworks maintenance export`); serve the .onnx file with --quantize")
        else:
            check_onnx_options(options)

    @classmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None) -> RULAdapter:
        """A `maintenance train` folder (or its model.pt) runs in PyTorch; its .onnx export in onnxruntime."""
        from manufacturing.maintenance.export import RUL_INPUT, RUL_OUTPUT
        from manufacturing.maintenance.features import ConditionNormalizer

        source = Path(path)
        if source.name == "model.pt" and not source.is_dir():
            source = source.parent  # the folder's checkpoint: its normaliser lives beside it
        source, options = cls.start_loading(source, options)
        if source.is_dir():
            from manufacturing.maintenance.rul import CHECKPOINT, RULEstimator

            estimator = RULEstimator.load(source)
            normalizer, window, kind = estimator.normalizer_, estimator.net_.window, estimator.net_.kind

            def run(windows: np.ndarray) -> np.ndarray:
                return estimator.predict_windows(torch.from_numpy(windows))

            version, runtime = file_version(source / CHECKPOINT), "torch+fp32"
        else:
            from core.quantization import QUANTIZED_ONNX_OPS
            from deploy.serving.families.onnx import OnnxAdapter

            # LSTM weights are most of an LSTM RUL model: INT8 covers them too (as the edge export does).
            inner = OnnxAdapter.from_path(source, options, quantize_ops=[*QUANTIZED_ONNX_OPS, "LSTM"])
            metadata = inner.session.get_modelmeta().custom_metadata_map
            normalizer = ConditionNormalizer.from_state(json.loads(metadata["normalizer"]))
            net = json.loads(metadata["net"])
            window, kind = int(net["window"]), net["kind"]

            def run(windows: np.ndarray) -> np.ndarray:
                return inner.predict({RUL_INPUT: windows})[RUL_OUTPUT]

            version, runtime = inner.version, inner.runtime
        columns = [*SETTINGS, *normalizer.sensors_]
        fields = [InputField("cycles", np.dtype(np.float32), (window, len(columns)), pad_first_axis=True)]
        config, regimes = normalizer.config, len(normalizer.centers_)
        if config.history or config.running_mean:
            fields.append(InputField(HISTORY_FIELD, np.dtype(np.float32), (regimes,)))
        if config.running_mean:  # float64: sums of raw readings over hundreds of cycles
            fields.append(InputField(SUMS_FIELD, np.dtype(np.float64), (regimes, len(normalizer.sensors_))))
        return cls(run=run, normalizer=normalizer, fields=fields, columns=columns, output=RUL_OUTPUT,
                   name=f"rul-{kind}", version=version, runtime=runtime, options=options)

    def describe(self) -> dict:
        return {**super().describe(), "columns": self.columns}

    def example(self, rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Cycles at the normaliser's own regime centres and sensor means, plus noise (warm-up)."""
        rng = np.random.default_rng(seed)
        window = self.fields[0].row_shape[0]
        regime = rng.integers(0, len(self.normalizer.centers_), size=(rows, window))
        settings = self.normalizer.centers_[regime] * self.normalizer.setting_scale_  # (rows, window, 3)
        sensors = self.normalizer.mean_[regime] + rng.standard_normal((rows, window, len(self.normalizer.sensors_)))
        example = {"cycles": np.concatenate([settings, sensors], axis=-1).astype(np.float32)}
        one_hot = np.eye(len(self.normalizer.centers_))[regime]  # an engine whose life so far is the window itself
        if any(f.name == HISTORY_FIELD for f in self.fields):
            example[HISTORY_FIELD] = one_hot.sum(1).astype(np.float32)
        if any(f.name == SUMS_FIELD for f in self.fields):
            example[SUMS_FIELD] = np.einsum("bwr,bws->brs", one_hot, sensors)
        return example

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cycles = inputs["cycles"]  # (batch, window, 3 + sensors)
        batch, window, columns = cycles.shape
        flat = cycles.reshape(-1, columns)
        config, history, running = self.normalizer.config, None, None
        if config.history:
            regime = self.normalizer.regimes(flat[:, :3]).reshape(batch, window)
            history = _window_history(regime, inputs[HISTORY_FIELD], len(self.normalizer.centers_))
        if config.running_mean:
            normalised = self.normalizer.normalise(flat[:, :3], flat[:, 3:]).reshape(batch, window, -1)
            sums = self.normalizer.normalised_sums(inputs[SUMS_FIELD], inputs[HISTORY_FIELD])
            running = _window_running(normalised, sums, inputs[HISTORY_FIELD].sum(-1))
        windows = self.normalizer.transform_arrays(flat[:, :3], flat[:, 3:], history, running)
        windows = windows.reshape(batch, window, -1)
        return {self.output: np.asarray(self._run(np.ascontiguousarray(windows, dtype=np.float32)))}
