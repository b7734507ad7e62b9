"""Edge agent -> real Mosquitto -> twin: exactly-once history, broker restart, killed agent, spool."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.sources import SimulatedMill
from deploy.edge.spool import Spool
from tests.polling import wait_for
from twin.service import TwinConfig, TwinService

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def twin(broker, tmp_path):
    service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(tmp_path / "twin.db"),
                                            client_id=f"twin-{tmp_path.name}")).start()
    service.wait_connected()
    yield service
    service.stop()


def agent(broker, tmp_path, *, rows, rate=400.0, node="edge-mill-1", device="mill-1"):
    return EdgeAgent(config=EdgeConfig(port=broker.port, node=node, device=device, rate_hz=rate, keepalive_s=2,
                                       spool=tmp_path / f"{node}.spool", backoff_max_s=0.5),
                     source=SimulatedMill(seed=3, rows=rows))


def test_spool_keeps_order_and_counters_across_restarts(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    seqs = [spool.append("d", "t", lambda seq: str(seq).encode()) for _ in range(5)]
    assert seqs == [0, 1, 2, 3, 4] and spool.next_counter("bdSeq") == 0
    pending = spool.pending()
    spool.acknowledge([pending[0][0], pending[2][0]])
    spool.close()
    again = Spool(tmp_path / "s.spool")
    assert [p[2] for p in again.pending()] == [b"1", b"3", b"4"] and again.first_pending_seq("d") == 1
    assert again.append("d", "t", lambda seq: b"") == 5 and again.next_counter("bdSeq") == 1


def test_every_message_arrives_once_in_order(broker, twin, tmp_path):
    stats = agent(broker, tmp_path, rows=300).run()
    assert stats["produced"] == stats["acknowledged"] == 300 and stats["spool_depth"] == 0
    wait_for(lambda: twin.committed >= 300, what="history")
    twin.store.flush()
    assert twin.store.seqs("mill-1") == list(range(300))
    wait_for(lambda: not twin.state.devices["mill-1"].online, what="clean death certificate")


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(broker, twin, tmp_path):
    stop = threading.Event()
    edge = agent(broker, tmp_path, rows=1200, rate=300.0)
    result = {}
    thread = threading.Thread(target=lambda: result.update(edge.run(stop)))
    thread.start()
    wait_for(lambda: twin.state.devices["mill-1"].messages > 150, what="first messages")
    broker.restart(down_s=1.0)  # the agent spools while the broker is away
    thread.join(timeout=60)
    assert result["produced"] == 1200 and result["spool_depth"] == 0 and result["sessions"] >= 2
    wait_for(lambda: twin.store.count("history") >= 1200 or twin.committed >= 1200, timeout=30, what="backlog")
    twin.store.flush()
    assert twin.store.seqs("mill-1") == list(range(1200)), "every message once, in order"
    node = twin.state.nodes["edge-mill-1"]
    assert node.bd_seq >= 1, "the agent came back with a new bdSeq"


def test_killed_agent_goes_offline_by_its_will_and_comes_back(broker, twin, tmp_path):
    cmd = [sys.executable, "-m", "deploy.cli", "edge", "run", "--source", "sim-mill", "--rate", "50",
           "--port", str(broker.port), "--node", "edge-mill-2", "--device", "mill-2",
           "--spool", str(tmp_path / "m2.spool"), "--duration", "60"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: twin.state.devices["mill-2"].messages > 20, what="agent online")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        wait_for(lambda: not twin.state.devices["mill-2"].online, timeout=10, what="death certificate")
        assert any(a.kind == "offline" and a.device == "mill-2" for a in twin.open_alarms())
        first_session = twin.state.nodes["edge-mill-2"].bd_seq
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: twin.state.devices["mill-2"].online, what="rebirth")
        assert twin.state.nodes["edge-mill-2"].bd_seq == first_session + 1
        wait_for(lambda: not any(a.kind == "offline" and a.cleared_ms is None and a.device == "mill-2"
                                 for a in twin.open_alarms()), what="offline alarm cleared")
        seen = twin.state.devices["mill-2"].messages
        wait_for(lambda: twin.state.devices["mill-2"].messages > seen + 20, what="data after restart")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    twin.store.flush()
    seqs = twin.store.seqs("mill-2")
    assert seqs == list(range(len(seqs))), "the spool resumed where the killed agent stopped, no duplicates"
    assert twin.state.counters["gap"] == 0
