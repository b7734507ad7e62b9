"""`moeworks twin serve --workers N`: N twin worker processes (twin/scaleout/worker.py) kept running.

A process supervisor rather than a pool: each worker is the same `twin serve` command with
`--worker-id k`, so it parses, checks and serves exactly as a worker an operator starts by hand.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading

from twin.scaleout.worker import ScaleOutError

log = logging.getLogger(__name__)


class WorkerSupervisor:
    """`moeworks twin serve --workers N`: N worker processes (the same command, with --worker-id k and
    --http-port base+k), each restarted if it dies, all stopped together."""

    def __init__(self, *, argv: list[str], workers: int, http_port: int, restart_delay_s: float = 1.0):
        self.argv, self.workers, self.http_port = argv, workers, http_port
        self.restart_delay_s = restart_delay_s
        self.processes: dict[int, subprocess.Popen] = {}
        self.restarts = 0
        self._stop = threading.Event()

    def command(self, k: int) -> list[str]:
        return [sys.executable, "-m", "deploy.cli", *self.argv, "--worker-id", str(k),
                "--http-port", str(self.http_port + k)]

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.is_set():
                for k in range(self.workers):
                    process = self.processes.get(k)
                    if process is None or process.poll() is not None:
                        if process is not None:
                            if process.returncode == 2:  # a mistake in the command: restarting repeats it
                                raise ScaleOutError(f"worker {k} refused its command (exit 2)")
                            self.restarts += 1
                            log.warning("worker %d exited with %s: restarting it", k, process.returncode)
                        self.processes[k] = subprocess.Popen(self.command(k))
                self._stop.wait(self.restart_delay_s)
        except KeyboardInterrupt:
            pass
        finally:
            for process in self.processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in self.processes.values():
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
