"""`moeworks twin demo` with its learned health models on, as a person runs it: 60 s through the
built-in broker with no traceback (no amqtt `Timeout waiting for PUBACK` storm), ingest-to-state p99
under 250 ms on this 2-core machine, and the dashboard live in headless Chromium within 5 s."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.twin.api.test_dashboard import CHROMIUM, Browser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_the_demo_with_health_models_holds_for_a_minute(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}  # one line per message, URL unwrapped
    proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "twin", "demo", "--out", str(tmp_path / "demo"),
                             "--duration", "60", "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url = None
    try:
        for line in proc.stdout:  # the models train first (seconds), then the demo prints its address
            lines.append(line)
            found = re.search(r"twin dashboard: (http://127\.0\.0\.1:\d+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the demo printed no dashboard address:\n" + "".join(lines[-40:])
        rest = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        rest.start()
        time.sleep(5)  # the edge agents are born and stream
        browser = Browser()
        try:
            opened = time.monotonic()
            browser.call("Page.navigate", url=url)
            feed = None
            while time.monotonic() - opened < 5.0 and feed != "live":
                time.sleep(0.2)
                feed = browser.call("Runtime.evaluate", expression="(document.getElementById('k-feed') || "
                                    "{}).textContent")["result"].get("value")
            live_after_s = time.monotonic() - opened
        finally:
            browser.close()
        assert feed == "live", f"the dashboard's feed is {feed!r} {live_after_s:.1f} s after opening"
        proc.wait(timeout=180)
        rest.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Timeout waiting for PUBACK" not in output, output[-3000:]
    summary = json.loads(lines[-1])
    stats = summary["stats"]
    assert stats["counters"].get("health_dropped", 0) == 0 and stats["counters"].get("health_error", 0) == 0
    sources = {a["health"]["source"] for a in summary["assets"] if a["health"]}
    assert sources == {"rul-model", "ai4i-model"}, "the learned models scored the assets"
    assert summary["history_rows"] == stats["counters"]["ingested"] > 1000
    assert all(agent["spool_depth"] == 0 for agent in summary["agents"].values()), "every message delivered"
    p99, load = stats["state_latency_ms"]["p99"], os.getloadavg()[0]
    if p99 >= 250 and load > 2 * (os.cpu_count() or 1):
        # the whole demo (edges, broker, twin, models) is one process: with the cores shared four ways and
        # more, the 250 ms target for a 2-core machine is not what is being measured
        pytest.skip(f"publish-to-state p99 {p99:.0f} ms under a load average of {load:.1f}")
    assert p99 < 250, stats


def test_slow_health_models_never_hold_up_ingestion_and_their_backlog_is_bounded(tmp_path):
    from tests.services import free_port
    from twin.service import TwinConfig, TwinService

    release = threading.Event()
    scored = []

    class SlowModel:  # a learned model stuck in a long call: 'inline' is not set, so it runs off the MQTT path
        def update(self, machine, values):
            release.wait(10)
            scored.append(values["torque"])
            return None

    service = TwinService(config=TwinConfig(broker_port=free_port(), db=str(tmp_path / "twin.db"), health_queue=5),
                          health_models={"mill": SlowModel()}).start()
    try:
        stamp = int(time.time() * 1000)
        topic = "spBv1.0/plant1/DDATA/edge-mill-1/mill-1"
        messages = [(topic, json.dumps({"timestamp": stamp, "seq": s % 256, "serial": s, "metrics": [
            {"name": "torque", "value": float(s)}]}).encode()) for s in range(50)]
        service.ingest_many(messages[:1])
        deadline = time.monotonic() + 5
        while service.stats()["health_backlog"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the model thread took the first scoring and is stuck in it
        started = time.monotonic()
        service.ingest_many(messages[1:])
        assert time.monotonic() - started < 2.0, "ingestion did not wait for the model"
        stats = service.stats()
        assert stats["counters"]["ingested"] == 50 and service.state.devices["mill-1"].values["torque"] == 49.0
        assert stats["health_backlog"] == 5 and stats["counters"]["health_dropped"] == 50 - 5 - 1
        release.set()
        service.wait_health(10)
        assert scored == [0.0, *[float(s) for s in range(1, 6)]], "the first scoring and the queued five, in order"
        assert service.stats()["health_backlog"] == 0
    finally:
        release.set()
        service.stop()
