"""A dynamic batcher: requests queue, batches close on size or wait, results go back per request.

The policy (`collect`) is separate from the worker thread so that its contracts can be tested with
a fake clock: a batch closes when the queued rows reach the current size limit, when its oldest
request has waited `max_wait_s`, or at once when the worker is idle and the request is alone
(nobody is delayed to wait for company that may never come). A request past its deadline is
answered with `DeadlineExceeded` and never computed. A full queue refuses new work with
`QueueFull`, which carries a Retry-After estimate. The size limit adapts to load within
[min_batch_size, max_batch_size]: it doubles when a full batch leaves work behind and halves when a
batch computes for longer than `target_batch_latency_s`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatcherConfig:
    min_batch_size: int = 5  # floor of the adaptive limit: the seed's 5-128 range
    max_batch_size: int = 128  # ceiling: past ~128 rows a CPU forward stops getting cheaper per row
    initial_batch_size: int = 32  # start mid-range; the limit finds its level within a few batches
    max_wait_s: float = 0.004  # longest a request waits for company; ~ one small-batch forward on CPU
    max_queue_rows: int = 2048  # beyond this, waiting longer helps nobody: reject with 503
    target_batch_latency_s: float = 0.05  # a batch computing longer than this halves the limit
    default_timeout_s: float | None = 2.0  # deadline of a request that names none; None = no deadline

    def __post_init__(self) -> None:
        assert 1 <= self.min_batch_size <= self.max_batch_size, "need 1 <= min_batch_size <= max_batch_size"
        assert self.min_batch_size <= self.initial_batch_size <= self.max_batch_size, \
            "initial_batch_size must lie within [min_batch_size, max_batch_size]"
        assert self.max_wait_s >= 0, "max_wait_s must be >= 0"
        assert self.max_queue_rows >= 1, "max_queue_rows must be >= 1"
        assert self.target_batch_latency_s > 0, "target_batch_latency_s must be > 0"


class QueueFull(Exception):
    """The queue holds `max_queue_rows`; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could be computed."""


@dataclass
class Request:
    inputs: Any
    rows: int
    enqueued: float
    deadline: float | None
    future: Future = field(default_factory=Future)


@dataclass
class BatchReport:
    """What one batch did, for metrics: rows, each request's queue time, compute seconds."""

    rows: int
    requests: int
    queue_seconds: list[float]
    compute_seconds: float
    limit: int  # the size limit in force when the batch closed
    failed: bool = False


class DynamicBatcher:
    """Batch requests for `run_batch(list_of_inputs) -> list_of_results` (one result per input).

    Args:
        run_batch: the model call; gets the requests' inputs in arrival order and must return
            one result per input, in the same order. An exception fails that batch's requests.
        config: BatcherConfig.
        clock: monotonic seconds; tests pass a fake one.
        on_batch: called with a BatchReport after each batch (metrics).
        on_expired: called with the number of requests dropped for their deadline.
        initializer: called once in the worker thread before it takes work (as ThreadPoolExecutor's):
            per-thread runtime settings, such as torch's intra-op thread count, which OpenMP and
            MKL keep per OS thread, so a value set in the thread that loaded the model does not
            reach the worker.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, config: BatcherConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 on_expired: Callable[[int], None] | None = None,
                 initializer: Callable[[], None] | None = None) -> None:
        self.run_batch = run_batch
        self.config = config or BatcherConfig()
        self.clock = clock
        self.on_batch = on_batch
        self.on_expired = on_expired
        self.initializer = initializer
        self._queue: deque[Request] = deque()
        self._queued_rows = 0
        self._busy = False
        self._limit = self.config.initial_batch_size
        self._rows_per_second = 0.0  # EWMA of throughput, for Retry-After
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the queue -------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The current batch size limit, in rows."""
        return self._limit

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, inputs: Any, *, rows: int = 1, timeout_s: float | None = None) -> Future:
        """Queue one request of `rows` rows; returns a Future of its result.

        Raises QueueFull when the queue cannot take `rows` more rows. `timeout_s` (or the
        config's default) sets the deadline from now.
        """
        assert rows >= 1, "a request has at least one row"
        with self._cond:
            if self._queued_rows + rows > self.config.max_queue_rows:
                raise QueueFull(self.retry_after_s())
            now = self.clock()
            timeout = self.config.default_timeout_s if timeout_s is None else timeout_s
            request = Request(inputs, rows, now, None if timeout is None else now + timeout)
            self._queue.append(request)
            self._queued_rows += rows
            self._cond.notify()
        return request.future

    def retry_after_s(self) -> float:
        """Seconds until the current backlog is likely served (at least 1 s, as HTTP counts)."""
        if self._rows_per_second <= 0:
            return 1.0
        return max(1.0, self._queued_rows / self._rows_per_second)

    # --- the policy ------------------------------------------------------------------------

    def collect(self) -> list[Request] | float | None:
        """Decide at clock(): the requests of the next batch, else seconds to wait, else None (empty).

        Expired requests are removed and failed with DeadlineExceeded on the way.
        """
        now = self.clock()
        self._expire(now)
        if not self._queue:
            return None
        oldest = self._queue[0]
        lone_and_idle = len(self._queue) == 1 and not self._busy
        if self._queued_rows >= self._limit or lone_and_idle or now - oldest.enqueued >= self.config.max_wait_s:
            return self._take()
        wait = oldest.enqueued + self.config.max_wait_s - now
        soonest_deadline = min((r.deadline for r in self._queue if r.deadline is not None), default=None)
        if soonest_deadline is not None:
            wait = min(wait, max(0.0, soonest_deadline - now))
        return wait

    def _expire(self, now: float) -> None:
        kept: deque[Request] = deque()
        expired = 0
        for request in self._queue:
            if request.deadline is not None and now >= request.deadline:
                self._queued_rows -= request.rows
                request.future.set_exception(DeadlineExceeded(
                    f"deadline passed after {now - request.enqueued:.3f} s in the queue"))
                expired += 1
            else:
                kept.append(request)
        if expired:
            self._queue = kept
            if self.on_expired:
                self.on_expired(expired)

    def _take(self) -> list[Request]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows  # a request larger than the limit still goes, alone
        while self._queue and rows + self._queue[0].rows <= self._limit:
            request = self._queue.popleft()
            batch.append(request)
            rows += request.rows
        self._queued_rows -= rows
        return batch

    def _adapt(self, rows: int, seconds: float) -> None:
        cfg = self.config
        if seconds > cfg.target_batch_latency_s and self._limit > cfg.min_batch_size:
            self._limit = max(cfg.min_batch_size, self._limit // 2)
        elif rows >= self._limit and self._queued_rows > 0:
            self._limit = min(cfg.max_batch_size, self._limit * 2)
        if seconds > 0:
            rate = rows / seconds
            self._rows_per_second = rate if self._rows_per_second == 0 else 0.8 * self._rows_per_second + 0.2 * rate

    # --- running ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Run one batch if the policy says one is ready; returns the number of requests run."""
        with self._cond:
            decision = self.collect()
            if not isinstance(decision, list):
                return 0
            self._busy = True
            limit = self._limit
        self._execute(decision, limit)
        return len(decision)

    def _execute(self, batch: list[Request], limit: int) -> None:
        started = self.clock()
        queue_seconds = [started - r.enqueued for r in batch]
        failed = False
        try:
            results = self.run_batch([r.inputs for r in batch])
            assert len(results) == len(batch), f"run_batch returned {len(results)} results for {len(batch)} inputs"
        except Exception as error:  # noqa: BLE001 - the error belongs to the requests, not the worker
            failed = True
            for request in batch:
                request.future.set_exception(error)
        else:
            for request, result in zip(batch, results, strict=True):
                request.future.set_result(result)
        seconds = self.clock() - started
        rows = sum(r.rows for r in batch)
        with self._cond:
            self._busy = False
            self._adapt(rows, seconds)
        if self.on_batch:
            self.on_batch(BatchReport(rows, len(batch), queue_seconds, seconds, limit, failed))

    def _worker(self) -> None:
        if self.initializer is not None:
            self.initializer()
        while True:
            with self._cond:
                while True:
                    if self._stopping and not self._queue:
                        return
                    decision = self.collect()
                    if isinstance(decision, list):
                        self._busy = True
                        limit = self._limit
                        break
                    self._cond.wait(timeout=decision)  # None: until a submit notifies
            self._execute(decision, limit)

    def start(self) -> DynamicBatcher:
        assert self._thread is None, "batcher already started"
        self._stopping = False
        self._thread = threading.Thread(target=self._worker, name="dynamic-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Serve what is queued, then stop the worker."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> DynamicBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
