"""Bearer tokens with roles for the product's HTTP services (the twin's API and `moeworks serve`).

A token is `mw_<id>_<secret>`: the id finds its record, the secret (32 random bytes) is checked
against the stored SHA-256 hash in constant time. Only hashes are stored: the token file can be
read by whoever runs the service without handing out the tokens. A salted slow hash (scrypt) buys
nothing for 256-bit random secrets and would cost milliseconds per request; GitHub and PyPI tokens
are stored the same way.

Roles are ordered: viewer (reads) < operator (acknowledges alarms, runs what-ifs, scores) < admin
(MES, ETL, configuration, rollouts). A route asks for the least role it needs.

Without a token file a service binds loopback only (`check_bind`): nothing unauthenticated is ever
reachable from another host.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request

ROLES = ("viewer", "operator", "admin")  # each role may do everything the ones before it may
TOKEN_PREFIX = "mw_"
_TOKEN_RE = re.compile(r"^mw_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9 ._@-]{1,64}$")
MAX_TOKEN_FILE_BYTES = 1 << 20
MAX_TOKENS = 10_000


class AuthError(ValueError):
    """A token file or a request to make a token that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Identity:
    """Who made a request: the token's name (recorded, e.g., with an alarm acknowledgement) and role."""
    name: str
    role: str
    token_id: str

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


# Used where a service runs without a token file (loopback only): everyone on the machine is admin,
# as with any local tool, and acknowledgements say so.
LOCAL_ADMIN = Identity(name="local", role="admin", token_id="local")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


@dataclass
class TokenStore:
    """The hashed tokens of one token file. `TokenStore.load(path)`; `identify(header)` per request."""
    path: Path
    records: dict[str, dict]

    @classmethod
    def load(cls, path: Path | str) -> TokenStore:
        path = Path(path)
        if not path.is_file():
            raise AuthError(f"token file {path} does not exist (make one with `moeworks auth token`)")
        if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
            raise AuthError(f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AuthError(f"token file {path} is not JSON: {error}") from None
        tokens = document.get("tokens") if isinstance(document, dict) else None
        if not isinstance(tokens, list) or len(tokens) > MAX_TOKENS:
            raise AuthError(f"token file {path} has no list 'tokens' (of at most {MAX_TOKENS})")
        records: dict[str, dict] = {}
        for index, record in enumerate(tokens):
            ok = (isinstance(record, dict) and isinstance(record.get("id"), str)
                  and re.fullmatch(r"[0-9a-f]{16}", record["id"]) and record.get("role") in ROLES
                  and isinstance(record.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
                  and isinstance(record.get("name"), str) and _NAME_RE.match(record["name"]))
            if not ok:
                raise AuthError(f"token file {path}: entry {index} needs id, name, role ({'/'.join(ROLES)}) and sha256")
            records[record["id"]] = record
        return cls(path=path, records=records)

    def identify(self, token: str | None) -> Identity | None:
        """The identity a presented token stands for, or None (unknown, revoked, malformed)."""
        match = _TOKEN_RE.match(token or "")
        record = self.records.get(match.group(1)) if match else None
        if record is None or not hmac.compare_digest(record["sha256"], _hash(match.group(2))):
            return None
        return Identity(name=record["name"], role=record["role"], token_id=record["id"])


def create_token(path: Path | str, *, role: str, name: str) -> str:
    """Add a token of `role` to the token file (made if missing) and return it; only its hash is kept."""
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not _NAME_RE.match(name):
        raise AuthError("name must be 1-64 letters, digits, spaces or . _ @ -")
    path = Path(path)
    records = list(TokenStore.load(path).records.values()) if path.exists() else []
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    records.append({"id": token_id, "name": name, "role": role, "sha256": _hash(secret),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _write_private(path, {"tokens": records})
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def revoke_token(path: Path | str, token_id: str) -> bool:
    """Remove a token by id (the part after `mw_`); True if it was there."""
    store = TokenStore.load(path)
    if store.records.pop(token_id, None) is None:
        return False
    _write_private(Path(path), {"tokens": list(store.records.values())})
    return True


def _write_private(path: Path, document: dict) -> None:
    """Write atomically with mode 0600: hashes are not secrets, but who holds which role is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth_file: Path | str | None) -> None:
    """Refuse to serve beyond loopback without authentication (raises AuthError with the reason)."""
    if auth_file is None and not is_loopback(host):
        raise AuthError(f"refusing to bind {host}: without --auth-file a service binds loopback only "
                        "(127.0.0.1 or ::1); make tokens with `moeworks auth token`")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def role_dependency(store: TokenStore | None, role: str):
    """A FastAPI dependency that returns the caller's Identity if it holds at least `role`.

    401 (with `WWW-Authenticate: Bearer`) for a missing or unknown token, 403 for too small a role.
    Without a store (loopback-only service) every caller is LOCAL_ADMIN.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")

    def dependency(request: Request) -> Identity:
        if store is None:
            return LOCAL_ADMIN
        identity = store.identify(bearer_token(request.headers.get("authorization")))
        if identity is None:
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        if not identity.allows(role):
            raise HTTPException(403, f"this needs the {role} role; the token has {identity.role}")
        return identity

    return dependency
