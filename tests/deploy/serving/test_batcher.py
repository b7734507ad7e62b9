"""Contracts of the dynamic batcher, driven by a fake clock (no sleeping, no threads) and one real run."""

import threading
import time

import pytest

from deploy.serving.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, QueueFull


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """run_batch that doubles its inputs and records the batches it saw (advancing the fake clock)."""

    def __init__(self, clock: FakeClock | None = None, seconds: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.clock, self.seconds = clock, seconds

    def __call__(self, inputs):
        self.batches.append(list(inputs))
        if self.clock:
            self.clock.advance(self.seconds)
        return [2 * x for x in inputs]


def make(clock, **overrides):
    config = BatcherConfig(**{"min_batch_size": 5, "max_batch_size": 128, "initial_batch_size": 8,
                              "max_wait_s": 0.01, "max_queue_rows": 64, "default_timeout_s": None, **overrides})
    run = Recorder()
    return DynamicBatcher(run, config=config, clock=clock), run


def test_lone_request_runs_at_once_when_idle():
    clock = FakeClock()
    batcher, run = make(clock)
    future = batcher.submit(21)
    assert batcher.run_once() == 1  # no time has passed: it did not wait for company
    assert future.result(timeout=0) == 42
    assert run.batches == [[21]]


def test_batch_waits_up_to_max_wait_then_closes():
    clock = FakeClock()
    batcher, run = make(clock)
    batcher.submit(1)
    batcher.submit(2)
    decision = batcher.collect()
    assert decision == pytest.approx(0.01)  # two requests: wait for more, at most max_wait
    clock.advance(0.004)
    assert batcher.run_once() == 0
    clock.advance(0.006)
    assert batcher.run_once() == 2
    assert run.batches == [[1, 2]]


def test_batch_closes_at_size_limit_and_keeps_order():
    clock = FakeClock()
    batcher, run = make(clock)
    futures = [batcher.submit(i) for i in range(19)]
    assert batcher.run_once() == 8  # limit 8 reached: no waiting
    assert run.batches == [list(range(8))]
    assert batcher.limit == 16  # a full batch left work behind: the limit doubled
    assert batcher.run_once() == 0  # 11 rows < 16 and nobody has waited max_wait yet
    clock.advance(0.01)
    while batcher.run_once():
        pass
    assert [f.result(timeout=0) for f in futures] == [2 * i for i in range(19)]
    assert [x for batch in run.batches for x in batch] == list(range(19))  # arrival order kept


def test_limit_adapts_to_load_within_bounds():
    clock = FakeClock()
    batcher, _ = make(clock, max_queue_rows=10_000)
    for i in range(2000):
        batcher.submit(i)
    sizes = []
    while batcher.queued_rows:
        clock.advance(0.01)
        batcher.run_once()
        sizes.append(batcher.limit)
    assert max(sizes) == 128, "a backlog grows the limit to the ceiling"
    slow = Recorder(clock, seconds=1.0)  # every batch now takes longer than the latency target
    batcher.run_batch = slow
    for i in range(500):
        batcher.submit(i)
    while batcher.queued_rows:
        clock.advance(0.01)
        batcher.run_once()
    assert batcher.limit == 5, "slow batches shrink the limit to the floor, never below"


def test_expired_request_is_answered_with_error_not_computed():
    clock = FakeClock()
    batcher, run = make(clock)
    late = batcher.submit(1, timeout_s=0.002)
    on_time = batcher.submit(2, timeout_s=1.0)
    clock.advance(0.02)
    assert batcher.run_once() == 1
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=0)
    assert on_time.result(timeout=0) == 4
    assert run.batches == [[2]]


def test_full_queue_rejects_with_retry_after():
    clock = FakeClock()
    batcher, _ = make(clock, max_queue_rows=6)
    for i in range(3):
        batcher.submit(i, rows=2)
    with pytest.raises(QueueFull) as info:
        batcher.submit(99)
    assert info.value.retry_after_s >= 1.0


def test_failed_batch_fails_its_requests_only():
    clock = FakeClock()

    def broken(inputs):
        raise ValueError("model exploded")

    batcher = DynamicBatcher(broken, config=BatcherConfig(default_timeout_s=None), clock=clock)
    future = batcher.submit(1)
    batcher.run_once()
    with pytest.raises(ValueError, match="exploded"):
        future.result(timeout=0)


def test_worker_thread_serves_concurrent_clients_with_their_own_results():
    seen = []

    def run(inputs):
        seen.append(len(inputs))
        time.sleep(0.002)
        return [x * 10 for x in inputs]

    results = {}
    with DynamicBatcher(run, config=BatcherConfig(max_wait_s=0.002)) as batcher:
        def client(i):
            results[i] = batcher.submit(i).result(timeout=5)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: i * 10 for i in range(64)}
    assert max(seen) > 1, "concurrent requests shared a forward pass"


def test_initializer_runs_once_in_the_worker_thread_before_any_batch():
    events = []

    def run(inputs):
        events.append(("batch", threading.current_thread().name))
        return inputs

    def initializer():
        events.append(("init", threading.current_thread().name))

    with DynamicBatcher(run, config=BatcherConfig(max_wait_s=0.0), initializer=initializer) as batcher:
        assert [batcher.submit(i).result(timeout=5) for i in range(3)] == [0, 1, 2]
    assert events == [("init", "dynamic-batcher")] + [("batch", "dynamic-batcher")] * 3


def test_service_time_fit_recovers_fixed_and_per_row_cost():
    from deploy.serving.batcher import ServiceTime

    fit = ServiceTime()
    for rows in (1, 8, 32, 128, 4, 64):
        fit.observe(rows, 0.002 + rows * 0.0005)
    fixed, per_row = fit.coefficients()
    assert fixed == pytest.approx(0.002, rel=1e-6) and per_row == pytest.approx(0.0005, rel=1e-6)
    assert fit.seconds(300, 128) == pytest.approx(3 * 0.002 + 300 * 0.0005)


def test_admission_refuses_a_request_the_backlog_would_make_late():
    from deploy.serving.batcher import Overloaded

    clock = FakeClock()
    batcher, _ = make(clock, max_queue_rows=10_000, max_batch_size=8, initial_batch_size=8)
    for _ in range(5):
        batcher.observe(8, 0.1)  # measured: 8 rows per 0.1 s
    for _ in range(10):
        batcher.submit(0, rows=8, timeout_s=100)  # 80 rows ahead: about 1 s of work
    assert batcher.expected_wait_s(1) == pytest.approx(81 * 0.1 / 8)  # one batch size seen: cost per row
    with pytest.raises(Overloaded) as refused:
        batcher.submit(0, rows=1, timeout_s=0.5)
    assert refused.value.expected_s > 0.5 and refused.value.retry_after_s >= 1.0
    batcher.submit(0, rows=1, timeout_s=2.0)  # ~1 s of work fits 0.8 x 2 s: admitted
    clock.advance(0.3)  # time already spent since arrival counts against the deadline
    with pytest.raises(Overloaded):
        batcher.submit(0, rows=1, timeout_s=1.5, received=clock.now - 0.3)


def test_without_measurements_only_the_queue_bound_applies():
    clock = FakeClock()
    batcher, _ = make(clock)
    batcher.submit(0, rows=8, timeout_s=0.001)  # nothing measured yet: admitted
    assert batcher.expected_wait_s(1) == 0.0
