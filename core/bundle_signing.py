"""The bundle's manifest (SHA-256 of every file) and its OpenSSF model-signing signature.

`manifest.json` lists every file of the bundle but itself and the signature, with its SHA-256 and
size; `model.sig` is a model-signing (Sigstore bundle format) signature over the whole folder made
with the publisher's own EC private key (PEM). The private key is read, never copied: nothing under
the bundle folder is written from it but the signature.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
SIGNATURE = "model.sig"
MAX_FILES = 64  # a bundle holds a handful of files; more is not a bundle we made


class BundleIntegrityError(ValueError):
    """The bundle differs from what was signed or listed (the message says how)."""


def _files(bundle: Path) -> list[Path]:
    files = []
    for path in sorted(bundle.rglob("*")):
        if path.is_symlink():
            raise BundleIntegrityError(f"{path.relative_to(bundle)}: symbolic links are not allowed in a bundle")
        if path.is_file():
            files.append(path)
        if len(files) > MAX_FILES:
            raise BundleIntegrityError(f"more than {MAX_FILES} files: not a bundle")
    return files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle: Path) -> dict:
    entries = {p.relative_to(bundle).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
               for p in _files(bundle) if p.name not in (MANIFEST, SIGNATURE)}
    manifest = {"algorithm": "sha256", "files": entries}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def check_manifest(bundle: Path) -> dict:
    """The manifest, after checking every listed file's hash and that no file is missing or added."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleIntegrityError(f"{bundle}: no {MANIFEST}")
    if path.stat().st_size > 1 << 20:
        raise BundleIntegrityError(f"{MANIFEST} is larger than 1 MiB")
    try:
        manifest = json.loads(path.read_text())
        listed = {str(k): str(v["sha256"]) for k, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleIntegrityError(f"{MANIFEST} is not a bundle manifest ({error})") from None
    present = {p.relative_to(bundle).as_posix(): p for p in _files(bundle) if p.name not in (MANIFEST, SIGNATURE)}
    added, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
    if added or missing:
        raise BundleIntegrityError(f"files added {added} / removed {missing} since the manifest was made")
    changed = sorted(name for name, p in present.items() if sha256_file(p) != listed[name])
    if changed:
        raise BundleIntegrityError(f"files changed since the manifest was made: {changed}")
    return manifest


def _hashing_config():
    from model_signing import hashing

    # every file counts, .git* ones included: an added file must break the signature
    return hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(
        paths=[SIGNATURE], ignore_git_paths=False)


def sign(bundle: Path, private_key: Path) -> Path:
    """Sign the bundle folder with an EC private key (PEM); writes bundle/model.sig."""
    from model_signing import signing

    signature = bundle / SIGNATURE
    signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
        _hashing_config()).sign(bundle, signature)
    return signature


def verify_signature(bundle: Path, public_key: Path) -> None:
    """Raise BundleIntegrityError unless model.sig verifies with public_key over the bundle as it is."""
    from model_signing import verifying

    signature = bundle / SIGNATURE
    if not signature.is_file():
        raise BundleIntegrityError(f"{bundle} is not signed (no {SIGNATURE})")
    if signature.stat().st_size > 1 << 20:
        raise BundleIntegrityError(f"{SIGNATURE} is larger than 1 MiB")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            _hashing_config()).verify(bundle, signature)
    except Exception as error:  # model-signing raises ValueError and crypto/protobuf errors alike
        raise BundleIntegrityError(f"signature does not verify with {public_key.name}: "
                                   f"{str(error).splitlines()[0][:300] or type(error).__name__}") from None
