"""C-MAPSS loading, labels, windows, split and metrics (fast; the real files where present)."""

import gzip

import numpy as np
import pandas as pd
import pytest

from manufacturing.maintenance.cmapss import COLUMNS, SENSORS, add_rul, find_file, read_cmapss, read_rul
from manufacturing.maintenance.errors import MaintenanceDataError
from manufacturing.maintenance.features import ConditionNormalizer, FeatureConfig
from manufacturing.maintenance.generator import generate_cmapss, write_cmapss, write_generated_dataset
from manufacturing.maintenance.metrics import nasa_score, rmse, rul_metrics
from manufacturing.maintenance.split import split_units, truncate_units
from manufacturing.maintenance.windows import build_windows

STANDARD_14 = ["s_2", "s_3", "s_4", "s_7", "s_8", "s_9", "s_11", "s_12", "s_13", "s_14", "s_15", "s_17",
               "s_20", "s_21"]


@pytest.mark.parametrize("subset,rows,units", [("FD001", 20_631, 100), ("FD002", 53_759, 260),
                                               ("FD003", 24_720, 100), ("FD004", 61_249, 249)])
def test_real_training_files_row_and_unit_counts(data_root, subset, rows, units):
    frame = read_cmapss(find_file(data_root / "cmapss", "train", subset))
    assert list(frame.columns) == COLUMNS
    assert len(frame) == rows and frame["unit"].nunique() == units
    # Every unit's cycles run 1..life without gaps.
    lives = frame.groupby("unit")["cycle"].agg(["min", "max", "count"])
    assert (lives["min"] == 1).all() and (lives["max"] == lives["count"]).all()


def test_informative_sensors_and_regimes_on_real_files(data_root):
    fd001 = read_cmapss(find_file(data_root / "cmapss", "train", "FD001"))
    assert ConditionNormalizer(FeatureConfig(num_regimes=1)).fit(fd001).sensors_ == STANDARD_14
    fd002 = read_cmapss(find_file(data_root / "cmapss", "train", "FD002"))
    normalizer = ConditionNormalizer(FeatureConfig(num_regimes=6)).fit(fd002)
    assert normalizer.sensors_ == STANDARD_14
    regimes = normalizer.regimes(fd002[["setting_1", "setting_2", "setting_3"]].to_numpy())
    # The six operating conditions are tight points: each cluster's altitude spans < 1 kft.
    spans = fd002.groupby(regimes)["setting_1"].agg(lambda s: s.max() - s.min())
    assert len(spans) == 6 and (spans < 1.0).all()
    features = normalizer.transform(fd002)
    assert features.shape == (len(fd002), 14 + 6)
    for r in range(6):  # within each regime every kept sensor is standardised
        block = features[regimes == r, :14]
        np.testing.assert_allclose(block.mean(axis=0), 0, atol=1e-3)
        np.testing.assert_allclose(block.std(axis=0), 1, atol=1e-2)


def test_rul_labels_are_piecewise_linear_with_cap():
    frame = generate_cmapss(2, seed=3, min_life=150, max_life=200)
    labelled = add_rul(frame, cap=125)
    for _, unit in labelled.groupby("unit"):
        life = len(unit)
        raw = life - unit["cycle"].to_numpy()
        np.testing.assert_array_equal(unit["rul"].to_numpy(), np.minimum(raw, 125))
        assert unit["rul"].iloc[0] == 125 and unit["rul"].iloc[-1] == 0
    assert add_rul(frame, cap=None)["rul"].max() == frame.groupby("unit")["cycle"].max().max() - 1


def test_windows_never_cross_engines_and_pad_short_ones():
    units = np.repeat([1, 2, 3], [40, 12, 31])
    features = units[:, None].astype(np.float32) * np.ones((1, 3), np.float32)
    features[:, 1] = np.concatenate([np.arange(40), np.arange(12), np.arange(31)])  # cycle index
    windows = build_windows(features, units, window=30)
    batch = windows.gather().numpy()
    for w, unit in zip(batch, windows.unit, strict=True):
        assert (w[:, 0] == unit).all(), "a window mixes rows of two engines"
        assert (np.diff(w[:, 1]) >= 0).all() and (np.diff(w[:, 1]) <= 1).all()
    # Full windows only, except the short engine's single padded last window.
    assert sorted(np.unique(windows.unit, return_counts=True)[1].tolist()) == [1, 2, 11]
    short = batch[windows.unit == 2][0]
    assert (short[:19, 1] == 0).all() and short[-1, 1] == 11  # padded with its first cycle
    last = build_windows(features, units, window=30, last_only=True)
    assert last.unit.tolist() == [1, 2, 3] and last.cycle_row.tolist() == [39, 51, 82]


def test_unit_split_and_random_cuts_like_the_test_set():
    frame = generate_cmapss(30, seed=1)
    train, val = split_units(frame["unit"].to_numpy(), val_fraction=0.2, seed=0)
    assert len(val) == 6 and not set(train) & set(val) and len(train) + len(val) == 30
    cut, true_rul = truncate_units(frame[frame["unit"].isin(val)], seed=0, cuts_per_unit=3)
    assert cut["unit"].nunique() == 18 == len(true_rul)
    lives = frame.groupby("unit")["cycle"].max()
    for (_, rows), rul in zip(cut.groupby("unit", sort=True), true_rul, strict=True):
        source = rows["source_unit"].iloc[0]
        assert rows["cycle"].max() + rul == lives[source] and rul >= 1
        assert rows["cycle"].tolist() == list(range(1, len(rows) + 1))


def test_metrics_known_values():
    assert rmse(np.array([10.0, 20.0]), np.array([13.0, 16.0])) == pytest.approx(np.sqrt(12.5))
    # One engine 13 cycles early, one 10 late: exp(1) - 1 each.
    assert nasa_score(np.array([87.0, 60.0]), np.array([100.0, 50.0])) == pytest.approx(2 * (np.e - 1))
    capped = rul_metrics(np.array([125.0]), np.array([140.0]), cap=125)
    assert capped["rmse"] == 0 and capped["rmse_uncapped"] == 15


def test_generated_files_round_trip_in_cmapss_layout(tmp_path):
    paths = write_generated_dataset(tmp_path, train_units=5, test_units=4, seed=2)
    train, test, rul = read_cmapss(paths["train"]), read_cmapss(paths["test"]), read_rul(paths["rul"])
    assert train["unit"].nunique() == 5 and test["unit"].nunique() == 4 and len(rul) == 4
    line = paths["train"].read_text().splitlines()[0]
    assert len(line.split()) == 26 and line.endswith(" ")
    assert "GENERATED" in paths["note"].read_text()
    gz = tmp_path / "train_FD009.txt.gz"
    gz.write_bytes(gzip.compress(paths["train"].read_bytes()))
    pd.testing.assert_frame_equal(read_cmapss(gz), train)


def test_bad_files_name_the_field_and_row(tmp_path):
    frame = generate_cmapss(2, seed=0, min_life=130, max_life=130)
    good = write_cmapss(frame, tmp_path / "good.txt").read_text().splitlines()

    short = tmp_path / "short.txt"
    short.write_text("\n".join(good[:3] + [" ".join(good[3].split()[:24])] + good[4:]) + "\n")
    with pytest.raises(MaintenanceDataError, match=r"row 4.*'s_20'.*missing s_20, s_21"):
        read_cmapss(short)

    text = tmp_path / "text.txt"
    fields = good[6].split()
    fields[COLUMNS.index("s_7")] = "n/a"
    text.write_text("\n".join(good[:6] + [" ".join(fields)] + good[7:]) + "\n")
    with pytest.raises(MaintenanceDataError, match=r"row 7, field 's_7': value 'n/a' is not a finite number"):
        read_cmapss(text)

    named = frame.drop(columns=["s_3", "setting_2"])
    from manufacturing.maintenance.cmapss import validate_frame

    with pytest.raises(MaintenanceDataError, match="missing column.*setting_2, s_3"):
        validate_frame(named)

    rul = tmp_path / "rul.txt"
    rul.write_text("12\nabc\n")
    with pytest.raises(MaintenanceDataError, match=r"row 2.*'rul'"):
        read_rul(rul)
    assert len(SENSORS) == 21


def test_history_features_count_cycles_per_regime_within_each_unit():
    frame = generate_cmapss(4, num_regimes=6, seed=3, max_life=150)
    normalizer = ConditionNormalizer(FeatureConfig(num_regimes=6, history=True)).fit(frame)
    features = normalizer.transform(frame)
    assert features.shape[1] == normalizer.num_features == len(normalizer.sensors_) + 6 + 6
    counts = features[:, -6:] * 100  # cycles spent in each regime so far
    regimes = normalizer.regimes(frame[["setting_1", "setting_2", "setting_3"]].to_numpy())
    for _, rows in frame.groupby("unit"):
        index = rows.index.to_numpy()
        # The counts restart at each unit, sum to its age and follow its own regime sequence.
        np.testing.assert_allclose(counts[index].sum(axis=1), np.arange(1, len(index) + 1), atol=1e-3)
        np.testing.assert_allclose(counts[index], np.cumsum(np.eye(6)[regimes[index]], axis=0), atol=1e-3)
    single = generate_cmapss(3, num_regimes=1, seed=3, max_life=150)
    one_regime = ConditionNormalizer(FeatureConfig(num_regimes=1, history=True)).fit(single)
    np.testing.assert_allclose(one_regime.transform(single)[:, -1] * 100,  # the age
                               single.groupby("unit").cumcount().to_numpy() + 1, atol=1e-3)


def test_running_mean_features_average_each_units_normalised_sensors_so_far():
    frame = generate_cmapss(4, num_regimes=6, seed=3, max_life=150)
    normalizer = ConditionNormalizer(FeatureConfig(num_regimes=6, history=True, running_mean=True)).fit(frame)
    features = normalizer.transform(frame)
    sensors = len(normalizer.sensors_)
    assert features.shape[1] == normalizer.num_features == sensors + 6 + 6 + sensors
    current, running = features[:, :sensors], features[:, -sensors:]
    for _, rows in frame.groupby("unit"):
        index = rows.index.to_numpy()
        # Restarts at each unit: the mean of the unit's normalised readings up to and including each cycle.
        expected = np.cumsum(current[index], axis=0) / np.arange(1, len(index) + 1)[:, None]
        np.testing.assert_allclose(running[index], expected, atol=1e-4)
    # The server's route: raw sums and cycle counts per regime give the same normalised sums.
    unit = frame[frame["unit"] == frame["unit"].iloc[0]]
    one_hot = np.eye(6)[normalizer.regimes(unit[["setting_1", "setting_2", "setting_3"]].to_numpy())]
    raw_sums = one_hot.T @ unit[normalizer.sensors_].to_numpy()  # (regimes, sensors)
    np.testing.assert_allclose(normalizer.normalised_sums(raw_sums, one_hot.sum(0)),
                               current[unit.index].sum(axis=0), rtol=1e-4, atol=1e-3)
