"""Services on loopback for the tests and the benchmarks: Mosquitto (Debian's package) and a throwaway
PostgreSQL cluster. The in-process amqtt broker is part of the product (twin.mqtt.embedded_broker:
`moeworks twin broker`, the demo) and is imported from there.

All bind 127.0.0.1 on a free port and are stopped by their context manager. Mosquitto closes the
connection of a client that sends a packet over twin.sparkplug.payload.BROKER_MAX_PACKET_BYTES and keeps
a persistent session's QoS 1 messages while its client is away (twin/SCHEMA.md, "Delivery"); it can run
secured with a config from twin.mqtt.mosquitto_config (TLS listener, password file, ACL).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from twin.mqtt.embedded_broker import EmbeddedBroker, free_port
from twin.sparkplug.payload import BROKER_MAX_PACKET_BYTES

# the product's built-in broker, started by the tests beside Mosquitto
__all__ = ["EmbeddedBroker", "Mosquitto", "PostgresCluster", "ServiceError", "free_port", "wait_port"]

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class ServiceError(RuntimeError):
    pass


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ServiceError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Mosquitto:
    """`mosquitto -c conf` on 127.0.0.1:port. Queues are unbounded so a slow subscriber loses nothing;
    sessions persist in memory across client reconnects (not across broker restarts unless `persistence`)."""

    def __init__(self, *, port: int | None = None, workdir: Path | None = None, persistence: bool = True,
                 security=None):
        """`security`: a twin.mqtt.mosquitto_config.MosquittoSecurity whose listener, TLS, password file and
        ACL replace the anonymous plaintext listener (its own port is ignored: this one's is used)."""
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(self.binary).exists():
            raise ServiceError("mosquitto is not installed (apt-get install mosquitto)")
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moeworks-mosquitto-"))
        self.persistence = persistence
        self.security = security
        self.process: subprocess.Popen | None = None

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        if self.security is not None:
            from dataclasses import replace

            from twin.mqtt.mosquitto_config import security_lines

            listener = security_lines(replace(self.security, port=self.port, bind="127.0.0.1"))
        else:
            listener = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines = [*listener,
                 "user root" if os.geteuid() == 0 else "",  # as root it would switch to `mosquitto` and lose its dir
                 "max_queued_messages 0",          # unbounded queue per client: the twin may lag, never lose
                 "max_inflight_messages 5000",     # QoS 1 window towards each subscriber: the twin acknowledges
                                                   # after its history commit, ~50-100 ms later, 5,000 msg/s
                 f"max_packet_size {BROKER_MAX_PACKET_BYTES}",  # a client sending more is disconnected
                 "persistent_client_expiration 1h"]
        if self.persistence:  # queued QoS 1 messages of persistent sessions survive a broker restart
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        conf.write_text("\n".join(lines) + "\n")
        self.log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port)
        except ServiceError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, *, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PostgresCluster:
    """A throwaway PostgreSQL 15 cluster (initdb + pg_ctl) in a temp dir on 127.0.0.1:port.

    PostgreSQL refuses to run as root; as root the cluster runs as the `postgres` system user.
    """

    def __init__(self, *, port: int | None = None, bin_dir: Path = PG_BIN):
        self.port = port or free_port()
        self.bin = bin_dir
        if not (self.bin / "initdb").exists():
            raise ServiceError(f"PostgreSQL binaries not found in {self.bin}")
        self.dir = Path(tempfile.mkdtemp(prefix="moeworks-pg-"))
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            shutil.chown(self.dir, user="postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--"] + cmd
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(args[:2])} failed: {result.stderr.strip()[-500:]}")

    @property
    def url(self) -> str:
        return f"postgresql://{self.user or os.environ.get('USER', 'postgres')}@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresCluster:
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", self.user or os.environ.get("USER",
                  "postgres"), "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off", "start")
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        except (ServiceError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
