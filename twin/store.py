"""History, alarms, dead letters and work orders in SQLite (a file, the default) or PostgreSQL.

Writes go through one writer thread in batches (one transaction per batch), so the MQTT thread
never waits on the disk. Every history row has the key (device, seq): a message delivered twice
is stored once (INSERT ... ON CONFLICT DO NOTHING), which makes ingestion idempotent even across
restarts of the twin.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from twin.alarms import Alarm
from twin.state import Ingested

SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    device TEXT NOT NULL, seq BIGINT NOT NULL, ts_ms BIGINT NOT NULL, received_ms BIGINT NOT NULL,
    in_order INTEGER NOT NULL, rul DOUBLE PRECISION, failure_prob DOUBLE PRECISION, failure_mode TEXT,
    vals TEXT NOT NULL, PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS history_device_ts ON history (device, ts_ms);
CREATE INDEX IF NOT EXISTS history_ts ON history (ts_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    id {serial}, received_ms BIGINT NOT NULL, topic TEXT NOT NULL, payload {blob}, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL, metric TEXT NOT NULL, severity TEXT NOT NULL,
    message TEXT NOT NULL, value DOUBLE PRECISION, raised_ms BIGINT NOT NULL, cleared_ms BIGINT, acked_ms BIGINT,
    acked_by TEXT, acked_role TEXT);
CREATE INDEX IF NOT EXISTS alarms_raised ON alarms (raised_ms);
CREATE TABLE IF NOT EXISTS work_orders (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, alarm_id TEXT, created_ms BIGINT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL, last_error TEXT, delivered_ms BIGINT, body TEXT NOT NULL);
"""
DIALECT = {"sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"},
           "postgresql": {"serial": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA"}}
UPSERT = {
    "history": "INSERT INTO history VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
    "dead_letters": "INSERT INTO dead_letters (received_ms, topic, payload, reason) VALUES (?,?,?,?)",
    "alarms": "INSERT INTO alarms VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
              "message=excluded.message, value=excluded.value, cleared_ms=excluded.cleared_ms, "
              "acked_ms=excluded.acked_ms, acked_by=excluded.acked_by, acked_role=excluded.acked_role",
    "work_orders": "INSERT INTO work_orders VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
                   "status=excluded.status, attempts=excluded.attempts, last_error=excluded.last_error, "
                   "delivered_ms=excluded.delivered_ms",
}
ALARM_COLUMNS = ("id", "device", "kind", "metric", "severity", "message", "value", "raised_ms", "cleared_ms",
                 "acked_ms", "acked_by", "acked_role")


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class WriterConfig:
    batch_rows: int = 2_000        # one transaction per this many rows at most: SQLite's per-commit cost amortised
    flush_interval_s: float = 0.05  # a row waits at most this long: keeps publish-to-history latency well under 250 ms
    checkpoint_interval_s: float = 1.0  # SQLite: WAL checkpoints (the only fsyncs) run this often on their own
                                        # thread, never inside a commit of the writer (that stalled it by 100s of ms)


@dataclass
class WorkOrder:
    id: str
    device: str
    alarm_id: str | None
    created_ms: int
    body: dict[str, Any]
    status: str = "pending"      # pending -> delivered
    attempts: int = 0
    last_error: str | None = None
    delivered_ms: int | None = None

    def row(self) -> tuple:
        return (self.id, self.device, self.alarm_id, self.created_ms, self.status, self.attempts, self.last_error,
                self.delivered_ms, json.dumps(self.body))


def _history_row(item: Ingested) -> tuple:
    h = item.health
    if h is None:
        rul = prob = mode = None
    else:
        rul, prob, mode = h.rul, h.failure_prob, h.mode
    try:  # orjson writes the same compact JSON as json.dumps(separators=(",", ":")), several times faster
        vals = orjson.dumps(item.values).decode()
    except TypeError:  # an integer beyond 64 bits (read by the stdlib fallback of twin.payload.decode)
        vals = json.dumps(item.values, separators=(",", ":"))
    return (item.device, item.seq, item.timestamp, item.received_ms, int(item.in_order), rul, prob, mode, vals)


class HistoryStore:
    """`url`: a file path, ``sqlite:///path.db``, or ``postgresql://user@host:port/db``."""

    def __init__(self, url: str | Path, *, writer: WriterConfig = WriterConfig(),
                 on_commit: Callable[[list[Ingested], float], None] | None = None):
        url = str(url)
        self.dialect = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self.url = url.removeprefix("sqlite:///") if self.dialect == "sqlite" else url
        self.writer = writer
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.rows_written = 0
        self.batches = 0
        self.write_errors = 0
        self.last_write_error: str | None = None
        conn = self._connect()
        try:
            statements = SCHEMA.format(**DIALECT[self.dialect])
            if self.dialect == "sqlite":
                conn.executescript(statements)
                # databases made before acknowledgements recorded the role gain the column (appended last,
                # where ALARM_COLUMNS expects it)
                if "acked_role" not in {row[1] for row in conn.execute("PRAGMA table_info(alarms)")}:
                    conn.execute("ALTER TABLE alarms ADD COLUMN acked_role TEXT")
            else:
                conn.execute(statements)
                conn.execute("ALTER TABLE alarms ADD COLUMN IF NOT EXISTS acked_role TEXT")
            conn.commit()
        finally:
            conn.close()

    # ------------------------------------------------------------------ connections
    def _connect(self):
        if self.dialect == "postgresql":
            import psycopg

            try:
                return psycopg.connect(self.url, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise StoreError(f"cannot connect to PostgreSQL at {self.url}: {exc}") from None
        Path(self.url).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.url, timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")       # readers never block the writer
        conn.execute("PRAGMA synchronous=NORMAL")     # durable across a process crash; WAL makes it safe
        conn.execute("PRAGMA wal_autocheckpoint=0")   # the checkpointer thread does it (HistoryStore._checkpoint_loop)
        return conn

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.dialect == "postgresql" else statement

    def _reader(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            if self.dialect == "postgresql":
                conn.autocommit = True  # reads see the writer's commits at once
            with self._lock:
                self._connections.append(conn)
        return conn

    def query(self, statement: str, params: tuple = ()) -> list[tuple]:
        cur = self._reader().execute(self._sql(statement), params)
        return cur.fetchall()

    # ------------------------------------------------------------------ writer
    def start(self) -> HistoryStore:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="twin-history-writer", daemon=True)
            self._thread.start()
            if self.dialect == "sqlite":
                self._checkpoint_stop.clear()
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="twin-wal-checkpoint",
                                                      daemon=True)
                self._checkpointer.start()
        return self

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints copy committed WAL frames into the database file without blocking the writer
        or the readers; the writer starts the WAL over once a checkpoint has caught up with it."""
        conn = self._connect()
        try:
            while not self._checkpoint_stop.wait(self.writer.checkpoint_interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or locked: the next round catches up
                    self.last_write_error = f"checkpoint: {type(exc).__name__}: {exc}"
        finally:
            conn.close()

    # Each put hands the writer a list of rows: a burst of messages is one queue operation (one wake-up of
    # the writer thread), not one per message.
    def put_history(self, item: Ingested) -> None:
        self._queue.put(("history", [item]))

    def put_history_many(self, items: list[Ingested]) -> None:
        self._queue.put(("history", items))

    def put_dead_letters(self, letters: list[tuple[str, bytes, str, int]]) -> None:
        """(topic, payload, reason, received_ms) each."""
        self._queue.put(("dead_letters", [(ms, topic, payload, reason) for topic, payload, reason, ms in letters]))

    def put_alarm(self, alarm: Alarm) -> None:
        self._queue.put(("alarms", [tuple(getattr(alarm, c) for c in ALARM_COLUMNS)]))

    def put_work_order(self, order: WorkOrder) -> None:
        self._queue.put(("work_orders", [order.row()]))

    def flush(self, timeout: float = 30.0) -> None:
        """Block until everything queued before this call is committed."""
        if self._thread is None:
            raise StoreError("the writer is not started")
        done = threading.Event()
        self._queue.put(("flush", done))
        if not done.wait(timeout):
            raise StoreError(f"history writer did not flush within {timeout} s")

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(("stop", None))
            self._thread.join(timeout=30)
            self._thread = None
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join(timeout=30)
            self._checkpointer = None
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing other threads' connections is best effort
                    pass
            self._connections.clear()

    def _write_loop(self) -> None:
        self._wconn = self._connect()
        stop = False
        while not stop:
            batch: list[tuple[str, Any]] = [self._queue.get()]
            rows = len(batch[0][1]) if batch[0][0] not in ("flush", "stop") else self.writer.batch_rows
            deadline = time.monotonic() + self.writer.flush_interval_s
            while rows < self.writer.batch_rows:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if batch[-1][0] in ("flush", "stop"):
                    break
                rows += len(batch[-1][1])
            stop = any(kind == "stop" for kind, _ in batch)
            self._write(batch)
        self._wconn.close()

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        grouped: dict[str, list] = {}
        events = []
        ingested: list[Ingested] = []
        for kind, items in batch:
            if kind in ("flush", "stop"):
                if items is not None:
                    events.append(items)
                continue
            if kind == "history":
                ingested.extend(items)
                items = [_history_row(item) for item in items]
            grouped.setdefault(kind, []).extend(items)
        attempt = 0
        while grouped:
            try:
                cur = self._wconn.cursor()
                for kind, rows in grouped.items():
                    cur.executemany(self._sql(UPSERT[kind]), rows)
                self._wconn.commit()
                break
            except Exception as exc:  # noqa: BLE001 - a locked or restarting database: retry, never drop the batch
                self.write_errors += 1
                self.last_write_error = f"{type(exc).__name__}: {exc}"
                try:
                    self._wconn.rollback()
                except Exception:  # noqa: BLE001 - the connection itself is gone: open a new one
                    try:
                        self._wconn = self._connect()
                    except StoreError:
                        pass
                time.sleep(min(5.0, 0.1 * 2**attempt))
                attempt += 1
        self.rows_written += sum(len(rows) for rows in grouped.values())
        self.batches += 1
        if self.on_commit is not None and ingested:
            self.on_commit(ingested, time.time())
        for event in events:
            event.set()

    # ------------------------------------------------------------------ reads
    def has(self, device: str, seq: int) -> bool:
        return bool(self.query("SELECT 1 FROM history WHERE device = ? AND seq = ?", (device, seq)))

    def last_seqs(self) -> dict[str, int]:
        return dict(self.query("SELECT device, MAX(seq) FROM history GROUP BY device"))

    def history(self, device: str, *, start_ms: int = 0, end_ms: int = 2**62, limit: int | None = 1000,
                latest: bool = False) -> list[dict[str, Any]]:
        """Rows of one device in [start_ms, end_ms), oldest first (`latest`: the newest `limit` rows;
        limit None: all)."""
        order = "DESC" if latest else "ASC"
        rows = self.query("SELECT seq, ts_ms, received_ms, in_order, rul, failure_prob, failure_mode, vals "
                          f"FROM history WHERE device = ? AND ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms {order}, "
                          f"seq {order} LIMIT ?", (device, start_ms, end_ms, -1 if limit is None else limit))
        out = [{"seq": r[0], "ts_ms": r[1], "received_ms": r[2], "in_order": bool(r[3]), "rul": r[4],
                "failure_prob": r[5], "failure_mode": r[6], "values": json.loads(r[7])} for r in rows]
        return out[::-1] if latest else out

    def seqs(self, device: str) -> list[int]:
        """Every stored seq of a device, ordered by edge timestamp (then seq)."""
        return [r[0] for r in self.query("SELECT seq FROM history WHERE device = ? ORDER BY ts_ms, seq", (device,))]

    def alarms(self, *, device: str | None = None, since_ms: int = 0, limit: int = 500) -> list[Alarm]:
        where, params = "raised_ms >= ?", [since_ms]
        if device:
            where += " AND device = ?"
            params.append(device)
        rows = self.query(f"SELECT {', '.join(ALARM_COLUMNS)} FROM alarms WHERE {where} "
                          "ORDER BY raised_ms DESC LIMIT ?", (*params, limit))
        return [Alarm(*row) for row in rows]

    def open_alarms(self) -> list[Alarm]:
        rows = self.query(f"SELECT {', '.join(ALARM_COLUMNS)} FROM alarms WHERE cleared_ms IS NULL OR acked_ms IS NULL")
        return [Alarm(*row) for row in rows]

    def dead_letters(self, *, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.query("SELECT id, received_ms, topic, payload, reason FROM dead_letters ORDER BY id DESC LIMIT ?",
                          (limit,))
        return [{"id": r[0], "received_ms": r[1], "topic": r[2],
                 "payload": bytes(r[3]).decode("utf-8", "replace") if r[3] is not None else None, "reason": r[4]}
                for r in rows]

    def count(self, table: str) -> int:
        assert table in ("history", "dead_letters", "alarms", "work_orders"), table
        return self.query(f"SELECT COUNT(*) FROM {table}")[0][0]

    def work_orders(self, *, status: str | None = None) -> list[WorkOrder]:
        where = "WHERE status = ?" if status else ""
        rows = self.query("SELECT id, device, alarm_id, created_ms, body, status, attempts, last_error, delivered_ms "
                          f"FROM work_orders {where} ORDER BY created_ms", (status,) if status else ())
        return [WorkOrder(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8]) for r in rows]

    def history_rows(self, start_ms: int, end_ms: int, batch: int = 50_000):
        """(device, ts_ms, rul, failure_prob, vals-json) in [start_ms, end_ms), in chunks (ETL)."""
        cursor_ts, cursor_dev, cursor_seq = start_ms - 1, "", -1
        while True:
            rows = self.query("SELECT device, seq, ts_ms, rul, failure_prob, vals FROM history WHERE ts_ms < ? "
                              "AND (ts_ms > ? OR (ts_ms = ? AND (device > ? OR (device = ? AND seq > ?)))) "
                              "ORDER BY ts_ms, device, seq LIMIT ?",
                              (end_ms, cursor_ts, cursor_ts, cursor_dev, cursor_dev, cursor_seq, batch))
            if not rows:
                return
            yield rows
            cursor_dev, cursor_seq, cursor_ts = rows[-1][0], rows[-1][1], rows[-1][2]
