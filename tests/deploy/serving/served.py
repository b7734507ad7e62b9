"""`moeworks serve --model MODEL ...` under gunicorn on a free loopback port, for the tests that start a server."""

import os
import subprocess
import sys
import time

import httpx

from tests.services import free_port


class Served:
    """`module`: what runs `serve` (deploy.cli, or benchmarks.serving_models with its own family)."""

    def __init__(self, model, *extra, module="deploy.cli", ready_s=180):
        self.port, self.ready_s = free_port(), ready_s
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        self.process = subprocess.Popen([sys.executable, "-m", module, "serve", "--model", str(model), "--port",
                                         str(self.port), "--max-wait-ms", "5", *extra],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self):
        deadline = time.monotonic() + self.ready_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read().decode()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {self.ready_s} s")

    def post(self, body, **kwargs):
        return httpx.post(f"{self.url}/v1/predict", json=body, timeout=60, **kwargs)

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait(timeout=30)
