"""Store and forward on the edge device's disk: an SQLite outbox every data message goes through.

A message is written (with its serial, in the column `seq`) before it is published and deleted only
when the broker acknowledges it (PUBACK, QoS 1). After a crash or a lost connection everything still
in the outbox is sent again in the order it was made, so nothing is lost; the twin drops what it
already has by (device, serial). The serial and bdSeq counters live in the same file, so they survive
restarts. Sparkplug's seq is not stored: the agent stamps it on a message when it publishes it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, seq INTEGER NOT NULL,
                                   topic TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Spool:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process; WAL keeps it consistent
        self._db.executescript(SCHEMA)
        self._counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]  # kept in memory after this

    def counter(self, name: str) -> int:
        """The last value handed out (-1 if none yet)."""
        return self._counters.get(name, -1)

    def next_counter(self, name: str) -> int:
        value = self._counters.get(name, -1) + 1
        self._db.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                         (name, value))
        self._counters[name] = value
        return value

    def append(self, device: str, topic: str, make_payload) -> int:
        """Give the next serial of `device` to `make_payload(serial) -> bytes` and store the message; returns the
        serial."""
        self._db.execute("BEGIN")
        try:
            seq = self.next_counter(f"seq:{device}")
            self._db.execute("INSERT INTO outbox (device, seq, topic, payload) VALUES (?, ?, ?, ?)",
                             (device, seq, topic, make_payload(seq)))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._counters[f"seq:{device}"] -= 1
            raise
        self._depth += 1
        return seq

    def pending(self, *, after_id: int = 0, limit: int = 500) -> list[tuple[int, str, bytes]]:
        """(id, topic, payload) not yet acknowledged, oldest first, with id > after_id."""
        return self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                (after_id, limit)).fetchall()

    def first_pending_seq(self, device: str) -> int | None:
        row = self._db.execute("SELECT MIN(seq) FROM outbox WHERE device = ?", (device,)).fetchone()
        return row[0]

    def acknowledge(self, ids: list[int]) -> None:
        if ids:
            self._db.execute("BEGIN")
            cur = self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self._db.execute("COMMIT")
            self._depth -= cur.rowcount

    def depth(self) -> int:
        return self._depth

    def close(self) -> None:
        self._db.close()
