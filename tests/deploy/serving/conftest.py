import pytest
import torch


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny untrained TabularMoE checkpoint (5 numeric inputs, 2 categorical of 3 and 4 levels)."""
    from core import MoEConfig
    from core.blocks import TabularMoE, TabularMoEConfig
    from core.trainer import save_checkpoint

    torch.manual_seed(0)
    config = TabularMoEConfig(num_numeric=5, categorical_cardinalities=[3, 4], embedding_dim=2, moe=MoEConfig(
        num_experts=4, top_k=2, hidden_size=16, intermediate_size=32))
    return save_checkpoint(tmp_path_factory.mktemp("serving") / "tiny.pt", TabularMoE(config), config=config)
