"""User-settable values are refused with ValueError also under `python -O`, which strips asserts."""

from tests.python_optimized import raised_under_optimize

IMPORTS = """
import torch
from core.blocks import SelfAttention, TabularMoE, TabularMoEConfig
from core.config import MoEConfig
from core.moe import MoELayer
from core.quantization import AWQConfig
"""

CASES = {
    "MoEConfig top_k=0": "MoEConfig(top_k=0)",
    "TabularMoEConfig no feature": "TabularMoEConfig(num_numeric=0)",
    "TabularMoEConfig num_layers=0": "TabularMoEConfig(num_numeric=3, num_layers=0)",
    "TabularMoEConfig categorical level 0": "TabularMoEConfig(num_numeric=1, categorical_cardinalities=[0])",
    "AWQConfig grid_size=0": "AWQConfig(grid_size=0)",
    "AWQConfig scheme": "AWQConfig(scheme='int4')",
    "SelfAttention heads": "SelfAttention(hidden_size=10, num_heads=3)",
    "MoELayer input width": "MoELayer(MoEConfig(num_experts=4, hidden_size=8, intermediate_size=8))(torch.zeros(2, 5))",
    "TabularMoE categorical missing":
        "TabularMoE(TabularMoEConfig(num_numeric=1, categorical_cardinalities=[3]))(torch.zeros(2, 1))",
}


def test_bad_values_raise_value_error_under_python_O():
    assert raised_under_optimize(IMPORTS, CASES) == {name: "ValueError" for name in CASES}
