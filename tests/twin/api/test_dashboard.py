"""The live dashboard in headless Chromium: a screenshot the test inspects, and the rendered DOM."""

import base64
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.edge.agent import EdgeAgent, EdgeConfig
from deploy.edge.sources import SimulatedEngine, SimulatedMill
from deploy.rollout_lab import make_keys
from deploy.twin_demo import HttpServer
from tests.services import Mosquitto
from twin.api.app import create_app
from twin.auth import TokenStore, create_token
from twin.rollout.manager import RolloutConfig, RolloutManager
from twin.service import TwinConfig, TwinService

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol: open a page, let it run, screenshot it."""

    def __init__(self):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--remote-debugging-port=0"]
        self.proc = subprocess.Popen([CHROMIUM, *flags, "about:blank"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            found = re.search(r"DevTools listening on ws://127.0.0.1:(\d+)/", line)
            if found or time.monotonic() > deadline:
                break
        assert found, "chromium did not start its DevTools endpoint"
        port = found.group(1)
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        from websockets.sync.client import connect

        self.ws = connect([p for p in pages if p["type"] == "page"][0]["webSocketDebuggerUrl"], max_size=2**26)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def close(self):
        self.ws.close()
        self.proc.kill()
        self.proc.wait()


def near(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(image[..., :3].astype(int) - rgb).max(axis=-1) <= tol).sum())


def evaluate(browser: Browser, expression: str):
    return browser.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
@pytest.mark.parametrize("auth", [False, True], ids=["loopback-no-login", "bearer-token"])
def test_dashboard_shows_live_assets_health_alarms_and_trend(tmp_path, auth):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed")
    token = create_token(tmp_path / "tokens.json", role="operator", name="olga") if auth else None
    tokens = TokenStore.load(tmp_path / "tokens.json") if auth else None
    with Mosquitto(workdir=tmp_path / "mosquitto") as broker:
        service = TwinService(config=TwinConfig(broker_port=broker.port, db=str(tmp_path / "twin.db"),
                                                client_id="twin-dashboard")).start()
        # rollouts on: the page lists each edge node's model (none here: the agents run without one)
        rollouts = RolloutManager(config=RolloutConfig(folder=tmp_path / "rollouts", base_url="http://127.0.0.1:1",
                                                       publisher_key=make_keys(tmp_path / "keys")[1]), service=service)
        http = HttpServer(create_app(service, stream_max_s=5, tokens=tokens, rollouts=rollouts)).start()
        stop = threading.Event()
        agents = [EdgeAgent(config=EdgeConfig(port=broker.port, node=node, device=device, rate_hz=100,
                                              spool=tmp_path / f"{node}.spool"), source=source)
                  for node, device, source in (("edge-mill-1", "mill-1", SimulatedMill(seed=2)),
                                               ("edge-cell-1", "engine-1", SimulatedEngine(seed=2, life_cycles=5000)))]
        threads = [threading.Thread(target=a.run, args=(stop,)) for a in agents]
        try:
            service.wait_connected()
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while service.state.devices["mill-1"].messages < 150 and time.monotonic() < deadline:
                time.sleep(0.05)
            browser = Browser()
            try:
                browser.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1,
                             mobile=False)
                browser.call("Page.navigate", url=http.url)
                if auth:
                    time.sleep(1.5)
                    login_shown = evaluate(browser, "getComputedStyle(document.getElementById('login')).display")
                    assert login_shown == "flex", "without a token the page asks for one"
                    assert evaluate(browser, "document.getElementById('lines').children.length") == 0, "no data yet"
                    # sign in as a person would: type the token into the form and submit it
                    evaluate(browser, f"document.getElementById('login-token').value = {json.dumps(token)}; "
                                      "document.getElementById('login-form').requestSubmit(); true")
                time.sleep(4)  # page loads, fetches, opens its event stream, draws the trend
                shot = tmp_path / "dashboard.png"
                shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
                dom = evaluate(browser, "document.documentElement.outerHTML")
                feed = evaluate(browser, "document.getElementById('k-feed').textContent")
                who = evaluate(browser, "document.getElementById('who').textContent")
                edge_models = evaluate(browser, "document.getElementById('edge-models').innerText")
                urls = evaluate(browser, "JSON.stringify([location.href, ...performance.getEntriesByType('resource')"
                                         ".map(e => e.name)])")
                if auth:  # the operator acknowledges an alarm from the page; the twin records who did
                    evaluate(browser, "document.querySelector('#alarms button').click(); true")
                    time.sleep(1.0)
            finally:
                browser.close()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=20)
            http.stop()
            rollouts.stop()
            acknowledged = [a for a in service.store.alarms() if a.acked_ms is not None]
            service.stop()
    assert feed == "live", "the page follows the server-sent event stream"
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (900, 1400)
    assert near(image, (0x22, 0xC5, 0x5E)) > 300, "green ONLINE pills and borders of live assets"
    assert near(image, (0x38, 0xBD, 0xF8)) > 200, "the health trend line (and the selected card's outline)"
    assert near(image, (0xF5, 0x9E, 0x0B)) > 100, "the sensor trend line"
    # the rendered page: assets by line, live state and health from the twin
    for text in ("Engine test cells", "Milling line", "mill-1", "engine-1", "ONLINE", "failure risk"):
        assert text in dom, text
    assert "Digital twin" in dom or "digital twin" in dom
    assert "Edge models" in dom and all(node in edge_models for node in ("edge-mill-1", "edge-cell-2")), edge_models
    if auth:
        assert "olga (operator)" in who
        # every URL the page loaded (the feed, still open, is not listed yet): none holds the token
        assert "/api/whoami" in urls and token not in urls and token.split("_")[-1] not in urls
        assert [(a.acked_by, a.acked_role) for a in acknowledged] == [("olga", "operator")]
    else:
        assert who == "" and not acknowledged
