"""moeworks core: the shared Mixture-of-Experts engine.

The names below are imported on first use (PEP 562), so that `core.model_files` (hashing, no
torch) can be imported by torch-free paths such as the LightGBM and scorecard credit models.
"""

import importlib

_EXPORTS = {"MoEConfig": "core.config", "DenseFFN": "core.experts", "ExpertBank": "core.experts",
            "Experts": "core.experts", "MoELayer": "core.moe", "MoEOutput": "core.moe", "Router": "core.router",
            "Routing": "core.router"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")
