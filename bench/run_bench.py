"""End-to-end run throughput and latency of the real mesh (``stepline up``).

For each executor count (default 1, then 2) it starts the whole embedded mesh
in a fresh temporary state directory with ``stepline.cli.mesh.up``, registers
a workflow of ``--steps`` ``core.noop`` steps through WorkflowService (admin
token from the state directory's ``credentials.json``), then measures:

1. closed loop: ``--clients`` clients each call StartRun and wait for the run's
   terminal ``RunStateChanged`` event on ``STEPLINE_EVENTS`` (a plain NATS
   subscription to ``stepline.events.run.>``), for ``--seconds`` after a
   ``--warmup``: runs/s and steps/s at saturation (peak);
2. open loop at half the peak rate for ``--open-seconds``: StartRun issued on
   a fixed schedule; afterwards GetRun (RUN_VIEW_TASKS) gives each run's first
   task start_time, compared with the client's clock when StartRun was sent
   (same machine, same clock): StartRun -> first step p50/p99;
3. per-step overhead from the tasks' start/end times (GetRun, RUN_VIEW_TASKS)
   of runs sampled from both phases: run duration / steps, the gap between a
   step's end and the next step's start, and (run duration - sum of task
   durations) / steps;
4. per process (ledger, scheduler, executors, PostgreSQL, NATS, ...): CPU used
   during each phase (% of one core, children included) and peak memory (the
   process's VmHWM, and the sampled peak RSS of its process tree), with the
   CPU of everything else on the machine (other work skews the figures).

With ``--profile ledger,executor`` those services run under cProfile (through
a ``sitecustomize`` on PYTHONPATH that only acts in the named services'
processes; the profiled process is slower) and the top functions by own time
are printed after the mesh stops.

The mesh is stopped with ``mesh.down`` at the end, also on error. Figures are
printed next to the targets; nothing is asserted.

    .venv/bin/python bench/run_bench.py [--executors 1,2] [--clients 32] [--seconds 20]
        [--warmup 3] [--open-seconds 5] [--steps 10] [--sample 300] [--profile ledger]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import random
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc, workflow_service_pb2_grpc
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.cli import mesh
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings
from stepline.common.errors import SteplineError
from stepline.common.states import RUN_TERMINAL

R = common_pb2.WorkflowRunState
WORKFLOW = "bench-noop"
TARGETS = (
    "targets (issue): >= 3,000 steps/s; per-step overhead p50 < 2 ms; "
    "StartRun -> first step p99 < 50 ms at half peak; no service above 200 MB"
)
SAMPLE_INTERVAL_S = 0.25


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def ms(value: float) -> str:
    return f"{value * 1000:8.2f} ms"


# --------------------------------------------------------------------------- processes


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ProcessWatch:
    """Samples the RSS of each component's process tree in a thread (peak kept)
    and reads CPU time per component at phase boundaries."""

    def __init__(self, components: dict[str, int]) -> None:
        self.components = components
        self.peak_rss: dict[str, int] = dict.fromkeys(components, 0)
        self.hwm_kb: dict[str, int] = dict.fromkeys(components, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sample()
        for name, pid in self.components.items():
            self.hwm_kb[name] = _hwm_kb(pid)
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.components.items():
            rss = 0
            for proc in _tree(pid):
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss[name] = max(self.peak_rss[name], rss)

    def cpu(self) -> dict[str, dict[int, float]]:
        """CPU seconds (user + system) of every process of every component, by pid."""
        snapshot: dict[str, dict[int, float]] = {}
        for name, pid in self.components.items():
            by_pid: dict[int, float] = {}
            for proc in _tree(pid):
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                by_pid[proc.pid] = times.user + times.system
            snapshot[name] = by_pid
        own = psutil.Process().cpu_times()
        snapshot["bench (this process)"] = {os.getpid(): own.user + own.system}
        return snapshot


@dataclass
class CpuPhase:
    """CPU used per component between two snapshots, as a fraction of one core."""

    name: str
    began: float
    start: dict[str, dict[int, float]]
    machine_start: tuple[float, float]
    shares: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0

    @classmethod
    def open(cls, name: str, watch: ProcessWatch) -> CpuPhase:
        return cls(name, time.perf_counter(), watch.cpu(), _machine_times())

    def close(self, watch: ProcessWatch) -> None:
        elapsed = time.perf_counter() - self.began
        end = watch.cpu()
        for component, pids in end.items():
            before = self.start.get(component, {})
            # A process born during the phase counts from zero.
            used = sum(t - before.get(pid, 0.0) for pid, t in pids.items())
            self.shares[component] = used / elapsed
        busy0, total0 = self.machine_start
        busy1, total1 = _machine_times()
        self.machine_busy = (busy1 - busy0) / max(1e-9, total1 - total0)


def _machine_times() -> tuple[float, float]:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total


# --------------------------------------------------------------------------- profiling

_SITECUSTOMIZE = """
import atexit, cProfile, os
_argv = open("/proc/self/cmdline", "rb").read().split(b"\\0")
_wanted = {"stepline." + n.replace("-", "_") for n in os.environ["RUN_BENCH_PROFILE"].split(",")}
_module = _argv[2].decode() if len(_argv) > 2 and _argv[1] == b"-m" else ""
if _module in _wanted:
    _profile = cProfile.Profile()
    _profile.enable()
    _out = os.path.join(os.environ["RUN_BENCH_PROFILE_DIR"], f"{_module}-{os.getpid()}.prof")
    atexit.register(lambda: (_profile.disable(), _profile.dump_stats(_out)))
"""


@contextlib.contextmanager
def profiling(services: str, folder: Path) -> Iterator[None]:
    """Services started inside the block run under cProfile if named in ``services``."""
    if not services:
        yield
        return
    hook = folder / "profile-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    saved = {
        k: os.environ.get(k) for k in ("PYTHONPATH", "RUN_BENCH_PROFILE", "RUN_BENCH_PROFILE_DIR")
    }
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), saved["PYTHONPATH"]]))
    os.environ["RUN_BENCH_PROFILE"] = services
    os.environ["RUN_BENCH_PROFILE_DIR"] = str(folder)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def print_profiles(folder: Path, top: int) -> None:
    for path in sorted(folder.glob("*.prof")):
        stats = pstats.Stats(str(path))
        print(f"\n  profile of {path.stem}: top {top} by own time (event-loop waits left out)")
        stats.sort_stats("tottime").print_stats(r"^(?!.*(epoll|_run_once|Context' obj))", top)
        print(f"  profile of {path.stem}: top {top} Stepline functions by cumulative time")
        stats.sort_stats("cumulative").print_stats(r"/stepline/", top)


# --------------------------------------------------------------------------- the workflow


def definition(steps: int) -> workflow_pb2.WorkflowDefinition:
    result = workflow_pb2.WorkflowDefinition(
        name=WORKFLOW,
        description=f"{steps} core.noop steps (bench/run_bench.py)",
        allowed_verbs=["core.noop"],
    )
    for i in range(steps):
        result.steps.add(id=f"s{i}", atomic=workflow_pb2.AtomicOp(verb="core.noop"))
    return result


class RunEnds:
    """Terminal run events from ``stepline.events.run.>``, by run id."""

    def __init__(self) -> None:
        self.waiters: dict[str, asyncio.Future[tuple[int, float]]] = {}
        self.early: dict[str, tuple[int, float]] = {}
        self.relay_lag: list[float] = []
        self.events = 0

    async def on_message(self, msg: Msg) -> None:
        self.events += 1
        event = events_pb2.Event()
        event.ParseFromString(msg.data)
        if event.WhichOneof("payload") != "run_state_changed":
            return
        state = event.run_state_changed.to_state
        if state not in RUN_TERMINAL:
            return
        now = time.time()
        self.relay_lag.append(now - seconds(event.time))
        waiter = self.waiters.pop(event.run_id, None)
        if waiter is None:
            self.early[event.run_id] = (state, now)
        elif not waiter.done():
            waiter.set_result((state, now))

    def wait(self, run_id: str) -> asyncio.Future[tuple[int, float]]:
        future: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()
        if run_id in self.early:
            future.set_result(self.early.pop(run_id))
        else:
            self.waiters[run_id] = future
        return future


@dataclass
class Bench:
    runs: scheduler_service_pb2_grpc.SchedulerServiceAsyncStub
    ends: RunEnds
    failed: int = 0

    async def start(self) -> str:
        response = await self.runs.StartRun(
            spb.StartRunRequest(request_id=str(uuid.uuid4()), workflow_name=WORKFLOW)
        )
        return str(response.run.run_id)

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the scheduler reaches the ledger: the services start together,
        and a channel that tried a peer before it listened backs off for a while."""
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                await self.runs.ListRuns(spb.ListRunsRequest(page_size=1), timeout=2.0)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.perf_counter() > deadline:
                    raise
            await asyncio.sleep(0.2)  # an outside process's state: nothing to await

    async def one_run(self) -> str:
        run_id = await self.start()
        state, _ = await asyncio.wait_for(self.ends.wait(run_id), 120)
        if state != R.WORKFLOW_RUN_STATE_SUCCEEDED:
            self.failed += 1
        return run_id

    async def closed_loop(self, clients: int, duration: float) -> tuple[list[str], float]:
        """Runs completed by ``clients`` loops in ``duration`` seconds (run ids, elapsed)."""
        done: list[str] = []
        stop_at = time.perf_counter() + duration

        async def client() -> None:
            while time.perf_counter() < stop_at:
                run_id = await self.one_run()
                if time.perf_counter() <= stop_at:
                    done.append(run_id)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        # Runs that ended after the deadline are not counted; the window is the deadline.
        return done, min(time.perf_counter(), stop_at) - began

    async def open_loop(self, rate: float, duration: float) -> list[tuple[str, float, float]]:
        """StartRun at ``rate`` per second for ``duration``; (run id, send time, RPC time)."""
        sent: list[tuple[str, float, float]] = []
        pending: list[asyncio.Task[None]] = []
        count = max(1, int(rate * duration))

        async def fire() -> None:
            t0 = time.time()
            p0 = time.perf_counter()
            run_id = await self.start()
            rpc = time.perf_counter() - p0
            sent.append((run_id, t0, rpc))
            state, _ = await asyncio.wait_for(self.ends.wait(run_id), 120)
            if state != R.WORKFLOW_RUN_STATE_SUCCEEDED:
                self.failed += 1

        began = time.perf_counter()
        for i in range(count):
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the open loop is the point here
            pending.append(asyncio.create_task(fire()))
        await asyncio.gather(*pending)
        return sent

    async def tasks_of(self, run_ids: Iterable[str]) -> list[run_pb2.WorkflowRun]:
        gate = asyncio.Semaphore(16)

        async def get(run_id: str) -> run_pb2.WorkflowRun:
            async with gate:
                response = await self.runs.GetRun(
                    spb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_TASKS)
                )
                return response.run

        return list(await asyncio.gather(*(get(r) for r in run_ids)))


@dataclass
class StepFigures:
    per_step_wall: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    task_durations: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)

    def add(self, run: run_pb2.WorkflowRun) -> None:
        tasks = sorted(run.tasks, key=lambda t: t.ordinal)
        if not tasks or not run.HasField("end_time") or not run.HasField("start_time"):
            return
        run_s = seconds(run.end_time) - seconds(run.start_time)
        busy = 0.0
        for i, task in enumerate(tasks):
            duration = seconds(task.end_time) - seconds(task.start_time)
            busy += duration
            self.task_durations.append(duration)
            if i:
                self.gaps.append(seconds(task.start_time) - seconds(tasks[i - 1].end_time))
        self.per_step_wall.append(run_s / len(tasks))
        self.overhead.append((run_s - busy) / len(tasks))

    def print(self, title: str) -> None:
        print(f"  per-step figures, {title}:")
        for name, samples in (
            ("run duration / steps", self.per_step_wall),
            ("task RUNNING -> SUCCEEDED", self.task_durations),
            ("gap step end -> next start", self.gaps),
            ("(run - sum tasks) / steps", self.overhead),
        ):
            print(
                f"    {name:<28} p50 {ms(percentile(samples, 0.5))}"
                f"   p99 {ms(percentile(samples, 0.99))}   (n={len(samples)})"
            )


@dataclass
class Result:
    executors: int
    runs_per_s: float = 0.0
    steps_per_s: float = 0.0
    run_latency: list[float] = field(default_factory=list)
    first_step: list[float] = field(default_factory=list)
    start_rpc: list[float] = field(default_factory=list)
    open_rate: float = 0.0
    failed: int = 0
    cpu: list[CpuPhase] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    hwm_kb: dict[str, int] = field(default_factory=dict)


async def measure(state: mesh.MeshState, args: argparse.Namespace, result: Result) -> None:
    components = {c.name: c.pid for c in state.components}
    settings = ClientSettings(default_timeout_s=60.0)
    channel = open_channel(state.endpoint("scheduler"), settings=settings, token=state.admin_token)
    nc = await nats.connect(state.endpoint("nats"), name="run-bench")
    ends = RunEnds()
    await nc.subscribe("stepline.events.run.>", cb=ends.on_message)
    try:
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        registered = await workflows.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(
                request_id=str(uuid.uuid4()), definition=definition(args.steps)
            )
        )
        print(f"  registered {WORKFLOW} version {registered.workflow.definition.version}")
        bench = Bench(scheduler_service_pb2_grpc.SchedulerServiceStub(channel), ends)
        await bench.ready()
        with ProcessWatch(components) as watch:
            print(f"  warm-up: {args.clients} clients, {args.warmup:.0f} s")
            await bench.closed_loop(args.clients, args.warmup)

            print(f"  closed loop: {args.clients} clients, {args.seconds:.0f} s")
            lag_mark = len(ends.relay_lag)
            phase = CpuPhase.open("closed loop (peak)", watch)
            done, elapsed = await bench.closed_loop(args.clients, args.seconds)
            phase.close(watch)
            result.cpu.append(phase)
            result.runs_per_s = len(done) / elapsed
            result.steps_per_s = result.runs_per_s * args.steps
            closed_lag = ends.relay_lag[lag_mark:]
            print(
                f"  {len(done)} runs in {elapsed:.1f} s; terminal event seen after commit:"
                f" p50 {ms(percentile(closed_lag, 0.5))} p99 {ms(percentile(closed_lag, 0.99))}"
            )

            result.open_rate = max(1.0, result.runs_per_s / 2)
            print(f"  open loop: {result.open_rate:.1f} runs/s for {args.open_seconds:.0f} s")
            phase = CpuPhase.open(f"open loop ({result.open_rate:.0f} runs/s)", watch)
            sent = await bench.open_loop(result.open_rate, args.open_seconds)
            phase.close(watch)
            result.cpu.append(phase)
        result.peak_rss, result.hwm_kb = watch.peak_rss, watch.hwm_kb
        result.failed = bench.failed

        closed_runs = await bench.tasks_of(random.sample(done, min(args.sample, len(done))))
        open_runs = await bench.tasks_of(run_id for run_id, _, _ in sent)
        closed, half = StepFigures(), StepFigures()
        for run in closed_runs:
            closed.add(run)
        send_time = {run_id: t0 for run_id, t0, _ in sent}
        for run in open_runs:
            half.add(run)
            first = min(run.tasks, key=lambda t: t.ordinal)
            if first.HasField("start_time"):
                result.first_step.append(seconds(first.start_time) - send_time[run.run_id])
        result.start_rpc = [rpc for _, _, rpc in sent]
        closed.print(f"closed loop ({len(closed_runs)} runs sampled)")
        half.print(f"open loop at half peak ({len(open_runs)} runs)")
    finally:
        await nc.close()
        await channel.close()


def log_problems(folder: Path) -> None:
    """How many WARNING and ERROR lines each service logged (retries show up here)."""
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
        problems = [line for line in lines if " WARNING " in line or " ERROR " in line]
        if problems:
            print(f"  {log.name}: {len(problems)} WARNING/ERROR lines, e.g. {problems[-1][:160]}")


def start_mesh(state_dir: Path, executors: int, args: argparse.Namespace) -> mesh.MeshState:
    """``mesh.up``, tried again once: on a shared machine a free port can be taken
    between its choice and its use (``up`` stops what it started when it fails)."""
    settings = dict(item.split("=", 1) for item in args.env)
    extra: dict[str, Any] = {"env": settings} if settings else {}
    for attempt in (1, 2):
        try:
            return mesh.up(
                state_dir, executors=executors, progress=lambda m: print(f"  {m}"), **extra
            )
        except SteplineError as exc:
            if attempt == 2:
                raise
            print(f"  start-up failed ({str(exc).splitlines()[0]}); trying once more")
    raise AssertionError("unreachable")


def configuration(executors: int, args: argparse.Namespace) -> Result:
    result = Result(executors)
    with tempfile.TemporaryDirectory(prefix="stepline-run-bench-") as tmp:
        state_dir = Path(tmp) / "state"
        started = time.perf_counter()
        try:
            with profiling(args.profile, Path(tmp)):
                state = start_mesh(state_dir, executors, args)
            print(f"  mesh up in {time.perf_counter() - started:.1f} s")
            asyncio.run(measure(state, args, result))
        except BaseException:
            for log in sorted((state_dir / "logs").glob("*.log")):
                tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
                print(f"  --- {log.name} (last lines)", *tail, sep="\n    ")
            raise
        finally:
            log_problems(state_dir / "logs")
            mesh.down(state_dir, progress=lambda m: print(f"  {m}"))
        print_profiles(Path(tmp), args.profile_top)
    return result


def report(result: Result) -> None:
    print(f"\n=== {result.executors} executor(s) ===")
    print(f"  runs/s  (peak, closed loop)       {result.runs_per_s:10,.1f}")
    print(f"  steps/s (peak, closed loop)       {result.steps_per_s:10,.1f}   target >= 3,000")
    print(
        f"  StartRun -> first step at {result.open_rate:.0f} runs/s:"
        f" p50 {ms(percentile(result.first_step, 0.5))}"
        f"   p99 {ms(percentile(result.first_step, 0.99))}   target p99 < 50 ms"
    )
    print(
        f"  StartRun RPC at {result.open_rate:.0f} runs/s:       "
        f" p50 {ms(percentile(result.start_rpc, 0.5))}"
        f"   p99 {ms(percentile(result.start_rpc, 0.99))}"
    )
    print(f"  runs not SUCCEEDED: {result.failed}")
    cores = os.cpu_count() or 1
    print(f"  {'process':<24}{'VmHWM':>8}{'tree RSS':>10}{'CPU peak':>10}{'CPU half':>10}")
    for name in [*result.peak_rss, "bench (this process)"]:
        memory = (
            f"{result.hwm_kb[name] / 1024:>6.0f}MB{result.peak_rss[name] / 2**20:>8.0f}MB"
            if name in result.hwm_kb
            else f"{'':>18}"
        )
        cpu = "".join(f"{phase.shares.get(name, 0.0):>10.0%}" for phase in result.cpu)
        print(f"  {name:<24}{memory}{cpu}")
    others = "".join(
        f"{max(0.0, p.machine_busy * cores - sum(p.shares.values())):>10.0%}" for p in result.cpu
    )
    print(f"  {'others on this machine':<24}{'':>18}{others}")
    busy = "".join(f"{p.machine_busy * cores:>10.0%}" for p in result.cpu)
    print(f"  {'machine busy':<24}{'':>18}{busy}   (of {cores * 100}%)")
    print("  CPU in % of one core; " + "; ".join(p.name for p in result.cpu))
    print("  (target: no service above 200 MB; PostgreSQL's tree RSS counts shared buffers")
    print("   once per backend, so it overstates its memory)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", default="1,2", help="executor counts, comma separated")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0, help="closed-loop duration")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--open-seconds", type=float, default=5.0, help="half-peak duration")
    parser.add_argument("--steps", type=int, default=10, help="core.noop steps per run")
    parser.add_argument("--sample", type=int, default=300, help="closed-loop runs read back")
    parser.add_argument(
        "--profile", default="", help="services to run under cProfile, e.g. ledger,executor"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="STEPLINE_X=V",
        help="extra service setting, e.g. STEPLINE_MAX_CONCURRENT_RUNS=32 (repeatable)",
    )
    parser.add_argument("--profile-top", type=int, default=25, help="functions shown per profile")
    args = parser.parse_args()
    counts = [int(n) for n in args.executors.split(",") if n.strip()]
    print(
        f"clients: {args.clients}  seconds: {args.seconds}  warm-up: {args.warmup}"
        f"  steps/run: {args.steps}  cores: {os.cpu_count()}"
    )
    results = []
    for n in counts:
        print(f"\n--- mesh with {n} executor(s)")
        results.append(configuration(n, args))
    for result in results:
        report(result)
    print(f"\n{TARGETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
