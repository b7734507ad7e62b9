"""Content hashes that bind a job to what it read: one file's SHA-256, and a model folder's.

A model folder's hash covers every file in it (relative path and content), so retraining, editing
scorer.json or swapping a file under model/ changes it. `generated-data/` (what `finance train
--dataset generated` writes beside the model when it generates its own data) is not the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

NOT_MODEL_FILES = ("generated-data",)  # top-level folders of a model folder that are not the model


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (streamed: memory stays flat for any size)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """Hex SHA-256 over the sorted (relative path, file SHA-256) pairs of a model folder's files."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in NOT_MODEL_FILES or path.name.endswith(".tmp"):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
