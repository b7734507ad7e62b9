"""A model folder's manifest: the SHA-256 of every file it was saved with, checked before loading.

`write_manifest(folder)` is the last step of every save (credit, RUL, AI4I and defects folders);
`verify_manifest(folder)` the first step of every load. A file changed, missing or added since the
save refuses the folder with one line naming the file, so a swapped weights file, a half-copied
folder or a file planted beside the model never reaches a loader. The manifest itself is not
signed: it protects against accidents and mixing, not against someone who can rewrite it too.

MANIFEST.json: {"format": "moeworks-manifest/1", "files": {relative path: {"sha256", "bytes"}},
"unsealed": [top-level folders outside the manifest, e.g. a training run's work files]}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

MANIFEST = "MANIFEST.json"
FORMAT = "moeworks-manifest/1"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest of 10,000 files is ~1.5 MB; more is not one of ours
MAX_FILES = 10_000


class ModelFilesError(ValueError):
    """A model folder that does not match its manifest; the message is one line naming the file."""


class CheckpointError(ModelFilesError):
    """A .pt that is not a weights-only checkpoint of ours (core.trainer.read_checkpoint); one line."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path, unsealed: Iterable[str]) -> list[str]:
    """Relative POSIX paths of every file under `folder` (symlinks included), manifest and
    unsealed top-level folders left out."""
    skip = set(unsealed)
    out = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] in skip or relative.as_posix() == MANIFEST:
            continue
        if path.is_file() or path.is_symlink():
            out.append(relative.as_posix())
    return sorted(out)


def write_manifest(folder: str | Path, *, unsealed: Iterable[str] = ()) -> Path:
    """Hash every file under `folder` into folder/MANIFEST.json (replacing an older one).

    unsealed: top-level subfolder names left out of the manifest and of its checks, for work files
    a save leaves beside the model (a defects run's dataset and ultralytics run); nothing loads them.
    """
    folder = Path(folder)
    unsealed = sorted(set(unsealed))
    for name in unsealed:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"unsealed entries are top-level folder names, got {name!r}")
    files = {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
             for name in _files(folder, unsealed)}
    path = folder / MANIFEST
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT, "files": files, "unsealed": unsealed}, indent=1))
    temporary.replace(path)
    return path


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFilesError(f"{folder}: no {MANIFEST}: not a model folder saved by this version "
                              "(retrain it, or re-save it from a trusted copy)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelFilesError(f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB: not a moeworks manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nesting too deep
        raise ModelFilesError(f"{path}: not valid JSON ({type(error).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFilesError(f"{path}: field 'format' is not {FORMAT!r}")
    files, unsealed = manifest.get("files"), manifest.get("unsealed", [])
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise ModelFilesError(f"{path}: field 'files' must be an object of at most {MAX_FILES} entries")
    if not isinstance(unsealed, list) or not all(isinstance(u, str) and u and "/" not in u and u not in (".", "..")
                                                 for u in unsealed):
        raise ModelFilesError(f"{path}: field 'unsealed' must be a list of top-level folder names")
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or ".." in parts or name == MANIFEST:
            raise ModelFilesError(f"{path}: entry {name[:80]!r} is not a relative path inside the folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0):
            raise ModelFilesError(f"{path}: entry {name[:80]!r} needs 'sha256' (64 hex digits) and 'bytes'")
    return manifest


def verify_manifest(folder: str | Path) -> dict[str, str]:
    """Check every file of `folder` against its MANIFEST.json; returns {relative path: sha256}.

    Raises ModelFilesError (one line) for a missing or unreadable manifest, a listed file that is
    missing or changed, or a file that is not listed (outside the unsealed folders).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    files = manifest["files"]
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise ModelFilesError(f"{path}: missing (listed in {MANIFEST}); the folder is incomplete")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise ModelFilesError(f"{path}: changed since the model was saved (SHA-256 differs from {MANIFEST})")
    extra = sorted(set(_files(folder, manifest["unsealed"])) - set(files))
    if extra:
        raise ModelFilesError(f"{folder / extra[0]}: not in {MANIFEST} (a file added after the model was saved)"
                              + (f", and {len(extra) - 1} more" if len(extra) > 1 else ""))
    return {name: entry["sha256"] for name, entry in files.items()}


def verify_file(path: str | Path) -> str | None:
    """Check one model file against the MANIFEST.json of its folder, when the folder has one.

    Returns the file's SHA-256 when checked, None when the folder has no manifest (a single file
    copied on its own: its format is a data format, so nothing in it can run). A file missing from,
    or changed against, its folder's manifest raises ModelFilesError.
    """
    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return None
    files = _read_manifest(path.parent)["files"]
    entry = files.get(path.name)
    if entry is None:
        raise ModelFilesError(f"{path}: not in its folder's {MANIFEST} (a file added after the model was saved)")
    if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
        raise ModelFilesError(f"{path}: changed since the model was saved (SHA-256 differs from {MANIFEST})")
    return entry["sha256"]
