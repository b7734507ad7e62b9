"""History store on a real SQLite file and a real PostgreSQL server; ETL to Parquet; MES export."""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from twin.domain.alarms import Alarm
from twin.domain.health import Health
from twin.domain.state import Ingested
from twin.store.etl import run_etl
from twin.store.history import HistoryStore
from twin.store.mes import MESConfig, WorkOrderExporter

DAY = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000  # a UTC midnight


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, database_url):
    s = HistoryStore(database_url(request.param, f"t{os.getpid()}_{abs(hash(request.node.name)) % 10**8}")).start()
    yield s
    s.close()


def item(device, seq, ts, **values):
    return Ingested(device, seq, ts, ts + 5, values, True, Health(failure_prob=0.1 * (seq % 3)))


def test_history_is_idempotent_batched_and_queryable(store):
    for seq in range(500):
        store.put_history(item("m1", seq, DAY + seq * 1000, torque=40.0 + seq % 7, product_type="L"))
    for seq in range(0, 500, 7):  # redelivered messages
        store.put_history(item("m1", seq, DAY + seq * 1000, torque=0.0))
    store.flush()
    assert store.count("history") == 500
    assert store.batches < 100, "rows are written in batches, not one transaction each"
    assert store.seqs("m1") == list(range(500))
    rows = store.history("m1", start_ms=DAY + 10_000, end_ms=DAY + 20_000)
    assert [r["seq"] for r in rows] == list(range(10, 20)) and rows[0]["values"]["torque"] == 43.0
    assert [r["seq"] for r in store.history("m1", limit=3, latest=True)] == [497, 498, 499]
    assert [r["seq"] for r in store.history("m1", limit=None)] == list(range(500))  # no limit, either database
    assert store.last_seqs() == {"m1": 499} and store.has("m1", 3) and not store.has("m1", 500)


def test_dead_letters_alarms_and_work_orders_persist(store):
    store.put_dead_letters([("spBv1.0/g/DDATA/n/m", b"\xff{bad", "malformed JSON", DAY)])
    alarm = Alarm("a1", "m1", "limit_high", "torque", "medium", "torque high", 75.0, DAY)
    store.put_alarm(alarm)
    alarm.cleared_ms = DAY + 1
    store.put_alarm(alarm)
    store.flush()
    dead = store.dead_letters()
    assert dead[0]["reason"] == "malformed JSON" and dead[0]["topic"].endswith("/m")
    [row] = store.alarms()
    assert row.state == "CLEARED_UNACK" and [a.id for a in store.open_alarms()] == ["a1"]


def test_etl_writes_daily_parquet_aggregates(store, tmp_path):
    for seq in range(48):  # two days, one message per hour
        store.put_history(item("m1", seq, DAY + seq * 3_600_000, torque=float(seq)))
    store.flush()
    files = run_etl(store, tmp_path / "daily")
    assert [f.name for f in files] == [f"{pd.Timestamp(DAY, unit='ms').date()}.parquet",
                                       f"{pd.Timestamp(DAY + 86_400_000, unit='ms').date()}.parquet"]
    day1 = pd.read_parquet(files[0]).set_index("metric")
    assert day1.loc["torque", "count"] == 24 and day1.loc["torque", "mean"] == pytest.approx(11.5)
    assert day1.loc["torque", "first"] == 0 and day1.loc["torque", "last"] == 23
    assert day1.loc["failure_prob", "max"] == pytest.approx(0.2)
    assert run_etl(store, tmp_path / "daily") == files  # idempotent: the same files again


class FlakyMES(BaseHTTPRequestHandler):
    refusals = 2
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FlakyMES.received.append((self.headers["Idempotency-Key"], body))
        code = 503 if len(FlakyMES.received) <= FlakyMES.refusals else 201
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_work_orders_are_retried_until_the_mes_accepts_and_written_to_csv(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyMES)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = HistoryStore(tmp_path / "twin.db").start()
    csv = tmp_path / "work_orders.csv"
    mes = WorkOrderExporter(config=MESConfig(url=f"http://127.0.0.1:{server.server_port}/orders", csv_path=csv,
                                             backoff_s=0.05), store=store).start()
    try:
        alarm = Alarm("a1", "mill-1", "failure_risk", "failure_prob", "high", "failure probability 0.95", 0.95, DAY)
        order = mes.order_for(alarm, line="line-mills", now_ms=DAY)
        for _ in range(200):
            if mes.delivered:
                break
            threading.Event().wait(0.02)
    finally:
        mes.stop()
        server.shutdown()
    store.flush()
    [saved] = store.work_orders()
    assert mes.delivered == 1 and saved.status == "delivered" and saved.attempts == 3
    assert [key for key, _ in FlakyMES.received] == [order.id] * 3, "the same order, with its idempotency key"
    assert FlakyMES.received[0][1]["asset_id"] == "mill-1" and FlakyMES.received[0][1]["priority"] == "urgent"
    rows = pd.read_csv(csv)
    assert rows["id"].tolist() == [order.id] and rows["device"].tolist() == ["mill-1"]
    store.close()


def test_a_row_the_database_refuses_is_dead_lettered_and_never_blocks_the_others(store):
    now = 1_765_000_000_000
    good = [Ingested("mill-1", s, now, now, {"torque": 1.0}, True, None) for s in range(3)]
    poison = Ingested("mill-1", 2**70, 2**80, now, {"torque": 1.0}, True, None)  # no 64-bit column holds it
    store.put_history_many([good[0], poison, good[1]])
    store.put_history_many([good[2]])
    store.flush(timeout=20)
    assert store.seqs("mill-1") == [0, 1, 2]
    assert store.rows_refused == 1
    (letter,) = store.dead_letters()
    assert letter["topic"] == "history-writer/history" and "refused by the history writer" in letter["reason"]
    assert letter["size"] == len(letter["payload"].encode()) and len(letter["sha256"]) == 64
    store.put_history_many([Ingested("mill-1", 3, now, now, {}, True, None)])
    store.flush(timeout=20)
    assert store.seqs("mill-1") == [0, 1, 2, 3], "the writer goes on after it"


def test_count_refuses_a_table_it_does_not_keep(tmp_path):
    store = HistoryStore(tmp_path / "twin.db").start()
    try:
        with pytest.raises(ValueError, match="no table"):
            store.count("history; DROP TABLE history")
        assert store.count("history") == 0
    finally:
        store.close()


def test_a_batch_of_mixed_health_figures_is_written_whole(store):
    """PostgreSQL writes a batch as one statement of arrays (twin.store.history.PG_BULK): health figures that are
    ints, floats and missing in one batch go in together, without a refused batch written again row by row."""
    now = 1_765_000_000_000
    figures = [Health(rul=125), Health(rul=80.5, failure_prob=0.25), None, Health(failure_prob=1)]
    store.put_history_many([Ingested("engine-1", s, now + s, now + s, {"s2": 641.8 + s, "mode": "a\u00e9"}, s % 2 == 0,
                                     h) for s, h in enumerate(figures)])
    store.flush(timeout=20)
    assert store.write_errors == 0 and store.rows_refused == 0
    rows = store.history("engine-1")
    assert [(r["seq"], r["rul"], r["failure_prob"], r["in_order"], r["values"]["s2"]) for r in rows] == [
        (0, 125.0, None, True, 641.8), (1, 80.5, 0.25, False, 642.8), (2, None, None, True, 643.8),
        (3, None, 1.0, False, 644.8)]
