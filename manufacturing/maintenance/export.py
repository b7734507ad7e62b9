"""ONNX export of the maintenance models, with the parity check against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from core.compress.hashed import materialize
from core.onnx_export import export_onnx, inference_session
from manufacturing.maintenance.models import RULOnly
from manufacturing.maintenance.rul import RULEstimator

RUL_INPUT, RUL_OUTPUT = "window", "rul"


def export_rul_onnx(estimator: RULEstimator, path: str | Path, *,
                    moe_dispatch: Literal["static", "sparse"] = "static") -> Path:
    """Write the RUL net as ONNX: input `window` (batch, window, features) float32, normalised as
    `metadata_props["normalizer"]` says; output `rul` (batch,) in cycles. Dynamic batch axis.
    `moe_dispatch` as `core.onnx_export.export_onnx` (the partner bundle takes "sparse")."""
    example = torch.zeros(2, estimator.net_.window, estimator.net_.num_features)
    metadata = {"model": f"moeworks RUL {estimator.net.kind}", "net": estimator.net_.to_dict(),
                "normalizer": estimator.normalizer_.state(),
                "input": "window (batch, window, features): sensors normalised per regime, then regime one-hot",
                "metrics": estimator.metadata_.get("metrics", {})}
    with warnings.catch_warnings():  # the exporter's deprecation chatter; parity is what is checked
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*were assigned during export.*")
        # Hashed weights (core.compress.hashed) go out dense: the graph then holds plain MatMul/LSTM
        # weights instead of a gather over an int64 bucket table as large as the weights themselves.
        return export_onnx(RULOnly(materialize(estimator.model_)).eval(), (example,), path, input_names=[RUL_INPUT],
                           output_names=[RUL_OUTPUT], metadata=metadata, moe_dispatch=moe_dispatch)


def onnx_rul(path: str | Path, windows: np.ndarray) -> np.ndarray:
    """Run an exported RUL model with onnxruntime. windows: (batch, window, features) -> (batch,)."""
    session = inference_session(path)
    return session.run([RUL_OUTPUT], {RUL_INPUT: np.ascontiguousarray(windows, dtype=np.float32)})[0]


def rul_parity(estimator: RULEstimator, path: str | Path, windows: torch.Tensor) -> float:
    """Largest |PyTorch - onnxruntime| RUL (cycles) over `windows` (batch, window, features)."""
    eager = estimator.predict_windows(windows)
    return float(np.max(np.abs(eager - onnx_rul(path, windows.numpy()))))


class AI4IProbabilities(torch.nn.Module):
    """The AI4I MoE net with sigmoid outputs. forward(numeric (batch, 8), type_code (batch, 1)) -> (batch, 6)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, numeric: torch.Tensor, type_code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(numeric, type_code)[0])


def export_ai4i_onnx(model, folder: str | Path) -> dict[str, Path]:
    """Write `ai4i_moe.onnx` (inputs `numeric` standardised (batch, 8) float32 and `type_code`
    (batch, 1) int64, output `probabilities` (batch, 6) in OUTPUTS order) and one
    `lightgbm_<output>.onnx` per output (input `features` (batch, 9): the 8 features then the
    type code; outputs `label`, `probabilities` (batch, 2))."""
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    from manufacturing.maintenance.ai4i import FEATURES, OUTPUTS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scaling = {"features": FEATURES, "mean": model.mean_.tolist(), "std": model.std_.tolist(),
               "type_codes": {"L": 1, "M": 2, "H": 3}, "outputs": OUTPUTS}
    example = (torch.zeros(2, len(FEATURES)), torch.ones(2, 1, dtype=torch.int64))
    # hashed experts (`moeworks compress hash`) go out dense, as the RUL nets' do
    paths = {"moe": export_onnx(AI4IProbabilities(model.moe_.dense_copy()).eval(), example, folder / "ai4i_moe.onnx",
                                input_names=["numeric", "type_code"], output_names=["probabilities"],
                                metadata={"model": "moeworks AI4I MoE", **scaling})}
    for name, booster in model.boosters_.items():
        proto = convert_lightgbm(booster, initial_types=[("features", FloatTensorType([None, len(FEATURES) + 1]))],
                                 zipmap=False, target_opset=15)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "model", f"moeworks AI4I LightGBM, output {name}"
        path = folder / f"lightgbm_{name}.onnx"
        path.write_bytes(proto.SerializeToString())
        paths[f"lightgbm_{name}"] = path
    return paths


def ai4i_parity(model, paths: dict[str, Path], rows) -> dict[str, float]:
    """Largest |framework - onnxruntime| probability per exported file on `rows` (AI4I columns)."""
    from manufacturing.maintenance.ai4i import OUTPUTS, features, validate_ai4i

    frame = validate_ai4i(rows)
    numeric, type_code = model.moe_inputs(frame)
    session = inference_session(paths["moe"])
    onnx_probs = session.run(None, {"numeric": numeric.numpy(), "type_code": type_code.numpy()})[0]
    eager = model.predict_proba(frame, backend="moe").to_numpy()
    result = {str(paths["moe"]): float(np.max(np.abs(onnx_probs - eager)))}
    raw, codes = features(frame)
    matrix = np.column_stack([raw, codes]).astype(np.float32)
    lgb_probs = model.predict_proba(frame, backend="lightgbm")
    for name in OUTPUTS:
        path = paths[f"lightgbm_{name}"]
        outputs = inference_session(path).run(None, {"features": matrix})
        result[str(path)] = float(np.max(np.abs(outputs[1][:, 1] - lgb_probs[name].to_numpy())))
    return result


def export_model_folder(model_dir: str | Path, out: str | Path,
                        rows_file: str | Path | None = None) -> dict[str, float]:
    """Export a RUL or AI4I model folder to ONNX in `out` and return {file: parity} on real rows
    from `rows_file` (a C-MAPSS or AI4I file) or, without one, on generated rows."""
    from manufacturing.maintenance.ai4i import AI4IFailureModel, generate_ai4i, read_ai4i
    from manufacturing.maintenance.cmapss import read_cmapss
    from manufacturing.maintenance.generator import generate_cmapss
    from manufacturing.maintenance.windows import build_windows

    model_dir, out = Path(model_dir), Path(out)
    if (model_dir / "ai4i.json").is_file():
        model = AI4IFailureModel.load(model_dir)
        rows = read_ai4i(rows_file) if rows_file else generate_ai4i(2000, seed=1)
        return ai4i_parity(model, export_ai4i_onnx(model, out), rows)
    estimator = RULEstimator.load(model_dir)
    frame = read_cmapss(rows_file) if rows_file else generate_cmapss(
        10, num_regimes=estimator.features.num_regimes, seed=1)
    windows = build_windows(estimator.normalizer_.transform(frame), frame["unit"].to_numpy(),
                            window=estimator.net.window)
    sample = windows.gather(np.linspace(0, len(windows) - 1, min(len(windows), 2048)).astype(int))
    path = export_rul_onnx(estimator, out / f"rul_{estimator.net.kind}.onnx")
    return {str(path): rul_parity(estimator, path, sample)}
