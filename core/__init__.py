"""moeworks core: the shared Mixture-of-Experts engine."""

from core.config import MoEConfig
from core.experts import DenseFFN, Experts
from core.moe import MoELayer, MoEOutput
from core.router import Router, Routing

__all__ = ["DenseFFN", "Experts", "MoEConfig", "MoELayer", "MoEOutput", "Router", "Routing"]
