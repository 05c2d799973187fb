"""The worker pool's supervision, with stand-in worker processes (`tests.support.standin_worker`)
that die on the records told to kill them: a dead worker's instance is retired in the store
before its record runs anywhere again, its record goes on in the worker's replacement, and a
record that kills every worker it meets still ends, in the service's own process, after three
tries. The real workers' crashes, against the real broker and store, are in
`tests/integration/test_workers.py`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.workload import until
from voucher_bridge.kafka.records import Record
from voucher_bridge.settings import Settings
from voucher_bridge.workers import WorkerPool
from voucher_bridge.workers.wire import WireRecord


def _record(value: bytes, key: bytes = b"till-1") -> WireRecord:
    """A record of the commands topic, as the service hands it to a worker."""
    return WireRecord("pos.commands", 0, 0, 0, key, value, ())


@dataclass
class _Service:
    """What the pool asks of the service: retiring a dead worker's instance, and running a
    record in its own process. Each is noted with its (monotonic) time."""

    log: Path
    retired: list[tuple[float, str]] = field(default_factory=list)
    ran_here: list[tuple[float, bytes | None]] = field(default_factory=list)

    async def retire(self, instance: str) -> None:
        self.retired.append((time.monotonic(), instance))

    async def run_here(self, record: Record) -> None:
        self.ran_here.append((time.monotonic(), record.value))

    def runs(self, value: str) -> list[tuple[float, str]]:
        """When, and in which worker's instance, each try of the record `value` began."""
        found = []
        for line in self.log.read_text().splitlines():
            at, instance, got = line.split(" ", 2)
            if got == value:
                found.append((float(at), instance))
        return found


@pytest.fixture
async def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Service:
    log = tmp_path / "received.log"
    log.touch()
    monkeypatch.setenv("STANDIN_WORKER_LOG", str(log))
    return _Service(log)


PoolFactory = Callable[..., Awaitable[WorkerPool]]


@pytest.fixture
async def make_pool(service: _Service) -> AsyncIterator[PoolFactory]:
    started: list[WorkerPool] = []

    async def make(**options: float) -> WorkerPool:
        workers = WorkerPool(
            Settings(),
            2,
            in_process=service.run_here,
            retire=service.retire,
            worker_module="tests.support.standin_worker",
            **{"start_timeout_s": 30.0, **options},
        )
        await workers.start()
        started.append(workers)
        return workers

    yield make
    for workers in started:
        await workers.stop()


@pytest.fixture
async def pool(make_pool: PoolFactory) -> WorkerPool:
    return await make_pool()


def _ready(pool: WorkerPool) -> Callable[[], Awaitable[bool]]:
    async def ready() -> bool:
        return pool.ready()

    return ready


def _other_worker(pool: WorkerPool, record: WireRecord) -> WireRecord:
    """A record of another key, which another worker runs."""
    for n in range(100):
        other = _record(b"ok", key=f"till-{n}".encode())
        if pool.index_of(other) != pool.index_of(record):
            return other
    raise AssertionError("no key of the other worker")


async def test_a_record_whose_worker_dies_goes_on_in_the_replacement_once_it_is_retired(
    pool: WorkerPool, service: _Service
) -> None:
    record = _record(b"kills-one-worker")
    await asyncio.wait_for(pool.process(record), 30)
    (died_at, dead), (again_at, replacement) = service.runs("kills-one-worker")
    assert replacement != dead
    # The dead worker's instance was retired (its claims a dead instance's, so that the
    # replacement resumes them through the store) before the record ran again.
    assert [instance for _, instance in service.retired] == [dead]
    assert died_at < service.retired[0][0] < again_at
    assert not service.ran_here
    await until(_ready(pool), 30, "the replacement worker ready")


async def test_a_record_that_kills_every_worker_still_ends_in_the_services_process(
    pool: WorkerPool, service: _Service
) -> None:
    record = _record(b"kills-every-worker")
    await asyncio.wait_for(pool.process(record), 60)
    tries = service.runs("kills-every-worker")
    assert len(tries) == 3 and len({instance for _, instance in tries}) == 3
    # Each dead worker was retired before the next try, the last before the service's own.
    assert [instance for _, instance in service.retired] == [i for _, i in tries]
    next_tries = [at for at, _ in tries[1:]] + [service.ran_here[0][0]]
    assert all(r < n for (r, _), n in zip(service.retired, next_tries, strict=True))
    assert [value for _, value in service.ran_here] == [b"kills-every-worker"]
    # The other worker was never touched, and the one replaced is up again.
    other = _other_worker(pool, record)
    await asyncio.wait_for(pool.process(other), 30)
    assert [value for _, value in service.ran_here] == [b"kills-every-worker"]
    await until(_ready(pool), 30, "the replacement worker ready")


async def test_a_worker_whose_loop_stops_is_killed_and_its_record_goes_on(
    make_pool: PoolFactory, service: _Service
) -> None:
    pool = await make_pool(silent_after_s=2.5)
    await asyncio.sleep(4)  # idle, saying only that it is alive: not killed
    assert not service.retired
    await asyncio.wait_for(pool.process(_record(b"freezes-once")), 30)
    (_, frozen), (_, replacement) = service.runs("freezes-once")
    assert [instance for _, instance in service.retired] == [frozen] != [replacement]
    assert not service.ran_here


async def test_a_replacement_that_never_gets_ready_is_killed_and_replaced(
    make_pool: PoolFactory, service: _Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_WORKER_HANG_ONCE", "1")
    pool = await make_pool(start_timeout_s=3.0)
    await asyncio.wait_for(pool.process(_record(b"kills-one-worker")), 30)
    assert len(service.runs("kills-one-worker")) == 2
    assert service.log.with_suffix(".hung").exists()
    await until(_ready(pool), 30, "the pool ready, its hung worker replaced")


async def test_a_message_that_cannot_be_read_is_a_lost_worker(
    pool: WorkerPool, service: _Service
) -> None:
    await asyncio.wait_for(pool.process(_record(b"garbles-once")), 30)
    (_, garbled), (_, replacement) = service.runs("garbles-once")
    assert [instance for _, instance in service.retired] == [garbled] != [replacement]
    assert not service.ran_here


async def test_a_record_given_up_by_the_service_is_cancelled_in_its_worker(
    pool: WorkerPool, service: _Service
) -> None:
    running = asyncio.create_task(pool.process(_record(b"runs-until-cancelled")))
    await until(_ran(service, "runs-until-cancelled"), 10, "the record in its worker")
    running.cancel()
    await until(_ran(service, "cancelled:runs-until-cancelled"), 10, "the cancel in its worker")
    assert running.cancelled()
    assert not service.retired  # the worker lives on


def _ran(service: _Service, value: str) -> Callable[[], Awaitable[bool]]:
    async def ran() -> bool:
        return bool(service.runs(value))

    return ran
