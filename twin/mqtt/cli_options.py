"""The MQTT security options, one grammar for `twin serve`, `twin broker`, `twin demo` and `edge run`.

    --mqtt-username NAME         (or $MOEWORKS_MQTT_USERNAME)
    --mqtt-password-file FILE    the password on its first line (or $MOEWORKS_MQTT_PASSWORD_FILE;
                                 or the password itself in $MOEWORKS_MQTT_PASSWORD). Never on the
                                 command line, where `ps` and shell history would keep it.
    --mqtt-tls                   TLS, the broker checked against the system's CAs
    --mqtt-ca FILE               TLS, the other side's certificate checked against this CA
    --mqtt-cert FILE, --mqtt-key FILE
                                 this side's certificate and key: a client's (optional; for
                                 brokers that require one) or, for `twin broker`, the broker's
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from twin.mqtt.security import MQTTSecurity, MQTTSecurityError

Username = Annotated[str | None, typer.Option("--mqtt-username", envvar="MOEWORKS_MQTT_USERNAME",
                                              help="MQTT username (an edge node's is its node id under the "
                                                   "generated Mosquitto ACL)")]
PasswordFile = Annotated[Path | None, typer.Option(
    "--mqtt-password-file", envvar="MOEWORKS_MQTT_PASSWORD_FILE",
    help="file whose first line is the MQTT password (else $MOEWORKS_MQTT_PASSWORD); never on the command line")]
Tls = Annotated[bool, typer.Option("--mqtt-tls", help="MQTT over TLS (implied by --mqtt-ca/--mqtt-cert)")]
Ca = Annotated[Path | None, typer.Option("--mqtt-ca", help="CA certificate (PEM) the broker's certificate must "
                                                            "chain to; its host name is checked too")]
Cert = Annotated[Path | None, typer.Option("--mqtt-cert", help="client certificate (PEM), for brokers that "
                                                                "require one; needs --mqtt-key")]
Key = Annotated[Path | None, typer.Option("--mqtt-key", help="private key (PEM) of --mqtt-cert")]


def security_or_exit(*, username: str | None, password_file: Path | None, ca: Path | None, cert: Path | None,
                     key: Path | None, tls: bool) -> MQTTSecurity | None:
    """The MQTTSecurity of the options (None when none is given); a mistake exits 2 with one line."""
    try:
        security = MQTTSecurity.from_options(username=username, password_file=password_file, ca=ca, cert=cert,
                                             key=key, tls=tls)
        security.ssl_context()  # unreadable or mismatched certificate files fail here, not at each reconnect
    except MQTTSecurityError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return None if security.is_plain else security
