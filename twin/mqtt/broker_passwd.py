"""The built-in broker's password file (`moeworks twin broker --password-file`): `user:hash` lines
with Argon2 hashes, the format of amqtt's FileAuthPlugin (Mosquitto's own `mosquitto_passwd`
hashes are PBKDF2, which amqtt cannot read: each broker keeps its own file).

`moeworks twin broker-passwd --file F --username U` adds or replaces one user, like
`mosquitto_passwd`; the file is written with mode 0600 and only hashes are stored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

USERNAME = re.compile(r"[A-Za-z0-9._-]{1,128}")  # no ':' (the separator), no MQTT wildcards, no spaces
MAX_FILE_BYTES = 1 << 20


class BrokerPasswdError(ValueError):
    pass


def _hasher():
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(),))


def read_users(path: Path) -> dict[str, str]:
    """username -> hash; comments and blank lines skipped; a malformed line is an error with its number."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BrokerPasswdError(f"{path}: over {MAX_FILE_BYTES:,} bytes, not a password file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BrokerPasswdError(f"{path}: no such password file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerPasswdError(f"cannot read {path}: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        if not sep or not USERNAME.fullmatch(name) or not hashed.startswith("$argon2"):
            raise BrokerPasswdError(f"{path}:{number}: not a `user:$argon2...` line "
                                    "(make entries with `moeworks twin broker-passwd`)")
        users[name] = hashed
    return users


def set_password(path: Path, username: str, password: str) -> None:
    """Add or replace `username` in the file (made, 0600, if missing)."""
    if not USERNAME.fullmatch(username):
        raise BrokerPasswdError(f"username {username!r}: use 1-128 letters, digits, '.', '_' or '-'")
    if not password:
        raise BrokerPasswdError("an empty password is not a password")
    path = Path(path)
    users = read_users(path) if path.exists() else {}
    users[username] = _hasher().hash(password)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}:{hashed}\n" for name, hashed in sorted(users.items())))
    os.replace(tmp, path)  # readers never see half a file

