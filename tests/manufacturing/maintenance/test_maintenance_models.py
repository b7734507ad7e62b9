"""RUL models: streaming equals batch, save/load, ONNX parity on real windows, learning on generated data."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.model_files import write_manifest
from manufacturing.maintenance.cmapss import find_file, read_cmapss
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.export import export_rul_onnx, rul_parity
from manufacturing.maintenance.generator import generate_cmapss
from manufacturing.maintenance.models import build_rul_net
from manufacturing.maintenance.rul import RULEstimator, RULTrainConfig
from manufacturing.maintenance.split import truncate_units
from manufacturing.maintenance.streaming import StreamingRULPredictor
from manufacturing.maintenance.windows import build_windows


@pytest.fixture(scope="module", params=["lstm", "moe", "moe-ensemble"])
def fitted(request, tiny_rul_estimator):
    frame = generate_cmapss(12, num_regimes=6, seed=4, max_life=180)
    return tiny_rul_estimator(request.param, num_regimes=6).fit(frame)


def test_streaming_equals_batch_prediction_on_the_same_window(fitted):
    # Three engines cut early, one shorter than the 30-cycle window; cycles arrive interleaved.
    test, _ = truncate_units(generate_cmapss(3, num_regimes=6, seed=9, max_life=160), seed=1, min_cycles=20)
    test.loc[test["unit"] == test["unit"].min(), "keep"] = True
    short_unit = test["unit"].min()
    test = test[(test["unit"] != short_unit) | (test["cycle"] <= 17)].reset_index(drop=True)
    stream = StreamingRULPredictor(fitted)
    streamed = {}
    for record in test.sort_values(["cycle", "unit"]).to_dict("records"):
        streamed[(record["unit"], record["cycle"])] = stream.update(f"{record['unit']}", record)
    # Batch: the window ending at every cycle, padded like a test engine that stops there.
    windows = build_windows(fitted.normalizer_.transform(test), test["unit"].to_numpy(), window=30,
                            full_only=False)
    batch = fitted.predict_windows(windows.gather())
    keys = list(zip(windows.unit, test["cycle"].to_numpy()[windows.cycle_row], strict=True))
    np.testing.assert_allclose([streamed[k] for k in keys], batch, atol=1e-4)
    # And the public batch API on the file as it stands after the last cycle.
    last = fitted.predict(test)
    for unit, rul in zip(last["unit"], last["rul"], strict=True):
        assert stream.last_estimate(str(unit)) == pytest.approx(rul, abs=1e-4)
    np.testing.assert_array_equal(stream.state(str(short_unit))[:13], np.repeat(stream.state(str(short_unit))[:1],
                                                                                 13, axis=0))


def test_streaming_rejects_bad_cycles_by_field(fitted):
    stream = StreamingRULPredictor(fitted, min_cycles=2)
    record = generate_cmapss(1, num_regimes=6, seed=2).iloc[0].to_dict()
    assert stream.update("a", record) is None  # under min_cycles
    assert isinstance(stream.update("a", {**record, "cycle": 2}), float)
    with pytest.raises(MaintenanceDataError, match=r"unit a, row cycle 3, field 's_4': missing"):
        stream.update("a", {k: v for k, v in record.items() if k != "s_4"} | {"cycle": 3})
    with pytest.raises(MaintenanceDataError, match=r"field 's_9': value 'hot' is not a finite number"):
        stream.update("a", {**record, "s_9": "hot", "cycle": 3})
    with pytest.raises(MaintenanceDataError, match="field 'cycle'.*reset"):
        stream.update("a", {**record, "cycle": 2})
    stream.reset("a")
    assert stream.units == [] and stream.update("a", record) is None


def test_save_load_round_trip(fitted, tmp_path):
    fitted.save(tmp_path / "model", metrics={"val_rmse": 1.0})
    loaded = RULEstimator.load(tmp_path / "model")
    test = generate_cmapss(4, num_regimes=6, seed=5)
    np.testing.assert_array_equal(loaded.predict(test)["rul"], fitted.predict(test)["rul"])
    assert StreamingRULPredictor.from_dir(tmp_path / "model").required_fields[:3] == ["setting_1", "setting_2",
                                                                                      "setting_3"]
    with pytest.raises(MaintenanceDataError, match="not a RUL model folder"):
        RULEstimator.load(tmp_path)
    # A folder saved by an older layout (a config field this version does not know) is refused by name.
    payload = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    payload["metadata"]["config"]["moe_layers"] = 2
    torch.save(payload, tmp_path / "model" / "model.pt")
    with pytest.raises(MaintenanceDataError, match="model.pt: changed since the model was saved"):
        RULEstimator.load(tmp_path / "model")  # the manifest notices first
    write_manifest(tmp_path / "model")  # re-sealed: as a folder that an older version saved whole
    with pytest.raises(MaintenanceDataError, match="another model layout.*moe_layers.*retrain"):
        RULEstimator.load(tmp_path / "model")


@pytest.mark.parametrize("kind", ["lstm", "moe", "moe-ensemble"])
def test_onnx_parity_on_real_windows(data_root, kind, tmp_path, tiny_rul_estimator):
    frame = read_cmapss(find_file(data_root / "cmapss", "train", "FD001"))
    estimator = tiny_rul_estimator(kind).fit(frame[frame["unit"] <= 20])
    test = frame[frame["unit"] > 90]
    windows = build_windows(estimator.normalizer_.transform(test), test["unit"].to_numpy(), window=30)
    sample = windows.gather(np.arange(0, len(windows), 4))
    path = export_rul_onnx(estimator, tmp_path / f"{kind}.onnx")  # an ensemble: every member in one graph
    assert rul_parity(estimator, path, sample) < 1e-3  # cycles, on RULs of 0-125
    assert estimator.predict_windows(sample).std() > 0  # not a constant model


def test_moe_routes_each_token_of_the_window_to_top_k_experts(tiny_rul_estimator):
    config = replace(tiny_rul_estimator("moe").net, num_features=20)
    net = build_rul_net(config).eval()
    load = []
    net.blocks[0].moe.register_forward_hook(lambda module, args, out: load.append(out.expert_load))
    rul, aux = net(torch.randn(7, 30, 20))
    assert rul.shape == (7,) and aux.ndim == 0 and bool(((rul >= 0) & (rul <= 125)).all())
    # 30 cycles in patches of 3: 10 tokens per engine, each sent to top_k experts.
    assert int(load[0].sum()) == 7 * 10 * config.moe.top_k
    with pytest.raises(ValueError, match="multiple of patch"):
        replace(config, patch=4)


def test_ensemble_is_the_mean_of_its_separately_trained_members(fitted):
    if fitted.net_.members == 1:
        pytest.skip("a single net")
    members = fitted.model_.members
    # Each member trained from its own seed: different weights, hence different answers.
    assert not torch.equal(members[0].head[0].weight, members[1].head[0].weight)
    assert len(fitted.metadata_["best_epoch"]) == 2
    x = torch.randn(5, 30, fitted.net_.num_features)
    with torch.no_grad():
        rul, aux = fitted.model_(x)
        expected = (members[0](x)[0] + members[1](x)[0]) / 2
    torch.testing.assert_close(rul, expected)
    assert aux.ndim == 0


def test_lstm_learns_rul_on_generated_engines(tiny_rul_estimator):
    torch.manual_seed(0)
    frame = generate_cmapss(30, seed=11, max_life=220)
    train, val = frame[frame["unit"] <= 24], frame[frame["unit"] > 24]
    estimator = tiny_rul_estimator("lstm")
    estimator.train = RULTrainConfig(max_epochs=6, windows_per_epoch=2048, learning_rate=5e-3, progress=False)
    estimator.fit(train, val_frame=val)
    cut, true_rul = truncate_units(val, seed=0, cuts_per_unit=4)
    predicted = estimator.predict(cut)["rul"].to_numpy()
    capped = np.minimum(true_rul, 125)
    model_rmse = np.sqrt(np.mean((predicted - capped) ** 2))
    constant_rmse = np.sqrt(np.mean((capped.mean() - capped) ** 2))
    assert model_rmse < 0.7 * constant_rmse, (model_rmse, constant_rmse)
