"""Maintenance configs and arguments are refused with ValueError also under `python -O`."""

from tests.python_optimized import raised_under_optimize

IMPORTS = """
import numpy as np
from manufacturing.maintenance.features import FeatureConfig
from manufacturing.maintenance.generator import generate_cmapss
from manufacturing.maintenance.models import RULNetConfig
from manufacturing.maintenance.split import split_units
from manufacturing.maintenance.windows import build_windows
"""

CASES = {
    "RULNetConfig kind": "RULNetConfig(kind='gru')",
    "RULNetConfig window vs patch": "RULNetConfig(kind='moe', window=30, patch=4)",
    "RULNetConfig members=0": "RULNetConfig(members=0)",
    "FeatureConfig min_trend": "FeatureConfig(min_trend=1.5)",
    "generate_cmapss num_units=0": "generate_cmapss(0)",
    "split_units val_fraction": "split_units(np.arange(10), val_fraction=1.0)",
    "split_units one unit": "split_units(np.zeros(5))",
    "build_windows scattered unit": "build_windows(np.zeros((3, 2), np.float32), np.array([1, 2, 1]), window=2)",
}


def test_bad_values_raise_value_error_under_python_O():
    assert raised_under_optimize(IMPORTS, CASES) == {name: "ValueError" for name in CASES}
