"""Local services on loopback for the demo, the benchmark and the tests: Mosquitto (Debian's
package), an in-process amqtt broker (no set-up at all) and a throwaway PostgreSQL cluster.

All bind 127.0.0.1 on a free port and are stopped by their context manager. Both brokers close the
connection of a client that sends a packet over twin.payload.BROKER_MAX_PACKET_BYTES, and both keep
a persistent session's QoS 1 messages while its client is away (twin/SCHEMA.md, "Delivery"). Both
can run secured: Mosquitto with a config from twin.mosquitto_config (TLS listener, password file,
ACL), amqtt with a TLS listener and a password file (twin.broker_passwd).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from twin.payload import BROKER_MAX_PACKET_BYTES

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


class PacketTooLarge(ConnectionError):
    pass


class _CappedReader:
    """amqtt reads a packet's body with one read of its whole remaining length: refusing that read
    drops the connection (as Mosquitto's `max_packet_size` does) before the body is buffered."""

    def __init__(self, reader, limit: int):
        self._reader, self._limit = reader, limit

    async def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._limit:
            raise PacketTooLarge(f"packet over the {self._limit:,}-byte limit: connection closed")
        return await self._reader.read(n)

    def feed_eof(self) -> None:
        self._reader.feed_eof()


_AMQTT_PATCHED = False


def _amqtt_durable_sessions() -> None:
    """What amqtt 0.12 lacks for "nothing acknowledged is lost" (read in its broker.py and
    mqtt/protocol/handler.py), fixed here for the processes that run the built-in broker:

    - A QoS 1 message sent to a subscriber is dropped from the session when no PUBACK comes within
      a fixed 5 s (`Timeout waiting for PUBACK`) or when the connection drops before it: a twin that
      is busy, or killed, loses those messages for good. Ours waits for the PUBACK as long as the
      connection lives and keeps the message in the session's in-flight set otherwise, so that the
      next connect of the same persistent session sends it again (MQTT 3.1.1, 4.4).
    - Packets of any size are read into memory: ours refuses more than BROKER_MAX_PACKET_BYTES.

    (The third gap, no offline queue for anonymous sessions, is `PersistentSessionAuth` below.)
    amqtt picks its handler class from a module global; it is replaced once, by a subclass.
    """
    global _AMQTT_PATCHED
    if _AMQTT_PATCHED:
        return
    import amqtt.broker
    from amqtt.mqtt.constants import QOS_1
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
    from amqtt.mqtt.protocol.handler import OUTGOING
    from amqtt.session import OutgoingApplicationMessage

    class DurableBrokerHandler(BrokerProtocolHandler):
        def attach(self, session, reader, writer) -> None:
            super().attach(session, _CappedReader(reader, BROKER_MAX_PACKET_BYTES), writer)

        async def _handle_qos1_message_flow(self, app_message) -> None:
            if app_message.direction != OUTGOING or app_message.qos != QOS_1 or app_message.puback_packet:
                return await super()._handle_qos1_message_flow(app_message)
            inflight = self.session.inflight_out
            if app_message.packet_id not in inflight and isinstance(app_message, OutgoingApplicationMessage):
                inflight[app_message.packet_id] = app_message
            packet = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            waiter: asyncio.Future = asyncio.Future()
            self._puback_waiters[app_message.packet_id] = waiter
            try:
                await self._send_packet(packet)
                app_message.publish_packet = packet
                app_message.puback_packet = await waiter  # no give-up: a dead peer is the keepalive's to find
            finally:
                self._puback_waiters.pop(app_message.packet_id, None)
            inflight.pop(app_message.packet_id, None)  # acknowledged: only now does it leave the session

    amqtt.broker.BrokerProtocolHandler = DurableBrokerHandler
    _AMQTT_PATCHED = True


@functools.cache
def _persistent_session_auth():
    from amqtt.plugins.authentication import AnonymousAuthPlugin

    class PersistentSessionAuth(AnonymousAuthPlugin):
        """amqtt's anonymous plugin, except that a client asking for a persistent session
        (clean_session=False) gets one: amqtt keeps no offline queue for a session marked anonymous
        (broker.py, `_run_broadcast`), so the built-in broker dropped every message published while
        the twin was down."""

        async def authenticate(self, *, session) -> bool:
            ok = await super().authenticate(session=session)
            if ok and session is not None and not session.clean_session:
                session.is_anonymous = False
            return ok

    return PersistentSessionAuth


class EmbeddedBroker:
    """amqtt in a thread of this process, bound to 127.0.0.1 (its default would be 0.0.0.0:1883), with
    the fixes of `_amqtt_durable_sessions` and `PersistentSessionAuth`.

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

        _amqtt_durable_sessions()
        listener = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.certfile is not None:
            listener |= {"ssl": True, "certfile": str(self.certfile), "keyfile": str(self.keyfile)}
            if self.cafile is not None:
                listener["cafile"] = str(self.cafile)
        if self.password_file is not None:  # only this plugin answers: a client without a username gets no yes
            # (its users' sessions are not anonymous, so persistent sessions keep their offline queue)
            plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self.password_file)}}
        else:
            plugins = {"twin.services.PersistentSessionAuth": {"allow_anonymous": True}}
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


def __getattr__(name: str):
    # amqtt loads its plugins by dotted name; the class is built on first use so that importing this
    # module does not import amqtt
    if name == "PersistentSessionAuth":
        return _persistent_session_auth()
    raise AttributeError(name)
