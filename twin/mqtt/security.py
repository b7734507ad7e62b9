"""MQTT credentials and TLS, one config for every client of the suite: the edge agent (paho) and the
twin and its load generator (twin.mqtt.burst_client).

As the field does it: the broker's certificate is checked against a CA (and its name against the
host we dial), a username and password go in the CONNECT, and a client certificate is optional
(for brokers with `require_certificate true`). Passwords never come from the command line (they
would show in `ps` and shell history): from a file or the MOEWORKS_MQTT_PASSWORD variable.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

PASSWORD_ENV = "MOEWORKS_MQTT_PASSWORD"
MAX_PASSWORD_FILE_BYTES = 4096  # a password file is one line; anything larger is not one
MAX_CREDENTIAL_BYTES = 65_535   # MQTT 3.1.1 encodes the user name and password with a 2-byte length


class MQTTSecurityError(ValueError):
    """A credential or certificate option that cannot work (missing file, empty password, ...)."""


@dataclass(frozen=True, kw_only=True)
class MQTTSecurity:
    """`tls` turns TLS on (the system's CAs check the broker unless `ca` is given; `ca`, `cert` or
    `key` imply it). `password` is excluded from repr so it never reaches a log line."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None     # PEM CA certificate(s) the broker's certificate must chain to
    cert: Path | None = None   # PEM client certificate (optional; brokers may require one)
    key: Path | None = None    # PEM private key of `cert`
    tls: bool = False

    def __post_init__(self) -> None:
        if self.username is not None:
            if not self.username or len(self.username.encode()) > MAX_CREDENTIAL_BYTES or "\0" in self.username:
                raise MQTTSecurityError("the MQTT username must be 1-65,535 bytes without NUL")
        if self.password is not None:
            if self.username is None:
                raise MQTTSecurityError("an MQTT password needs a username (MQTT 3.1.1 sends none without one)")
            if not self.password or len(self.password.encode()) > MAX_CREDENTIAL_BYTES:
                raise MQTTSecurityError("the MQTT password must be 1-65,535 bytes")
        if (self.cert is None) != (self.key is None):
            raise MQTTSecurityError("a client certificate needs its key and a key its certificate "
                                    "(--mqtt-cert and --mqtt-key together)")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise MQTTSecurityError(f"--mqtt-{name} {path}: no such file")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca is not None or self.cert is not None

    @property
    def is_plain(self) -> bool:
        return not self.uses_tls and self.username is None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context that checks the broker's certificate chain and host name (None without TLS)."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca) if self.ca else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None:
                context.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as exc:
            raise MQTTSecurityError(f"cannot load the MQTT TLS files: {exc}") from exc
        return context

    def apply_to_paho(self, client) -> None:
        """TLS and credentials on a paho client, before its connect()."""
        context = self.ssl_context()
        if context is not None:
            client.tls_set_context(context)  # paho passes the host as server_hostname: the name is checked
        if self.username is not None:
            client.username_pw_set(self.username, self.password)

    @classmethod
    def from_options(cls, *, username: str | None = None, password_file: Path | None = None,
                     ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
                     tls: bool = False, environ: dict[str, str] | None = None) -> MQTTSecurity:
        """The config from the command-line options: the password comes from `password_file`, else
        from $MOEWORKS_MQTT_PASSWORD."""
        environ = os.environ if environ is None else environ
        password = read_password_file(password_file) if password_file is not None else environ.get(PASSWORD_ENV) or None
        if password is not None and username is None:
            source = f"--mqtt-password-file {password_file}" if password_file else f"${PASSWORD_ENV}"
            raise MQTTSecurityError(f"{source} is set but --mqtt-username is not")
        return cls(username=username, password=password, ca=ca, cert=cert, key=key, tls=tls)


def read_password_file(path: Path) -> str:
    """The password on the file's first line (its line break is not part of it)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise MQTTSecurityError(f"cannot read the MQTT password file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_PASSWORD_FILE_BYTES:
        raise MQTTSecurityError(f"{path}: over {MAX_PASSWORD_FILE_BYTES} bytes, not a password file")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise MQTTSecurityError(f"{path}: not UTF-8 text") from None
    if not lines or not lines[0]:
        raise MQTTSecurityError(f"{path}: empty, no password on its first line")
    return lines[0]
