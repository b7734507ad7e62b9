"""Configuration of a Mixture-of-Experts layer."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROUTER_SCORINGS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """Hyper-parameters of one MoE layer.

    The product range is 16-128 experts with 2-4 active per token; smaller values (one expert,
    top-1) are accepted because they are the reference cases the layer is tested against.
    """

    num_experts: int = 64  # the design guide's default pool; 16-128 is the supported range
    top_k: int = 2  # experts active per token; 2 keeps compute at ~2 dense FFNs per token
    # Capacity: tokens each expert may take per forward pass. `expert_capacity` is absolute,
    # `capacity_factor` scales the even share (tokens * top_k / num_experts). Both None: dropless.
    expert_capacity: int | None = None
    capacity_factor: float | None = None
    hidden_size: int = 512  # model width the layer reads and writes
    intermediate_size: int = 2048  # each expert's FFN width (4x hidden, as in a dense FFN)
    num_shared_experts: int = 0  # always-on experts added to the routed output (DeepSeek-style)
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    normalize_weights: bool = True  # rescale the top-k weights of a token to sum to 1
    aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss; 0.01 is the common choice
    z_loss_weight: float = 0.001  # router z-loss (ST-MoE); keeps logits small, fp32-stable
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores only when
    # choosing experts, nudged by `bias_update_rate` towards even load after each training pass.
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    activation: Literal["gelu", "relu", "silu"] = "gelu"

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"MoEConfig: {message}")

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            fail(f"num_experts must be a positive integer, got {self.num_experts!r}")
        if self.num_experts > 1024:
            fail(f"num_experts={self.num_experts} is beyond what this engine is built for (<= 1024)")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            fail(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            fail(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.expert_capacity is not None and self.capacity_factor is not None:
            fail("set expert_capacity or capacity_factor, not both")
        if self.expert_capacity is not None and (
            not isinstance(self.expert_capacity, int) or self.expert_capacity < 1
        ):
            fail(f"expert_capacity must be a positive integer or None, got {self.expert_capacity!r}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            fail(f"capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        for name in ("hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.num_shared_experts < 0:
            fail(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.router_scoring not in ROUTER_SCORINGS:
            fail(f"router_scoring must be one of {ROUTER_SCORINGS}, got {self.router_scoring!r}")
        if self.activation not in ("gelu", "relu", "silu"):
            fail(f"activation must be gelu, relu or silu, got {self.activation!r}")
        for name in ("aux_loss_weight", "z_loss_weight", "bias_update_rate"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def dropless(self) -> bool:
        return self.expert_capacity is None and self.capacity_factor is None

    def capacity(self, num_tokens: int) -> int | None:
        """Tokens each expert may take in a pass over `num_tokens` tokens; None when dropless."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is not None:
            even_share = num_tokens * self.top_k / self.num_experts
            return max(1, int(-(-even_share * self.capacity_factor // 1)))  # ceil
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MoEConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> MoEConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
