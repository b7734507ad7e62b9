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
from pathlib import Path

import numpy as np
import torch

from deploy.serving.adapters import AdapterOptions, ModelAdapter, OnnxAdapter, file_version
from deploy.serving.models import InputField

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

    def __init__(self, source: str | Path, options: AdapterOptions | None = None) -> None:
        from manufacturing.maintenance.export import RUL_INPUT, RUL_OUTPUT
        from manufacturing.maintenance.features import ConditionNormalizer

        self.options = options = options or AdapterOptions()
        source = Path(source)
        torch.set_num_threads(options.threads)
        if source.is_dir():
            from manufacturing.maintenance.rul import CHECKPOINT, RULEstimator

            if options.quantize != "none" or options.fuse:
                raise ValueError(f"{source}: INT8 and fusion of a RUL model run through its ONNX export "
                                 "(`moeworks maintenance export`); serve the .onnx file with --quantize")
            estimator = RULEstimator.load(source)
            self.normalizer, window, kind = estimator.normalizer_, estimator.net_.window, estimator.net_.kind
            self._run = lambda windows: estimator.predict_windows(torch.from_numpy(windows))
            self.version, self.runtime = file_version(source / CHECKPOINT), "torch+fp32"
        else:
            from core.quantization import QUANTIZED_ONNX_OPS

            # LSTM weights are most of an LSTM RUL model: INT8 covers them too (as the edge export does).
            inner = OnnxAdapter(source, options, quantize_ops=[*QUANTIZED_ONNX_OPS, "LSTM"])
            metadata = inner.session.get_modelmeta().custom_metadata_map
            self.normalizer = ConditionNormalizer.from_state(json.loads(metadata["normalizer"]))
            net = json.loads(metadata["net"])
            window, kind = int(net["window"]), net["kind"]
            self._run = lambda windows: inner.predict({RUL_INPUT: windows})[RUL_OUTPUT]
            self.version, self.runtime = inner.version, inner.runtime
        self.output = RUL_OUTPUT
        self.name = f"rul-{kind}"
        self.columns = [*SETTINGS, *self.normalizer.sensors_]
        self.fields = [InputField("cycles", np.dtype(np.float32), (window, len(self.columns)), pad_first_axis=True)]
        config, regimes = self.normalizer.config, len(self.normalizer.centers_)
        if config.history or config.running_mean:
            self.fields.append(InputField(HISTORY_FIELD, np.dtype(np.float32), (regimes,)))
        if config.running_mean:  # float64: sums of raw readings over hundreds of cycles
            self.fields.append(InputField(SUMS_FIELD, np.dtype(np.float64), (regimes, len(self.normalizer.sensors_))))

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
