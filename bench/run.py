"""`make bench`: voucher-bridge against Confluent's Parallel Consumer (the JVM peer), a naive
FastStream subscriber and a bare aiokafka loop, on the real broker and the eVOUCHER sandbox,
under the same load.

    uv run python -m bench.run [--quick] [--out bench/results] [--strict] [--keep]

What it does (bench/README.md says why):

1. starts (or reuses) the broker (`tests.support.kafka.ensure_kafka`) and one eVOUCHER sandbox
   whose seed generates 1,000 terminals with deterministic tokens;
2. for each partition count P, for each system (voucher-bridge, parallel-consumer, naive,
   bare; the peer built with Maven first, `bench.peer`, or skipped without Java or Maven): fresh
   command and result topics with P partitions and a fresh consumer group, the system started
   as its own process and warmed up (every terminal's first command answered before anything
   is timed);
   then for each sandbox latency (`POST /_sandbox/faults {"latency_ms": …}`) and terminal count
   K, a burst of N commands produced as fast as the producer goes, timed from each command's
   send to its result's arrival;
3. at the target scenario (20 ms, 100 terminals, 1 partition), voucher-bridge, the peer and the
   bare loop again at a paced rate of half voucher-bridge's measured maximum there, for the latency
   target;
4. prints one table and the target checks, writes `<out>/<mode>-<UTC time>.json` (every figure,
   the machine) and `.png` (throughput per scenario and system).

Throughput = results received / (last result's arrival - first command's send). Latency =
arrival - send, p50/p95/p99 over the run's commands. CPU = each system's CPU time per command,
over its whole process tree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bench import peer as parallel_consumer
from bench.common import Command, commands, sandbox_seed, terminals, warmup_commands
from tests.support.kafka import create_topic, ensure_kafka, unique_topic
from voucher_sandboxes.localstack import Process, free_port, start_sandbox, start_service

ROOT = Path(__file__).resolve().parents[1]

VB, PEER, NAIVE, BARE = "voucher-bridge", "parallel-consumer", "naive", "bare"
# voucher-bridge as shipped (WORKERS unset: a worker process per core, at most 4; 2 here) and
# with its commands in its own process (WORKERS=1): what the workers give one partition.
VB_ONE = "vb-1-worker"
# The same peer with as many worker threads (so calls, and connections, at once) as
# voucher-bridge's connection bound: the two side by side at the same upstream concurrency.
# The targets are against the peer as a new user would run it (PEER); this one is stated.
PEER_BOUNDED = "pc-bounded"
SYSTEMS = (VB, VB_ONE, PEER, PEER_BOUNDED, NAIVE, BARE)
VOUCHER_BRIDGES = (VB, VB_ONE)
PEERS = (PEER, PEER_BOUNDED)
# The peer's KEY-ordered concurrency (Parallel Consumer's maxConcurrency: worker threads, each
# making its call with a blocking HttpClient.send, so up to as many connections).
PEER_MAX_CONCURRENCY = 100
# voucher-bridge's EVOUCHER_MAX_CONNECTIONS and the bare loop's concurrency. The production
# default, 10, is also the fastest here: httpx's pool (httpcore 1.0.9) costs CPU per request
# that grows with the pool size (bench/README.md: the bare loop makes 303/s with 10, 251/s with
# 20, 179/s with 50 and 105/s with 200 at 0 ms), and 10 calls at once already cover
# 10 / 20 ms = 500 calls/s, more than one Python process makes here.
MAX_CONNECTIONS = 10
# Where the targets are checked.
TARGET_LATENCY_MS, TARGET_TERMINALS, TARGET_PARTITIONS = 20, 100, 1
PACED_PAUSE_S = 2.0


# --- plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    latency_ms: int
    terminals: int
    partitions: int

    @property
    def label(self) -> str:
        return f"{self.latency_ms}ms K={self.terminals} P={self.partitions}"


@dataclass(frozen=True)
class Plan:
    mode: str
    latencies: tuple[int, ...]
    terminal_counts: tuple[int, ...]
    partition_counts: tuple[int, ...]
    n_fast: int  # voucher-bridge, the peer and bare, per burst
    n_fast_ordered_bound: int  # ... at 20 ms with 10 terminals (10 lanes: ≤ ~450/s by design)
    n_naive_0ms: int
    n_naive_slow: int  # naive with latency: one record at a time, ≈ 35/s
    paced_s: float
    warmup_terminals: int
    # Then an untimed burst of this many commands over those terminals (all but naive): the
    # JVM's JIT compiles the peer's hot paths (its first burst costs about twice the CPU per
    # command otherwise), and every other system gets the same.
    warmup_burst: int

    def n(self, system: str, s: Scenario) -> int:
        if system == NAIVE:
            return self.n_naive_0ms if s.latency_ms == 0 else self.n_naive_slow
        if s.latency_ms > 0 and s.terminals <= 10:
            return self.n_fast_ordered_bound
        return self.n_fast


FULL = Plan(
    mode="full",
    latencies=(0, 20),
    terminal_counts=(10, 100, 1000),
    partition_counts=(1, 6),
    n_fast=1500,
    n_fast_ordered_bound=1000,
    n_naive_0ms=400,
    n_naive_slow=120,
    paced_s=6.0,
    warmup_terminals=1000,
    warmup_burst=2000,
)
QUICK = Plan(
    mode="quick",
    latencies=(0, 20),
    terminal_counts=(100,),
    partition_counts=(1,),
    n_fast=1000,
    n_fast_ordered_bound=1000,
    n_naive_0ms=250,
    n_naive_slow=80,
    paced_s=4.0,
    warmup_terminals=100,
    warmup_burst=2000,
)


# --- figures -------------------------------------------------------------------------------------


@dataclass
class Run:
    system: str
    scenario: Scenario
    kind: str  # "burst" (as fast as possible) or "paced"
    n: int
    status: str = "ok"  # ok | timeout | crashed | skipped | wrong (answers the load never gets)
    received: int = 0
    rate_offered: float | None = None  # paced: commands/s sent
    produce_s: float = 0.0  # first send → last send
    duration_s: float = 0.0  # first send → last arrival
    throughput: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    # CPU time per command (ms) of each process, and how busy the machine was (of all cores).
    cpu_ms_per_command: dict[str, float] = field(default_factory=dict)
    machine_busy: float | None = None
    other_cores: float | None = None  # CPU used outside the benchmark's processes, in cores
    # With --samples: [ms since the run's first send, latency ms] per command, in send order.
    samples: list[tuple[float, float]] | None = None

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        data["scenario"] = asdict(self.scenario)
        return data


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarise(
    run: Run, sent: dict[str, int], arrivals: dict[str, int], samples: bool = False
) -> None:
    latencies = sorted((arrivals[i] - t) / 1e6 for i, t in sent.items() if i in arrivals)
    run.received = len(latencies)
    first_send, last_send = min(sent.values()), max(sent.values())
    run.produce_s = (last_send - first_send) / 1e9
    if samples:
        run.samples = [
            (round((t - first_send) / 1e6, 3), round((arrivals[i] - t) / 1e6, 3))
            for i, t in sent.items()
            if i in arrivals
        ]
    if latencies:
        last_arrival = max(arrivals[i] for i in sent if i in arrivals)
        run.duration_s = (last_arrival - first_send) / 1e9
        run.throughput = run.received / run.duration_s if run.duration_s > 0 else math.nan
        run.latency_ms = {
            "min": latencies[0],
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "p99.9": percentile(latencies, 99.9),
            "max": latencies[-1],
            "mean": sum(latencies) / len(latencies),
        }


# --- CPU accounting ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads


def _tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of `pid` and every process below it (all threads), counting children that
    have already exited and been waited for (cutime + cstime): a JVM, a launcher and its child,
    or a service with worker processes, measured the same way."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        child = int(proc.name)
        children.setdefault(int(fields[1]), []).append(child)
        cpu[child] = sum(int(v) for v in fields[11:15]) / _TICK  # utime stime cutime cstime
    if pid not in cpu:
        return None
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += cpu.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


def listening_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:`port` (the broker), from /proc; None if not ours to
    see."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
    return None


class CpuMeter:
    """CPU seconds used by named processes (those in `trees` with everything below them), and
    by the whole machine, between two points."""

    def __init__(self, pids: dict[str, int | None], trees: frozenset[str] = frozenset()) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid}
        self._trees = trees
        self._start: dict[str, float] = {}
        self._machine: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self._start = {
            name: cpu
            for name, pid in self._pids.items()
            if (cpu := self._cpu(name, pid)) is not None
        }
        self._machine = _machine_cpu()

    def stop(self, commands: int) -> tuple[dict[str, float], float, float]:
        """CPU ms per command of each process; the machine's busy fraction (of all cores);
        and the cores used by everything else (other processes on the machine, the kernel)."""
        used_s = {}
        for name, before in self._start.items():
            after = self._cpu(name, self._pids[name])
            if after is not None:
                used_s[name] = after - before
        busy, total = _machine_cpu()
        busy_s, total_s = busy - self._machine[0], max(total - self._machine[1], 1e-9)
        wall_s = total_s / (os.cpu_count() or 1)
        per_command = {k: v * 1000 / max(commands, 1) for k, v in used_s.items()}
        # "consumer" is a part of "system", not counted twice.
        others = max(0.0, busy_s - sum(v for k, v in used_s.items() if k != "consumer")) / wall_s
        return per_command, busy_s / total_s, others

    def _cpu(self, name: str, pid: int) -> float | None:
        return _tree_cpu_s(pid) if name in self._trees else _process_cpu_s(pid)


# --- Kafka side ----------------------------------------------------------------------------------

_COMMAND_ID = re.compile(rb'"command_id"\s*:\s*"([^"]+)"')
# The load's commands succeed (bill totals) or are rejected (scans of unknown vouchers); any
# other answer (failed, indeterminate, command_expired) means the run did not measure the work.
_UNEXPECTED = re.compile(rb'"outcome":\s*"(?:failed|indeterminate)"|"reason":\s*"command_expired"')


class ResultsReader:
    """Reads a results topic from the start, without a group, and notes each command's first
    result's arrival (monotonic ns)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        self.arrivals: dict[str, int] = {}
        self.unexpected = 0  # results the load never gets (see _UNEXPECTED)
        self._expected: set[str] = set()
        self._missing = 0
        self._complete = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            now = time.monotonic_ns()
            for records in batches.values():
                for record in records:
                    found = _COMMAND_ID.search(record.value or b"")
                    if found is None:
                        continue
                    command_id = found.group(1).decode()
                    if command_id in self.arrivals:
                        continue  # a republished result: the first one counts
                    self.arrivals[command_id] = now
                    if _UNEXPECTED.search(record.value or b""):
                        self.unexpected += 1
                    if command_id in self._expected:
                        self._missing -= 1
            if self._expected and self._missing <= 0:
                self._complete.set()

    def expect(self, ids: set[str]) -> None:
        self._expected = ids
        self._missing = len(ids - self.arrivals.keys())
        self._complete.clear()
        if self._missing == 0:
            self._complete.set()

    async def wait(self, timeout_s: float, alive: Callable[[], bool]) -> str:
        deadline = time.monotonic() + timeout_s
        while not self._complete.is_set():
            if not alive():
                return "crashed"
            if time.monotonic() > deadline:
                return "timeout"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._complete.wait(), 0.5)
        return "wrong" if self.unexpected else "ok"


class Load:
    """The POS side: produces commands (acks=all), as fast as it can or at a fixed rate."""

    def __init__(self, bootstrap: str) -> None:
        # Bursts batch (linger 5 ms); paced runs send each command at once (linger 0), so that
        # the producer's own wait does not count as latency.
        self._burst = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
        self._paced = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)

    async def start(self) -> None:
        await self._burst.start()
        await self._paced.start()

    async def stop(self) -> None:
        await self._burst.stop()
        await self._paced.stop()

    async def burst(self, topic: str, batch: list[Command]) -> dict[str, int]:
        sent: dict[str, int] = {}
        pending = []
        for i, c in enumerate(batch):
            sent[c.id] = time.monotonic_ns()
            pending.append(
                await self._burst.send(topic, value=c.value, key=c.key, headers=c.headers)
            )
            if i % 200 == 199:
                await asyncio.sleep(0)  # let the results reader run
        await asyncio.gather(*pending)
        return sent

    async def paced(self, topic: str, batch: list[Command], rate: float) -> dict[str, int]:
        sent: dict[str, int] = {}
        pending = []
        interval_ns = 1e9 / rate
        start = time.monotonic_ns()
        for i, c in enumerate(batch):
            wait_ns = start + i * interval_ns - time.monotonic_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            sent[c.id] = time.monotonic_ns()
            pending.append(
                await self._paced.send(topic, value=c.value, key=c.key, headers=c.headers)
            )
        await asyncio.gather(*pending)
        return sent


# --- the systems ---------------------------------------------------------------------------------


class System:
    """One system under test on its own topics, as its own process."""

    def __init__(
        self,
        name: str,
        bootstrap: str,
        sandbox_url: str,
        partitions: int,
        workdir: Path,
        max_connections: int,
        command: list[str] | None = None,  # the peer's (bench.peer)
    ) -> None:
        self.name = name
        self.max_connections = max_connections
        self.command = command
        self.bootstrap = bootstrap
        self.sandbox_url = sandbox_url
        self.partitions = partitions
        self.workdir = workdir
        tag = {
            VB: "vb",
            VB_ONE: "vb1",
            PEER: "pc",
            PEER_BOUNDED: "pcb",
            NAIVE: "naive",
            BARE: "bare",
        }[name]
        self.commands = unique_topic(f"bench.{tag}.p{partitions}.commands")
        self.results = self.commands.replace(".commands-", ".results-")
        self.extra_topics: list[str] = []
        if name in VOUCHER_BRIDGES:
            suffix = self.commands.rsplit("-", 1)[1]
            self.extra_topics = [
                f"bench.{tag}.p{partitions}.coupon.commands-{suffix}",
                f"bench.{tag}.p{partitions}.coupon.results-{suffix}",
            ]
        self.group = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
        self.log = workdir / f"{tag}-p{partitions}.log"
        self.process: Process | None = None
        self.reader = ResultsReader(bootstrap, self.results)

    @property
    def topics(self) -> list[str]:
        return [self.commands, self.results, *self.extra_topics]

    async def start(self) -> None:
        await asyncio.gather(
            *(create_topic(self.bootstrap, t, self.partitions) for t in self.topics)
        )
        await self.reader.start()
        tokens = json.dumps(terminals())
        if self.name in VOUCHER_BRIDGES:
            store = self.workdir / f"store-p{self.partitions}.sqlite3"
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "KAFKA_GROUP_ID": self.group,
                "POS_COMMANDS_TOPIC": self.commands,
                "POS_RESULTS_TOPIC": self.results,
                "COUPON_COMMANDS_TOPIC": self.extra_topics[0],
                "COUPON_RESULTS_TOPIC": self.extra_topics[1],
                "EVOUCHER_BASE_URL": self.sandbox_url,
                "EVOUCHER_TERMINALS": tokens,
                "EVOUCHER_MAX_CONNECTIONS": str(self.max_connections),
                "IDEMPOTENCY_STORE_URL": f"sqlite:///{store}",
                "LOG_LEVEL": "WARNING",
            }
            if self.name == VB_ONE:
                env["WORKERS"] = "1"
            self.process = start_service(env, self.log)
            return
        env = {
            "BENCH_BOOTSTRAP": self.bootstrap,
            "BENCH_COMMANDS_TOPIC": self.commands,
            "BENCH_RESULTS_TOPIC": self.results,
            "BENCH_GROUP_ID": self.group,
            "BENCH_SANDBOX_URL": self.sandbox_url,
            "BENCH_TERMINALS": tokens,
            "BENCH_MAX_CONNECTIONS": str(self.max_connections),
        }
        if self.name in PEERS:
            assert self.command is not None
            env["BENCH_PC_MAX_CONCURRENCY"] = str(
                PEER_MAX_CONCURRENCY if self.name == PEER else self.max_connections
            )
            self.process = Process(self.command, env, self.log)
            return
        module = {NAIVE: "bench.naive", BARE: "bench.bare"}[self.name]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.process = Process([sys.executable, "-m", module], env, self.log)

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    async def stop(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(self.process.stop, 30.0)
        await self.reader.stop()


# --- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, only: set[str], workdir: Path, max_connections: int) -> None:
        self.plan = plan
        self.max_connections = max_connections
        self.samples = False
        self.only = only
        self.workdir = workdir
        self.runs: list[Run] = []
        self.topics: list[str] = []
        self.bootstrap = ""
        self.sandbox_url = ""
        self.sandbox_pid: int | None = None
        self.broker_pid: int | None = None
        self.peer: parallel_consumer.Peer | None = None
        self.peer_skipped: str | None = None  # why the peer did not run
        self._run_seq = 0

    async def set_latency(self, latency_ms: int) -> None:
        async with httpx.AsyncClient(base_url=self.sandbox_url, timeout=10) as admin:
            response = await admin.post("/_sandbox/faults", json={"latency_ms": latency_ms})
            response.raise_for_status()

    def batch(self, n: int, terminal_count: int, label: str) -> list[Command]:
        self._run_seq += 1
        # The same seed for every system in a scenario: the same terminals, kinds and amounts
        # (the naive subscriber's shorter run is a prefix of the others').
        return commands(n, terminal_count, f"{label}{self._run_seq}", seed=terminal_count)

    async def warm_up(self, system: System, load: Load) -> None:
        await self.set_latency(0)
        count = self.plan.warmup_terminals if system.name != NAIVE else 20
        # One command per terminal (so voucher-bridge has every till's session stored), then
        # wait for all of them: group joined, connections open, code paths warm.
        batch = warmup_commands(count, f"warm-{system.name}")
        system.reader.expect({c.id for c in batch})
        await load.burst(system.commands, batch)
        status = await system.reader.wait(180, system.alive)
        if status != "ok":
            raise RuntimeError(f"{system.name} did not warm up ({status}); see {system.log}")
        if system.name == NAIVE or not self.plan.warmup_burst:
            return
        started = time.monotonic()
        batch = commands(self.plan.warmup_burst, count, f"warm-burst-{system.name}", seed=0)
        system.reader.expect({c.id for c in batch})
        await load.burst(system.commands, batch)
        status = await system.reader.wait(180, system.alive)
        if status != "ok":
            raise RuntimeError(f"{system.name} did not warm up ({status}); see {system.log}")
        print(
            f"  warmed up: {count} terminals, then {len(batch)} commands in "
            f"{time.monotonic() - started:.1f} s (not timed)",
            flush=True,
        )

    async def measure(
        self,
        system: System,
        load: Load,
        scenario: Scenario,
        n: int,
        rate: float | None = None,
    ) -> Run:
        run = Run(system.name, scenario, "paced" if rate else "burst", n, rate_offered=rate)
        batch = self.batch(n, scenario.terminals, "p" if rate else "b")
        system.reader.expect({c.id for c in batch})
        meter = CpuMeter(
            {
                "system": system.process.popen.pid if system.process else None,
                # voucher-bridge's own process (without its workers): the consumer's part.
                "consumer": system.process.popen.pid
                if system.process and system.name in VOUCHER_BRIDGES
                else None,
                "sandbox": self.sandbox_pid,
                "broker": self.broker_pid,
                "bench": os.getpid(),
            },
            trees=frozenset({"system"}),
        )
        meter.start()
        if rate:
            sent = await load.paced(system.commands, batch, rate)
        else:
            sent = await load.burst(system.commands, batch)
        timeout_s = 30 + n / 40
        run.status = await system.reader.wait(timeout_s, system.alive)
        run.cpu_ms_per_command, run.machine_busy, run.other_cores = meter.stop(n)
        summarise(run, sent, system.reader.arrivals, self.samples)
        self.runs.append(run)
        print(f"  {_run_line(run)}", flush=True)
        return run

    async def build_peer(self) -> None:
        """Builds the Parallel Consumer peer if needed (before anything is measured); without
        Java or Maven, or if the build fails, says so and the peer is skipped."""
        print(f"{PEER}: checking its build (bench/peers/parallel-consumer)", flush=True)
        try:
            self.peer = await asyncio.to_thread(parallel_consumer.ensure)
        except parallel_consumer.PeerUnavailable as exc:
            self.peer_skipped = str(exc)
            print(f"{PEER}: SKIPPED: {exc}", flush=True)
            return
        built = {"current": "already built", "offline": "built (offline)", "online": "built"}
        versions = ", ".join(f"{k} {v}" for k, v in self.peer.versions.items())
        print(f"{PEER}: {built[self.peer.built]}; Java {self.peer.java}, {versions}", flush=True)

    async def main(self) -> None:
        plan = self.plan
        if self.only & set(PEERS):
            await self.build_peer()
        self.bootstrap = await asyncio.to_thread(ensure_kafka)
        seed_path = self.workdir / "evoucher-seed.json"
        seed_path.write_text(json.dumps(sandbox_seed()))
        port = free_port()
        sandbox = await asyncio.to_thread(
            start_sandbox, port, self.workdir / "sandbox.log", seed=seed_path
        )
        self.sandbox_url = f"http://127.0.0.1:{port}"
        self.sandbox_pid = sandbox.popen.pid
        broker_port = self.bootstrap.split(",")[0].rsplit(":", 1)[-1]
        if broker_port.isdigit():
            self.broker_pid = await asyncio.to_thread(listening_pid, int(broker_port))
        load = Load(self.bootstrap)
        await load.start()
        try:
            for partitions in plan.partition_counts:
                vb_max: float | None = None
                for name in SYSTEMS:
                    if name not in self.only:
                        continue
                    vb_max = await self.one_system(name, partitions, load, vb_max)
        finally:
            await load.stop()
            await asyncio.to_thread(sandbox.stop)
            await self.delete_topics()

    async def one_system(
        self, name: str, partitions: int, load: Load, vb_max: float | None
    ) -> float | None:
        plan = self.plan
        if name in PEERS and self.peer is None:
            for latency in plan.latencies:
                for count in plan.terminal_counts:
                    scenario = Scenario(latency, count, partitions)
                    n = plan.n(name, scenario)
                    self.runs.append(Run(name, scenario, "burst", n, status="skipped"))
            print(f"{name}, {partitions} partition(s): skipped ({self.peer_skipped})", flush=True)
            return vb_max
        system = System(
            name,
            self.bootstrap,
            self.sandbox_url,
            partitions,
            self.workdir,
            self.max_connections,
            self.peer.command if name in PEERS and self.peer else None,
        )
        self.topics += system.topics
        print(f"{name}, {partitions} partition(s): starting", flush=True)
        await system.start()
        try:
            await self.warm_up(system, load)
            failed = False
            for latency in plan.latencies:
                await self.set_latency(latency)
                for count in plan.terminal_counts:
                    scenario = Scenario(latency, count, partitions)
                    n = plan.n(name, scenario)
                    if failed:
                        self.runs.append(Run(name, scenario, "burst", n, status="skipped"))
                        continue
                    run = await self.measure(system, load, scenario, n)
                    failed = run.status != "ok"
                    target = (latency, count, partitions) == (
                        TARGET_LATENCY_MS,
                        TARGET_TERMINALS,
                        TARGET_PARTITIONS,
                    )
                    if target and name == VB and run.status == "ok":
                        vb_max = run.throughput
                    if (
                        target
                        and name in (*VOUCHER_BRIDGES, *PEERS, BARE)
                        and vb_max
                        and not failed
                    ):
                        # The latency target: half of voucher-bridge's maximum rate here, after
                        # a pause that lets the burst's after-effects (commits, a garbage
                        # collection) pass, so that it measures the steady state.
                        rate = vb_max / 2
                        await asyncio.sleep(PACED_PAUSE_S)
                        await self.measure(
                            system, load, scenario, max(50, int(rate * plan.paced_s)), rate
                        )
        finally:
            await system.stop()
        return vb_max

    async def delete_topics(self) -> None:
        if not self.topics:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            await admin.start()
            await admin.delete_topics(self.topics)
        except Exception as exc:  # best effort: a shared broker keeps a few empty topics
            print(f"(could not delete the benchmark's topics: {exc})")
        finally:
            await admin.close()


# --- report --------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _run_line(run: Run) -> str:
    lat = run.latency_ms
    rate = f" at {run.rate_offered:,.0f}/s" if run.rate_offered else ""
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu_ms_per_command.items())
    busy = f"{run.machine_busy:.0%}" if run.machine_busy is not None else "-"
    if run.other_cores is not None:
        busy += f", {run.other_cores:.2f} cores used by others"
    return (
        f"{run.scenario.label:<20} {run.system:<17} {run.kind}{rate}: {run.status}, "
        f"{run.received}/{run.n} in {run.duration_s:.2f}s = {run.throughput:,.0f}/s, "
        f"p50 {_fmt(lat.get('p50'))} p95 {_fmt(lat.get('p95'))} p99 {_fmt(lat.get('p99'))} ms; "
        f"CPU ms/command: {cpu}; machine busy {busy}"
    )


def _ratio(by: dict[tuple[Scenario, str, str], Run], run: Run, other: str) -> float | None:
    """A burst's throughput over another system's in the same scenario."""
    theirs = by.get((run.scenario, other, "burst"))
    if run.status == "ok" and run.kind == "burst" and theirs and theirs.status == "ok":
        return run.throughput / theirs.throughput
    return None


def table(runs: list[Run]) -> str:
    by = {(r.scenario, r.system, r.kind): r for r in runs}
    header = (
        f"{'scenario':<20} {'system':<17} {'run':<11} {'N':>5} {'throughput/s':>12} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'x peer':>7} {'x naive':>8} {'x bare':>7} "
        f"{'cpu ms':>7} {'cpu x peer':>10}"
    )
    lines = [header, "-" * len(header)]
    last_scenario: Scenario | None = None
    order = {name: i for i, name in enumerate(SYSTEMS)}
    for run in sorted(
        runs,
        key=lambda r: (
            r.scenario.partitions,
            r.scenario.latency_ms,
            r.scenario.terminals,
            r.kind != "burst",
            order[r.system],
        ),
    ):
        if last_scenario is not None and run.scenario != last_scenario:
            lines.append("")
        last_scenario = run.scenario
        ok = run.status == "ok"
        peer = by.get((run.scenario, PEER, run.kind))
        cpu, peer_cpu = (
            run.cpu_ms_per_command.get("system"),
            peer.cpu_ms_per_command.get("system") if peer and peer.status == "ok" else None,
        )
        cpu_vs_peer = cpu / peer_cpu if ok and cpu and peer_cpu else None
        kind = run.kind if run.kind == "burst" else f"@{run.rate_offered:,.0f}/s"
        throughput = _fmt(run.throughput, 0) if ok else run.status.upper()
        if disturbed(run):
            throughput = "*" + throughput
        lat = run.latency_ms
        lines.append(
            f"{run.scenario.label:<20} {run.system:<17} {kind:<11} {run.n:>5} {throughput:>12} "
            f"{_fmt(lat.get('p50')):>8} {_fmt(lat.get('p95')):>8} {_fmt(lat.get('p99')):>8} "
            f"{_fmt(_ratio(by, run, PEER), 2):>7} {_fmt(_ratio(by, run, NAIVE)):>8} "
            f"{_fmt(_ratio(by, run, BARE), 2):>7} "
            f"{_fmt(cpu, 2):>7} {_fmt(cpu_vs_peer, 2):>10}"
        )
    if any(disturbed(r) for r in runs):
        lines.append("")
        lines.append(
            f"* other processes used more than {DISTURBED_CORES} of a core during this run "
            "(other_cores in the JSON): its figures are lower than the machine can do"
        )
    return "\n".join(lines)


DISTURBED_CORES = 0.25


def disturbed(run: Run) -> bool:
    return run.other_cores is not None and run.other_cores > DISTURBED_CORES


@dataclass
class Target:
    name: str
    passed: bool | None  # None: not measured
    measured: str
    detail: dict[str, Any] = field(default_factory=dict)
    disturbed: bool = False  # a run it rests on was disturbed by other work on the machine


def targets(runs: list[Run]) -> list[Target]:
    def burst(system: str, s: Scenario) -> Run | None:
        r = next((r for r in runs if r.system == system and r.scenario == s), None)
        return r if r is not None and r.kind == "burst" and r.status == "ok" else None

    found: list[Target] = []
    # 1. >= 30x the naive subscriber at 20 ms, 100 terminals, ONE partition.
    where = Scenario(TARGET_LATENCY_MS, TARGET_TERMINALS, TARGET_PARTITIONS)
    vb, naive = burst(VB, where), burst(NAIVE, where)
    if vb and naive:
        ratio = vb.throughput / naive.throughput
        found.append(
            Target(
                f"1. throughput >= 30x naive at {where.label}",
                ratio >= 30,
                f"{ratio:.1f}x ({vb.throughput:,.0f}/s vs {naive.throughput:,.1f}/s)",
                {"ratio": ratio, "vb": vb.throughput, "naive": naive.throughput},
                disturbed(vb) or disturbed(naive),
            )
        )
    else:
        found.append(Target(f"1. throughput >= 30x naive at {where.label}", None, "not measured"))
    # 2. ≥ 70 % of the bare loop at 0 ms: every 0 ms scenario measured.
    ratios = {}
    shaken = False
    for run in runs:
        if run.system == VB and run.kind == "burst" and run.scenario.latency_ms == 0:
            bare = burst(BARE, run.scenario)
            if run.status == "ok" and bare:
                ratios[run.scenario.label] = run.throughput / bare.throughput
                shaken = shaken or disturbed(run) or disturbed(bare)
    if ratios:
        worst = min(ratios, key=lambda k: ratios[k])
        found.append(
            Target(
                "2. throughput >= 70% of bare at 0 ms (every scenario)",
                all(v >= 0.7 for v in ratios.values()),
                f"worst {ratios[worst]:.0%} at {worst}; "
                + ", ".join(f"{k}: {v:.0%}" for k, v in ratios.items()),
                {"ratios": ratios},
                shaken,
            )
        )
    else:
        found.append(Target("2. throughput >= 70% of bare at 0 ms", None, "not measured"))
    # 3. p99 added over the sandbox's own time < 25 ms at half the maximum rate.
    paced = {
        r.system: r for r in runs if r.kind == "paced" and r.scenario == where and r.status == "ok"
    }
    vb_paced, bare_paced = paced.get(VB), paced.get(BARE)
    if vb_paced:
        added = vb_paced.latency_ms["p99"] - where.latency_ms
        over_bare = (
            vb_paced.latency_ms["p99"] - bare_paced.latency_ms["p99"] if bare_paced else None
        )
        found.append(
            Target(
                f"3. p99 - sandbox latency < 25 ms at half max rate ({where.label})",
                added < 25,
                f"{added:.1f} ms (p99 {vb_paced.latency_ms['p99']:.1f} ms at "
                f"{vb_paced.rate_offered:,.0f}/s); over bare's p99 at the same rate: "
                + (f"{over_bare:.1f} ms" if over_bare is not None else "not measured"),
                {
                    "p99_ms": vb_paced.latency_ms["p99"],
                    "added_over_sandbox_ms": added,
                    "added_over_bare_ms": over_bare,
                    "rate": vb_paced.rate_offered,
                },
                disturbed(vb_paced) or (bare_paced is not None and disturbed(bare_paced)),
            )
        )
    else:
        found.append(Target("3. p99 added < 25 ms at half max rate", None, "not measured"))
    # 4-6. Against the Parallel Consumer peer, in the same run, at the same scenario (and, for
    # the p99, at the same paced rate).
    peer = burst(PEER, where)
    name = f"4. throughput >= the Parallel Consumer peer's at {where.label}"
    if vb and peer:
        ratio = vb.throughput / peer.throughput
        found.append(
            Target(
                name,
                ratio >= 1,
                f"{ratio:.2f}x ({vb.throughput:,.0f}/s vs {peer.throughput:,.0f}/s)",
                {"ratio": ratio, "vb": vb.throughput, "peer": peer.throughput},
                disturbed(vb) or disturbed(peer),
            )
        )
    else:
        found.append(Target(name, None, "not measured"))
    name = f"5. CPU per command <= 1.25x the peer's at {where.label}"
    vb_cpu = vb.cpu_ms_per_command.get("system") if vb else None
    peer_cpu = peer.cpu_ms_per_command.get("system") if peer else None
    if vb_cpu and peer_cpu:
        ratio = vb_cpu / peer_cpu
        found.append(
            Target(
                name,
                ratio <= 1.25,
                f"{ratio:.2f}x ({vb_cpu:.2f} vs {peer_cpu:.2f} ms)",
                {"ratio": ratio, "vb_ms": vb_cpu, "peer_ms": peer_cpu},
                bool(vb and disturbed(vb)) or bool(peer and disturbed(peer)),
            )
        )
    else:
        found.append(Target(name, None, "not measured"))
    name = f"6. p99 at half max rate within 10 ms of the peer's ({where.label})"
    peer_paced = paced.get(PEER)
    if vb_paced and peer_paced:
        over = vb_paced.latency_ms["p99"] - peer_paced.latency_ms["p99"]
        found.append(
            Target(
                name,
                over <= 10,
                f"{over:+.1f} ms (p99 {vb_paced.latency_ms['p99']:.1f} vs "
                f"{peer_paced.latency_ms['p99']:.1f} ms at {vb_paced.rate_offered:,.0f}/s)",
                {
                    "over_peer_ms": over,
                    "vb_p99_ms": vb_paced.latency_ms["p99"],
                    "peer_p99_ms": peer_paced.latency_ms["p99"],
                    "rate": vb_paced.rate_offered,
                },
                disturbed(vb_paced) or disturbed(peer_paced),
            )
        )
    else:
        found.append(Target(name, None, "not measured"))
    # 7. What the worker processes give one partition (as shipped: one per core), and what the
    # service's own process (the part that does not spread over workers) costs per record:
    # stated, not a pass/fail.
    name = f"7. {_shipped_workers()} workers (as shipped) against 1 at {where.label}"
    one, two = burst(VB_ONE, where), vb
    if one and two:
        own = two.cpu_ms_per_command.get("consumer")
        two_cpu = two.cpu_ms_per_command.get("system")
        one_cpu = one.cpu_ms_per_command.get("system")
        found.append(
            Target(
                name,
                None,
                f"{two.throughput / one.throughput:.2f}x throughput ({two.throughput:,.0f}/s vs "
                f"{one.throughput:,.0f}/s), CPU per command {_fmt(two_cpu, 2)} vs "
                f"{_fmt(one_cpu, 2)} ms, of which the consumer process {_fmt(own, 2)} ms",
                {
                    "workers": _shipped_workers(),
                    "ratio": two.throughput / one.throughput,
                    "one_worker": one.throughput,
                    "as_shipped": two.throughput,
                    "consumer_cpu_ms": own,
                    "cpu_ms_two": two_cpu,
                    "cpu_ms_one": one_cpu,
                },
                disturbed(one) or disturbed(two),
            )
        )
    else:
        found.append(Target(name, None, "not measured"))
    # 8. Against the peer with as many threads as voucher-bridge has connections: what is left
    # of the gap at the same concurrency on the upstream. Stated, not a pass/fail.
    bounded, bounded_paced = burst(PEER_BOUNDED, where), paced.get(PEER_BOUNDED)
    name = (
        f"8. against the peer with as many threads as voucher-bridge's connections at {where.label}"
    )
    if vb and bounded:
        bounded_cpu = bounded.cpu_ms_per_command.get("system")
        over = (
            vb_paced.latency_ms["p99"] - bounded_paced.latency_ms["p99"]
            if vb_paced and bounded_paced
            else None
        )
        found.append(
            Target(
                name,
                None,
                f"{vb.throughput / bounded.throughput:.2f}x throughput ({vb.throughput:,.0f}/s "
                f"vs {bounded.throughput:,.0f}/s), CPU per command {_fmt(vb_cpu, 2)} vs "
                f"{_fmt(bounded_cpu, 2)} ms, p99 at half max rate "
                + (f"{over:+.1f} ms" if over is not None else "not measured"),
                {
                    "ratio": vb.throughput / bounded.throughput,
                    "vb": vb.throughput,
                    "peer_bounded": bounded.throughput,
                    "vb_cpu_ms": vb_cpu,
                    "peer_bounded_cpu_ms": bounded_cpu,
                    "over_peer_bounded_p99_ms": over,
                },
                disturbed(vb) or disturbed(bounded),
            )
        )
    else:
        found.append(Target(name, None, "not measured"))
    return found


def _shipped_workers() -> int:
    """How many worker processes voucher-bridge starts here with WORKERS unset."""
    from voucher_bridge.workers import worker_count

    return worker_count(None)


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bursts = [r for r in runs if r.kind == "burst"]
    scenarios: list[Scenario] = []
    for r in bursts:
        if r.scenario not in scenarios:
            scenarios.append(r.scenario)
    shown = [s for s in SYSTEMS if any(r.system == s and r.status == "ok" for r in bursts)]
    width = 0.8 / max(len(shown), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(scenarios) + 2), 4.8))
    colours = {
        VB: "#1f77b4",
        VB_ONE: "#17becf",
        PEER: "#ff7f0e",
        PEER_BOUNDED: "#ffbb78",
        NAIVE: "#d62728",
        BARE: "#7f7f7f",
    }
    for k, system in enumerate(shown):
        values = []
        for s in scenarios:
            found = next((r for r in bursts if r.system == system and r.scenario == s), None)
            values.append(found.throughput if found and found.status == "ok" else 0.0)
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(scenarios))]
        bars = ax.bar(xs, values, width, label=system, color=colours[system])
        for bar, v in zip(bars, values, strict=True):
            if v > 0:
                ax.annotate(
                    f"{v:,.0f}",
                    (bar.get_x() + bar.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
    ax.set_yscale("log")
    top = max((r.throughput for r in bursts if r.status == "ok"), default=100.0)
    ax.set_ylim(10, top * 5)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylabel("throughput (commands/s, log scale)")
    ax.set_xticks(range(len(scenarios)))
    ax.set_xticklabels([s.label.replace(" ", "\n") for s in scenarios], fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=len(shown) or 1)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    versions = {}
    for package in ("aiokafka", "faststream", "httpx", "uvicorn", "starlette", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    git: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--short", "--", "services", "contracts", "pyproject.toml"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        git = {"commit": head.stdout.strip(), "uncommitted": dirty.stdout.split("\n")[:-1]}
    return {
        "git": git,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute subset")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--keep", action="store_true", help="keep the logs and the store")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="EVOUCHER_MAX_CONNECTIONS of voucher-bridge and the bare loop's concurrency",
    )
    parser.add_argument(
        "--samples", action="store_true", help="write every command's latency to the JSON too"
    )
    parser.add_argument(
        "--only", default=",".join(SYSTEMS), help=f"systems to run (of {','.join(SYSTEMS)})"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    workdir = Path(tempfile.mkdtemp(prefix="voucher-bridge-bench-"))
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    clock = time.monotonic()
    bench = Bench(plan, only, workdir, args.max_connections)
    bench.samples = args.samples
    print(f"voucher-bridge benchmark ({plan.mode}); logs in {workdir}", flush=True)
    error: BaseException | None = None
    try:
        asyncio.run(bench.main())
    except (Exception, KeyboardInterrupt) as exc:
        error = exc
    elapsed = time.monotonic() - clock

    runs = bench.runs
    found = targets(runs)
    print()
    print(table(runs))
    print()
    print("Targets (checked here, not by timed tests):")
    for t in found:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t.passed]
        if t.passed is None and t.measured != "not measured":
            verdict = "INFO"
        note = " (* a run it rests on was disturbed: rerun)" if t.disturbed else ""
        print(f"  {verdict}  {t.name}: {t.measured}{note}")
    print()
    print(f"{plan.mode} run: {len(runs)} runs in {elapsed:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{plan.mode}-{started.strftime('%Y%m%dT%H%M%SZ')}"
    report = {
        "mode": plan.mode,
        "started_at": started.isoformat(),
        "elapsed_s": elapsed,
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "setup": {
            "broker": bench.bootstrap,
            "plan": asdict(plan),
            "max_connections": args.max_connections,
            "load": "80% pos.bill_total, 20% pos.scan of unknown codes; terminals drawn at "
            "random (seeded); CloudEvents structured mode; producer acks=all",
            "throughput": "received / (last arrival - first send)",
            "latency": "result arrival - command send, per command (monotonic clock)",
            "cpu": "CPU time per command of each system's whole process tree (/proc)",
            "peer": (
                {
                    "java": bench.peer.java,
                    **bench.peer.versions,
                    "max_concurrency": PEER_MAX_CONCURRENCY,
                    "built": bench.peer.built,
                }
                if bench.peer
                else {"skipped": bench.peer_skipped}
            ),
        },
        "runs": [r.row() for r in runs],
        "targets": [asdict(t) for t in found],
        "error": repr(error) if error else None,
    }
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = args.out / f"{stem}.png"
    if runs:
        plot(
            runs,
            png_path,
            f"voucher-bridge benchmark ({plan.mode}), {len(os.sched_getaffinity(0))} cores, "
            f"{started:%Y-%m-%d %H:%M} UTC",
        )
    print(f"wrote {json_path}" + (f" and {png_path}" if runs else ""))

    if error is not None:
        print(f"benchmark failed: {error!r}; logs kept in {workdir}", file=sys.stderr)
        return 2
    if args.keep:
        print(f"logs and store kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.strict and any(t.passed is False for t in found):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
