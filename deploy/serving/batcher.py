"""A dynamic batcher: requests queue, batches close on size or wait, results go back per request.

The policy (`collect`) is separate from the worker thread so that its contracts can be tested with
a fake clock: a batch closes when the queued rows reach the current size limit, when its oldest
request has waited `max_wait_s`, or at once when the worker is idle and the request is alone
(nobody is delayed to wait for company that may never come). A request past its deadline is
answered with `DeadlineExceeded` and never computed. A full queue refuses new work with
`QueueFull`, which carries a Retry-After estimate. The size limit adapts to load within
[min_batch_size, max_batch_size]: it doubles when a full batch leaves work behind and halves when a
batch computes for longer than `target_batch_latency_s`.

Admission control (as Triton's queue policy, but by time rather than by count): a request is
admitted only when the work ahead of it plus its own can still finish before its deadline. The
estimate comes from the batches measured so far, a batch costing `fixed + rows * per_row` seconds
(an exponentially weighted least-squares fit), so it follows the machine's real speed under load.
A request that cannot make it is refused at once with `Overloaded` (a 503 with Retry-After),
instead of queueing and failing late: the requests that are admitted then keep their deadlines.
"""

from __future__ import annotations

import math
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
    # Admit a request only if its estimated finish lies within this share of its time budget: the
    # rest is left for what the estimate does not see (answer serialisation, the event loop, the
    # network). 0 turns admission control off (only max_queue_rows bounds the queue).
    admission_headroom: float = 0.8

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch_size <= self.max_batch_size:
            raise ValueError("need 1 <= min_batch_size <= max_batch_size")
        if not self.min_batch_size <= self.initial_batch_size <= self.max_batch_size:
            raise ValueError("initial_batch_size must lie within [min_batch_size, max_batch_size]")
        if not self.max_wait_s >= 0:
            raise ValueError("max_wait_s must be >= 0")
        if self.max_queue_rows < 1:
            raise ValueError("max_queue_rows must be >= 1")
        if not self.target_batch_latency_s > 0:
            raise ValueError("target_batch_latency_s must be > 0")
        if self.default_timeout_s is not None and not 0 < self.default_timeout_s <= 3600:
            raise ValueError("default_timeout_s must be in (0, 3600] seconds or None")
        if not 0 <= self.admission_headroom <= 1:
            raise ValueError("admission_headroom must be in [0, 1]")


class QueueFull(Exception):
    """The queue holds `max_queue_rows`; try again after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class Overloaded(QueueFull):
    """Admission control: the work ahead would not finish before this request's deadline."""

    def __init__(self, retry_after_s: float, expected_s: float, budget_s: float) -> None:
        Exception.__init__(self, f"overloaded: about {expected_s:.2f} s of work ahead, deadline in {budget_s:.2f} s")
        self.retry_after_s = retry_after_s
        self.expected_s = expected_s
        self.budget_s = budget_s


class ServiceTime:
    """Seconds a batch of `rows` takes, `fixed + rows * per_row`, fitted by exponentially weighted
    least squares over the batches seen (recent batches count most: the machine's load drifts)."""

    def __init__(self, *, decay: float = 0.95) -> None:
        self.decay = decay
        self._n = self._x = self._y = self._xx = self._xy = 0.0

    @property
    def known(self) -> bool:
        return self._n > 0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self._n = d * self._n + 1
        self._x = d * self._x + rows
        self._y = d * self._y + seconds
        self._xx = d * self._xx + rows * rows
        self._xy = d * self._xy + rows * seconds

    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds per batch, seconds per row), both >= 0."""
        if self._n <= 0:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._n, self._y / self._n
        var = self._xx / self._n - mean_x * mean_x
        if var <= 1e-9 * max(1.0, mean_x * mean_x):  # one batch size seen so far: all of it per row
            return 0.0, mean_y / max(mean_x, 1.0)
        slope = (self._xy / self._n - mean_x * mean_y) / var
        fixed = mean_y - slope * mean_x
        if slope < 0 or fixed < 0:  # noise on a few points: fall back to the mean cost per row
            return 0.0, mean_y / max(mean_x, 1.0)
        return fixed, slope

    def seconds(self, rows: float, batch_limit: int, *, max_batches: int | None = None) -> float:
        """Time to serve `rows` rows in batches of at most `batch_limit` rows (and at most
        `max_batches` batches: one request is never split)."""
        if rows <= 0:
            return 0.0
        fixed, per_row = self.coefficients()
        batches = math.ceil(rows / max(1, batch_limit))
        if max_batches is not None:
            batches = max(1, min(batches, max_batches))
        return batches * fixed + rows * per_row


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
        self._busy_rows = 0  # rows of the batch being computed
        self._busy_since = 0.0
        self._limit = self.config.initial_batch_size
        self.service_time = ServiceTime()  # measured batch cost, for admission control and Retry-After
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

    def submit(self, inputs: Any, *, rows: int = 1, timeout_s: float | None = None,
               received: float | None = None) -> Future:
        """Queue one request of `rows` rows; returns a Future of its result.

        Raises QueueFull when the queue cannot take `rows` more rows, and Overloaded (a QueueFull)
        when the work ahead and its own would not finish before its deadline. `timeout_s` (or the
        config's default) sets the deadline from `received` (clock() seconds; default now): a
        server passes the request's arrival, so the time spent reading and parsing counts.
        """
        if rows < 1:
            raise ValueError("a request has at least one row")
        with self._cond:
            if self._queued_rows + rows > self.config.max_queue_rows:
                raise QueueFull(self.retry_after_s())
            now = self.clock()
            deadline = self._admit(rows, timeout_s, received, now)
            request = Request(inputs, rows, now, deadline)
            self._queue.append(request)
            self._queued_rows += rows
            self._cond.notify()
        return request.future

    def check_admission(self, rows: float, *, timeout_s: float | None = None, received: float | None = None) -> None:
        """Raise Overloaded if a request of about `rows` rows would be refused now (a server asks
        before parsing a body, from its size, so that a refusal costs almost nothing)."""
        with self._cond:
            self._admit(rows, timeout_s, received, self.clock())

    def _admit(self, rows: float, timeout_s: float | None, received: float | None, now: float) -> float | None:
        """The request's deadline, or Overloaded when the work ahead and its own would miss it."""
        start = now if received is None else min(received, now)
        timeout = self.config.default_timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout is None else start + timeout
        if deadline is not None and self.config.admission_headroom > 0:
            expected = self._expected_finish_s(rows, now)
            budget = deadline - now
            if expected > budget * self.config.admission_headroom:
                raise Overloaded(self.retry_after_s(), expected, budget)
        return deadline

    def expected_wait_s(self, rows: int = 0) -> float:
        """Estimated seconds until `rows` more rows, queued now behind the backlog, are computed."""
        with self._cond:
            return self._expected_finish_s(rows, self.clock())

    def _expected_finish_s(self, rows: float, now: float) -> float:
        if not self.service_time.known:  # nothing measured yet: only the queue bound applies
            return 0.0
        busy_left = 0.0
        if self._busy:
            busy_left = max(0.0, self.service_time.seconds(self._busy_rows, self._limit) - (now - self._busy_since))
        # A request larger than the limit runs alone, so there are at most as many batches as requests.
        return busy_left + self.service_time.seconds(self._queued_rows + rows, self._limit,
                                                     max_batches=len(self._queue) + 1)

    def observe(self, rows: int, seconds: float) -> None:
        """Feed a measured batch (warm-up, or a batch run outside the worker) to the service-time fit."""
        with self._cond:
            self.service_time.observe(rows, seconds)

    def retry_after_s(self) -> float:
        """Seconds until the current backlog is likely served (at least 1 s, as HTTP counts)."""
        if not self.service_time.known:
            return 1.0
        return max(1.0, self.service_time.seconds(self._queued_rows, self._limit))

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
        self.service_time.observe(rows, seconds)

    # --- running ---------------------------------------------------------------------------

    def run_once(self) -> int:
        """Run one batch if the policy says one is ready; returns the number of requests run."""
        with self._cond:
            decision = self.collect()
            if not isinstance(decision, list):
                return 0
            self._mark_busy(decision)
            limit = self._limit
        self._execute(decision, limit)
        return len(decision)

    def _mark_busy(self, batch: list[Request]) -> None:
        self._busy = True
        self._busy_rows = sum(r.rows for r in batch)
        self._busy_since = self.clock()

    def _execute(self, batch: list[Request], limit: int) -> None:
        started = self.clock()
        queue_seconds = [started - r.enqueued for r in batch]
        failed = False
        try:
            results = self.run_batch([r.inputs for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} inputs")
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
            self._busy_rows = 0
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
                        self._mark_busy(decision)
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
