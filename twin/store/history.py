"""History, alarms, dead letters and work orders in SQLite (a file, the default) or PostgreSQL.

Writes go through one writer thread in batches (one transaction per batch), so the MQTT thread
never waits on the disk. Every history row has the key (device, seq), where `seq` holds the
message's serial (twin/sparkplug/payload.py): a message delivered twice is stored once (INSERT ... ON
CONFLICT DO NOTHING), which makes ingestion idempotent even across restarts of the twin.

Acknowledgements ride the same queue (`put_ack`): the writer calls them after the commit that made
everything queued before them durable, so the twin acknowledges a message to the broker only once
its row (or dead letter) is on disk. A row the database refuses (a value it cannot hold) never
blocks the others: the batch is retried row by row and the refused row becomes a dead letter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from twin.domain.alarms import Alarm
from twin.domain.state import Ingested

log = logging.getLogger(__name__)
DEAD_LETTER_EXCERPT_BYTES = 4096   # a dead letter keeps the payload's size, SHA-256 and first 4 KiB
DEAD_LETTER_TOPIC_CHARS = 512      # MQTT allows 64 KiB topics: a dead letter keeps their start
DEAD_LETTER_REASON_CHARS = 300

SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    device TEXT NOT NULL, seq BIGINT NOT NULL, ts_ms BIGINT NOT NULL, received_ms BIGINT NOT NULL,
    in_order INTEGER NOT NULL, rul DOUBLE PRECISION, failure_prob DOUBLE PRECISION, failure_mode TEXT,
    vals TEXT NOT NULL, PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS history_device_ts ON history (device, ts_ms);
CREATE INDEX IF NOT EXISTS history_ts ON history (ts_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    id {serial}, received_ms BIGINT NOT NULL, topic TEXT NOT NULL, payload {blob}, reason TEXT NOT NULL,
    size BIGINT, sha256 TEXT);
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
    "dead_letters": "INSERT INTO dead_letters (received_ms, topic, payload, reason, size, sha256) "
                    "VALUES (?,?,?,?,?,?)",
    "alarms": "INSERT INTO alarms VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
              "message=excluded.message, value=excluded.value, cleared_ms=excluded.cleared_ms, "
              # an acknowledgement is never undone: a state writer that has not seen one (another twin worker's
              # API took it, twin/scaleout/worker.py) must not erase it
              "acked_ms=COALESCE(alarms.acked_ms, excluded.acked_ms), "
              "acked_by=COALESCE(alarms.acked_by, excluded.acked_by), "
              "acked_role=COALESCE(alarms.acked_role, excluded.acked_role)",
    "work_orders": "INSERT INTO work_orders VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET "
                   "status=excluded.status, attempts=excluded.attempts, last_error=excluded.last_error, "
                   "delivered_ms=excluded.delivered_ms",
}
# PostgreSQL: a batch of rows of these kinds is written with one binary COPY, not one statement per row
# (psycopg's executemany: each row's parameters dumped and sent as a Bind/Execute of its own, 5-7x COPY's
# client CPU per row). That was much of the scale-out workers' CPU, every message being written twice
# (inbox, history): benchmarks/RESULTS.md, "Twin scale-out". kind -> Bulk. A batch the database refuses
# is written again row by row with the kind's ordinary statement (HistoryStore._isolate), as before.
@dataclass(frozen=True)
class Bulk:
    table: str                        # COPY's target, with its columns
    types: tuple[str, ...]            # PostgreSQL type of each column, for the binary format
    prepare: str | None = None        # run first in the same transaction (a staging table)
    finish: str | None = None         # run after the COPY (staging -> the table, ON CONFLICT as the statement)


PG_BULK = {
    # COPY knows no ON CONFLICT: history rows go through a temporary table emptied at each commit
    "history": Bulk("history_in", ("text", "int8", "int8", "int8", "int4", "float8", "float8", "text", "text"),
                    prepare="CREATE TEMP TABLE IF NOT EXISTS history_in (LIKE history) ON COMMIT DELETE ROWS",
                    finish="INSERT INTO history SELECT * FROM history_in ON CONFLICT DO NOTHING"),
}
ALARM_COLUMNS = ("id", "device", "kind", "metric", "severity", "message", "value", "raised_ms", "cleared_ms",
                 "acked_ms", "acked_by", "acked_role")


class StoreError(RuntimeError):
    pass


def dead_letter_row(topic: str, payload: bytes, reason: str, received_ms: int) -> tuple:
    """The stored form of a refused message: bounded whatever its size (excerpt, size and hash)."""
    payload = bytes(payload)
    return (received_ms, topic[:DEAD_LETTER_TOPIC_CHARS], payload[:DEAD_LETTER_EXCERPT_BYTES],
            reason[:DEAD_LETTER_REASON_CHARS], len(payload), hashlib.sha256(payload).hexdigest())


def _transient(exc: BaseException) -> bool:
    """A database that is busy, locked or gone (retry the batch), as opposed to a row it refuses."""
    if isinstance(exc, sqlite3.OperationalError | ConnectionError | TimeoutError):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(exc, psycopg.OperationalError)


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
    except TypeError:  # an integer beyond 64 bits (read by the stdlib fallback of twin.sparkplug.payload.decode)
        vals = json.dumps(item.values, separators=(",", ":"))
    return (item.device, item.seq, item.timestamp, item.received_ms, int(item.in_order), rul, prob, mode, vals)


class HistoryStore:
    """`url`: a file path, ``sqlite:///path.db``, or ``postgresql://user@host:port/db``."""

    def __init__(self, url: str | Path, *, writer: WriterConfig = WriterConfig(),
                 on_commit: Callable[[list[Ingested], float], None] | None = None,
                 statements: dict[str, str] | None = None, bulk: dict[str, Bulk] | None = None):
        """`statements`: more kinds of rows the writer takes (`put(kind, rows)`), each an executemany
        statement with `?` placeholders (the twin's scale-out tables, twin/scaleout/worker.py); `bulk`: more
        kinds written in one statement per batch on PostgreSQL (as PG_BULK)."""
        url = str(url)
        self.dialect = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self.url = url.removeprefix("sqlite:///") if self.dialect == "sqlite" else url
        self.writer = writer
        self.on_commit = on_commit
        self.statements = UPSERT | (statements or {})
        self.bulk = PG_BULK | (bulk or {})
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
        self.rows_refused = 0             # rows the database refused, dead-lettered instead
        self.last_write_error: str | None = None
        conn = self._connect()
        try:
            statements = SCHEMA.format(**DIALECT[self.dialect])
            if self.dialect == "sqlite":
                conn.executescript(statements)
                # databases of earlier versions gain the newer columns (appended last, where
                # ALARM_COLUMNS and the dead-letter queries expect them)
                have = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
                for column, kind in (("size", "BIGINT"), ("sha256", "TEXT")):
                    if column not in have:
                        conn.execute(f"ALTER TABLE dead_letters ADD COLUMN {column} {kind}")
                if "acked_role" not in {row[1] for row in conn.execute("PRAGMA table_info(alarms)")}:
                    conn.execute("ALTER TABLE alarms ADD COLUMN acked_role TEXT")
            else:
                conn.execute(statements)
                conn.execute("ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS size BIGINT")
                conn.execute("ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS sha256 TEXT")
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
        """(topic, payload, reason, received_ms) each; stored bounded (`dead_letter_row`)."""
        self._queue.put(("dead_letters", [dead_letter_row(*letter) for letter in letters]))

    def put(self, kind: str, rows: list[tuple]) -> None:
        """Rows of a kind given in `statements`, committed in queue order with everything else."""
        if kind not in self.statements:
            raise StoreError(f"no statement for rows of kind {kind!r}")
        self._queue.put((kind, rows))

    def put_ack(self, ack: Callable[[], None]) -> None:
        """Call `ack()` on the writer thread once everything queued before it is committed."""
        self._queue.put(("ack", ack))

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
            rows = len(batch[0][1]) if batch[0][0] not in ("flush", "stop", "ack") else \
                (0 if batch[0][0] == "ack" else self.writer.batch_rows)
            deadline = time.monotonic() + self.writer.flush_interval_s
            while rows < self.writer.batch_rows:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
                if batch[-1][0] in ("flush", "stop"):
                    break
                if batch[-1][0] != "ack":
                    rows += len(batch[-1][1])
            stop = any(kind == "stop" for kind, _ in batch)
            self._write(batch)
        self._wconn.close()

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        grouped: dict[str, list] = {}
        events, acks = [], []
        ingested: list[Ingested] = []
        refused: list[tuple] = []
        for kind, items in batch:
            if kind in ("flush", "stop"):
                if items is not None:
                    events.append(items)
                continue
            if kind == "ack":
                acks.append(items)
                continue
            if kind == "history":
                rows = []
                for item in items:
                    try:
                        rows.append(_history_row(item))
                        ingested.append(item)
                    except Exception as exc:  # noqa: BLE001 - a row that cannot be encoded costs that row only
                        refused.append(self._refused_row("history", item, exc))
                items = rows
            grouped.setdefault(kind, []).extend(items)
        if refused:
            grouped.setdefault("dead_letters", []).extend(refused)
        attempt = 0
        while grouped:
            try:
                self._commit(grouped)
                break
            except Exception as exc:  # noqa: BLE001 - sorted below: retried, or isolated row by row
                self.write_errors += 1
                self.last_write_error = f"{type(exc).__name__}: {exc}"[:500]
                self._rollback()
                if not _transient(exc):
                    try:
                        grouped, bad = self._isolate(grouped)
                    except Exception as again:  # noqa: BLE001 - the database went away meanwhile: retry it all
                        self._rollback()
                        exc = again
                    else:
                        bad_keys = {(r[0], r[1]) for r in bad}
                        ingested = [i for i in ingested if (i.device, i.seq) not in bad_keys]
                        break
                # a locked or restarting database: retry, never drop the batch (the acks wait with it)
                time.sleep(min(5.0, 0.1 * 2**attempt))
                attempt += 1
        self.rows_written += sum(len(rows) for rows in grouped.values())
        self.batches += 1
        if self.on_commit is not None and ingested:
            self.on_commit(ingested, time.time())
        for ack in acks:
            try:
                ack()
            except Exception:  # noqa: BLE001 - a failed acknowledgement is the broker's redelivery, not ours to fix
                log.exception("acknowledging a committed batch failed")
        for event in events:
            event.set()

    def _commit(self, grouped: dict[str, list]) -> None:
        cur = self._wconn.cursor()
        for kind, rows in grouped.items():
            bulk = self.bulk.get(kind) if self.dialect == "postgresql" and len(rows) > 1 else None  # Bulk
            if bulk is None:
                cur.executemany(self._sql(self.statements[kind]), rows)
                continue
            if bulk.prepare:
                cur.execute(bulk.prepare)
            with cur.copy(f"COPY {bulk.table} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(bulk.types)
                for row in rows:
                    copy.write_row(row)
            if bulk.finish:
                cur.execute(bulk.finish)
        self._wconn.commit()

    def _rollback(self) -> None:
        try:
            self._wconn.rollback()
        except Exception:  # noqa: BLE001 - the connection itself is gone: open a new one
            try:
                self._wconn = self._connect()
            except StoreError:
                pass

    def _isolate(self, grouped: dict[str, list]) -> tuple[dict[str, list], list[tuple]]:
        """One savepoint per row: rows the database refuses become dead letters, the rest commit together.
        Returns what was written and the refused history rows. Transient errors propagate (retry all)."""
        if self.dialect == "sqlite" and not self._wconn.in_transaction:
            self._wconn.execute("BEGIN")  # else the outermost SAVEPOINT would be the transaction, one per row
        cur = self._wconn.cursor()
        written: dict[str, list] = {}
        bad_history: list[tuple] = []
        letters: list[tuple] = []
        for kind, rows in grouped.items():
            for row in rows:
                cur.execute("SAVEPOINT one_row")
                try:
                    cur.execute(self._sql(self.statements[kind]), row)
                except Exception as exc:  # noqa: BLE001 - classified just below
                    if _transient(exc):
                        raise
                    cur.execute("ROLLBACK TO SAVEPOINT one_row")
                    self.rows_refused += 1
                    log.warning("history writer: the database refused a %s row (%s): dead-lettered", kind, exc)
                    if kind == "history":
                        bad_history.append(row)
                    if kind != "dead_letters":  # our own dead-letter rows are bounded; one refused is dropped
                        letters.append(self._refused_row(kind, row, exc))
                    continue
                cur.execute("RELEASE SAVEPOINT one_row")
                written.setdefault(kind, []).append(row)
        for letter in letters:
            cur.execute(self._sql(UPSERT["dead_letters"]), letter)
        written.setdefault("dead_letters", []).extend(letters)
        self._wconn.commit()
        return written, bad_history

    def _refused_row(self, kind: str, row: Any, exc: Exception) -> tuple:
        if isinstance(row, Ingested):
            self.rows_refused += 1
        body = repr(row).encode("utf-8", "replace")
        return dead_letter_row(f"history-writer/{kind}", body, f"refused by the history writer: "
                               f"{type(exc).__name__}: {exc}", int(time.time() * 1000))

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
                          f"seq {order} LIMIT ?", (device, start_ms, end_ms, limit if limit is not None else
                                                   None if self.dialect == "postgresql" else -1))  # no limit
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
        """The newest first; `payload` is the first DEAD_LETTER_EXCERPT_BYTES of the message (`truncated` says
        whether there was more), `size` its full length and `sha256` its hash."""
        rows = self.query("SELECT id, received_ms, topic, payload, reason, size, sha256 FROM dead_letters "
                          "ORDER BY id DESC LIMIT ?", (limit,))
        out = []
        for r in rows:
            excerpt = bytes(r[3]) if r[3] is not None else b""
            size = r[5] if r[5] is not None else len(excerpt)
            out.append({"id": r[0], "received_ms": r[1], "topic": r[2],
                        "payload": excerpt.decode("utf-8", "replace") if r[3] is not None else None,
                        "reason": r[4], "size": size, "sha256": r[6], "truncated": size > len(excerpt)})
        return out

    def count(self, table: str) -> int:
        if table not in ("history", "dead_letters", "alarms", "work_orders"):  # the name goes into the SQL
            raise ValueError(f"no table {table!r} to count")
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
