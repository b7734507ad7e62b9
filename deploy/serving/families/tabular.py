"""A core TabularMoE checkpoint (core.trainer.save_checkpoint) run by PyTorch, optionally INT8 and fused.

The checkpoint carries its config; `metadata["model_kind"]` (or, for older core checkpoints, the
shape of the config) says which model it is. `TorchAdapter` serves any core checkpoint whose kind
its subclass names and rebuilds (`kinds`, `build`): here the TabularMoE (inputs `numeric` and
`categorical`); benchmarks/serving_models.py adds the sequence classifier the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from deploy.serving.base import AdapterOptions, InputField, ModelAdapter, ModelPath, file_version
from deploy.serving.optimise import check_torch_options, optimise_torch

if TYPE_CHECKING:
    from torch import nn


def checkpoint_kind(metadata: dict[str, Any]) -> str:
    """The model kind a core checkpoint's metadata names ("unknown" when it names none)."""
    kind = metadata.get("model_kind")
    if isinstance(kind, str) and kind:
        return kind
    config = metadata.get("config")
    return "tabular_moe" if isinstance(config, dict) and "num_numeric" in config else "unknown"


class TorchAdapter(ModelAdapter):
    """Named input arrays -> `logits` (and `probability` beside a one-column logit)."""

    family = "tabular"
    describes = "a core TabularMoE checkpoint .pt"
    kinds: ClassVar[tuple[str, ...]] = ("tabular_moe",)  # the checkpoint kinds `build` rebuilds

    def __init__(self, *, model: nn.Module, fields: list[InputField], name: str, version: str, runtime: str,
                 options: AdapterOptions) -> None:
        self.model, self.fields = model, fields
        self.name, self.version, self.runtime, self.options = name, version, runtime, options

    @classmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        metadata = candidate.checkpoint
        return metadata is not None and checkpoint_kind(metadata) in cls.kinds

    @classmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        check_torch_options(options)

    @classmethod
    def build(cls, path: Path) -> tuple[nn.Module, list[InputField], dict[str, Any]]:
        """(model in eval mode, its input fields, the checkpoint's metadata) of the checkpoint at `path`."""
        from core.blocks import TabularMoE, TabularMoEConfig
        from core.trainer import load_checkpoint

        model, metadata = load_checkpoint(path, lambda c: TabularMoE(TabularMoEConfig(**c)))
        config = model.config
        fields = []
        if config.num_numeric:
            fields.append(InputField("numeric", np.dtype(np.float32), (config.num_numeric,)))
        if config.categorical_cardinalities:
            fields.append(InputField("categorical", np.dtype(np.int64), (len(config.categorical_cardinalities),),
                                     high=tuple(config.categorical_cardinalities)))
        return model, fields, metadata

    @classmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None) -> TorchAdapter:
        path, options = cls.start_loading(path, options)
        model, fields, metadata = cls.build(path)
        model, runtime = optimise_torch(model.eval(), options, fields)
        return cls(model=model, fields=fields, name=metadata.get("name", path.stem),
                   version=metadata.get("version") or file_version(path), runtime=runtime, options=options)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v) for k, v in inputs.items()})[0].float().numpy()
        out = {"logits": logits}
        if logits.shape[-1] == 1:
            out["probability"] = 1 / (1 + np.exp(-logits))
        return out
