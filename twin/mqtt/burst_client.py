"""A lean MQTT 3.1.1 client that hands received messages over in bursts.

Why not paho here: paho handles one packet per select() and per callback, with five syscalls per
QoS 1 message (a 1-byte recv for the command, one per length byte, one for the body, a wake-up
byte on its socket pair and a send for the PUBACK) and a few dozen Python calls around them. At
the twin's rates that was most of its CPU (benchmarks/RESULTS.md, "Digital twin ingestion"). This
client reads whatever the socket holds (up to `read_bytes`), parses every complete packet in it,
gives all its PUBLISHes to one callback, and only then sends their PUBACKs, in order, in one
write. A message is therefore acknowledged after the callback has applied it, as before. With
`defer_acks` the callback also gets an `ack()` to call once the burst is durable (the twin calls it
after the history commit): the PUBACKs leave then, on the connection the burst came in on, or
never (a reconnect makes the broker send the messages again).

What it does (all the twin needs, for the twin and the load generator): one connection with a
fixed client id and a persistent or clean session, a will, keepalive pings, subscriptions at QoS
0/1 (renewed on every connect), publishing at QoS 0/1 from any thread (QoS 1 kept until its PUBACK
and resent with DUP after a reconnect), reconnect with doubling backoff, a username and password,
and TLS (twin.mqtt.security: the broker's certificate checked against a CA and the host name, an optional
client certificate). No QoS 2 (the twin never asks for it: a QoS 2 PUBLISH is a protocol error that
drops the connection), no MQTT 5.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from twin.mqtt.security import MQTTSecurity

log = logging.getLogger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
CONNACK_ERRORS = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                  4: "bad user name or password", 5: "not authorised"}
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_PUBACK = struct.Struct("!BBH")


class MQTTProtocolError(ConnectionError):
    pass


@dataclass(frozen=True)
class BurstClientConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "moeworks-burst"
    clean_session: bool = True
    keepalive_s: int = 10             # the broker drops us (and sends the will) after 1.5x this without a packet
    will: tuple[str, bytes, int, bool] | None = None  # (topic, payload, qos, retain)
    backoff_min_s: float = 0.1        # first reconnect delay, doubling...
    backoff_max_s: float = 5.0        # ...to this: a broker back from a restart is found within 5 s
    connect_timeout_s: float = 10.0
    read_bytes: int = 256 * 1024      # one recv: about a thousand telemetry messages, one burst
    security: MQTTSecurity | None = None  # credentials and TLS; None: anonymous, plaintext


def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return len(raw).to_bytes(2, "big") + raw


def publish_packet(topic: str, payload: bytes, qos: int, mid: int = 0, *, retain: bool = False,
                   dup: bool = False) -> bytes:
    topic_b = topic.encode()
    body_len = 2 + len(topic_b) + (2 if qos else 0) + len(payload)
    head = bytes((0x30 | dup << 3 | qos << 1 | retain,)) + encode_length(body_len) + len(topic_b).to_bytes(2, "big")
    return head + topic_b + (mid.to_bytes(2, "big") if qos else b"") + payload


def connect_packet(cfg: BurstClientConfig) -> bytes:
    flags = 0x02 if cfg.clean_session else 0
    payload = _string(cfg.client_id)
    if cfg.will is not None:
        topic, message, qos, retain = cfg.will
        flags |= 0x04 | qos << 3 | retain << 5
        payload += _string(topic) + _string(message)
    security = cfg.security
    if security is not None and security.username is not None:  # MQTT 3.1.1, 3.1.2.8-9: user name, then password
        flags |= 0x80
        payload += _string(security.username)
        if security.password is not None:
            flags |= 0x40
            payload += _string(security.password)
    body = _string("MQTT") + bytes((4, flags)) + cfg.keepalive_s.to_bytes(2, "big") + payload
    return b"\x10" + encode_length(len(body)) + body


class BurstClient:
    """`on_messages(messages)` gets a list of (topic, payload) per burst, in arrival order, on the
    network thread (`on_messages(messages, ack)` with `defer_acks`: call `ack()` once, from any
    thread, in the order of the bursts, when they may be acknowledged); `on_connect(client,
    session_present)` runs after every CONNACK (subscribe there, or pass `subscriptions`);
    `on_disconnect(client)` after a lost connection; `on_acked(mids)` with the packet ids of our
    QoS 1 publishes the broker acknowledged."""

    def __init__(self, *, config: BurstClientConfig,
                 on_messages: Callable[[list[tuple[str, bytes]]], None] | None = None,
                 on_connect: Callable[[BurstClient, bool], None] | None = None,
                 on_disconnect: Callable[[BurstClient], None] | None = None,
                 on_acked: Callable[[list[int]], None] | None = None,
                 subscriptions: tuple[tuple[str, int], ...] = (), defer_acks: bool = False):
        self.config = config
        self.defer_acks = defer_acks
        self.on_messages, self.on_connect, self.on_disconnect, self.on_acked = (on_messages, on_connect,
                                                                                on_disconnect, on_acked)
        self.subscriptions = subscriptions
        self.connected = threading.Event()
        self.connections = 0              # successful connects: 2+ means it reconnected
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()     # one writer at a time on the socket; also guards the mids
        self._inflight: dict[int, bytes] = {}  # mid -> PUBLISH packet, until its PUBACK
        self._next_mid = 0
        self._last_sent = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # made once: loading the CA and the client key on every reconnect would only cost time
        self._ssl_context = config.security.ssl_context() if config.security is not None else None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> BurstClient:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.config.client_id}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.connected.wait(timeout):
            raise ConnectionError(f"no MQTT connection to {self.config.host}:{self.config.port} within {timeout} s"
                                  + (f" ({self.last_error})" if self.last_error else ""))

    def stop(self) -> None:
        """Send DISCONNECT (the broker then drops the will) and end the network thread."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:
                with self._send_lock:
                    sock.sendall(DISCONNECT_PACKET)
            except OSError:
                pass
            try:
                # the plain socket's shutdown: SSLSocket.shutdown would first drop its TLS state under the
                # reading thread, which could then read ciphertext as MQTT; this way that thread reads EOF
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ sending
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Publish now, in one write; returns the packet id (0 for QoS 0). A QoS 1 message published
        while disconnected is kept and sent on the next connect."""
        return self.publish_many([(topic, payload)], qos=qos, retain=retain)[0]

    def publish_many(self, messages: list[tuple[str, bytes]], *, qos: int = 1, retain: bool = False) -> list[int]:
        """Publish several messages in one write; returns their packet ids (0s for QoS 0)."""
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos} is not supported (0 or 1)")
        with self._send_lock:
            mids, packets = [], []
            for topic, payload in messages:
                mid = self._allocate_mid() if qos else 0
                packet = publish_packet(topic, payload, qos, mid, retain=retain)
                if qos:
                    self._inflight[mid] = packet
                mids.append(mid)
                packets.append(packet)
            self._send_locked(b"".join(packets))
        return mids

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _allocate_mid(self) -> int:
        if len(self._inflight) >= 65_535:
            raise MQTTProtocolError("65,535 QoS 1 messages unacknowledged: no packet id left")
        while True:
            self._next_mid = self._next_mid % 65_535 + 1
            if self._next_mid not in self._inflight:
                return self._next_mid

    def _send_locked(self, data: bytes) -> None:
        sock = self._sock
        if sock is None or not data:
            return  # QoS 1 packets stay in _inflight and go out after the next connect
        try:
            sock.sendall(data)
            self._last_sent = time.monotonic()
        except OSError as exc:
            self.last_error = f"send: {exc}"
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the network thread sees EOF and reconnects
            except OSError:
                pass

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._send_locked(data)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """One more subscription, now and on every later connect."""
        if qos not in (0, 1):
            raise ValueError(f"QoS {qos} is not supported (0 or 1)")
        with self._send_lock:
            self.subscriptions = (*self.subscriptions, (topic, qos))
            self._send_locked(self._subscribe_packet(topic, qos))

    def _subscribe_packet(self, topic: str, qos: int) -> bytes:
        # its packet id is not kept in flight: every connect sends the subscriptions again
        body = self._allocate_mid().to_bytes(2, "big") + _string(topic) + bytes((qos,))
        return b"\x82" + encode_length(len(body)) + body

    # ------------------------------------------------------------------ network thread
    def _run(self) -> None:
        delay = self.config.backoff_min_s
        while not self._stop.is_set():
            try:
                self._connect()
                delay = self.config.backoff_min_s
                self._read_loop()
            except (OSError, MQTTProtocolError) as exc:
                if not self._stop.is_set():
                    self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                was_connected = self.connected.is_set()
                self.connected.clear()
                self._close()
                if was_connected and self.on_disconnect is not None:
                    self._call(self.on_disconnect, self)
            if self._stop.wait(delay):
                break
            delay = min(self.config.backoff_max_s, delay * 2)

    def _connect(self) -> None:
        cfg = self.config
        sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self._ssl_context is not None:  # the handshake checks the chain and that the name is cfg.host
                sock = self._ssl_context.wrap_socket(sock, server_hostname=cfg.host)
            sock.sendall(connect_packet(cfg))
            head = _recv_exact(sock, 4)
        except OSError:
            sock.close()
            raise
        if head[0] >> 4 != CONNACK or head[1] != 2:
            sock.close()
            raise MQTTProtocolError(f"expected CONNACK, got packet type {head[0] >> 4}")
        if head[3] != 0:
            sock.close()
            raise MQTTProtocolError(f"broker refused the connection: {CONNACK_ERRORS.get(head[3], head[3])}")
        # writes may block up to a keepalive on a broker that stopped reading: then it is dead to us
        sock.settimeout(max(1.0, float(cfg.keepalive_s)))
        with self._send_lock:
            self._sock = sock
            self._last_sent = time.monotonic()
            first = [self._subscribe_packet(topic, qos) for topic, qos in self.subscriptions]
            first += [publish_packet_dup(p) for p in self._inflight.values()]  # in the order first sent
            self._send_locked(b"".join(first))
        self.connections += 1
        self.connected.set()
        if self.on_connect is not None:
            self._call(self.on_connect, self, bool(head[2] & 1))

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        keepalive = self.config.keepalive_s
        buf = bytearray()
        last_read = last_ping = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            # a ping at half the keepalive when either direction went quiet: the broker's 1.5x never runs
            # out, and a publisher that only sends still hears from the broker
            if keepalive and max(now - self._last_sent, now - last_read) >= keepalive / 2 \
                    and now - last_ping >= keepalive / 2:
                self._send(PINGREQ_PACKET)
                last_ping = now
            if keepalive and now - last_read > 1.5 * keepalive:
                raise MQTTProtocolError(f"nothing from the broker for {now - last_read:.1f} s")
            data = self._receive(sock, 0.25 if not keepalive else min(0.25, keepalive / 4))
            if data is None:
                continue
            if not data:
                raise ConnectionError("the broker closed the connection")
            last_read = time.monotonic()
            if buf:
                buf += data
                consumed = self._handle(buf)
                del buf[:consumed]
            else:
                consumed = self._handle(data)
                if consumed < len(data):
                    buf = bytearray(data[consumed:])

    def _receive(self, sock: socket.socket, wait_s: float) -> bytes | None:
        """What the socket holds, up to `read_bytes`: None when nothing came within `wait_s`, b"" when
        the broker closed the connection."""
        tls = isinstance(sock, ssl.SSLSocket)
        if not (tls and sock.pending()):  # decrypted bytes waiting in OpenSSL do not wake select()
            ready, _, _ = select.select([sock], [], [], wait_s)
            if not ready:
                return None
        if not tls:
            return sock.recv(self.config.read_bytes)
        # One OpenSSL connection must not be read and written by two threads at once, and publishers
        # write from theirs: reads take the writers' lock, without blocking in it. OpenSSL hands over
        # one TLS record (16 KiB at most) per read, so a burst is several reads.
        chunks, size = [], 0
        with self._send_lock:
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                while size < self.config.read_bytes:
                    try:
                        chunk = sock.recv(self.config.read_bytes - size)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        break  # the rest of a record is still on its way
                    if not chunk:
                        if not chunks:
                            return b""
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            finally:
                sock.settimeout(timeout)
        return b"".join(chunks) if chunks else None

    def _handle(self, data: bytes | bytearray) -> int:
        """Parse every complete packet in `data`; returns the bytes consumed."""
        messages: list[tuple[str, bytes]] = []
        acks: list[int] = []
        acked: list[int] = []
        pos, n = 0, len(data)
        while n - pos >= 2:
            header = data[pos]
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < n:
                byte = data[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise MQTTProtocolError("remaining length over 4 bytes")
            if not complete:
                break
            end = i + length
            if end > n:
                break
            kind = header >> 4
            if kind == PUBLISH:
                qos = (header >> 1) & 3
                tlen = (data[i] << 8) | data[i + 1]
                j = i + 2 + tlen
                topic = bytes(data[i + 2:j]).decode("utf-8", "replace")
                if qos == 1:
                    acks.append((data[j] << 8) | data[j + 1])
                    j += 2
                elif qos:
                    raise MQTTProtocolError(f"QoS {qos} PUBLISH: this client subscribes at QoS 0 or 1 only")
                messages.append((topic, bytes(data[j:end])))
            elif kind == PUBACK:
                acked.append((data[i] << 8) | data[i + 1])
            elif kind == SUBACK:
                if 0x80 in data[i + 2:end]:
                    self.last_error = "the broker refused a subscription"
                    log.error("MQTT broker refused a subscription of %s", self.config.client_id)
            elif kind not in (PINGRESP, CONNACK):
                raise MQTTProtocolError(f"unexpected packet type {kind}")
            pos = end
        if messages and self.on_messages is not None:
            if self.defer_acks:
                self._call(self.on_messages, messages, self._acknowledger(acks))
                acks = []
            else:
                self._call(self.on_messages, messages)
        if acks:  # after the callback: acknowledged means applied
            self._send(b"".join([_PUBACK.pack(0x40, 2, mid) for mid in acks]))
        if acked:
            with self._send_lock:
                for mid in acked:
                    self._inflight.pop(mid, None)
            if self.on_acked is not None:
                self._call(self.on_acked, acked)
        return pos

    def _acknowledger(self, mids: list[int]) -> Callable[[], None]:
        """Sends these PUBACKs later, if the connection they belong to is still the current one: after a
        reconnect the broker redelivers the messages with their packet ids, and a stale PUBACK could
        acknowledge a message we have not stored."""
        if not mids:
            return _nothing
        packet = b"".join([_PUBACK.pack(0x40, 2, mid) for mid in mids])
        sock = self._sock

        def ack() -> None:
            with self._send_lock:
                if sock is not None and self._sock is sock:
                    self._send_locked(packet)
        return ack

    def _call(self, callback, *args) -> None:
        try:
            callback(*args)
        except Exception:  # a callback's bug must not take the connection down: logged, like paho does
            log.exception("MQTT callback %s failed", getattr(callback, "__name__", callback))

    def _close(self) -> None:
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _nothing() -> None:
    pass


def publish_packet_dup(packet: bytes) -> bytes:
    """The same PUBLISH with its DUP flag set (a resend after reconnect)."""
    return bytes((packet[0] | 0x08,)) + packet[1:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        out += chunk
    return out
