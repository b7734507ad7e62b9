"""The built-in MQTT broker (`moeworks twin broker`, the demo's default): amqtt in a thread of this
process on loopback, so the edge and the twin can be tried with no set-up at all.

It closes the connection of a client that sends a packet over
twin.sparkplug.payload.BROKER_MAX_PACKET_BYTES and keeps a persistent session's QoS 1 messages while
its client is away (twin/SCHEMA.md, "Delivery"), as Mosquitto does. It can run secured: a TLS
listener and a password file (twin.mqtt.broker_passwd). Mosquitto and PostgreSQL for the tests and
benchmarks are started by tests/services.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from pathlib import Path

from twin.sparkplug.payload import BROKER_MAX_PACKET_BYTES

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The built-in broker cannot start with these settings (a missing file, TLS half configured)."""


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it), for the broker and the demo's API."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def _broker_class():
    from amqtt.broker import Broker

    class RetainedToSubscribersBroker(Broker):
        """amqtt 0.12's broker, with its retained messages sent only to the subscriptions they match.

        On every connect, amqtt's `_handle_client_session` walks the broker's whole subscription dict,
        every client's filters, and for each one sends the matching retained messages to the client
        that connects, awaiting as it goes. Two faults: a client got the retained messages of filters
        other clients hold, past its own subscriptions; and another client's SUBSCRIBE during one of
        those awaits changed the dict, so the walk raised "dictionary changed size during iteration"
        and dropped the connecting client (an edge agent of the TLS demo then opened a second session:
        tests/twin/mqtt/test_security.py, 2 runs in 12 under load). Here a filter the client does not
        hold sends nothing and returns without yielding; one it holds (its SUBSCRIBE, or a persistent
        session's filters on reconnect) is sent from a task of its own, so that walk never yields either.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._retained_sends: set[asyncio.Task] = set()  # this broker's sends in flight

        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            held = [qos for s, qos in self._subscriptions.get(subscription[0], ()) if s.client_id == session.client_id]
            if not held:
                return
            send = super()._publish_retained_messages_for_subscription((subscription[0], held[0]), session)
            task = asyncio.ensure_future(send)
            self._retained_sends.add(task)  # a task nobody holds may be collected before it runs
            task.add_done_callback(self._retained_sends.discard)

    return RetainedToSubscribersBroker


@functools.cache
def _off_loop_password_auth():
    from amqtt.plugins.authentication import FileAuthPlugin

    class OffLoopPasswordAuth(FileAuthPlugin):
        """amqtt's password-file plugin, with the argon2 check off the broker's event loop.

        amqtt verifies on the loop itself: one argon2id check (64 MiB, t=3) took 0.33 s on the shared
        2-core VM at load 5, and every client of the broker waited that long per login, so that a few
        agents connecting together, or anyone trying passwords, stalled all traffic (the TLS demo's
        agents sent nothing in 3 s in 1 run of 15 under load). Here checks run in threads, at most
        MAX_CONCURRENT_CHECKS at a time (each holds 64 MiB), and an unknown user costs a check too, so
        that the time taken does not tell which user names exist.
        """

        MAX_CONCURRENT_CHECKS = 2
        _DUMMY_PASSWORD = "not a password of anyone's"

        async def authenticate(self, *, session) -> bool | None:
            if session is None or not session.username:
                return False
            if not hasattr(self, "_checks"):  # built on the broker's loop, at the first login
                self._checks = asyncio.Semaphore(self.MAX_CONCURRENT_CHECKS)
                self._dummy_hash = self.pwd_hasher.hash(self._DUMMY_PASSWORD)
            known = self._users.get(session.username)
            async with self._checks:
                ok = await asyncio.to_thread(self.pwd_hasher.verify, session.password or "",
                                             known or self._dummy_hash)
            return bool(known) and ok

    return OffLoopPasswordAuth


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

    With `password_file` (twin.mqtt.broker_passwd) only its users get in: anonymous clients are refused.
    With `certfile` and `keyfile` the listener speaks TLS only; with `cafile` as well, clients may
    present a certificate signed by that CA (amqtt asks for one but does not require it).
    """

    def __init__(self, *, port: int | None = None, host: str = "127.0.0.1", password_file: Path | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None, cafile: Path | None = None):
        # No per-user topic ACL here: with amqtt 0.12's TopicAccessControlListPlugin on, the last 7 of
        # 50 messages an edge agent published before its clean disconnect were acknowledged and never
        # delivered (0 without it): its check yields, and the disconnect cancels the pending deliveries.
        # Deployments that need per-node topics run Mosquitto (twin.mqtt.mosquitto_config)
        if (certfile is None) != (keyfile is None):
            raise BrokerError("the broker's TLS listener needs a certificate and its key together")
        if cafile is not None and certfile is None:
            raise BrokerError("a CA for client certificates needs the broker's own certificate and key (TLS)")
        for path in (password_file, certfile, keyfile, cafile):
            if path is not None and not Path(path).is_file():
                raise BrokerError(f"{path}: no such file")
        if password_file is not None:
            from twin.mqtt.broker_passwd import read_users

            if not read_users(password_file):  # a file without users would lock everyone out, silently
                raise BrokerError(f"{password_file}: no users (add some with `moeworks twin broker-passwd`)")
        self.host, self.password_file = host, password_file
        self.certfile, self.keyfile, self.cafile = certfile, keyfile, cafile
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_disconnects)
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    def start(self) -> EmbeddedBroker:
        _amqtt_durable_sessions()
        listener = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        if self.certfile is not None:
            listener |= {"ssl": True, "certfile": str(self.certfile), "keyfile": str(self.keyfile)}
            if self.cafile is not None:
                listener["cafile"] = str(self.cafile)
        if self.password_file is not None:  # only this plugin answers: a client without a username gets no yes
            # (its users' sessions are not anonymous, so persistent sessions keep their offline queue)
            plugins = {"twin.mqtt.embedded_broker.OffLoopPasswordAuth": {"password_file": str(self.password_file)}}
        else:
            plugins = {"twin.mqtt.embedded_broker.PersistentSessionAuth": {"allow_anonymous": True}}
        config = {"listeners": {"default": listener}, "plugins": plugins}
        self._thread.start()

        async def boot():
            self._broker = _broker_class()(config, loop=self._loop)
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


def __getattr__(name: str):
    # amqtt loads its plugins by dotted name; the class is built on first use so that importing this
    # module does not import amqtt
    if name == "PersistentSessionAuth":
        return _persistent_session_auth()
    if name == "OffLoopPasswordAuth":
        return _off_loop_password_auth()
    raise AttributeError(name)
