"""Local inference on the edge: an ONNX RUL model (FP32 or INT8) over a sliding window of cycles.

The model file carries its contract in metadata_props: `features` (JSON list of metric names, in
input order) and `window` (cycles per input); optionally `rul_rmse` (validation RMSE, cycles),
which the twin uses as the spread of the estimate. Input (1, window, features) float32, output
RUL in cycles, (1,) or (1, 1). Until `window` cycles have arrived the first cycle is repeated
(the usual padding for C-MAPSS windows).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from core.onnx_export import inference_session


class EdgeModelError(ValueError):
    pass


class OnnxRULEstimator:
    def __init__(self, path: str | Path, *, threads: int = 1):
        path = Path(path)
        if not path.exists():
            raise EdgeModelError(f"{path}: ONNX model not found")
        self.session = inference_session(path, threads=threads)  # one thread: small devices, no contention
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.features: list[str] = json.loads(meta["features"])
            self.window = int(meta["window"])
        except (KeyError, ValueError) as exc:
            raise EdgeModelError(f"{path}: metadata needs 'features' (JSON list) and 'window': {exc}") from None
        self.rul_rmse = float(meta["rul_rmse"]) if "rul_rmse" in meta else None
        self.input_name = self.session.get_inputs()[0].name
        self._rows: deque[np.ndarray] = deque(maxlen=self.window)

    def update(self, values: dict[str, Any]) -> float | None:
        try:
            row = np.array([float(values[f]) for f in self.features], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return None  # a tick without every feature: no estimate rather than a wrong one
        if not self._rows:
            self._rows.extend([row] * self.window)
        self._rows.append(row)
        window = np.stack(self._rows)[None]  # (1, window, features)
        out = self.session.run(None, {self.input_name: window})[0]
        return float(np.asarray(out).reshape(-1)[0])
