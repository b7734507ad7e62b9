"""Local inference on the edge: an ONNX RUL model (FP32 or INT8) over a sliding window of cycles.

Two contracts, read from the file's metadata_props:
- `moeworks maintenance export`: `normalizer` (the per-regime sensor normaliser's JSON state) and
  `net` (with `window`); each cycle is normalised on the device exactly as in training.
- raw features: `features` (JSON list of metric names, in input order) and `window`.
Optionally `rul_rmse` (or the exported `metrics.val_rmse`): the estimate's spread, cycles.
Input (1, window, features) float32, output RUL in cycles, (1,) or (1, 1). Until `window` cycles
have arrived the first cycle is repeated (the usual padding for C-MAPSS windows).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from core.model_files import ModelFilesError, verify_file
from core.onnx_export import inference_session


class EdgeModelError(ValueError):
    pass


class OnnxRULEstimator:
    def __init__(self, path: str | Path, *, threads: int = 1):
        path = Path(path)
        if not path.exists():
            raise EdgeModelError(f"{path}: ONNX model not found")
        try:  # an ONNX file runs no Python; the manifest beside it (if any) catches a swapped or damaged copy
            verify_file(path)
        except ModelFilesError as error:
            raise EdgeModelError(str(error)) from None
        self.session = inference_session(path, threads=threads)  # one thread: small devices, no contention
        meta = self.session.get_modelmeta().custom_metadata_map
        self.normalizer = None
        try:
            if "normalizer" in meta:
                from manufacturing.maintenance.features import ConditionNormalizer

                self.normalizer = ConditionNormalizer.from_state(json.loads(meta["normalizer"]))
                self.window = int(json.loads(meta["net"])["window"])
                # twin metric names: setting1..3 and s1..s21 for the model's setting_i / s_i
                self.features = [f"setting{i}" for i in (1, 2, 3)] + [s.replace("_", "")
                                                                      for s in self.normalizer.sensors_]
                rmse = json.loads(meta.get("metrics", "{}")).get("val_rmse")
            else:
                self.features = json.loads(meta["features"])
                self.window = int(meta["window"])
                rmse = meta.get("rul_rmse")
        except (KeyError, ValueError) as exc:
            raise EdgeModelError(f"{path}: metadata needs 'normalizer' and 'net' (a `maintenance export` file) "
                                 f"or 'features' (JSON list) and 'window': {exc}") from None
        self.rul_rmse = float(rmse) if rmse is not None else None
        self.input_name = self.session.get_inputs()[0].name
        self._rows: deque[np.ndarray] = deque(maxlen=self.window)
        # The engine's life so far, for history and running-mean features (ConditionNormalizer.advance):
        # cycles run in each regime and the normalised sensors summed over every cycle.
        self._history: np.ndarray | None = None
        self._sums: np.ndarray | None = None

    def update(self, values: dict[str, Any]) -> float | None:
        try:
            row = np.array([float(values[f]) for f in self.features], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return None  # a tick without every feature: no estimate rather than a wrong one
        if self.normalizer is not None:
            row, self._history, self._sums = self.normalizer.advance(row[None, :3], row[None, 3:], self._history,
                                                                     self._sums)
        if not self._rows:
            self._rows.extend([row] * self.window)
        self._rows.append(row)
        window = np.stack(self._rows)[None]  # (1, window, features)
        out = self.session.run(None, {self.input_name: window})[0]
        return float(np.asarray(out).reshape(-1)[0])
