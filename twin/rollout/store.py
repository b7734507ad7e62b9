"""Rollouts and each target node's progress, in the twin's database (SQLite file or PostgreSQL).

Two tables beside the history: `rollouts` (one row per rollout: the bundle it offers, its canary share,
its health gate, its state) and `rollout_nodes` (one row per target node: its wave, its state, the
hashes of the download tokens it was sent). Every change is committed before it is acted on, so a twin
restarted at any point carries on where it stopped.

Twin workers (twin/scaleout) share these tables in PostgreSQL: any worker's API starts, aborts and reads
rollouts; one worker at a time (the holder of the `/rollout` lease) moves them on, and its writes are
fenced by that lease (`save(..., fence=...)`), so a worker that stalled past its lease writes nothing and
sends no command. A finished rollout or node row is never written over: an abort taken by one worker's
API is not undone by the driver's write of the step it had computed before.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twin.rollout.protocol import NODE_TERMINAL

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL, version TEXT NOT NULL,
    sha256 TEXT NOT NULL, bytes BIGINT NOT NULL, folder TEXT NOT NULL, canary_share DOUBLE PRECISION NOT NULL,
    gate TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, updated_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_nodes (
    rollout_id TEXT NOT NULL, node TEXT NOT NULL, wave TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    version TEXT, token_hashes TEXT NOT NULL, offered_ms BIGINT, sent_ms BIGINT, updated_ms BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, node));
"""
SCHEMA_LOCK = 0x6D6F65_726F6C6C  # advisory lock id of the schema above
ROLLOUT_COLUMNS = ("id", "created_ms", "created_by", "version", "sha256", "bytes", "folder", "canary_share", "gate",
                   "state", "reason", "updated_ms")
# the states that end a rollout or a node's part in it (twin.rollout.protocol.NODE_TERMINAL): never written over
ROLLOUT_RUNNING = "('canary', 'rolling')"
NODE_DONE = "(" + ", ".join(f"'{state}'" for state in sorted(NODE_TERMINAL)) + ")"
# the driver's write holds its lease (twin.scaleout.ownership's table) until the commit: a worker that took the
# lease over after it reads the rows it wrote; one whose lease ran out writes nothing
FENCE = ("SELECT 1 FROM twin_node_leases WHERE node = %s AND holder = %s AND epoch = %s AND "
         "expires_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint FOR SHARE")
NODE_COLUMNS = ("rollout_id", "node", "wave", "state", "reason", "version", "token_hashes", "offered_ms", "sent_ms",
                "updated_ms")


@dataclass
class Rollout:
    id: str
    created_ms: int
    created_by: str
    version: str
    sha256: str
    bytes: int
    folder: str
    canary_share: float
    gate: dict[str, Any]
    state: str                     # canary -> rolling -> completed | partial; failed (canary); aborted
    reason: str | None
    updated_ms: int

    def row(self) -> tuple:
        return tuple(json.dumps(v) if k == "gate" else v for k, v in zip(ROLLOUT_COLUMNS, vars(self).values(),
                                                                        strict=True))


@dataclass
class RolloutNode:
    rollout_id: str
    node: str
    wave: str                      # canary | rest
    state: str                     # twin.rollout.protocol.NODE_TWIN or NODE_REPORTED
    reason: str | None = None
    version: str | None = None     # the node's active model, as it last reported
    token_hashes: list[str] = field(default_factory=list)  # SHA-256 of each download token it was sent
    offered_ms: int | None = None
    sent_ms: int | None = None
    updated_ms: int = 0

    def row(self) -> tuple:
        return tuple(json.dumps(v) if k == "token_hashes" else v
                     for k, v in zip(NODE_COLUMNS, vars(self).values(), strict=True))

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in ("token_hashes", "rollout_id")}


class LeaseLost(RuntimeError):
    """The driver's lease is no longer this worker's: nothing was written."""


class RolloutStore:
    """One connection, serialised by a lock: rollouts change a few times a second at most."""

    def __init__(self, url: str):
        self.dialect = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self.url = url.removeprefix("sqlite:///") if self.dialect == "sqlite" else url
        self._lock = threading.Lock()
        if self.dialect == "postgresql":
            import psycopg

            self._conn = psycopg.connect(self.url, connect_timeout=10)
            # twin workers starting together: one CREATE ... IF NOT EXISTS at a time (concurrent ones can fail)
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self._conn.execute(SCHEMA)
        else:
            Path(self.url).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.url, timeout=30, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SCHEMA)
        self._conn.commit()

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    def _query(self, statement: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            rows = self._conn.execute(self._sql(statement), params).fetchall()
            self._conn.commit()  # PostgreSQL: end the read's transaction, so the next read sees new commits
            return rows

    def save(self, rollout: Rollout | None = None, nodes: list[RolloutNode] = (), *,
             fence: tuple[str, str, int] | None = None) -> set[str]:
        """Insert or update a rollout and node rows, in one transaction; the nodes whose row was written (a
        finished node's row is kept as it is). `fence`: (lease key, holder, epoch) that must still hold (PostgreSQL),
        else LeaseLost and nothing is written."""
        with self._lock:
            try:
                if fence is not None and not self._conn.execute(FENCE, fence).fetchall():
                    raise LeaseLost(f"the rollout lease {fence[0]!r} is no longer {fence[1]}'s (epoch {fence[2]})")
                if rollout is not None:
                    self._conn.execute(self._sql(
                        f"INSERT INTO rollouts VALUES ({','.join('?' * len(ROLLOUT_COLUMNS))}) ON CONFLICT (id) "
                        f"DO UPDATE SET state=excluded.state, reason=excluded.reason, "
                        f"updated_ms=excluded.updated_ms WHERE rollouts.state IN {ROLLOUT_RUNNING}"), rollout.row())
                written = set()
                for node in nodes:
                    cursor = self._conn.execute(self._sql(
                        f"INSERT INTO rollout_nodes VALUES ({','.join('?' * len(NODE_COLUMNS))}) ON CONFLICT "
                        f"(rollout_id, node) DO UPDATE SET state=excluded.state, reason=excluded.reason, "
                        f"version=excluded.version, token_hashes=excluded.token_hashes, "
                        f"offered_ms=excluded.offered_ms, sent_ms=excluded.sent_ms, updated_ms=excluded.updated_ms "
                        f"WHERE rollout_nodes.state NOT IN {NODE_DONE}"), node.row())
                    if cursor.rowcount:
                        written.add(node.node)
                self._conn.commit()
                return written
            except BaseException:
                self._conn.rollback()
                raise

    def rollouts(self, *, active_only: bool = False, limit: int = 100) -> list[Rollout]:
        where = "WHERE state IN ('canary', 'rolling') " if active_only else ""
        rows = self._query(f"SELECT {','.join(ROLLOUT_COLUMNS)} FROM rollouts {where}"
                           f"ORDER BY created_ms DESC LIMIT ?", (limit,))
        return [_rollout(r) for r in rows]

    def rollout(self, rollout_id: str) -> Rollout | None:
        rows = self._query(f"SELECT {','.join(ROLLOUT_COLUMNS)} FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout(rows[0]) if rows else None

    def nodes(self, rollout_id: str) -> list[RolloutNode]:
        rows = self._query(f"SELECT {','.join(NODE_COLUMNS)} FROM rollout_nodes WHERE rollout_id = ? ORDER BY node",
                           (rollout_id,))
        return [RolloutNode(**{k: (json.loads(v) if k == "token_hashes" else v)
                               for k, v in zip(NODE_COLUMNS, r, strict=True)}) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _rollout(row: tuple) -> Rollout:
    return Rollout(**{k: (json.loads(v) if k == "gate" else v) for k, v in zip(ROLLOUT_COLUMNS, row, strict=True)})
