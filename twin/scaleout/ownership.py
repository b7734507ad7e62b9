"""Who does what among the twin's workers, as leases in PostgreSQL (twin/scaleout/worker.py runs them).

Two kinds of lease, both rows whose `expires_ms` the holder pushes forward every few hundred
milliseconds, on the database's clock (so workers on different machines need no clock agreement):

- MQTT session slots (`twin_slots`): the group shares the device subscription through N persistent
  MQTT sessions, one client id per slot. A slot's holder runs its session; when a worker dies its
  slots expire and live workers adopt them, so the broker hands the dead session's queued and
  unacknowledged messages to someone (Mosquitto keeps them in that session until its client id
  reconnects: a shared subscription does not move them to the other members).
- Edge-node ownership (`twin_node_leases`): the state of a node and its devices (live values,
  health, alarms) is applied by the node's owner only, so an alarm is raised once. The owner of each
  node is decided by rendezvous hashing over the live workers (`owner_of`), and taken only once the
  previous holder's lease is released or expired; every claim bumps the node's `epoch`.

A worker whose renewal finds a lease gone (it stalled past the expiry) drops that slot or node at
once. Everything here is one short statement per call, on the worker's own connection.
"""

from __future__ import annotations

import hashlib

NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"
DOOR = ""  # the ownership key of messages that name no node of the plant: their owner dead-letters them

SCHEMA = """
CREATE TABLE IF NOT EXISTS twin_workers (
    worker TEXT PRIMARY KEY, expires_ms BIGINT NOT NULL, started_ms BIGINT NOT NULL, stats TEXT);
CREATE TABLE IF NOT EXISTS twin_slots (slot INTEGER PRIMARY KEY, holder TEXT, expires_ms BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS twin_node_leases (
    node TEXT PRIMARY KEY, holder TEXT, epoch BIGINT NOT NULL DEFAULT 0, expires_ms BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS twin_inbox (
    id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, topic TEXT NOT NULL, payload BYTEA NOT NULL,
    received_us BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS twin_inbox_node ON twin_inbox (node, received_us);
CREATE TABLE IF NOT EXISTS twin_snapshots (key TEXT PRIMARY KEY, doc TEXT NOT NULL, updated_ms BIGINT NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS alarms_one_active ON alarms (device, kind, metric) WHERE cleared_ms IS NULL;
"""
# The last index is the database's own guard that an alarm is raised once: at most one active
# occurrence per (device, kind, metric), which is also what twin.domain.alarms.AlarmManager keeps in memory.
SCHEMA_LOCK = 0x6D6F65_7477696E  # advisory lock id: workers starting together create the tables one at a time


def ensure_schema(conn) -> None:
    """The scale-out tables (after twin.store.history's, which the last index needs). The caller holds SCHEMA_LOCK:
    concurrent CREATE ... IF NOT EXISTS can fail in PostgreSQL."""
    with conn.transaction():
        conn.execute(SCHEMA)


def owner_of(key: str, workers: list[str]) -> str:
    """Rendezvous hashing: the worker with the highest hash of (worker, key). When a worker joins or
    leaves, only the keys it wins or held move."""
    return max(workers, key=lambda w: hashlib.blake2b(f"{w}\x00{key}".encode(), digest_size=8).digest())


class Leases:
    """One worker's view of the lease tables. `conn`: a psycopg connection in autocommit mode."""

    def __init__(self, *, conn, worker: str, slots: int, lease_s: float):
        self.conn, self.worker, self.slots = conn, worker, slots
        self.lease_ms = int(lease_s * 1000)
        conn.execute("INSERT INTO twin_slots (slot) SELECT generate_series(0, %s - 1) ON CONFLICT DO NOTHING",
                     (slots,))

    def heartbeat(self, stats: str) -> list[str]:
        """Renew this worker's registration; the live workers (this one included), sorted."""
        self.conn.execute(f"INSERT INTO twin_workers VALUES (%s, {NOW_MS} + %s, {NOW_MS}, %s) ON CONFLICT (worker) "
                          "DO UPDATE SET expires_ms = excluded.expires_ms, stats = excluded.stats",
                          (self.worker, self.lease_ms, stats))
        rows = self.conn.execute(f"SELECT worker FROM twin_workers WHERE expires_ms > {NOW_MS} ORDER BY worker")
        return [r[0] for r in rows.fetchall()]

    def live_stats(self) -> list[tuple[str, str | None]]:
        return self.conn.execute(f"SELECT worker, stats FROM twin_workers WHERE expires_ms > {NOW_MS} "
                                 "ORDER BY worker").fetchall()

    # ------------------------------------------------------------------ MQTT session slots
    def renew_slots(self) -> set[int]:
        rows = self.conn.execute(f"UPDATE twin_slots SET expires_ms = {NOW_MS} + %s WHERE holder = %s "
                                 f"AND expires_ms > {NOW_MS} RETURNING slot", (self.lease_ms, self.worker))
        return {r[0] for r in rows.fetchall()}

    def claim_slot(self, slot: int) -> bool:
        rows = self.conn.execute(f"UPDATE twin_slots SET holder = %s, expires_ms = {NOW_MS} + %s WHERE slot = %s "
                                 f"AND (holder IS NULL OR expires_ms <= {NOW_MS}) RETURNING slot",
                                 (self.worker, self.lease_ms, slot))
        return bool(rows.fetchall())

    def free_slots(self) -> list[int]:
        rows = self.conn.execute(f"SELECT slot FROM twin_slots WHERE slot < %s AND (holder IS NULL OR expires_ms <= "
                                 f"{NOW_MS}) ORDER BY slot", (self.slots,))
        return [r[0] for r in rows.fetchall()]

    def release_slot(self, slot: int) -> None:
        self.conn.execute("UPDATE twin_slots SET holder = NULL, expires_ms = 0 WHERE slot = %s AND holder = %s",
                          (slot, self.worker))

    # ------------------------------------------------------------------ node ownership
    def renew_nodes(self) -> dict[str, int]:
        """node -> epoch of every node lease this worker still holds."""
        rows = self.conn.execute(f"UPDATE twin_node_leases SET expires_ms = {NOW_MS} + %s WHERE holder = %s "
                                 f"AND expires_ms > {NOW_MS} RETURNING node, epoch", (self.lease_ms, self.worker))
        return dict(rows.fetchall())

    def claim_node(self, node: str) -> int | None:
        """The new epoch if the node was free (released or expired) and is now this worker's."""
        rows = self.conn.execute(
            f"INSERT INTO twin_node_leases VALUES (%s, %s, 1, {NOW_MS} + %s) ON CONFLICT (node) DO UPDATE SET "
            "holder = excluded.holder, epoch = twin_node_leases.epoch + 1, expires_ms = excluded.expires_ms "
            f"WHERE twin_node_leases.holder IS NULL OR twin_node_leases.expires_ms <= {NOW_MS} RETURNING epoch",
            (node, self.worker, self.lease_ms)).fetchall()
        return rows[0][0] if rows else None

    def release_node(self, node: str) -> None:
        self.conn.execute("UPDATE twin_node_leases SET holder = NULL, expires_ms = 0 WHERE node = %s AND holder = %s",
                          (node, self.worker))

    def leave(self) -> None:
        """A clean stop: everything this worker holds is free at once (no wait for the expiry)."""
        self.conn.execute("UPDATE twin_node_leases SET holder = NULL, expires_ms = 0 WHERE holder = %s", (self.worker,))
        self.conn.execute("UPDATE twin_slots SET holder = NULL, expires_ms = 0 WHERE holder = %s", (self.worker,))
        self.conn.execute("DELETE FROM twin_workers WHERE worker = %s", (self.worker,))
