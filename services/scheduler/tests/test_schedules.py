"""Cron schedules: the RPCs, and firing each due time exactly once with two
schedulers sharing the database (their tickers driven by a test clock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from stepline.api.common.v1 import run_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.scheduler.schedules import Ticker, fire_key, next_fire
from stepline.scheduler.server import connected

from .conftest import Mesh, hello


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@contextlib.asynccontextmanager
async def tickers(mesh: Mesh, clock: FakeClock, count: int = 2) -> AsyncIterator[list[Ticker]]:
    """``count`` scheduler instances on the same database, each with its own pool."""
    async with contextlib.AsyncExitStack() as stack:
        result = []
        for _ in range(count):
            parts = await stack.enter_async_context(connected(mesh.settings, clock=clock))
            result.append(Ticker(parts.schedules))
        yield result


async def create(
    mesh: Mesh, policy: pb.OverlapPolicy.ValueType, request_id: str = ""
) -> pb.Schedule:
    schedule = pb.Schedule(
        workflow_name="hello",
        cron_expression="* * * * *",
        overlap_policy=policy,
    )
    schedule.inputs.update({"who": "cron"})
    response = await mesh.scheduler.CreateSchedule(
        pb.CreateScheduleRequest(request_id=request_id, schedule=schedule)
    )
    return response.schedule


async def runs_of(mesh: Mesh, schedule_id: str) -> list[run_pb2.WorkflowRun]:
    listed = await mesh.ledger.ListRuns(
        ledger_pb2.ListRunsRequest(filter=run_pb2.RunFilter(schedule_id=schedule_id))
    )
    return list(reversed(listed.runs))  # oldest first


async def tick_all(tickers: list[Ticker], rounds: int = 3) -> int:
    fired = 0
    for _ in range(rounds):
        fired += sum(await asyncio.gather(*(t.tick() for t in tickers)))
    return fired


async def test_each_due_time_fires_exactly_once_across_two_schedulers(mesh: Mesh) -> None:
    await mesh.register(hello())
    schedule = await create(mesh, pb.OVERLAP_POLICY_ALLOW, request_id="s-1")
    assert schedule.state == pb.SCHEDULE_STATE_ACTIVE
    assert (await create(mesh, pb.OVERLAP_POLICY_ALLOW, request_id="s-1")) == schedule
    due = schedule.next_fire_time.ToDatetime(tzinfo=UTC)
    clock = FakeClock(due - timedelta(seconds=1))
    async with tickers(mesh, clock) as pair:
        assert await tick_all(pair) == 0  # not due yet
        clock.now = due + timedelta(seconds=1)
        assert await tick_all(pair) == 1
        clock.now = due + timedelta(seconds=61)
        assert await tick_all(pair) == 1  # the next minute, once more

    runs = await runs_of(mesh, schedule.schedule_id)
    assert [r.request_id for r in runs] == [
        fire_key(schedule.schedule_id, due),
        fire_key(schedule.schedule_id, due + timedelta(minutes=1)),
    ]
    assert all(r.initiator.id == "alice" for r in runs)
    assert sorted(j.job.run_id for j in await mesh.jobs()) == sorted(r.run_id for r in runs)
    got = (
        await mesh.scheduler.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))
    ).schedule
    assert got.last_run_id == runs[-1].run_id
    assert got.next_fire_time.ToDatetime(tzinfo=UTC) == due + timedelta(minutes=2)


async def test_skip_policy_skips_a_firing_while_the_last_run_is_going(mesh: Mesh) -> None:
    await mesh.register(hello())
    schedule = await create(mesh, pb.OVERLAP_POLICY_SKIP)
    due = schedule.next_fire_time.ToDatetime(tzinfo=UTC)
    clock = FakeClock(due)
    async with tickers(mesh, clock, count=1) as (ticker,):
        await ticker.tick()
        clock.now = due + timedelta(minutes=1)
        await ticker.tick()  # the first run is still PENDING: skipped
    runs = await runs_of(mesh, schedule.schedule_id)
    assert len(runs) == 1
    got = (
        await mesh.scheduler.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))
    ).schedule
    assert got.last_run_id == ""
    assert got.last_fire_time.ToDatetime(tzinfo=UTC) == due + timedelta(minutes=1)


async def test_paused_schedule_does_not_fire_and_resumes_from_now(mesh: Mesh) -> None:
    await mesh.register(hello())
    schedule = await create(mesh, pb.OVERLAP_POLICY_ALLOW)
    paused = await mesh.scheduler.PauseSchedule(
        pb.PauseScheduleRequest(schedule_id=schedule.schedule_id)
    )
    assert paused.schedule.state == pb.SCHEDULE_STATE_PAUSED
    assert not paused.schedule.HasField("next_fire_time")
    clock = FakeClock(datetime.now(UTC) + timedelta(hours=1))
    async with tickers(mesh, clock, count=1) as (ticker,):
        assert await ticker.tick() == 0
    resumed = await mesh.scheduler.ResumeSchedule(
        pb.ResumeScheduleRequest(schedule_id=schedule.schedule_id)
    )
    assert resumed.schedule.state == pb.SCHEDULE_STATE_ACTIVE
    listed = await mesh.scheduler.ListSchedules(pb.ListSchedulesRequest(workflow_name="hello"))
    assert [s.schedule_id for s in listed.schedules] == [schedule.schedule_id]
    await mesh.scheduler.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=schedule.schedule_id))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await mesh.scheduler.GetSchedule(pb.GetScheduleRequest(schedule_id=schedule.schedule_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_schedules_are_refused_naming_the_field(mesh: Mesh) -> None:
    await mesh.register(hello())
    for field, value in [
        ("cron_expression", "61 * * * *"),
        ("cron_expression", "* * * * * *"),
        ("timezone", "Mars/Olympus"),
    ]:
        schedule = pb.Schedule(workflow_name="hello", cron_expression="* * * * *")
        schedule.inputs.update({"who": "cron"})
        setattr(schedule, field, value)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.scheduler.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (refused.value.details() or "")
    listed = await mesh.scheduler.ListSchedules(pb.ListSchedulesRequest())
    assert list(listed.schedules) == []


def test_next_fire_follows_the_time_zone() -> None:
    after = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)  # 08:30 in Shanghai
    assert next_fire("0 9 * * *", "Asia/Shanghai", after) == datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
