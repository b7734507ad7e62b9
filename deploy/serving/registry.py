"""Which model family serves a path: the one place the server and `moeworks serve` ask.

Each family (deploy/serving/families/) recognises its own files and builds itself
(`ModelAdapter.recognise`, `.from_path`). The registry holds the families by name
("module:Class") and imports them on first use, so importing the registry loads none of them and
no family imports the registry (no cycle). Specific families are asked first, in order; fallback
families (any other .onnx) after them. A path no family recognises is refused in one line that
lists the families known.

    from deploy.serving.registry import REGISTRY
    adapter = REGISTRY.from_path(path, AdapterOptions(quantize="int8_dynamic"))

A program serving a family of its own registers it first (benchmarks/serving_models.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from deploy.serving.base import AdapterOptions, ModelAdapter, ModelPath

# The built-in families, in the order they are asked (each recognises only its own files).
FAMILIES = (
    "deploy.serving.families.credit:CreditAdapter",
    "deploy.serving.families.rul:RULAdapter",
    "deploy.serving.families.defects:DefectsAdapter",
    "deploy.serving.families.tabular:TorchAdapter",
    "deploy.serving.families.onnx:OnnxAdapter",
)


def _import(spec: str) -> type[ModelAdapter]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class Registry:
    """Model families by name; `recognise(path)` picks one, `from_path(path)` builds its adapter."""

    def __init__(self, families: tuple[str | type[ModelAdapter], ...] = FAMILIES) -> None:
        self._entries: list[str | type[ModelAdapter]] = list(families)

    def register(self, family: str | type[ModelAdapter]) -> None:
        """Add a family ("module:Class" or the class); registering one twice changes nothing."""
        if family not in self._entries:
            self._entries.append(family)

    def families(self) -> list[type[ModelAdapter]]:
        """The families in the order they are asked: specific ones first, then the fallbacks."""
        loaded = [_import(e) if isinstance(e, str) else e for e in self._entries]
        return [f for f in loaded if not f.fallback] + [f for f in loaded if f.fallback]

    def describe(self) -> str:
        """One line: every family's name and what it serves."""
        return "; ".join(f"{f.family} ({f.describes})" for f in self.families())

    def recognise(self, path: str | Path) -> type[ModelAdapter]:
        """The family that serves `path`. FileNotFoundError for nothing at `path`; ValueError (one
        line, listing the families) when no family recognises it, or a file that is not safe to
        read (a pickled .pt: refused, never unpickled)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such model file or folder (serve a checkpoint, an .onnx file or "
                                    "a model folder)")
        candidate = ModelPath(path)
        for family in self.families():
            if family.recognise(candidate):
                return family
        raise ValueError(f"{path}: not a model any serving family recognises; known families: {self.describe()}")

    def check(self, path: str | Path, options: AdapterOptions) -> type[ModelAdapter]:
        """What `moeworks serve` checks before any worker starts: the family, the files against their
        folder's MANIFEST.json (a folder: every file; a file: itself, when its folder has one), and
        the options the family can apply. One-line ValueError (or FileNotFoundError) otherwise."""
        from core.model_files import verify_file, verify_manifest

        path = Path(path)
        family = self.recognise(path)
        if path.is_dir():
            verify_manifest(path)
        else:
            verify_file(path)
        family.check_options(path, options)
        return family

    def from_path(self, path: str | Path, options: AdapterOptions | None = None) -> ModelAdapter:
        """The adapter of the family that recognises `path`, loaded (and optimised) as `options` ask."""
        return self.recognise(path).from_path(path, options)


REGISTRY = Registry()
