"""The one optimise step: calibration arrays, AWQ INT8 of a PyTorch module, and the runtime labels."""

import numpy as np
import pytest
import torch

from deploy.serving.base import AdapterOptions
from deploy.serving.families.tabular import TorchAdapter
from deploy.serving.optimise import awq_int8, calibration_arrays, optimise_torch, torch_batches


def test_calibration_comes_from_the_file_or_is_generated_within_the_fields(checkpoint, tmp_path):
    fields = TorchAdapter.from_path(checkpoint).fields
    generated = calibration_arrays(AdapterOptions(calibration_rows=300), fields)
    assert generated["numeric"].shape == (300, 5) and generated["numeric"].dtype == np.float32
    assert ((generated["categorical"] >= 0) & (generated["categorical"] < [3, 4])).all()
    np.savez(tmp_path / "cal.npz", numeric=np.zeros((10, 5)), categorical=np.ones((10, 2)))
    loaded = calibration_arrays(AdapterOptions(calibration=tmp_path / "cal.npz"), fields)
    assert loaded["categorical"].dtype == np.int64 and loaded["numeric"].dtype == np.float32
    np.savez(tmp_path / "partial.npz", numeric=np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"partial.npz: calibration arrays missing \['categorical'\]"):
        calibration_arrays(AdapterOptions(calibration=tmp_path / "partial.npz"), fields)
    batches = torch_batches(generated)
    assert [len(b["numeric"]) for b in batches] == [128, 128, 44]


def test_awq_int8_stays_close_to_fp32_and_leaves_the_original(checkpoint):
    adapter = TorchAdapter.from_path(checkpoint)
    assert adapter.runtime == "torch+fp32"
    rows = adapter.example(64, seed=5)
    inputs = {k: torch.from_numpy(v) for k, v in rows.items()}
    before = adapter.model(**inputs)[0].detach()
    int8 = awq_int8(adapter.model, torch_batches(adapter.example(256, seed=1)))
    with torch.no_grad():
        got = int8(**inputs)[0]
    torch.testing.assert_close(adapter.model(**inputs)[0].detach(), before)  # a copy was quantized
    assert np.corrcoef(got.numpy().ravel(), before.numpy().ravel())[0, 1] > 0.98
    model, runtime = optimise_torch(adapter.model, AdapterOptions(), adapter.fields)
    assert model is adapter.model and runtime == "torch+fp32"
    with pytest.raises(ValueError, match="not a PyTorch scheme"):
        optimise_torch(adapter.model, AdapterOptions(quantize="int8_static"), adapter.fields)
