"""A bundle as one .tar.gz: the folder's files at the archive's top level, nothing else.

Writing is deterministic (sorted names, mtime 0, no owner), so the same bundle gives the same bytes.
Reading trusts nothing in the archive: before anything is written, every member must be a regular
file with a plain name (no folder, no `..`, no absolute path, no link or device), listed once, within
the bundle's size limits; only then are the files extracted (with tarfile's "data" filter as a second
guard) into a fresh temporary folder, where the folder checks (manifest, signature, test vectors) run.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from core.bundle_signing import MAX_FILES, BundleIntegrityError

SUFFIX = ".tar.gz"
MAX_UNPACKED_BYTES = 600 << 20  # the graph's limit (512 MiB) and the small JSON files beside it


def is_archive(path: Path) -> bool:
    return path.name.endswith(SUFFIX)


def write_archive(folder: Path, path: Path) -> Path:
    """Pack the bundle folder's files into path (.tar.gz)."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for file in sorted(folder.iterdir()):
            info = tarfile.TarInfo(file.name)
            info.size, info.mode, info.mtime = file.stat().st_size, 0o644, 0
            with file.open("rb") as f:
                tar.addfile(info, f)
    return path


def _checked_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members, names, total = [], set(), 0
    for member in tar:  # streams the headers; stops at the first member that is no plain file
        if len(members) >= MAX_FILES:
            raise BundleIntegrityError(f"the archive holds more than {MAX_FILES} members: not a bundle")
        name = member.name
        if not member.isreg():
            kind = "link" if member.issym() or member.islnk() else "folder" if member.isdir() else "special file"
            raise BundleIntegrityError(f"archive member {name!r} is a {kind}: a bundle archive holds plain files only")
        if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith(("-", ".")):
            raise BundleIntegrityError(f"archive member {name!r} is not a plain file name at the archive's top")
        if name in names:
            raise BundleIntegrityError(f"archive member {name!r} appears twice")
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise BundleIntegrityError(f"the archive unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB")
        names.add(name)
        members.append(member)
    return members


@contextlib.contextmanager
def extracted(path: Path) -> Iterator[Path]:
    """The archive's files in a temporary folder (removed afterwards), after the member checks above."""
    if not path.is_file():
        raise BundleIntegrityError(f"{path} is not a bundle archive")
    with tempfile.TemporaryDirectory(prefix="moeworks-bundle-") as work:
        try:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(work, members=_checked_members(tar), filter="data")
        except (tarfile.TarError, EOFError, OSError, io.UnsupportedOperation) as error:
            raise BundleIntegrityError(f"{path.name} is not a readable .tar.gz: {error}") from None
        yield Path(work)
