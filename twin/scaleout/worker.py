"""The twin as N workers on one broker and one PostgreSQL: `moeworks twin serve --workers N`.

Why this shape (twin/SCHEMA.md, "Scale-out", has the rules):
- The broker spreads the load: the workers share the plant's subscription through MQTT shared
  subscriptions (`$share/<worker group>/spBv1.0/<group>/#`, MQTT 3.1.1 as Mosquitto 2 implements
  it) over N persistent sessions, one per slot (twin.scaleout.ownership). A worker receives a message, writes
  it to `twin_inbox` and acknowledges it to the broker once that row is committed: nothing received
  is lost, whichever worker dies.
- One worker owns each edge node (a lease, twin.scaleout.ownership): only it applies the node's messages to
  the state (values, health, alarms), so an alarm is raised once. It reads its nodes' messages
  from the inbox after `hold_ms` (so a message another worker received a little later than a newer
  one is in the same batch), puts each device's data back in serial order (twin.scaleout.reorder), applies
  them exactly as the single twin does (history rows keyed by (device, serial), so a message applied
  twice is stored once), and deletes the inbox rows in the transaction after (or with) their history.
- Model rollouts (twin.rollout) live in PostgreSQL too: every worker's API starts, aborts and shows them
  and serves the bundle's files; the holder of the ROLLOUT lease (rendezvous over the live workers, like
  a node's) alone moves them on and sends the NCMDs, its writes fenced by that lease. The nodes'
  reports reach it through the snapshots their owners write.
- What the API shows comes from PostgreSQL (snapshots the owners write, the alarms and history
  tables), so every worker answers the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twin.domain.alarms import Alarm, AlarmManager
from twin.domain.health import Health
from twin.domain.state import DeviceState, NodeState
from twin.domain.whatif import EnginePlan, MillPlan, SimulationError, simulate_engine, simulate_mill
from twin.mqtt.burst_client import BurstClient, BurstClientConfig
from twin.scaleout.ownership import DOOR, SCHEMA_LOCK, Leases, ensure_schema, owner_of
from twin.scaleout.reorder import apply_order
from twin.service import TwinConfig, TwinService
from twin.sparkplug.payload import NAMESPACE
from twin.store.history import ALARM_COLUMNS, UPSERT, Bulk, HistoryStore

log = logging.getLogger(__name__)
HOST = "/state"  # the lease of the primary host's STATE (no node of a topic has a "/" in its id)
ROLLOUT = "/rollout"  # the lease of driving the model rollouts (twin.rollout.manager)
SHARE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # an MQTT topic level: no '/', '+', '#' or '$'
INBOX_BATCH = 5_000  # rows one poll of the inbox applies at most: bounds how long it holds the state's lock


class ScaleOutError(RuntimeError):
    pass


@dataclass(frozen=True)
class ScaleOutConfig:
    worker: str                       # unique within the group (also its name in twin_workers)
    slots: int = 2                    # MQTT sessions the group shares the subscription over: --workers
    worker_group: str = "moeworks-twin"  # the share name: `$share/<worker_group>/...`
    home_slot: int | None = None      # the slot this worker takes first (its index under `serve --workers`)
    lease_s: float = 3.0              # a dead worker's slots and nodes move after this (plus one renewal)
    hold_ms: int = 250                # inbox rows wait this long, so those other workers received just before
                                      # are committed and ordered with them: > flush interval + a commit
    poll_s: float = 0.05              # how often an owner reads its nodes' inbox

    def __post_init__(self):
        for name in ("worker", "worker_group"):
            if not isinstance(getattr(self, name), str) or not SHARE_NAME.fullmatch(getattr(self, name)):
                raise ValueError(f"ScaleOutConfig.{name} must be 1-64 letters, digits, '-' or '_', "
                                 f"got {getattr(self, name)!r}")
        if type(self.slots) is not int or not 1 <= self.slots <= 256:
            raise ValueError(f"ScaleOutConfig.slots must be 1..256, got {self.slots!r}")
        if self.home_slot is not None and (type(self.home_slot) is not int or not 0 <= self.home_slot < self.slots):
            raise ValueError(f"ScaleOutConfig.home_slot must be 0..{self.slots - 1}, got {self.home_slot!r}")
        if not isinstance(self.lease_s, int | float) or not 0.5 <= self.lease_s <= 300:
            raise ValueError(f"ScaleOutConfig.lease_s must be 0.5-300 s, got {self.lease_s!r}")
        if type(self.hold_ms) is not int or not 0 <= self.hold_ms <= 10_000:
            raise ValueError(f"ScaleOutConfig.hold_ms must be 0-10000, got {self.hold_ms!r}")
        if not isinstance(self.poll_s, int | float) or not 0.001 <= self.poll_s <= 5:
            raise ValueError(f"ScaleOutConfig.poll_s must be 0.001-5 s, got {self.poll_s!r}")


_HEALTH_FIELDS = tuple(f.name for f in dataclasses.fields(Health))


def _fields(health: Health) -> dict[str, Any]:
    """What dataclasses.asdict gives for a Health (its fields are numbers, strings and a dict of numbers), at a
    tenth of the cost: the snapshots hold every owned device's, every lease round."""
    doc = {name: getattr(health, name) for name in _HEALTH_FIELDS}
    doc["mode_probs"] = dict(doc["mode_probs"])
    return doc


def _connect(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


class ScaledTwinService(TwinService):
    """One worker of a scaled-out twin. Same queries as TwinService, answered from PostgreSQL."""

    _local_version = 0  # changes to this worker's state (TwinService's __init__ sets `version` before ours runs)
    store_statements = {
        "inbox": "INSERT INTO twin_inbox (node, topic, payload, received_us) VALUES (?,?,?,?)",
        "inbox_done": "DELETE FROM twin_inbox WHERE id = ANY(?)",  # one row per poll: its ids as an array
        # an alarm row is written only under the lease it was raised under (node, holder, epoch): a worker that
        # stalled past its lease cannot write over the new owner's alarms. FOR SHARE holds a claim of the node
        # until this commit, so the new owner's load of the open alarms (after its claim) sees the row.
        "alarms_fenced": "INSERT INTO alarms SELECT ?::text, ?::text, ?::text, ?::text, ?::text, ?::text, "
                         "?::double precision, ?::bigint, ?::bigint, ?::bigint, ?::text, ?::text WHERE EXISTS "
                         "(SELECT 1 FROM twin_node_leases WHERE node = ?::text AND holder = ?::text AND "
                         "epoch = ?::bigint FOR SHARE) ON CONFLICT " + UPSERT["alarms"].split(" ON CONFLICT ", 1)[1]}

    # one binary COPY per batch (twin.store.history.PG_BULK): rows take ids in the batch's order, which the owner
    # reads them in
    store_bulk = {"inbox": Bulk("twin_inbox (node, topic, payload, received_us)", ("text", "text", "bytea", "int8"))}

    def __init__(self, *, config: TwinConfig, scale: ScaleOutConfig, **kwargs):
        if not config.db.startswith(("postgresql://", "postgres://")):
            raise ValueError("twin workers share their state in PostgreSQL: --db must be a postgresql:// URL")
        super().__init__(config=config, **kwargs)
        self.scale = scale
        self._owned: dict[str, int] = {}              # node (or DOOR) -> lease epoch
        self._host: BurstClient | None = None         # the STATE session, while this worker holds HOST
        self._singletons: dict[str, int] = {}         # HOST, ROLLOUT -> lease epoch, while this worker holds it
        self.drives_rollouts = False                  # set by enable_rollouts: a worker without a rollout
                                                      # manager never takes the lease
        self._slot_clients: dict[int, BurstClient] = {}
        self._taken: set[int] = set()                 # inbox ids applied, their delete not yet committed
        self._taken_lock = threading.Lock()
        self._snapshot_version = -1
        self._cluster_version = 0
        self._cluster: dict[str, Any] = {"workers": []}
        self._stats_doc = "{}"                        # this worker's figures, for twin_workers.stats
        self._renewal: tuple[float, list[str], set[int], dict[str, int]] | None = None  # (when, live, slots, nodes)
        self._claimed: dict[tuple[str, Any], float] = {}  # (slot|node, id) -> when this worker claimed it
        self.received = 0                             # messages this worker's slots received
        self.applied = 0                              # inbox messages this worker applied as an owner

    # TwinService bumps `version` on every change: here that marks the snapshots to write; readers get the
    # cluster's version (snapshots and alarms in PostgreSQL), so the live feed moves with any worker's change
    @property
    def version(self) -> int:
        return self._cluster_version

    @version.setter
    def version(self, value: int) -> None:
        self._local_version += 1  # `version += 1` reads the cluster's version: count the changes instead

    # ------------------------------------------------------------------ life cycle
    def start(self) -> ScaledTwinService:
        # Workers starting together create and migrate the tables one at a time: concurrent CREATE ... IF NOT
        # EXISTS and ALTER TABLE (HistoryStore's migrations) fail or deadlock in PostgreSQL. The lock is held
        # until TwinService.start has made its store (released at the top of _start_mqtt).
        self._schema_conn = _connect(self.config.db)
        self._schema_conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        try:
            HistoryStore(self.config.db).close()
            ensure_schema(self._schema_conn)
            return super().start()
        finally:
            if not self._schema_conn.closed:
                self._schema_conn.close()  # closing the session releases its advisory lock

    def _start_mqtt(self) -> None:
        self._schema_conn.close()
        cfg, scale = self.config, self.scale
        # this worker starts owning nothing: every node's state comes with its lease (_take)
        for device_id, device in self.state.devices.items():
            self.state.devices[device_id] = DeviceState(device.machine)
        for node_id in self.state.nodes:
            self.state.nodes[node_id] = NodeState(node_id)
        # No seq gap checks here. Sparkplug's seq is one counter per edge node, and a gap means a lost
        # message only to a host that receives all of a node's messages in the order the broker passed
        # them on. The shared subscription deals a node's messages to N workers in turn; the owner gets
        # them through twin_inbox in per-device serial order (twin/scaleout/reorder.py), a message
        # handed over late in a later batch, its NBIRTH first and its NDATA in receipt order: seq steps
        # there would report gaps that are not losses and ask for rebirths in a loop. Loss is ruled out
        # instead by QoS 1 end to end and the inbox commit before each PUBACK; the serial orders and
        # de-duplicates the data (the rules that stay on: twin/domain/state.py).
        self.state.check_seq = False
        self.alarms = AlarmManager()
        self.leases = Leases(conn=_connect(cfg.db), worker=scale.worker, slots=scale.slots, lease_s=scale.lease_s)
        # commands (rebirth requests) leave on a session of this worker's own, never on a slot's
        self.client = BurstClient(config=BurstClientConfig(
            host=cfg.broker_host, port=cfg.broker_port, client_id=f"{cfg.client_id}-{scale.worker}-cmd",
            keepalive_s=cfg.keepalive_s, security=cfg.mqtt)).start()
        self._renew(self.leases)
        self._lease_round()
        for target, name in ((self._renew_loop, "twin-lease-renewal"), (self._lease_loop, "twin-leases"),
                             (self._inbox_loop, "twin-inbox")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """A clean stop: what was applied is committed, then the nodes and slots are free at once."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.store.flush()  # the PUBACKs of what was received leave...
        for client in self._slot_clients.values():
            client.stop()   # ...and what arrives after goes again to the slot's next holder
        self.store.flush()
        self._write_snapshots(force=True)
        if self._host is not None:
            if self._renewal is None or set(self._renewal[1]) <= {self.scale.worker}:  # the last worker: offline
                self._host.publish(self._state_topic, self._host_state(False), qos=1, retain=True)
            self._host.stop()
        try:
            self.leases.leave()
        except Exception:  # noqa: BLE001 - the database is gone: the leases expire instead
            log.exception("releasing the leases failed; they expire in %s s", self.scale.lease_s)
        self.leases.conn.close()
        if self.client is not None:
            self.client.stop()
        self.mes.stop()
        self.store.close()

    def wait_connected(self, timeout: float = 10.0) -> None:
        """The broker is reached (this worker's command session: with more workers than slots, some
        hold no slot and still own nodes)."""
        try:
            self.client.wait_connected(timeout)
        except ConnectionError as exc:
            raise ConnectionError(f"twin worker {self.scale.worker}: {exc}") from None

    # ------------------------------------------------------------------ receiving (any worker)
    def _route(self, topic: str) -> str:
        parts = topic.split("/", 4)
        if len(parts) >= 4 and parts[1] == self.plant.group and parts[3] in self.plant.nodes:
            return parts[3]
        return DOOR  # a topic of no node of ours: its owner dead-letters it with the reason

    def _on_slot_messages(self, messages: list[tuple[str, bytes]], ack) -> None:
        now_us = time.time_ns() // 1000
        self.store.put("inbox", [(self._route(topic), topic, bytes(raw), now_us) for topic, raw in messages])
        self.store.put_ack(ack)  # PUBACK once the inbox rows are committed
        self.received += len(messages)

    def _slot_client(self, slot: int) -> BurstClient:
        cfg = self.config
        return BurstClient(
            config=BurstClientConfig(host=cfg.broker_host, port=cfg.broker_port, client_id=f"{cfg.client_id}-{slot}",
                                     clean_session=False, keepalive_s=cfg.keepalive_s, backoff_min_s=0.1,
                                     backoff_max_s=2.0, security=cfg.mqtt),
            subscriptions=((f"$share/{self.scale.worker_group}/{NAMESPACE}/{self.plant.group}/#", 1),),
            on_messages=self._on_slot_messages, defer_acks=True,
            on_connect=lambda client, present: self.connected.set()).start()

    # ------------------------------------------------------------------ applying (the owner)
    def _inbox_loop(self) -> None:
        conn = _connect(self.config.db)
        try:
            while not self._stop.wait(self.scale.poll_s):
                try:
                    self._apply_inbox(conn)
                except Exception:  # noqa: BLE001 - the database went away: the rows wait in the inbox
                    log.exception("reading the inbox failed")
                    if conn.closed:
                        conn = _connect(self.config.db)
        finally:
            conn.close()

    def _apply_inbox(self, conn) -> int:
        with self._lock:
            owned = list(self._owned)
        if not owned:
            return 0
        cutoff = time.time_ns() // 1000 - self.scale.hold_ms * 1000
        rows = conn.execute("SELECT id, node, topic, payload FROM twin_inbox WHERE node = ANY(%s) AND received_us "
                            "<= %s ORDER BY received_us, id LIMIT %s", (owned, cutoff, INBOX_BATCH),
                            binary=True).fetchall()  # binary: the payloads come as they are, no hex to decode
        with self._taken_lock:
            rows = [r for r in rows if r[0] not in self._taken]
        if not rows:
            return 0
        with self._lock:  # no node changes hands while its messages are applied
            rows = [r for r in rows if r[1] in self._owned]
            ids = [r[0] for r in rows]
            with self._taken_lock:
                self._taken.update(ids)
            self.ingest_many(apply_order([(topic, bytes(payload)) for _, _, topic, payload in rows]))
            self.store.put("inbox_done", [(ids,)])
        self.store.put_ack(lambda: self._forget(ids))
        self.applied += len(ids)
        return len(ids)

    def _put_alarm(self, alarm: Alarm) -> None:
        node = self.plant.machines[alarm.device].node
        epoch = self._owned.get(node)
        if epoch is not None:  # else the node moved on: its new owner decides about this alarm
            self.store.put("alarms_fenced", [(*(getattr(alarm, c) for c in ALARM_COLUMNS), node, self.scale.worker,
                                              epoch)])

    def _forget(self, ids: list[int]) -> None:
        with self._taken_lock:
            self._taken.difference_update(ids)

    def _score(self, device_id: str, values: dict[str, Any]) -> None:
        with self._lock:
            if self.state.devices[device_id].machine.node not in self._owned:
                return  # the node moved on while this scoring waited
        super()._score(device_id, values)

    # ------------------------------------------------------------------ leases
    def _lease_loop(self) -> None:
        self._every_quarter_lease("lease round", self.leases, self._lease_round)

    def _renew_loop(self) -> None:
        """Only the renewals, on a connection of their own: nothing the lease round waits for (a flush of a
        busy writer, snapshots, a node's take-over) may let this worker's leases run out."""
        leases = Leases(conn=_connect(self.config.db), worker=self.scale.worker, slots=self.scale.slots,
                        lease_s=self.scale.lease_s)
        try:
            self._every_quarter_lease("lease renewal", leases, lambda: self._renew(leases))
        finally:
            leases.conn.close()

    def _every_quarter_lease(self, what: str, leases: Leases, step) -> None:
        while not self._stop.wait(self.scale.lease_s / 4):
            try:
                step()
            except Exception:  # noqa: BLE001 - a lost database: leases run out, and others take over
                log.exception("%s failed", what)
                try:
                    leases.conn.close()
                    leases.conn = _connect(self.config.db)
                except Exception:  # noqa: BLE001 - still down: the next round tries again
                    pass

    def _renew(self, leases: Leases) -> None:
        started = time.monotonic()
        live = leases.heartbeat(self._stats_doc)
        self._renewal = (started, live, leases.renew_slots(), leases.renew_nodes())

    def _lease_round(self) -> None:
        leases, scale = self.leases, self.scale
        self._stats_doc = json.dumps(self._local_stats())
        renewed_at, live, held, renewed = self._renewal
        # slots: this worker's share of the sessions, its home slot first
        for slot in [s for s in self._slot_clients if s not in held and self._claimed[("slot", s)] < renewed_at]:
            log.warning("worker %s lost slot %d (its lease ran out)", scale.worker, slot)
            self._slot_clients.pop(slot).stop()
        share = math.ceil(scale.slots / len(live))
        free = leases.free_slots()
        if scale.home_slot in free:
            free.remove(scale.home_slot)
            free.insert(0, scale.home_slot)
        for slot in free:
            if len(self._slot_clients) >= share:
                break
            if leases.claim_slot(slot):
                self._claimed[("slot", slot)] = time.monotonic()
                self._slot_clients[slot] = self._slot_client(slot)
        extra = [s for s in sorted(self._slot_clients, reverse=True) if s != scale.home_slot]
        while len(self._slot_clients) > share and extra:  # a worker joined: hand it a session
            slot = extra.pop(0)
            self._slot_clients.pop(slot).stop()  # its unacknowledged messages go to the next holder
            leases.release_slot(slot)
        # nodes: rendezvous over the live workers; a node is taken only once its lease is free
        keys = [DOOR, *self.plant.nodes]
        mine = {key for key in keys if owner_of(key, live) == scale.worker}
        for key in [k for k in self._owned if k not in renewed and self._claimed[("node", k)] < renewed_at]:
            log.warning("worker %s lost node %r (its lease ran out)", scale.worker, key)
            self._drop(key)
        for key in [k for k in self._owned if k not in mine]:  # a worker joined: hand it its nodes
            with self._lock:
                self._owned.pop(key)  # nothing more is applied to it here...
            self.store.flush()        # ...what was is committed, and its state written, before the next owner reads
            self._write_snapshots(force=True, nodes=[key])
            self._drop(key)
            leases.release_node(key)
        for key in mine - set(self._owned):
            epoch = leases.claim_node(key)
            if epoch is not None:
                self._claimed[("node", key)] = time.monotonic()
                self._take(key, epoch)
        self._host_round(live, renewed, renewed_at)
        self._rollout_round(live, renewed, renewed_at)
        self._write_snapshots()
        self._refresh_acks()
        self._refresh_cluster()

    # ------------------------------------------------------------------ the primary host's STATE
    # The group is one Sparkplug primary host application (host id: the config's client_id), whatever its
    # number of workers. One worker at a time holds its STATE (the HOST lease, claimed and moved like a
    # node's): it publishes `online` (retained) on a session of its own whose will says `offline` with
    # the same timestamp. Its SIGKILL fires the will: edge nodes following the host hold their data
    # until the next holder (after the lease) publishes `online` with a newer timestamp, and then send
    # births and their spool. A holder that hands over or loses its lease closes its session cleanly (no
    # will): the edges keep publishing until its successor's newer `online`; the last worker to stop
    # cleanly publishes `offline`.
    def _host_round(self, live: list[str], renewed: dict[str, int], renewed_at: float) -> None:
        # only with the broker reached (the commands' session): the slots' subscriptions are made or under way
        connected = self.client is not None and self.client.connected.is_set()
        change = self._singleton_round(HOST, live, renewed, renewed_at, wanted=True, may_take=connected)
        if change == "lost":
            log.warning("worker %s lost the primary host's STATE (its lease ran out)", self.scale.worker)
        if change in ("lost", "released"):
            self._host.stop()
            self._host = None
        elif change == "taken":
            self._host = self._host_client()

    def _singleton_round(self, key: str, live: list[str], renewed: dict[str, int], renewed_at: float, *,
                         wanted: bool, may_take: bool = True) -> str | None:
        """One round of a lease the group has one of (HOST, ROLLOUT), moved like a node's: "lost" (it ran out),
        "released" (a worker that joined wins it), "taken", or None (no change). Its epoch is in
        `self._singletons` while this worker holds it."""
        ours = wanted and owner_of(key, live) == self.scale.worker
        held = key in self._singletons
        if held and key not in renewed and self._claimed[("node", key)] < renewed_at:
            del self._singletons[key]
            return "lost"
        if held and not ours:
            del self._singletons[key]
            self.leases.release_node(key)  # a fenced write of the old holder fails from here on
            return "released"
        if not held and ours and may_take:
            epoch = self.leases.claim_node(key)
            if epoch is not None:
                self._claimed[("node", key)] = time.monotonic()
                self._singletons[key] = epoch
                return "taken"
        return None

    # ------------------------------------------------------------------ model rollouts
    def enable_rollouts(self) -> None:
        """This worker runs a rollout manager: it may take the ROLLOUT lease (every worker of the group must)."""
        self.drives_rollouts = True

    def _rollout_round(self, live: list[str], renewed: dict[str, int], renewed_at: float) -> None:
        change = self._singleton_round(ROLLOUT, live, renewed, renewed_at, wanted=self.drives_rollouts)
        if change == "lost":
            log.warning("worker %s lost the rollout lease (it ran out)", self.scale.worker)
        elif change == "taken":
            log.info("worker %s drives the model rollouts (epoch %d)", self.scale.worker, self._singletons[ROLLOUT])

    def rollout_fence(self) -> tuple[str, str, int] | bool:
        epoch = self._singletons.get(ROLLOUT)
        return False if epoch is None else (ROLLOUT, self.scale.worker, epoch)

    def nodes_metrics(self, nodes: list[str]) -> dict[str, dict[str, Any]]:
        """Owned nodes' metrics from this worker's state, the others' from the snapshots their owners write."""
        with self._lock:
            out = {n: dict(self.state.nodes[n].metrics, _online=self.state.nodes[n].online)
                   for n in nodes if n in self._owned and n in self.state.nodes}
        others = [f"node:{n}" for n in nodes if n not in out]
        if others:
            for key, doc in self.store.query("SELECT key, doc FROM twin_snapshots WHERE key = ANY(?)", (others,)):
                doc = json.loads(doc)
                out[key.removeprefix("node:")] = dict(doc.get("metrics", {}), _online=doc.get("online", False))
        return out

    def node_metrics(self, node: str) -> dict[str, Any]:
        return self.nodes_metrics([node]).get(node, {}) if node in self.plant.nodes else {}

    def _host_client(self) -> BurstClient:
        cfg = self.config
        self._state_timestamp = int(time.time() * 1000)  # newer than any STATE an earlier holder published
        return BurstClient(
            config=BurstClientConfig(host=cfg.broker_host, port=cfg.broker_port, client_id=f"{cfg.client_id}-host",
                                     keepalive_s=cfg.keepalive_s, will=(self._state_topic, self._host_state(False),
                                                                        1, True),
                                     backoff_min_s=0.1, backoff_max_s=2.0, security=cfg.mqtt),
            on_connect=lambda client, present: client.publish(self._state_topic, self._host_state(True), qos=1,
                                                              retain=True)).start()

    def _take(self, key: str, epoch: int) -> None:
        """Become the owner of a node: its state from the snapshot its last owner wrote, the devices' last
        serials from the history, their open alarms from the alarms table."""
        devices = list(self.plant.nodes.get(key, ()))
        snaps = {k: json.loads(doc) for k, doc in self.store.query(
            "SELECT key, doc FROM twin_snapshots WHERE key = ANY(?)",
            ([f"node:{key}", *(f"device:{d}" for d in devices)],))}
        last = dict(self.store.query("SELECT device, MAX(seq) FROM history WHERE device = ANY(?) GROUP BY device",
                                     (devices,))) if devices else {}
        alarms = [Alarm(*row) for row in self.store.query(
            f"SELECT {', '.join(ALARM_COLUMNS)} FROM alarms WHERE device = ANY(?) AND "
            "(cleared_ms IS NULL OR acked_ms IS NULL)", (devices,))] if devices else []
        with self._lock:
            if key != DOOR:
                node = self.state.nodes[key] = NodeState(key)
                doc = snaps.get(f"node:{key}", {})
                node.online, node.bd_seq = doc.get("online", False), doc.get("bd_seq")
                node.last_seq = doc.get("last_seq")
                node.dead.extend(doc.get("dead", []))
                node.metrics.update(doc.get("metrics", {}))
            for device_id in devices:
                device = self.state.devices[device_id] = DeviceState(self.plant.machines[device_id])
                doc = snaps.get(f"device:{device_id}", {})
                for name in ("online", "born", "ever_online", "stale", "data_ts", "received_ms", "messages"):
                    if name in doc:
                        setattr(device, name, doc[name])
                device.values.update(doc.get("values", {}))
                if doc.get("health_state"):
                    device.health = Health(**doc["health_state"])
                device.last_seq = device.max_serial = last.get(device_id, -1)
                self._warm_device(device)
            self.alarms.load(alarms)
            self._owned[key] = epoch
            self._local_version += 1
        log.info("worker %s owns node %r (epoch %d)", self.scale.worker, key, epoch)

    def _drop(self, key: str) -> None:
        with self._lock:
            self._owned.pop(key, None)
            if key == DOOR:
                return
            self.state.nodes[key] = NodeState(key)
            for device_id in self.plant.nodes[key]:
                self.state.devices[device_id] = DeviceState(self.plant.machines[device_id])
                for alarm in self.alarms.open.pop(device_id, {}).values():
                    self.alarms.by_id.pop(alarm.id, None)

    def _write_snapshots(self, *, force: bool = False, nodes: list[str] | None = None) -> None:
        """The owned nodes' and devices' state, for the API of every worker and the next owner."""
        if not force and self._local_version == self._snapshot_version:
            return
        now_ms = int(time.time() * 1000)
        with self._lock:
            version = self._local_version
            keys = [k for k in (nodes if nodes is not None else self._owned) if k != DOOR]
            rows = []
            for key in keys:
                node = self.state.nodes[key]
                rows.append((f"node:{key}", json.dumps({"online": node.online, "bd_seq": node.bd_seq,
                                                        "last_seq": node.last_seq, "dead": list(node.dead),
                                                        "metrics": node.metrics}, default=str), now_ms))
                for device_id in self.plant.nodes[key]:
                    device = self.state.devices[device_id]
                    doc = device.to_dict() | {"born": device.born, "ever_online": device.ever_online,
                                              "received_ms": device.received_ms, "values": dict(device.values),
                                              "health_state": _fields(device.health) if device.health else None}
                    rows.append((f"device:{device_id}", json.dumps(doc, default=str), now_ms))
        if rows:
            with self.leases.conn.transaction():
                self.leases.conn.cursor().executemany(
                    "INSERT INTO twin_snapshots VALUES (%s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
                    "doc = excluded.doc, updated_ms = excluded.updated_ms", rows)
        self._snapshot_version = version

    def _refresh_acks(self) -> None:
        """Acknowledgements another worker's API took: applied to this owner's open alarms."""
        with self._lock:
            waiting = [a.id for a in self.alarms.all_open() if a.acked_ms is None]
        if not waiting:
            return
        rows = self.leases.conn.execute("SELECT id, acked_ms, acked_by, acked_role FROM alarms WHERE id = ANY(%s) "
                                        "AND acked_ms IS NOT NULL", (waiting,)).fetchall()
        with self._lock:
            for alarm_id, acked_ms, by, role in rows:
                self.alarms.acknowledge(alarm_id, user=by, role=role, now_ms=acked_ms)

    def _refresh_cluster(self) -> None:
        conn = self.leases.conn
        snapshot_ms = conn.execute("SELECT COALESCE(MAX(updated_ms), 0) FROM twin_snapshots").fetchone()[0]
        alarms_ms, alarms_n = conn.execute(
            "SELECT COALESCE(MAX(GREATEST(raised_ms, COALESCE(cleared_ms, 0), COALESCE(acked_ms, 0))), 0), "
            "COUNT(*) FROM alarms").fetchone()
        self._cluster_version = hash((snapshot_ms, alarms_ms, alarms_n)) & 0x7FFF_FFFF_FFFF_FFFF
        self._cluster = {"workers": [{"worker": w, **json.loads(s or "{}")} for w, s in self.leases.live_stats()]}

    def _local_stats(self) -> dict[str, Any]:
        with self._lock:
            return {"slots": sorted(self._slot_clients), "nodes": sorted(k for k in self._owned if k != DOOR),
                    "received": self.received, "applied": self.applied, "committed": self.committed,
                    "counters": dict(self.state.counters)}

    # ------------------------------------------------------------------ queries (from PostgreSQL)
    def _snapshots(self) -> dict[str, dict]:
        return {k: json.loads(doc) for k, doc in self.store.query("SELECT key, doc FROM twin_snapshots")}

    def _asset_row(self, machine, snaps: dict[str, dict], open_counts: dict[str, int]) -> dict[str, Any]:
        doc = snaps.get(f"device:{machine.id}") or DeviceState(machine).to_dict()
        row = {k: doc[k] for k in ("id", "node", "line", "kind", "online", "stale", "last_seq", "data_ts",
                                   "messages", "values", "health", "attributes")}
        row["active_alarms"] = open_counts.get(machine.id, 0)
        row["node_online"] = snaps.get(f"node:{machine.node}", {}).get("online", False)
        return row

    def _open_counts(self) -> dict[str, int]:
        return dict(self.store.query("SELECT device, COUNT(*) FROM alarms WHERE cleared_ms IS NULL GROUP BY device"))

    def assets(self) -> list[dict[str, Any]]:
        snaps, counts = self._snapshots(), self._open_counts()
        return [self._asset_row(m, snaps, counts) for m in self.plant.machines.values()]

    def asset(self, device_id: str) -> dict[str, Any] | None:
        machine = self.plant.machines.get(device_id)
        if machine is None:
            return None
        snaps = self._snapshots()
        row = self._asset_row(machine, snaps, self._open_counts())
        row["sensors"] = [vars(s) for s in machine.sensors.values()]
        node = snaps.get(f"node:{machine.node}", {})
        row["node"] = {"id": machine.node, "online": node.get("online", False), "bd_seq": node.get("bd_seq"),
                       "metrics": node.get("metrics", {})}
        return row

    def open_alarms(self) -> list[Alarm]:
        return self.store.open_alarms()

    def acknowledge(self, alarm_id: str, user: str, role: str | None = None) -> Alarm | None:
        """In the alarms table, whoever owns the device: its owner picks the acknowledgement up there."""
        rows = self.store.query(f"UPDATE alarms SET acked_ms = ?, acked_by = ?, acked_role = ? WHERE id = ? AND "
                                f"acked_ms IS NULL RETURNING {', '.join(ALARM_COLUMNS)}",
                                (int(time.time() * 1000), user, role, alarm_id))
        return Alarm(*rows[0]) if rows else None

    def simulate(self, device_id: str, plan: MillPlan | EnginePlan) -> dict[str, Any]:
        machine = self.plant.machines.get(device_id)
        if machine is None:
            raise SimulationError(f"unknown asset {device_id!r}")
        doc = self._snapshots().get(f"device:{device_id}", {})
        values, health = doc.get("values", {}), doc.get("health_state") or {}
        if machine.kind == "mill":
            if not isinstance(plan, MillPlan):
                raise SimulationError(f"{device_id} is a mill: give a mill plan")
            return simulate_mill(values, plan, model=self.failure_model)
        if machine.kind == "engine":
            if not isinstance(plan, EnginePlan):
                raise SimulationError(f"{device_id} is an engine: give an engine plan")
            return simulate_engine(health.get("rul"), health.get("rul_sd"), plan)
        raise SimulationError(f"no simulation for machines of kind {machine.kind!r}")

    def stats(self) -> dict[str, Any]:
        """This worker's figures, with the counters and commits of every live worker added up."""
        out = super().stats()
        workers = self._cluster["workers"]
        if workers:
            counters: dict[str, int] = {}
            for w in workers:
                for k, v in (w.get("counters") or {}).items():
                    counters[k] = counters.get(k, 0) + v
            out["counters"] = counters
            out["committed"] = sum(w.get("committed", 0) for w in workers)
        out["online"] = sum(bool(a["online"]) for a in self.assets())
        out["worker"] = self.scale.worker
        out["workers"] = [{k: w.get(k) for k in ("worker", "slots", "nodes", "received", "applied")} for w in workers]
        return out


def share_probe(config: TwinConfig, worker_group: str, timeout_s: float = 5.0) -> None:
    """Raise ScaleOutError unless the broker delivers to a shared subscription ($share/...). The built-in
    broker (amqtt 0.12) does not implement them: it would deliver nothing to the workers."""
    token = uuid.uuid4().hex[:12]
    topic = f"{NAMESPACE}/STATE/moeworks-share-probe-{token}"  # the twin's ACL lets it read and write STATE
    got = threading.Event()
    client = BurstClient(config=BurstClientConfig(host=config.broker_host, port=config.broker_port,
                                                  client_id=f"{config.client_id}-probe-{token}",
                                                  keepalive_s=config.keepalive_s, security=config.mqtt),
                         subscriptions=((f"$share/{worker_group}-probe/{topic}", 1),),
                         on_messages=lambda messages: got.set()).start()
    try:
        client.wait_connected(timeout_s)
        deadline = time.monotonic() + timeout_s
        while not got.is_set() and time.monotonic() < deadline:
            client.publish(topic, b'{"probe":true}', qos=1)  # again until the SUBACK has landed
            got.wait(0.3)
    finally:
        client.stop()
    if not got.is_set():
        raise ScaleOutError(f"the broker at {config.broker_host}:{config.broker_port} does not deliver MQTT shared "
                            "subscriptions ($share/...), which --workers > 1 needs: run Mosquitto (the built-in "
                            "`moeworks twin broker` cannot)")


def main(argv: list[str] | None = None) -> None:
    """`python -m twin.scaleout.worker CONFIG.json`: one worker without the HTTP API unless CONFIG has `http_port`
    (served on 127.0.0.1; tokens with `auth_file`, HTTPS with `https_cert` and `https_key`), until SIGTERM.
    CONFIG: TwinConfig fields, `scale` (ScaleOutConfig fields), optionally `plant` / `generated_plant` as for
    `python -m twin.service`, and `rollout` (twin.rollout.manager.RolloutConfig fields) to run a rollout manager.
    The tests and benchmarks/twin.py run workers this way so that they can SIGKILL one."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m twin.scaleout.worker CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    from twin.domain.plant import Plant

    try:
        doc = json.loads(Path(args[0]).read_text())
        plant = Plant.from_dict(doc.pop("plant")) if "plant" in doc else None
        if "generated_plant" in doc:
            plant = Plant.generated(**doc.pop("generated_plant"))
        http_port = doc.pop("http_port", None)
        https = (doc.pop("https_cert", None), doc.pop("https_key", None))
        auth_file = doc.pop("auth_file", None)
        rollout = doc.pop("rollout", None)
        scale = ScaleOutConfig(**doc.pop("scale"))
        service = ScaledTwinService(config=TwinConfig(**doc), scale=scale, plant=plant).start()
        service.wait_connected(30)
        rollouts = None
        if rollout is not None:
            from twin.rollout.manager import RolloutConfig, RolloutManager

            rollout = RolloutConfig(**{k: Path(v) if k in ("folder", "publisher_key") else v
                                       for k, v in rollout.items()})
            rollouts = RolloutManager(config=rollout, service=service).start_thread()
        tokens = None
        if auth_file is not None:
            from twin.auth import TokenStore

            tokens = TokenStore.load(Path(auth_file))
    except (OSError, ValueError, TypeError, KeyError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if http_port is not None:
        import uvicorn

        from twin.api.app import create_app

        server = uvicorn.Server(uvicorn.Config(create_app(service, tokens=tokens, rollouts=rollouts), host="127.0.0.1",
                                               port=int(http_port), log_level="warning", ssl_certfile=https[0],
                                               ssl_keyfile=https[1]))
        server.install_signal_handlers = lambda: None  # ours above stop the worker
        threading.Thread(target=server.run, name="twin-http", daemon=True).start()
    print("ready", flush=True)
    stop.wait()
    if rollouts is not None:
        rollouts.stop()
    service.stop()


if __name__ == "__main__":
    main()
