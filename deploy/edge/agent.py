"""The edge agent: one edge node publishing one machine (device) to the twin over MQTT.

Session (Sparkplug B rules): every connect takes a new bdSeq, registers NDEATH(bdSeq) as the MQTT
will, then publishes NBIRTH(bdSeq) and DBIRTH before any data. Data (DDATA, QoS 1) goes through
the on-disk spool: written with its serial, published in order with a window of unacknowledged
messages, deleted on PUBACK. Sparkplug's seq is one counter of the edge node over NBIRTH (0),
DBIRTH, NDATA and DDATA, wrapping after 255: `_publish` stamps it on each message as it leaves
(twin.sparkplug.codec.with_seq), so a resend from the spool takes the next seq of its session.
QoS: NDATA and DDATA 1 (the twin acknowledges telemetry after it is stored: QoS 0, Sparkplug's
choice, would lose it silently on a broker's full queue), births 0 as Sparkplug 3.0 has them (a
lost one shows to the host as a seq gap or data before birth, and it asks for a rebirth), the
NDEATH will 1. A lost connection drops the session; the agent reconnects with
exponential backoff and jitter, births again with bdSeq + 1 and resends the spool from its head.
With `security` (twin.mqtt.security) it connects over TLS, checking the broker's certificate against a
CA and its host name, and logs in with its node's username and password; a refused login or an
untrusted certificate is retried like a lost broker, and logged once per distinct reason.

Payloads are Sparkplug B protobuf by default (`payload="json"`: our JSON); births declare each
device metric's alias and DDATA sends aliases alone (twin.sparkplug.protobuf). With `primary_host` the agent
follows that host application's STATE (`spBv1.0/STATE/<host>`, Sparkplug 3.0): no births and no data
until the host says it is online, data held in the spool while it is offline, births again and the
spool from its head when it returns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import paho.mqtt.client as mqtt

from deploy.edge.model_slot import MODEL_METRIC, PREDICTION, ModelSlot
from deploy.edge.rollout import RolloutClient
from deploy.edge.spool import Spool
from twin.mqtt.security import MQTTSecurity
from twin.sparkplug.codec import DEFAULT_CODEC, check_codec, decode, encode, with_seq
from twin.sparkplug.payload import NAMESPACE, REBIRTH, SEQ_MODULUS, Metric, Payload, PayloadError, Topic
from twin.sparkplug.protobuf import assign_aliases

log = logging.getLogger(__name__)

BIRTH_QOS = 0    # Sparkplug 3.0: NBIRTH and DBIRTH at QoS 0 (this agent sends no DDEATH: its one device lives
                 # as long as its node)
DATA_QOS = 1     # NDATA, DDATA: ours (see the module's docstring)
# paho's own in-flight limit sits this far above the spool's window, so the QoS 1 NDATA beside a full
# window is sent at once rather than queued inside paho, where a QoS 0 birth published after it would
# overtake it and reach the host with its seq out of order
INFLIGHT_SLACK = 16


class Estimator(Protocol):
    def update(self, values: dict[str, Any]) -> float | None:
        """An estimate (e.g. RUL) after one more tick of `values`, or None while warming up."""


@dataclass(frozen=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    group: str = "plant1"
    node: str = "edge-1"
    device: str = "machine-1"
    rate_hz: float = 1.0                  # ticks per second of the replay or simulation
    spool: Path = Path("runs/edge/edge-1.spool")
    keepalive_s: int = 5                  # the broker sends our death certificate within 1.5x this after a crash
    window: int = 500                     # published but unacknowledged messages: enough to fill loopback RTTs
    backoff_min_s: float = 0.1            # first reconnect delay...
    backoff_max_s: float = 5.0            # ...doubling to this: a broker back from a restart is found within 5 s
    node_metrics_s: float = 5.0           # NDATA with spool depth and counters this often
    spool_max_rows: int = 1_000_000       # production pauses (never drops) when the outbox holds this many
    max_messages: int | None = None       # stop producing after this many ticks (None: the source's end)
    duration_s: float | None = None       # stop after this long (None: until the source ends and the spool drains)
    drain_timeout_s: float = 30.0         # at the end, wait at most this long for the spool to empty
    settle_s: float = 2.0                 # on stop, wait this long at most for PUBACKs of what is in flight
    security: MQTTSecurity | None = None  # username/password and TLS; None: anonymous, plaintext
    payload: str = DEFAULT_CODEC          # "protobuf" (Sparkplug B) or "json"
    primary_host: str | None = None       # Sparkplug host id whose STATE gates publishing (None: publish at once)

    def __post_init__(self):
        check_codec(self.payload, "EdgeConfig")
        if self.primary_host is not None and (not self.primary_host or any(c in self.primary_host for c in "/+#")):
            raise ValueError(f"EdgeConfig.primary_host must be a non-empty MQTT topic level, got {self.primary_host!r}")


class _Session:
    """One MQTT connection with its bdSeq; dropped as a whole when the connection is lost."""

    def __init__(self, cfg: EdgeConfig, bd_seq: int, on_command=None):
        self.cfg, self.bd_seq = cfg, bd_seq
        self.on_command = on_command      # called with every valid NCMD payload (model rollouts), on paho's thread
        self.connected = threading.Event()
        self.lost = False
        self.refused: str | None = None   # the broker's reason when it refused the connection
        self.rebirth = False
        # the primary host's STATE: online or not, and the timestamp of its latest message (older ones are stale)
        self.host_online = cfg.primary_host is None
        self.host_timestamp = -1
        self.acked: deque[int] = deque()  # mids; appended by paho's thread, drained by the agent's
        self.inflight: dict[int, int] = {}  # mid -> spool id (agent thread only)
        self.sent_upto = 0
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cfg.group}-{cfg.node}",
                             clean_session=True)
        death = Payload(int(time.time() * 1000), bd_seq=bd_seq)
        client.will_set(str(Topic(cfg.group, "NDEATH", cfg.node)), encode(death, cfg.payload), qos=1)
        client.max_inflight_messages_set(cfg.window + INFLIGHT_SLACK)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = lambda c, u, mid, rc, p: self.acked.append(mid)
        client.on_message = self._on_command
        if cfg.security is not None:
            cfg.security.apply_to_paho(client)
        self.client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)  # e.g. "Bad user name or password", "Not authorized"
            self.lost = True
            return
        client.subscribe(str(Topic(self.cfg.group, "NCMD", self.cfg.node)), qos=1)
        if self.cfg.primary_host is not None:
            client.subscribe(f"{NAMESPACE}/STATE/{self.cfg.primary_host}", qos=1)
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.lost = True

    def _on_command(self, client, userdata, message) -> None:
        if message.topic.startswith(f"{NAMESPACE}/STATE/"):
            self._on_host_state(message.payload)
            return
        try:
            payload = decode("NCMD", message.payload)
        except PayloadError:
            return
        if any(m.name == REBIRTH and m.value is True for m in payload.metrics):
            self.rebirth = True
        if self.on_command is not None:
            self.on_command(payload)

    def _on_host_state(self, raw: bytes) -> None:
        """Sparkplug 3.0 STATE: {"online": bool, "timestamp": ms}; a message older than the last one is stale
        (a will registered before the host's latest connect). Coming online, or online again from a newer
        start of the host (one whose offline we never read), asks for births again: the host needs them."""
        try:
            state = orjson.loads(raw)
            online, stamp = state["online"], state["timestamp"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return
        if type(online) is not bool or type(stamp) is not int or stamp < self.host_timestamp:
            return
        if online and (not self.host_online or stamp > self.host_timestamp):
            self.rebirth = True
        self.host_timestamp = stamp
        self.host_online = online

    def open(self, timeout: float) -> None:
        try:
            self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        except OSError:  # refused, unreachable, or a TLS handshake that failed (untrusted certificate)
            self.client.disconnect()  # closes the socket paho may hold
            self.lost = True
            raise
        self.client.loop_start()
        if not self.connected.wait(timeout) or self.lost:
            self.close()
            raise ConnectionError(f"the broker refused the connection: {self.refused}" if self.refused
                                  else "broker did not accept the connection")

    def close(self, *, clean: bool = False) -> None:
        if clean and not self.lost:  # a clean stop publishes its own death certificate (the will would not fire)
            info = self.client.publish(str(Topic(self.cfg.group, "NDEATH", self.cfg.node)),
                                       encode(Payload(int(time.time() * 1000), bd_seq=self.bd_seq), self.cfg.payload),
                                       qos=1)
            info.wait_for_publish(timeout=2.0)
            self.client.disconnect()
        self.client.loop_stop()
        if not clean:
            self.client.disconnect()
        self.lost = True


class EdgeAgent:
    def __init__(self, *, config: EdgeConfig, source, estimator: Estimator | None = None,
                 model: ModelSlot | None = None, rollout: RolloutClient | None = None):
        """`model`: a signed bundle scoring each row (deploy.edge.model_slot); `rollout`: takes new ones
        from the twin's NCMDs (deploy.edge.rollout)."""
        self.config = config
        self.source = source
        self.estimator = estimator
        self.model = model
        self.rollout = rollout
        self.stats = {"produced": 0, "acknowledged": 0, "sessions": 0, "reconnect_failures": 0, "rebirths": 0}
        names = [m.name for m in source.metrics] + (["rul_edge"] if estimator is not None else [])
        # protobuf DDATA names its metrics by these aliases, which every DBIRTH declares
        self._aliases = assign_aliases(config.device, names) if config.payload == "protobuf" else None
        self._seq = 0  # the edge node's Sparkplug seq: the next message's (NBIRTH sets it back to 0)

    def _publish(self, session: _Session, topic: Topic | str, raw: bytes, qos: int) -> mqtt.MQTTMessageInfo:
        """Publish one message of this edge node, stamped with the node's next seq. Every message but the
        NDEATH (which has none) leaves through here, from the agent's thread alone, so the broker receives
        them in seq order."""
        if isinstance(topic, Topic) and topic.kind == "NBIRTH":  # spooled DDATA come with their topic as text
            self._seq = 0
        raw = with_seq(raw, self._seq)
        self._seq = (self._seq + 1) % SEQ_MODULUS
        return session.client.publish(str(topic), raw, qos=qos)

    def _births(self, session: _Session, spool: Spool) -> None:
        cfg = self.config
        now = int(time.time() * 1000)
        nbirth = Payload(now, None, session.bd_seq, [
            Metric("bdSeq", session.bd_seq, "Int64"), Metric(REBIRTH, False, "Boolean"),
            Metric("spool_depth", spool.depth(), "Int64"), Metric("source", self.source.description, "String"),
            *(self.model.metrics() if self.model is not None else [])])
        self._publish(session, Topic(cfg.group, "NBIRTH", cfg.node), encode(nbirth, cfg.payload), BIRTH_QOS)
        metrics = [Metric(m.name, None, m.type, m.unit) for m in self.source.metrics]
        if self.estimator is not None:
            metrics.append(Metric("rul_edge", None, "Double", "cycle"))
        if self.model is not None:
            metrics += [Metric(PREDICTION, None, "Double", ""), Metric(MODEL_METRIC, self.model.version, "String", "")]
        first = spool.first_pending_seq(cfg.device)
        next_serial = first if first is not None else spool.counter(f"seq:{cfg.device}") + 1
        dbirth = Payload(now, None, None, metrics, serial=next_serial)  # the serial of the device's next data
        self._publish(session, Topic(cfg.group, "DBIRTH", cfg.node, cfg.device),
                      encode(dbirth, cfg.payload, aliases=self._aliases), BIRTH_QOS)

    def _pump(self, session: _Session, spool: Spool) -> None:
        host_online = session.host_online
        if session.rebirth and host_online:
            session.rebirth = False
            self.stats["rebirths"] += 1
            self._births(session, spool)
        self._take_acks(session, spool)
        room = self.config.window - len(session.inflight)
        if room <= 0 or not host_online:  # the primary host is away: data waits in the spool
            return
        for spool_id, topic, payload in spool.pending(after_id=session.sent_upto, limit=room):
            info = self._publish(session, topic, payload, DATA_QOS)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                session.lost = True
                return
            session.inflight[info.mid] = spool_id
            session.sent_upto = spool_id

    def _take_acks(self, session: _Session, spool: Spool) -> None:
        """What the broker acknowledged leaves the spool: the host's persistent session holds it from then on."""
        done = []
        while session.acked:
            spool_id = session.inflight.pop(session.acked.popleft(), None)
            if spool_id is not None:
                done.append(spool_id)
        spool.acknowledge(done)
        self.stats["acknowledged"] += len(done)

    def _settle(self, session: _Session, spool: Spool) -> None:
        """On stop: nothing more is sent, and what is in flight gets `settle_s` for its PUBACKs, so that the
        counts reconcile (acknowledged = what the host will store) instead of leaving rows the host stores
        but the agent sends again at its next start (the host keeps one of each: nothing is lost either way)."""
        deadline = time.monotonic() + self.config.settle_s
        while True:
            self._take_acks(session, spool)
            if not session.inflight or session.lost or time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Publish until the source ends (and the spool is drained), `max_messages`, `duration_s` or `stop`."""
        cfg = self.config
        stop = stop or threading.Event()
        spool = Spool(cfg.spool)
        topic = str(Topic(cfg.group, "DDATA", cfg.node, cfg.device))
        ticks = iter(self.source)
        exhausted = False
        start = time.monotonic()
        next_tick = next_connect = next_node_metrics = start
        backoff = cfg.backoff_min_s
        session: _Session | None = None
        if self.rollout is not None:
            self.rollout.start()
        drain_deadline = None
        last_failure = None
        try:
            while not stop.is_set():
                now = time.monotonic()
                if cfg.duration_s is not None and now - start >= cfg.duration_s:
                    break
                if (session is None or session.lost) and now >= next_connect:
                    if session is not None:
                        session.close()
                        session = None
                    candidate = _Session(cfg, spool.next_counter("bdSeq") % SEQ_MODULUS,  # Sparkplug: 0-255
                                         self.rollout.on_command if self.rollout is not None else None)
                    try:
                        candidate.open(timeout=5.0)
                        if candidate.host_online:  # else the host's STATE online asks for them (_pump)
                            self._births(candidate, spool)
                        session, backoff = candidate, cfg.backoff_min_s
                        self.stats["sessions"] += 1
                    except (OSError, ConnectionError) as exc:  # ssl.SSLError is an OSError
                        self.stats["reconnect_failures"] += 1
                        if str(exc) != last_failure:  # a wrong password would otherwise fail in silence
                            last_failure = str(exc)
                            log.warning("edge %s: cannot connect to %s:%s: %s", cfg.node, cfg.host, cfg.port, exc)
                        next_connect = now + backoff * random.uniform(1.0, 1.5)  # jitter: agents don't stampede
                        backoff = min(cfg.backoff_max_s, backoff * 2)
                limit = cfg.max_messages
                produced_all = exhausted or (limit is not None and self.stats["produced"] >= limit)
                while not produced_all and now >= next_tick and spool.depth() < cfg.spool_max_rows:
                    try:
                        values = next(ticks)
                    except StopIteration:
                        exhausted = produced_all = True
                        break
                    self._produce(spool, topic, values)
                    next_tick += 1.0 / cfg.rate_hz
                    next_tick = max(next_tick, now - 1.0)  # after a stall, catch up at most one second's worth
                    produced_all = limit is not None and self.stats["produced"] >= limit
                if session is not None and not session.lost:
                    self._pump(session, spool)
                    report_due = self.model is not None and self.model.report_due.is_set()
                    if (now >= next_node_metrics or report_due) and session.host_online:
                        if report_due:
                            self.model.report_due.clear()
                        next_node_metrics = now + cfg.node_metrics_s
                        self._node_metrics(session, spool)
                if produced_all:
                    drain_deadline = drain_deadline or now + cfg.drain_timeout_s
                    if spool.depth() == 0 or now >= drain_deadline:
                        break
                time.sleep(max(0.0, min(next_tick - time.monotonic(), 0.005)) if not produced_all else 0.005)
        finally:
            if self.rollout is not None:
                self.rollout.stop()
            if session is not None:
                if not session.lost:
                    self._settle(session, spool)
                session.close(clean=True)
            self.stats["spool_depth"] = spool.depth()
            spool.close()
        return self.stats

    def _produce(self, spool: Spool, topic: str, values: dict[str, Any]) -> None:
        if self.estimator is not None:
            estimate = self.estimator.update(values)
            if estimate is not None:
                values = dict(values, rul_edge=float(estimate))
        if self.model is not None:
            values = dict(values, **self.model.score(values))
        now = int(time.time() * 1000)
        metrics = [Metric(name, value) for name, value in values.items()]
        # the spool's counter is the serial (never wraps: the twin's history key); the seq is stamped when
        # the message is published (_publish)
        codec, aliases = self.config.payload, self._aliases
        spool.append(self.config.device, topic,
                     lambda serial: encode(Payload(now, None, None, metrics, serial=serial), codec,
                                           aliases=aliases, names=False))
        self.stats["produced"] += 1

    def _node_metrics(self, session: _Session, spool: Spool) -> None:
        """NDATA with counters and the model's state (a rollout step's report: the twin waits for it)."""
        payload = Payload(int(time.time() * 1000), None, None, [
            Metric("spool_depth", spool.depth(), "Int64"), Metric("produced", self.stats["produced"], "Int64"),
            Metric("sessions", self.stats["sessions"], "Int64"),
            *(self.model.metrics() if self.model is not None else [])])
        self._publish(session, Topic(self.config.group, "NDATA", self.config.node),
                      encode(payload, self.config.payload), DATA_QOS)


def default_spool(node: str, root: Path = Path("runs/edge")) -> Path:
    return root / f"{node}.spool"
