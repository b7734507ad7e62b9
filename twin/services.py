"""Local services on loopback for the demo, the benchmark and the tests: Mosquitto (Debian's
package), an in-process amqtt broker (no set-up at all) and a throwaway PostgreSQL cluster.

All bind 127.0.0.1 on a free port and are stopped by their context manager. Both brokers can run
secured: Mosquitto with a config from twin.mosquitto_config (TLS listener, password file, ACL),
amqtt with a TLS listener and a password file (twin.broker_passwd).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        """`security`: a twin.mosquitto_config.MosquittoSecurity whose listener, TLS, password file and
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

            from twin.mosquitto_config import security_lines

            listener = security_lines(replace(self.security, port=self.port, bind="127.0.0.1"))
        else:
            listener = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        lines = [*listener,
                 "user root" if os.geteuid() == 0 else "",  # as root it would switch to `mosquitto` and lose its dir
                 "max_queued_messages 0",          # unbounded queue per client: the twin may lag, never lose
                 "max_inflight_messages 1000",     # QoS 1 window towards each subscriber
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


class EmbeddedBroker:
    """amqtt in a thread of this process, bound to 127.0.0.1 (its default would be 0.0.0.0:1883).

    With `password_file` (twin.broker_passwd) only its users get in: anonymous clients are refused.
    With `certfile` and `keyfile` the listener speaks TLS only; with `cafile` as well, clients may
    present a certificate signed by that CA (amqtt asks for one but does not require it).
    """

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1", password_file: Path | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None, cafile: Path | None = None):
        # No per-user topic ACL here: with amqtt 0.12's TopicAccessControlListPlugin on, the last 7 of
        # 50 messages an edge agent published before its clean disconnect were acknowledged and never
        # delivered (0 without it): its check yields, and the disconnect cancels the pending deliveries.
        # Deployments that need per-node topics run Mosquitto (twin.mosquitto_config)
        if (certfile is None) != (keyfile is None):
            raise ServiceError("the broker's TLS listener needs a certificate and its key together")
        if cafile is not None and certfile is None:
            raise ServiceError("a CA for client certificates needs the broker's own certificate and key (TLS)")
        for path in (password_file, certfile, keyfile, cafile):
            if path is not None and not Path(path).is_file():
                raise ServiceError(f"{path}: no such file")
        if password_file is not None:
            from twin.broker_passwd import read_users

            if not read_users(password_file):  # a file without users would lock everyone out, silently
                raise ServiceError(f"{password_file}: no users (add some with `moeworks twin broker-passwd`)")
        self.host, self.password_file = host, password_file
        self.certfile, self.keyfile, self.cafile = certfile, keyfile, cafile
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_disconnects)
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        listener = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.certfile is not None:
            listener |= {"ssl": True, "certfile": str(self.certfile), "keyfile": str(self.keyfile)}
            if self.cafile is not None:
                listener["cafile"] = str(self.cafile)
        if self.password_file is not None:  # only this plugin answers: a client without a username gets no yes
            plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self.password_file)}}
        else:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        config = {"listeners": {"default": listener}, "plugins": plugins}
        self._thread.start()

        async def boot():
            self._broker = Broker(config, loop=self._loop)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(boot(), self._loop).result(timeout=20)  # listening once it returns
        return self

    def stop(self) -> None:
        if self._broker is not None:
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=20)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A client that hangs up first (e.g. one just refused a login) makes amqtt's connection handler
    raise ConnectionResetError, which asyncio would log as a traceback: one line is what it is worth."""
    if isinstance(context.get("exception"), ConnectionError):
        log.info("MQTT client went away: %s", context["exception"])
        return
    loop.default_exception_handler(context)


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
