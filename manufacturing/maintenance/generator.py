"""Generated run-to-failure trajectories in the C-MAPSS format (GENERATED data, not NASA's).

For demos, tests and the digital twin where the real files are absent. A fixed "plant" (the
operating points, each sensor's level per regime, its sensitivity to wear and its noise) is
shared by every call; units differ by `seed`. Each unit starts with a little wear, degrades
exponentially to failure at the end of its life, and is observed through 14 sensors that move
with wear (in C-MAPSS's directions) and 7 that do not, as in the real files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from manufacturing.maintenance.cmapss import COLUMNS, SENSORS, SETTINGS
from manufacturing.maintenance.split import truncate_units

# The six operating conditions of FD002/FD004: altitude (kft), Mach, throttle resolver angle.
OPERATING_POINTS = np.array([[0.0, 0.0, 100.0], [10.0, 0.25, 100.0], [20.0, 0.70, 100.0],
                             [25.0, 0.62, 60.0], [35.0, 0.84, 100.0], [42.0, 0.84, 100.0]])
# FD001's sea-level means of s_1..s_21, the level of regime 0.
BASELINE = np.array([518.67, 642.68, 1590.52, 1408.93, 14.62, 21.61, 553.37, 2388.10, 9065.24, 1.30,
                     47.54, 521.41, 2388.10, 8143.75, 8.44, 0.03, 393.21, 2388.0, 100.0, 38.82, 23.29])
# Direction each sensor moves with wear, as in FD001 (0: the sensor does not move).
WEAR_SIGN = np.array([0, 1, 1, 1, 0, 0, -1, 1, 1, 0, 1, -1, 1, 1, 1, 0, 1, 0, 0, -1, -1])
# Relative noise (sd / level), about FD001's spread for a healthy engine.
NOISE = np.array([0, 8e-4, 3.5e-3, 4.5e-3, 0, 7e-5, 1.5e-3, 3e-5, 2e-3, 0,
                  4e-3, 1.3e-3, 3e-5, 2.3e-3, 4e-3, 0, 3.5e-3, 0, 0, 4.5e-3, 4.5e-3])
# Shift at failure in noise sds; FD001's informative sensors move about 3-6 sds over a life.
WEAR_SNR = np.array([0, 4, 4, 5, 0, 0, 4, 4, 3, 0, 5, 4, 4, 3, 4, 0, 4, 0, 0, 4, 4])
WEAR_SHIFT = WEAR_SIGN * WEAR_SNR * NOISE  # relative change of each sensor at failure
INTEGER_SENSORS = {"s_17": 16, "s_18": 17}  # htBleed and Nf_dmd are whole numbers in the files
PLANT_SEED = 2008  # the plant is fixed: train and test files from different seeds share it


def _plant(num_regimes: int) -> tuple[np.ndarray, np.ndarray]:
    """(regimes, 3) operating points and (regimes, 21) sensor levels."""
    rng = np.random.default_rng(PLANT_SEED)
    points = OPERATING_POINTS[:num_regimes] if num_regimes > 1 else OPERATING_POINTS[:1]
    # Altitude and Mach lower temperatures and pressures; each sensor reacts with its own strength.
    strength = rng.uniform(0.05, 0.35, size=len(SENSORS))
    load = points[:, 0] / 42.0 + 0.5 * points[:, 1] - 0.4 * (100.0 - points[:, 2]) / 40.0  # (regimes,)
    levels = BASELINE[None, :] * (1.0 - strength[None, :] * load[:, None])
    return points, levels


def generate_cmapss(num_units: int, *, num_regimes: int = 1, seed: int = 0, min_life: int = 128,
                    max_life: int = 360, first_unit: int = 1) -> pd.DataFrame:
    """Run-to-failure trajectories of `num_units` engines, C-MAPSS columns, sorted by unit and cycle.

    num_regimes: 1 (like FD001/FD003) or up to 6 operating conditions drawn at random per cycle
    (like FD002/FD004). The frame's `attrs["generated"]` is True.
    """
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    if not 1 <= num_regimes <= len(OPERATING_POINTS):
        raise ValueError(f"num_regimes must be 1..{len(OPERATING_POINTS)}, got {num_regimes}")
    if not 2 <= min_life <= max_life:
        raise ValueError(f"need 2 <= min_life <= max_life, got min_life={min_life}, max_life={max_life}")
    rng = np.random.default_rng(seed)
    points, levels = _plant(num_regimes)
    frames = []
    for i in range(num_units):
        life = int(rng.integers(min_life, max_life + 1))
        cycle = np.arange(1, life + 1)
        initial_wear = rng.uniform(0.0, 0.15)
        rate = rng.uniform(3.0, 6.0)  # exponential wear: slow for most of the life, fast at the end
        wear = initial_wear + (1.0 - initial_wear) * np.expm1(rate * cycle / life) / np.expm1(rate)  # (life,)
        regime = rng.integers(0, len(points), size=life)
        settings = points[regime] + rng.normal(0.0, [0.002, 0.0003, 0.0], size=(life, 3))
        level = levels[regime]  # (life, 21)
        sensors = level * (1.0 + WEAR_SHIFT[None, :] * wear[:, None] * rng.uniform(0.8, 1.2))
        sensors = sensors + rng.normal(0.0, 1.0, size=sensors.shape) * NOISE[None, :] * level
        for column in INTEGER_SENSORS.values():
            sensors[:, column] = np.round(sensors[:, column])
        block = pd.DataFrame(np.column_stack([settings, sensors]), columns=[*SETTINGS, *SENSORS])
        block.insert(0, "cycle", cycle)
        block.insert(0, "unit", first_unit + i)
        frames.append(block)
    frame = pd.concat(frames, ignore_index=True)[COLUMNS]
    frame.attrs["generated"] = True
    return frame


def write_cmapss(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write rows in NASA's layout: 26 space-separated columns, no header, a trailing space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = frame[COLUMNS].to_numpy(dtype=float)
    lines = (" ".join([f"{int(row[0])}", f"{int(row[1])}", *(f"{v:.4f}" for v in row[2:])]) + " "
             for row in values)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_generated_dataset(folder: str | Path, *, subset: str = "FD001", train_units: int = 100,
                            test_units: int = 100, num_regimes: int = 1, seed: int = 0) -> dict[str, Path]:
    """Write train_, test_ and RUL_{subset}.txt (test engines cut at random cycles) and a GENERATED.txt
    note. The files read back with `read_cmapss` / `read_rul` and train with `moeworks maintenance train`."""
    folder = Path(folder)
    train = generate_cmapss(train_units, num_regimes=num_regimes, seed=seed)
    full_test = generate_cmapss(test_units, num_regimes=num_regimes, seed=seed + 1)
    test, rul = truncate_units(full_test, seed=seed + 2)
    paths = {"train": write_cmapss(train, folder / f"train_{subset}.txt"),
             "test": write_cmapss(test, folder / f"test_{subset}.txt")}
    paths["rul"] = folder / f"RUL_{subset}.txt"
    paths["rul"].write_text("".join(f"{int(v)}\n" for v in rul))
    note = folder / "GENERATED.txt"
    note.write_text(f"GENERATED data in the NASA C-MAPSS layout, not NASA's: {train_units} train units, "
                    f"{test_units} test units cut at random cycles, {num_regimes} operating regime(s), "
                    f"seed {seed}. Made by manufacturing.maintenance.generator.\n")
    paths["note"] = note
    return paths
