"""Each asset's live state, driven by Sparkplug messages: no I/O here, so every rule is testable.

Rules (twin/SCHEMA.md has the full table); seq and bdSeq are Sparkplug's 0-255, compared modulo
256 (`seq_delta`), so no single message can push a counter where the real ones never reach it:
- A node is online from an NBIRTH until the NDEATH with the same bdSeq (or one up to 127 ahead: a
  death that overtook its birth). A birth whose bdSeq was already declared dead is late: ignored,
  counted. Any other birth starts a new session, as in Sparkplug.
- A device is online from its DBIRTH (inside a live node session) until DDEATH or its node's death.
- seq is one counter per edge node (Sparkplug B 3.0) over NBIRTH (0), DBIRTH, NDATA, DDATA and
  DDEATH. With `check_seq` (a single twin, which sees all of a node's messages in the order the
  broker passed them on) a message more than one ahead of the last is a gap: counted `seq_gap`, the
  node marked stale until its next NBIRTH, and a rebirth requested. A message behind the last (a
  redelivery, a late one) is no gap and moves nothing back, so it is never counted twice.
- DDATA whose serial (the device's never-wrapping message number) is already stored: a duplicate,
  dropped. Otherwise its serial, compared with the last in-order one, decides: above is in order
  (a jump is a `gap`: serials the edge will never send); below is out of order, kept in history
  without overwriting the latest values, and a rebirth is requested (its DBIRTH re-anchors the
  order). A plain Sparkplug publisher (no serial) gets its node's seq extended never-wrapping as
  the serial. Data from a device without a birth in this session is kept and a rebirth is requested
  (the twin may have restarted).
- Unknown metrics and values of the wrong type are dropped from the message and dead-lettered;
  the rest of the message is kept.
- Metric aliases (protobuf): a birth's name + alias pairs name the aliases of the data that follows;
  alias-only data before any birth is read with the aliases the edge agent derives from the plant's
  names (twin.sparkplug.protobuf.metric_alias), so data queued while the twin restarted is not lost.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twin.domain.health import Health, HealthModel
from twin.domain.plant import Machine, Plant
from twin.sparkplug.codec import decode
from twin.sparkplug.payload import (
    DEFAULT_LIMITS,
    SEQ_MODULUS,
    Limits,
    Metric,
    Payload,
    PayloadError,
    Topic,
    parse_topic,
    seq_delta,
    value_fits,
)
from twin.sparkplug.protobuf import assign_aliases

RECENT_SEQS = 2048  # per device: duplicates are caught in memory this far back, older ones by the store


@dataclass
class DeviceState:
    machine: Machine
    online: bool = False
    born: bool = False               # has a DBIRTH in the node's live session
    ever_online: bool = False
    stale: bool = False
    last_seq: int = -1               # serial of the latest in-order data (-1: none yet)
    anchor: int | None = None        # data with a serial above this is in order (the latest, or a DBIRTH's - 1)
    max_serial: int = -1             # every serial up to this one may be stored: ask `seen` (above it: new)
    recent: set[int] = field(default_factory=set)
    recent_order: deque[int] = field(default_factory=deque)
    values: dict[str, Any] = field(default_factory=dict)
    data_ts: int | None = None        # edge timestamp (ms) of the latest in-order data
    received_ms: int | None = None    # twin clock (ms) at the latest data: staleness runs on this
    health: Health | None = None
    messages: int = 0

    def remember(self, seq: int) -> None:
        self.recent.add(seq)
        self.recent_order.append(seq)
        if len(self.recent_order) > RECENT_SEQS:
            self.recent.discard(self.recent_order.popleft())

    def to_dict(self) -> dict[str, Any]:
        m = self.machine
        return {"id": m.id, "node": m.node, "line": m.line, "kind": m.kind, "online": self.online,
                "stale": self.stale, "last_seq": self.last_seq, "data_ts": self.data_ts, "messages": self.messages,
                "values": self.values, "health": self.health.to_dict() if self.health else None,
                "attributes": m.attributes}


@dataclass
class NodeState:
    id: str
    online: bool = False
    bd_seq: int | None = None                  # the live (or last) session
    dead: deque[int] = field(default_factory=lambda: deque(maxlen=32))  # recent bdSeqs declared dead
    last_seq: int | None = None                # the node's latest Sparkplug seq (0-255; None: not followed yet)
    position: int | None = None                # that seq extended never-wrapping (a plain publisher's serials)
    stale: bool = False                        # a seq gap since its last NBIRTH: its values may miss updates
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ingested:
    """A data message accepted into history."""
    device: str
    seq: int
    timestamp: int
    received_ms: int
    values: dict[str, Any]
    in_order: bool
    health: Health | None


@dataclass
class Outcome:
    ingested: Ingested | None = None
    dead_letters: list[str] = field(default_factory=list)   # reasons; the raw message goes with each
    changed: list[str] = field(default_factory=list)        # device ids whose state changed (alarms re-checked)
    rebirth: str | None = None                              # node to ask for a rebirth
    health_job: tuple[str, dict[str, Any]] | None = None    # (device, latest values): score off this thread


class TwinState:
    """The plant's live state. `apply` takes one MQTT message; `tick` ages data into staleness.

    `seen(device, serial)` answers for serials older than the in-memory window (the history store).
    `check_seq`: count seq gaps per edge node and ask for a rebirth on each; only for a host that
    receives all of a node's messages in order (not the scale-out workers: twin/scaleout/worker.py).
    `defer_health`: health models without `inline = True` (the learned ones, milliseconds a call) are
    not run here; the outcome carries a `health_job` for a worker, and `set_health` takes the result.
    """

    def __init__(self, *, plant: Plant, health_models: dict[str, HealthModel],
                 seen: Callable[[str, int], bool] | None = None,
                 last_seqs: dict[str, int] | None = None, rebirth_every_ms: int = 5_000,
                 limits: Limits = DEFAULT_LIMITS, defer_health: bool = False, check_seq: bool = True):
        self.plant = plant
        self.health_models = health_models
        self.limits = limits
        self.defer_health = defer_health
        self.check_seq = check_seq
        self.seen = seen or (lambda device, seq: False)
        self.rebirth_every_ms = rebirth_every_ms
        self.counters: Counter[str] = Counter()
        self.devices = {mid: DeviceState(m) for mid, m in plant.machines.items()}
        self.nodes = {nid: NodeState(nid) for nid in plant.nodes}
        self._rebirth_asked: dict[str, int] = {}
        # device id (or "/" + node id: no device id has a "/") -> alias -> name, from its last birth
        self._aliases: dict[str, dict[int, str]] = {}
        # topics already checked against the plant: at most 8 message types x (nodes + devices) entries,
        # since only topics that pass every check are kept. Saves the split and the checks per message.
        self._topics: dict[str, Topic] = {}
        self._handlers = {"NBIRTH": self._nbirth, "NDEATH": self._ndeath, "DBIRTH": self._dbirth,
                          "DDEATH": self._ddeath, "NDATA": self._ndata, "DDATA": self._ddata}
        for device, seq in (last_seqs or {}).items():
            if device in self.devices:
                self.devices[device].last_seq = self.devices[device].max_serial = seq

    # ------------------------------------------------------------------ messages
    def apply(self, topic: str, raw: bytes, now_ms: int) -> Outcome:
        self.counters["received"] += 1
        out = Outcome()
        try:
            parsed = self._topics.get(topic)
            if parsed is None:
                parsed = self._check_topic(topic)
                if parsed is None:
                    return out
            kind = parsed.kind
            payload = decode(kind, raw, now_ms=now_ms, limits=self.limits,
                             aliases=self._alias_map(parsed.device or "/" + parsed.node), as_values=kind == "DDATA")
        except PayloadError as exc:
            self.counters["dead_letter"] += 1
            self.counters[exc.key] += 1
            out.dead_letters.append(exc.reason)
            return out
        self._handlers[parsed.kind](parsed, payload, now_ms, out)
        return out

    def _check_topic(self, topic: str) -> Topic | None:
        """The parsed topic if it is the plant's, None for commands; raises PayloadError otherwise."""
        parsed = parse_topic(topic)
        if parsed.kind in ("NCMD", "DCMD"):
            self.counters["commands_seen"] += 1  # our own rebirth requests echo back
            return None
        if parsed.group != self.plant.group:
            raise PayloadError(f"unknown group {parsed.group[:100]!r}", "unknown_group")
        if parsed.node not in self.nodes:
            raise PayloadError(f"unknown edge node {parsed.node[:100]!r}", "unknown_node")
        if parsed.device is not None:
            machine = self.plant.machines.get(parsed.device)
            if machine is None:
                raise PayloadError(f"unknown device {parsed.device[:100]!r}", "unknown_device")
            if machine.node != parsed.node:
                raise PayloadError(f"device {parsed.device!r} belongs to node {machine.node!r}", "unknown_device")
        self._topics[topic] = parsed
        return parsed

    def _nbirth(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        node = self.nodes[topic.node]
        bd = payload.bd_seq
        if bd in node.dead:
            self.counters["late_birth"] += 1  # it would resurrect a node that died after it
            return
        node.online, node.bd_seq, node.stale = True, bd, False
        self._sequence(topic, payload.seq, now_ms, out)
        self._learn_aliases("/" + topic.node, payload)
        node.metrics.update({m.name: m.value for m in payload.metrics if m.value is not None})
        self.counters["nbirth"] += 1
        for device_id in self.plant.nodes[topic.node]:
            self.devices[device_id].born = False  # a new session: each device must be born again

    def _ndeath(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        node = self.nodes[topic.node]
        bd = payload.bd_seq
        if node.bd_seq is not None and seq_delta(bd, node.bd_seq) < 0:
            self.counters["stale_death"] += 1  # the death of a session already replaced
            return
        node.dead.append(bd)
        self.counters["ndeath"] += 1
        if bd != node.bd_seq and node.bd_seq is not None:
            self.counters["death_before_birth"] += 1  # its birth is still in flight; it will be refused
        node.online = False
        for device_id in self.plant.nodes[topic.node]:
            device = self.devices[device_id]
            if device.online or device.born:
                device.online = device.born = False
                out.changed.append(device_id)

    def _dbirth(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        node, device = self.nodes[topic.node], self.devices[topic.device]
        if not node.online:
            self.counters["late_birth"] += 1
            return
        self._sequence(topic, payload.seq, now_ms, out)
        machine = device.machine
        self._learn_aliases(topic.device, payload)
        for metric in payload.metrics:
            sensor = machine.sensors.get(metric.name)
            if sensor is None:
                self._metric_fault(out, "unknown_metric", f"birth declares unknown metric {metric.name!r}")
            elif metric.type is not None and metric.type != sensor.type:
                self._metric_fault(out, "wrong_type",
                                   f"birth declares {metric.name!r} as {metric.type}, the plant says {sensor.type}")
            elif metric.value is not None and value_fits(sensor.type, metric.value):
                device.values[metric.name] = metric.value
        if payload.serial is not None:  # the serial of the device's next data: the new anchor
            if device.last_seq >= 0 and payload.serial > device.last_seq + 1:
                self.counters["gap"] += 1  # the edge will never send the serials in between
            device.anchor = payload.serial - 1
        else:  # a plain publisher: whatever data comes next is in order (its serial is the node's count)
            device.anchor = None
        device.online = device.born = device.ever_online = True
        device.stale = False
        device.received_ms = now_ms
        self.counters["dbirth"] += 1
        out.changed.append(device.machine.id)

    def _ddeath(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        device = self.devices[topic.device]
        if self.nodes[topic.node].online:
            self._sequence(topic, payload.seq, now_ms, out)
        device.online = device.born = False
        self.counters["ddeath"] += 1
        out.changed.append(device.machine.id)

    def _ndata(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        node = self.nodes[topic.node]
        if node.last_seq is not None and seq_delta(payload.seq, node.last_seq) <= 0:
            self.counters["node_duplicate"] += 1  # a redelivery: its values are older than what we hold
            return
        self._sequence(topic, payload.seq, now_ms, out)
        self._resolve_aliases("/" + topic.node, payload, out)
        node.metrics.update({m.name: m.value for m in payload.metrics})
        self.counters["ndata"] += 1

    def _ddata(self, topic: Topic, payload: Payload, now_ms: int, out: Outcome) -> None:
        device = self.devices[topic.device]
        position = self._sequence(topic, payload.seq, now_ms, out)
        serial = payload.serial
        if serial is None:  # a plain Sparkplug publisher: the serial is the node's seq extended
            serial = position
        if serial in device.recent or (serial <= device.max_serial and self.seen(topic.device, serial)):
            self.counters["duplicate"] += 1
            return
        in_order = device.anchor is None or serial > device.anchor
        if not in_order:
            self.counters["out_of_order"] += 1
        elif payload.serial is not None and device.last_seq >= 0 and serial > device.last_seq + 1:
            self.counters["gap"] += 1  # (a plain publisher's serials step over its other devices' messages)
        if not device.born or not in_order:  # Sparkplug: a host that lost the thread asks for the births again
            if not device.born:
                self.counters["data_before_birth"] += 1
            self._ask_rebirth(topic.node, now_ms, out)
        sensors = device.machine.sensors
        values = payload.values
        if values is not None:  # named once each (protobuf, twin.sparkplug.protobuf.decode's as_values)
            for name, value in values.items():
                sensor = sensors.get(name)
                if sensor is None or not value_fits(sensor.type, value):  # the dict is kept when all fit
                    values = self._fitting(out, sensors, [Metric(n, v) for n, v in values.items()])
                    break
        else:
            self._resolve_aliases(topic.device, payload, out)
            values = self._fitting(out, sensors, payload.metrics)
        device.remember(serial)
        if serial > device.max_serial:
            device.max_serial = serial
        device.messages += 1
        self.counters["ingested"] += 1
        if in_order:
            device.last_seq = device.anchor = serial
            device.values.update(values)
            device.data_ts = payload.timestamp
            device.received_ms = now_ms
            model = self.health_models.get(device.machine.kind)
            if model is not None:
                if self.defer_health and not getattr(model, "inline", False):
                    out.health_job = (device.machine.id, dict(device.values))
                else:
                    health = model.update(device.machine, device.values)
                    if health is not None:
                        device.health = health
            if device.stale:
                device.stale = False
            out.changed.append(device.machine.id)
        out.ingested = Ingested(device.machine.id, serial, payload.timestamp, now_ms, values, in_order,
                                device.health if in_order else None)

    def _fitting(self, out: Outcome, sensors, metrics: list[Metric]) -> dict[str, Any]:
        """name -> value of the metrics the plant's sensors take; the others dead-lettered."""
        values: dict[str, Any] = {}
        for metric in metrics:
            sensor = sensors.get(metric.name)
            if sensor is None:
                self._metric_fault(out, "unknown_metric", f"unknown metric {metric.name!r}")
            elif not value_fits(sensor.type, metric.value):
                text = repr(metric.value)
                self._metric_fault(out, "wrong_type", f"metric {metric.name!r} must be {sensor.type} in range, got "
                                                      f"{type(metric.value).__name__} "
                                                      f"{text if len(text) <= 60 else text[:57] + '...'}")
            else:
                values[metric.name] = metric.value
        return values

    def _sequence(self, topic: Topic, seq: int | None, now_ms: int, out: Outcome) -> int | None:
        """Follow the node's seq with one more message; returns the message's position on the node's count
        extended never-wrapping (the serial of a publisher that sends none), None without a seq (a DDEATH
        may lack one). The position after an NBIRTH starts above every serial the node's devices have
        stored, so a new session of a plain publisher never reuses the keys of an old one."""
        if seq is None:
            return None
        node = self.nodes[topic.node]
        if topic.kind == "NBIRTH" or node.position is None:
            floor = max([-1 if node.position is None else node.position]
                        + [self.devices[d].last_seq for d in self.plant.nodes[topic.node]])
            if topic.kind == "NBIRTH":  # Sparkplug: seq starts again (at 0) on every birth
                node.position = (floor // SEQ_MODULUS + 1) * SEQ_MODULUS + seq
            else:  # data of a node whose birth this twin never saw: continue around what history holds
                node.position = seq if floor < 0 else max(0, floor + seq_delta(seq, floor))
            node.last_seq = seq
            return node.position
        delta = seq_delta(seq, node.last_seq)
        if delta <= 0:  # a redelivery or a message that overtook nothing: no loss, and no step back
            return max(0, node.position + delta)
        if delta > 1 and self.check_seq:  # the messages in between never came: the host lost the thread
            self.counters["seq_gap"] += 1
            node.stale = True
            self._ask_rebirth(topic.node, now_ms, out)
        node.last_seq = seq
        node.position += delta
        return node.position

    def _ask_rebirth(self, node: str, now_ms: int, out: Outcome) -> None:
        """A rebirth request for `node`, at most one every `rebirth_every_ms`: the births it brings answer
        every gap and every unborn device up to then."""
        if now_ms - self._rebirth_asked.get(node, -10**15) >= self.rebirth_every_ms:
            self._rebirth_asked[node] = now_ms
            out.rebirth = node

    def _learn_aliases(self, owner: str, payload: Payload) -> None:
        self._aliases[owner] = {m.alias: m.name for m in payload.metrics if m.alias is not None and m.name}

    def _alias_map(self, owner: str) -> dict[int, str]:
        """alias -> name for a node's or device's alias-only data: from its last birth, or before any birth the
        aliases an edge agent derives from the plant's names (twin.sparkplug.protobuf.metric_alias)."""
        known = self._aliases.get(owner)
        if known is None:
            machine = self.plant.machines.get(owner)
            names = machine.sensors if machine is not None else ()
            known = self._aliases[owner] = {alias: name for name, alias in assign_aliases(owner, names).items()}
        return known

    def _resolve_aliases(self, owner: str, payload: Payload, out: Outcome) -> None:
        """Drop the metrics whose alias (protobuf data) no birth named; decode named the others."""
        for metric in payload.metrics:
            if metric.name is None:
                break
        else:
            return
        kept = []
        for metric in payload.metrics:
            if metric.name is None:
                self._metric_fault(out, "unknown_metric", f"alias {metric.alias} named by no birth")
                continue
            kept.append(metric)
        payload.metrics = kept

    def _metric_fault(self, out: Outcome, counter: str, reason: str) -> None:
        self.counters[counter] += 1
        self.counters["dead_letter"] += 1
        out.dead_letters.append(reason)

    # ------------------------------------------------------------------ time
    def tick(self, now_ms: int) -> list[str]:
        """Mark devices stale whose data stopped; returns the ids that changed."""
        changed = []
        for device in self.devices.values():
            if device.online and not device.stale and device.received_ms is not None \
                    and now_ms - device.received_ms > device.machine.stale_after_s * 1000:
                device.stale = True
                self.counters["stale"] += 1
                changed.append(device.machine.id)
        return changed

