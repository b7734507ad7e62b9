"""Work orders for a MES: when an asset needs maintenance, POST a JSON work order to a configured
URL, retried with backoff until the MES accepts it (2xx), and append it to a CSV file.

Orders live in the history store first (status pending), so a restart resends what was not yet
accepted. A 4xx other than 408/429 is still retried (the MES may be misconfigured for a while),
but the error is kept on the order so an operator sees it.
"""

from __future__ import annotations

import csv
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from twin.domain.alarms import Alarm
from twin.store.history import HistoryStore, WorkOrder

CSV_FIELDS = ("id", "created_utc", "device", "line", "kind", "priority", "reason", "alarm_id")


@dataclass(frozen=True)
class MESConfig:
    url: str | None = None            # None: CSV and the store only
    csv_path: Path | None = None
    timeout_s: float = 5.0            # one POST; a MES slower than this is treated as down
    backoff_s: float = 0.5            # first retry delay, doubled each time...
    max_backoff_s: float = 60.0       # ...up to a minute: a MES back from maintenance gets orders within a minute


class WorkOrderExporter:
    def __init__(self, *, config: MESConfig, store: HistoryStore):
        self.config = config
        self.store = store
        self._pending: list[WorkOrder] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.delivered = 0

    def start(self) -> WorkOrderExporter:
        if self.config.url:
            with self._cv:
                self._pending.extend(self.store.work_orders(status="pending"))
            self._thread = threading.Thread(target=self._loop, name="twin-mes", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def order_for(self, alarm: Alarm, *, line: str, now_ms: int) -> WorkOrder:
        """Create, store, write to CSV and queue the work order an alarm asks for."""
        priority = "urgent" if alarm.kind == "failure_risk" and (alarm.value or 0) > 0.9 else "high"
        body = {"work_order_id": f"WO-{uuid.uuid4().hex[:10].upper()}", "asset_id": alarm.device, "line": line,
                "type": "predictive_maintenance", "trigger": alarm.kind, "priority": priority,
                "reason": alarm.message, "alarm_id": alarm.id, "value": alarm.value,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000))}
        order = WorkOrder(body["work_order_id"], alarm.device, alarm.id, now_ms, body,
                          status="pending" if self.config.url else "csv_only")
        self.store.put_work_order(order)
        if self.config.csv_path is not None:
            self._append_csv(body)
        if self.config.url:
            with self._cv:
                self._pending.append(order)
                self._cv.notify_all()
        return order

    def _append_csv(self, body: dict) -> None:
        path = Path(self.config.csv_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({"id": body["work_order_id"], "created_utc": body["created_utc"],
                             "device": body["asset_id"], "line": body["line"], "kind": body["trigger"],
                             "priority": body["priority"], "reason": body["reason"], "alarm_id": body["alarm_id"]})

    def _loop(self) -> None:
        delay = 0.0
        with httpx.Client(timeout=self.config.timeout_s) as client:
            while True:
                with self._cv:
                    self._cv.wait_for(lambda: self._stop or self._pending, timeout=1.0)
                    if self._stop:
                        return
                    if not self._pending:
                        continue
                    order = self._pending[0]
                order.attempts += 1
                try:
                    response = client.post(self.config.url, content=json.dumps(order.body),
                                           headers={"Content-Type": "application/json",
                                                    "Idempotency-Key": order.id})
                    accepted = 200 <= response.status_code < 300
                    order.last_error = None if accepted else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    accepted, order.last_error = False, f"{type(exc).__name__}: {exc}"
                if accepted:
                    order.status, order.delivered_ms = "delivered", int(time.time() * 1000)
                    self.delivered += 1
                    delay = 0.0
                    with self._cv:
                        self._pending.pop(0)
                else:
                    delay = min(self.config.max_backoff_s, max(self.config.backoff_s, delay * 2))
                self.store.put_work_order(order)
                if accepted:
                    continue
                with self._cv:  # a stop request cuts the backoff short
                    self._cv.wait_for(lambda: self._stop, timeout=delay)

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)
