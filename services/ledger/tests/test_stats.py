"""GetStats against a hand-made ledger: rows inserted with explicit times, every
figure checked against values worked out by hand below.

The window is [W, W + 24h) with W = 2025-03-01T00:00Z; ``t(h, m, s)`` is W plus
that much (negative before the window, 24h and more after it).

Runs (create / start / end, state, failure reason):

  alpha A1  00:00 / 01:00 / 01:10:15  SUCCEEDED            created exactly at W
  alpha A2  02:00 / 02:00 / 02:30     FAILED     VERB_ERROR
  alpha A3  -2h   / -2h   / 03:00     SUCCEEDED            created before W
  alpha A4  20:00 / 20:00 / -         RUNNING
  alpha A5  -5h   / -5h   / -1h       FAILED     EXECUTOR_LOST  all before W
  alpha A6  23:00 / 23:00 / 24:00     SUCCEEDED            ends exactly at W+24h
  beta  B1  04:00 / 04:00 / 05:00     TIMED_OUT  DEADLINE_EXCEEDED
  beta  B2  06:00 / -     / 06:05     CANCELLED  CANCELLED  never started
  beta  B3  07:00 / 07:00 / 09:00     FAILED     VERB_ERROR
  beta  B4  08:00 / 08:00 / 08:20     SUCCEEDED
  beta  B5  10:00 / 10:00 / 11:00     FAILED     (failure without a reason)
  beta  B6  -3h   / -3h   / -         SUSPENDED
  gamma G1  -48h  / -48h  / -47h      SUCCEEDED            nothing in the window
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.errors import InvalidArgument
from stepline.ledger.stats import get_stats

from .conftest import Ledger

W = datetime(2025, 3, 1, tzinfo=UTC)

# Run states (WorkflowRunState) and task/attempt states (TaskRunState).
RUNNING, SUSPENDED, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = 2, 3, 5, 6, 7, 8
T_RUNNING, T_SUCCEEDED, T_FAILED, T_TIMED_OUT, T_CANCELLED = 2, 4, 5, 6, 7
ATOMIC, CHUNKED, GOVERN = 1, 3, 4
TASK_STATE_CHANGED, ATTEMPT_RECORDED = 3, 4

R = common_pb2.FailureReason
UNSPECIFIED = R.FAILURE_REASON_UNSPECIFIED  # 0
VERB_ERROR = R.FAILURE_REASON_VERB_ERROR  # 1
TIMEOUT = R.FAILURE_REASON_TIMEOUT  # 2
INTERRUPTED = R.FAILURE_REASON_INTERRUPTED  # 3
CANCELLED_REASON = R.FAILURE_REASON_CANCELLED  # 6
DEADLINE_EXCEEDED = R.FAILURE_REASON_DEADLINE_EXCEEDED  # 7
DEVICE_LOST = R.FAILURE_REASON_DEVICE_LOST  # 11


def t(hours: float, minutes: float = 0, seconds: float = 0) -> datetime:
    return W + timedelta(hours=hours, minutes=minutes, seconds=seconds)


def failure(reason: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {"message": "boom"}
    if reason is not None:
        result["reason"] = f"FAILURE_REASON_{reason}"
    return result


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


def request(
    start: datetime = W, end: datetime = W + timedelta(days=1), workflow: str = ""
) -> ledger_pb2.GetStatsRequest:
    result = ledger_pb2.GetStatsRequest(workflow_name=workflow)
    result.window.start_time.CopyFrom(stamp(start))
    result.window.end_time.CopyFrom(stamp(end))
    return result


# --- the fixture ---------------------------------------------------------------------


async def add_run(
    conn: asyncpg.Connection,
    run_id: str,
    workflow: str,
    state: int,
    create: datetime,
    start: datetime | None,
    end: datetime | None,
    reason: str | None = "",
) -> None:
    """A run; ``reason`` '' means no failure, None a failure without a reason."""
    await conn.execute(
        "INSERT INTO runs (run_id, request_id, workflow_name, workflow_version, definition,"
        " state, initiator_id, create_time, start_time, end_time, failure)"
        " VALUES ($1, $1, $2, 1, ''::bytea, $3, 'user:alice', $4, $5, $6, $7)",
        run_id,
        workflow,
        state,
        create,
        start,
        end,
        None if reason == "" else failure(reason),
    )


async def add_task(
    conn: asyncpg.Connection, task_id: str, run_id: str, ordinal: int, kind: int = ATOMIC
) -> None:
    await conn.execute(
        "INSERT INTO tasks (task_id, run_id, step_id, step_path, ordinal, kind, state)"
        " VALUES ($1, $2, $3, $3, $4, $5, $6)",
        task_id,
        run_id,
        f"step{ordinal}",
        ordinal,
        kind,
        T_RUNNING,
    )


async def add_attempt(
    conn: asyncpg.Connection,
    owner_id: str,
    run_id: str,
    number: int,
    state: int,
    start: datetime,
    end: datetime | None,
    reason: str | None = "",
    *,
    task_id: str | None = None,
) -> None:
    """An attempt of a task (or of a chunk: owner_id the chunk, task_id its task)."""
    await conn.execute(
        "INSERT INTO attempts (owner_id, run_id, task_id, chunk_id, attempt_number, state,"
        " start_time, end_time, failure) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        owner_id,
        run_id,
        task_id or owner_id,
        owner_id if task_id else None,
        number,
        state,
        start,
        end,
        None if reason == "" else failure(reason),
    )


async def add_event(
    conn: asyncpg.Connection,
    run_id: str,
    sequence: int,
    task_id: str,
    time: datetime,
    moves: tuple[str, str] | None,
) -> None:
    """A TASK_STATE_CHANGED event (from, to), or an ATTEMPT_RECORDED one when None."""
    payload = {"from_state": moves[0], "to_state": moves[1]} if moves else {"attempt_number": 1}
    await conn.execute(
        "INSERT INTO events (run_id, sequence, event_id, type, actor_id, time, task_id, payload)"
        " VALUES ($1, $2, $3, $4, 'executor:a', $5, $6, $7)",
        run_id,
        sequence,
        uuid.uuid4(),
        TASK_STATE_CHANGED if moves else ATTEMPT_RECORDED,
        time,
        task_id,
        payload,
    )


async def populate(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        # Runs: see the module docstring.
        await add_run(conn, "A1", "alpha", SUCCEEDED, t(0), t(1), t(1, 10, 15))
        await add_run(conn, "A2", "alpha", FAILED, t(2), t(2), t(2, 30), "VERB_ERROR")
        await add_run(conn, "A3", "alpha", SUCCEEDED, t(-2), t(-2), t(3))
        await add_run(conn, "A4", "alpha", RUNNING, t(20), t(20), None)
        await add_run(conn, "A5", "alpha", FAILED, t(-5), t(-5), t(-1), "EXECUTOR_LOST")
        await add_run(conn, "A6", "alpha", SUCCEEDED, t(23), t(23), t(24))
        await add_run(conn, "B1", "beta", TIMED_OUT, t(4), t(4), t(5), "DEADLINE_EXCEEDED")
        await add_run(conn, "B2", "beta", CANCELLED, t(6), None, t(6, 5), "CANCELLED")
        await add_run(conn, "B3", "beta", FAILED, t(7), t(7), t(9), "VERB_ERROR")
        await add_run(conn, "B4", "beta", SUCCEEDED, t(8), t(8), t(8, 20))
        await add_run(conn, "B5", "beta", FAILED, t(10), t(10), t(11), None)
        await add_run(conn, "B6", "beta", SUSPENDED, t(-3), t(-3), None)
        await add_run(conn, "G1", "gamma", SUCCEEDED, t(-48), t(-48), t(-47))

        # Tasks (one chunked, three GOVERN) and their attempts.
        for task_id, run_id, ordinal, kind in [
            ("a1-t1", "A1", 1, ATOMIC),
            ("a2-t1", "A2", 1, ATOMIC),
            ("a3-t1", "A3", 1, ATOMIC),
            ("a3-t2", "A3", 2, CHUNKED),
            ("a4-t1", "A4", 1, ATOMIC),
            ("a4-gov", "A4", 2, GOVERN),
            ("a5-t1", "A5", 1, ATOMIC),
            ("a5-gov", "A5", 2, GOVERN),
            ("a6-t1", "A6", 1, ATOMIC),
            ("a6-gov", "A6", 2, GOVERN),
            ("b1-t1", "B1", 1, ATOMIC),
            ("b3-t1", "B3", 1, ATOMIC),
            ("b3-t2", "B3", 2, ATOMIC),
            ("b3-gov", "B3", 3, GOVERN),
            ("b4-t1", "B4", 1, ATOMIC),
            ("b5-t1", "B5", 1, ATOMIC),
            ("b6-gov", "B6", 1, GOVERN),
            ("b6-gov2", "B6", 2, GOVERN),
        ]:
            await add_task(conn, task_id, run_id, ordinal, kind)
        await conn.execute(
            "INSERT INTO chunks (chunk_id, task_id, run_id, index, record, state)"
            " VALUES ('a3-c0', 'a3-t2', 'A3', 0, '{}', $1)",
            T_SUCCEEDED,
        )

        attempt = add_attempt
        # a1-t1: one success.
        await attempt(conn, "a1-t1", "A1", 1, T_SUCCEEDED, t(1), t(1, 5))
        # a2-t1: two verb errors, then a timeout; never recovers.
        await attempt(conn, "a2-t1", "A2", 1, T_FAILED, t(2), t(2, 5), "VERB_ERROR")
        await attempt(conn, "a2-t1", "A2", 2, T_FAILED, t(2, 6), t(2, 10), "VERB_ERROR")
        await attempt(conn, "a2-t1", "A2", 3, T_TIMED_OUT, t(2, 11), t(2, 30), "TIMEOUT")
        # a3-t1: failed before the window (23:00 the day before), recovered at 01:00.
        await attempt(conn, "a3-t1", "A3", 1, T_FAILED, t(-2), t(-1), "EXECUTOR_LOST")
        await attempt(conn, "a3-t1", "A3", 2, T_SUCCEEDED, t(0, 30), t(1))
        # a3-c0 (a chunk of a3-t2): timed out at 01:20, recovered at 01:40.
        await attempt(
            conn, "a3-c0", "A3", 1, T_TIMED_OUT, t(1, 10), t(1, 20), "DEVICE_LOST", task_id="a3-t2"
        )
        await attempt(conn, "a3-c0", "A3", 2, T_SUCCEEDED, t(1, 25), t(1, 40), task_id="a3-t2")
        # a4-t1: still running, no attempt ended.
        await attempt(conn, "a4-t1", "A4", 1, T_RUNNING, t(20, 5), None)
        # a5-t1: everything before the window.
        await attempt(conn, "a5-t1", "A5", 1, T_FAILED, t(-5), t(-2), "EXECUTOR_LOST")
        # a6-t1: failed in the window; its retry starts (and succeeds) after it.
        await attempt(conn, "a6-t1", "A6", 1, T_FAILED, t(23, 10), t(23, 20), "VERB_ERROR")
        await attempt(conn, "a6-t1", "A6", 2, T_SUCCEEDED, t(24, 5), t(24, 10))
        # b1-t1: one timeout.
        await attempt(conn, "b1-t1", "B1", 1, T_TIMED_OUT, t(4), t(5), "TIMEOUT")
        # b3-t1: failed at 07:30, recovered at 08:00; b3-t2: one failure.
        await attempt(conn, "b3-t1", "B3", 1, T_FAILED, t(7), t(7, 30), "VERB_ERROR")
        await attempt(conn, "b3-t1", "B3", 2, T_SUCCEEDED, t(7, 40), t(8))
        await attempt(conn, "b3-t2", "B3", 1, T_FAILED, t(8), t(9), "VERB_ERROR")
        # b4-t1: interrupted at 08:05, recovered at 08:10, then run again (as by a rerun)
        # and succeeded at 08:18 with no failure in between: no second recovery.
        await attempt(conn, "b4-t1", "B4", 1, T_FAILED, t(8), t(8, 5), "INTERRUPTED")
        await attempt(conn, "b4-t1", "B4", 2, T_SUCCEEDED, t(8, 5), t(8, 10))
        await attempt(conn, "b4-t1", "B4", 3, T_SUCCEEDED, t(8, 12), t(8, 18))
        # b5-t1: cancelled, with no failure recorded.
        await attempt(conn, "b5-t1", "B5", 1, T_CANCELLED, t(10), t(11), None)

        # GOVERN tasks: into SUSPENDED and out of it.
        event = add_event
        # a4-gov: suspended 20:02, approved 20:32 (an unrelated event in between).
        await event(conn, "A4", 1, "a4-gov", t(20, 1), ("PENDING", "RUNNING"))
        await event(conn, "A4", 2, "a4-gov", t(20, 2), ("RUNNING", "SUSPENDED"))
        await event(conn, "A4", 3, "a4-t1", t(20, 5), None)
        await event(conn, "A4", 4, "a4-gov", t(20, 32), ("SUSPENDED", "RUNNING"))
        # a5-gov: suspended and approved before the window.
        await event(conn, "A5", 1, "a5-gov", t(-4), ("RUNNING", "SUSPENDED"))
        await event(conn, "A5", 2, "a5-gov", t(-3), ("SUSPENDED", "RUNNING"))
        # a6-gov: suspended 23:50, decided 24:20, after the window.
        await event(conn, "A6", 1, "a6-gov", t(23, 50), ("RUNNING", "SUSPENDED"))
        await event(conn, "A6", 2, "a6-gov", t(24, 20), ("SUSPENDED", "RUNNING"))
        # b3-gov: suspended 07:00, approved 07:10.
        await event(conn, "B3", 1, "b3-gov", t(7), ("RUNNING", "SUSPENDED"))
        await event(conn, "B3", 2, "b3-gov", t(7, 10), ("SUSPENDED", "RUNNING"))
        # b6-gov: suspended 23:00 the day before, rejected 00:30; b6-gov2: suspended
        # at 01:00 and still waiting.
        await event(conn, "B6", 1, "b6-gov", t(-1), ("RUNNING", "SUSPENDED"))
        await event(conn, "B6", 2, "b6-gov", t(0, 30), ("SUSPENDED", "FAILED"))
        await event(conn, "B6", 3, "b6-gov2", t(1), ("RUNNING", "SUSPENDED"))


# --- helpers for the assertions -----------------------------------------------------


def counts(stats: ledger_pb2.WorkflowStats) -> dict[str, int]:
    fields = (
        "runs_started",
        "runs_ended",
        "runs_succeeded",
        "runs_failed",
        "runs_cancelled",
        "runs_timed_out",
        "tasks_started",
        "tasks_retried",
    )
    return {name: getattr(stats, name) for name in fields}


def reasons(counted: Any) -> list[tuple[int, int]]:
    return [(item.reason, item.count) for item in counted]


def seconds(stats: ledger_pb2.DurationStats) -> tuple[int, float, float, float, float]:
    """(count, average, p50, p95, max), the durations in seconds."""
    return (
        stats.count,
        stats.average.ToTimedelta().total_seconds(),
        stats.p50.ToTimedelta().total_seconds(),
        stats.p95.ToTimedelta().total_seconds(),
        stats.max.ToTimedelta().total_seconds(),
    )


# --- the tests ----------------------------------------------------------------------


async def test_figures_per_workflow_and_total(ledger: Ledger) -> None:
    await populate(ledger.pool)
    response = await get_stats(ledger.pool, request())

    # gamma did nothing in the window and is not listed.
    assert [w.workflow_name for w in response.workflows] == ["alpha", "beta"]
    alpha, beta = response.workflows
    total = response.total
    assert total.workflow_name == ""

    # Runs: started = created in [00:00, 24:00); ended = end_time in it.
    # Tasks: owners with an attempt that ended in the window; retried = more than
    # one attempt started before 24:00.
    assert counts(alpha) == {
        "runs_started": 4,  # A1 (at 00:00), A2, A4, A6; not A3, A5
        "runs_ended": 3,  # A1, A2, A3; not A5 (before), A6 (at 24:00, excluded)
        "runs_succeeded": 2,  # A1, A3
        "runs_failed": 1,  # A2
        "runs_cancelled": 0,
        "runs_timed_out": 0,
        "tasks_started": 5,  # a1-t1, a2-t1, a3-t1, a3-c0, a6-t1; not a4-t1, a5-t1
        "tasks_retried": 3,  # a2-t1 (3), a3-t1 (2), a3-c0 (2); a6-t1's retry is after
    }
    assert counts(beta) == {
        "runs_started": 5,  # B1..B5; not B6
        "runs_ended": 5,  # B1..B5
        "runs_succeeded": 1,  # B4
        "runs_failed": 2,  # B3, B5
        "runs_cancelled": 1,  # B2
        "runs_timed_out": 1,  # B1
        "tasks_started": 5,  # b1-t1, b3-t1, b3-t2, b4-t1, b5-t1
        "tasks_retried": 2,  # b3-t1 (2), b4-t1 (3)
    }
    assert counts(total) == {
        "runs_started": 9,  # 4 + 5
        "runs_ended": 8,  # 3 + 5
        "runs_succeeded": 3,  # 2 + 1
        "runs_failed": 3,  # 1 + 2
        "runs_cancelled": 1,
        "runs_timed_out": 1,
        "tasks_started": 10,  # 5 + 5
        "tasks_retried": 5,  # 3 + 2
    }
    assert alpha.completion_rate == pytest.approx(2 / 3)  # succeeded 2 / ended 3
    assert beta.completion_rate == pytest.approx(0.2)  # 1 / 5
    assert total.completion_rate == pytest.approx(0.375)  # 3 / 8
    assert alpha.retry_rate == pytest.approx(0.6)  # retried 3 / started 5
    assert beta.retry_rate == pytest.approx(0.4)  # 2 / 5
    assert total.retry_rate == pytest.approx(0.5)  # 5 / 10

    # Unsuccessful runs ended in the window, most frequent first, ties by number.
    assert reasons(alpha.run_failure_reasons) == [(VERB_ERROR, 1)]  # A2; A5 is before
    assert reasons(beta.run_failure_reasons) == [
        (UNSPECIFIED, 1),  # B5, a failure without a reason
        (VERB_ERROR, 1),  # B3
        (CANCELLED_REASON, 1),  # B2
        (DEADLINE_EXCEEDED, 1),  # B1
    ]
    assert reasons(total.run_failure_reasons) == [
        (VERB_ERROR, 2),  # A2, B3
        (UNSPECIFIED, 1),
        (CANCELLED_REASON, 1),
        (DEADLINE_EXCEEDED, 1),
    ]
    # Unsuccessful attempts ended in the window.
    assert reasons(alpha.attempt_failure_reasons) == [
        (VERB_ERROR, 3),  # a2-t1 #1, #2, a6-t1 #1
        (TIMEOUT, 1),  # a2-t1 #3
        (DEVICE_LOST, 1),  # a3-c0 #1; a3-t1 #1 and a5-t1 #1 ended before the window
    ]
    assert reasons(beta.attempt_failure_reasons) == [
        (VERB_ERROR, 2),  # b3-t1 #1, b3-t2 #1
        (UNSPECIFIED, 1),  # b5-t1 #1, cancelled without a failure
        (TIMEOUT, 1),  # b1-t1 #1
        (INTERRUPTED, 1),  # b4-t1 #1
    ]
    assert reasons(total.attempt_failure_reasons) == [
        (VERB_ERROR, 5),  # 3 + 2
        (TIMEOUT, 2),  # 1 + 1
        (UNSPECIFIED, 1),
        (INTERRUPTED, 1),
        (DEVICE_LOST, 1),
    ]

    # Percentiles: percentile_cont, interpolated at position p * (n - 1) of the
    # sorted samples (zero-based).
    #
    # Execution time of runs ended in the window (B2 never started):
    #   alpha: A1 615 (01:00 -> 01:10:15), A2 1800, A3 18000 (-2h -> 03:00)
    #     average 20415 / 3 = 6805; p50 = 1800;
    #     p95 at 0.95 * 2 = 1.9: 1800 + 0.9 * (18000 - 1800) = 16380
    #   beta: B4 1200, B1 3600, B5 3600, B3 7200
    #     average 15600 / 4 = 3900; p50 at 1.5: 3600;
    #     p95 at 2.85: 3600 + 0.85 * (7200 - 3600) = 6660
    #   total: 615, 1200, 1800, 3600, 3600, 7200, 18000
    #     average 36015 / 7 = 5145; p50 at 3: 3600;
    #     p95 at 5.7: 7200 + 0.7 * (18000 - 7200) = 14760
    assert seconds(alpha.execution_time) == pytest.approx((3, 6805, 1800, 16380, 18000), abs=1e-6)
    assert seconds(beta.execution_time) == pytest.approx((4, 3900, 3600, 6660, 7200), abs=1e-6)
    assert seconds(total.execution_time) == pytest.approx((7, 5145, 3600, 14760, 18000), abs=1e-6)

    # Approval latency, pairs whose leaving event is in the window:
    #   alpha: a4-gov 20:02 -> 20:32 = 1800 (a5-gov is before the window; a6-gov
    #     leaves at 24:20, after it)
    #   beta: b3-gov 07:00 -> 07:10 = 600; b6-gov 23:00 the day before -> 00:30 = 5400
    #     (rejected; b6-gov2 is still suspended)
    #     average 6000 / 2 = 3000; p50 at 0.5: 3000; p95 at 0.95: 600 + 0.95 * 4800 = 5160
    #   total: 600, 1800, 5400
    #     average 7800 / 3 = 2600; p50 1800; p95 at 1.9: 1800 + 0.9 * 3600 = 5040
    assert seconds(alpha.approval_latency) == pytest.approx((1, 1800, 1800, 1800, 1800), abs=1e-6)
    assert seconds(beta.approval_latency) == pytest.approx((2, 3000, 3000, 5160, 5400), abs=1e-6)
    assert seconds(total.approval_latency) == pytest.approx((3, 2600, 1800, 5040, 5400), abs=1e-6)

    # Recovery time, first failure's end -> success's end, success in the window:
    #   alpha: a3-t1 23:00 the day before -> 01:00 = 7200; a3-c0 01:20 -> 01:40 = 1200
    #     (a6-t1 succeeds after the window)
    #     average 8400 / 2 = 4200; p50 4200; p95 at 0.95: 1200 + 0.95 * 6000 = 6900
    #   beta: b3-t1 07:30 -> 08:00 = 1800; b4-t1 08:05 -> 08:10 = 300 (its second
    #     success follows a success, not a failure)
    #     average 2100 / 2 = 1050; p50 1050; p95 at 0.95: 300 + 0.95 * 1500 = 1725
    #   total: 300, 1200, 1800, 7200
    #     average 10500 / 4 = 2625; p50 at 1.5: 1500;
    #     p95 at 2.85: 1800 + 0.85 * (7200 - 1800) = 6390
    assert seconds(alpha.recovery_time) == pytest.approx((2, 4200, 4200, 6900, 7200), abs=1e-6)
    assert seconds(beta.recovery_time) == pytest.approx((2, 1050, 1050, 1725, 1800), abs=1e-6)
    assert seconds(total.recovery_time) == pytest.approx((4, 2625, 1500, 6390, 7200), abs=1e-6)


async def test_workflow_filter(ledger: Ledger) -> None:
    await populate(ledger.pool)
    everything = await get_stats(ledger.pool, request())
    response = await get_stats(ledger.pool, request(workflow="beta"))

    assert [w.workflow_name for w in response.workflows] == ["beta"]
    assert response.workflows[0] == everything.workflows[1]
    # The total is beta's figures under an empty name.
    expected = ledger_pb2.WorkflowStats()
    expected.CopyFrom(everything.workflows[1])
    expected.workflow_name = ""
    assert response.total == expected
    # Spot checks against the hand-computed beta figures.
    assert response.total.runs_started == 5
    assert response.total.tasks_retried == 2
    assert seconds(response.total.approval_latency) == pytest.approx(
        (2, 3000, 3000, 5160, 5400), abs=1e-6
    )

    nothing = await get_stats(ledger.pool, request(workflow="nope"))
    assert nothing.total == ledger_pb2.WorkflowStats()
    assert list(nothing.workflows) == []


async def test_empty_window(ledger: Ledger) -> None:
    await populate(ledger.pool)
    # A day in which nothing happened (gamma's run ended at -47h).
    response = await get_stats(ledger.pool, request(t(-24), t(-23)))

    assert list(response.workflows) == []
    total = response.total
    assert response.HasField("total")
    assert set(counts(total).values()) == {0}
    assert total.completion_rate == 0.0
    assert total.retry_rate == 0.0
    assert list(total.run_failure_reasons) == []
    assert list(total.attempt_failure_reasons) == []
    for figure in (total.execution_time, total.approval_latency, total.recovery_time):
        assert figure.count == 0
        for field in ("average", "p50", "p95", "max"):
            assert not figure.HasField(field)


async def test_window_with_only_gamma(ledger: Ledger) -> None:
    await populate(ledger.pool)
    # [-48h, -46h) holds G1 only: created, started and ended, 1h of execution.
    response = await get_stats(ledger.pool, request(t(-48), t(-46)))

    assert [w.workflow_name for w in response.workflows] == ["gamma"]
    assert counts(response.total) == {
        "runs_started": 1,
        "runs_ended": 1,
        "runs_succeeded": 1,
        "runs_failed": 0,
        "runs_cancelled": 0,
        "runs_timed_out": 0,
        "tasks_started": 0,
        "tasks_retried": 0,
    }
    assert response.total.completion_rate == 1.0
    assert seconds(response.total.execution_time) == (1, 3600.0, 3600.0, 3600.0, 3600.0)


def _without(field: Literal["start_time", "end_time"]) -> ledger_pb2.GetStatsRequest:
    result = request()
    result.window.ClearField(field)
    return result


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (ledger_pb2.GetStatsRequest(), "window.start_time is required"),
        (_without("start_time"), "window.start_time is required"),
        (_without("end_time"), "window.end_time is required"),
        (request(W, W), "window.end_time must be after window.start_time"),
        (request(t(2), t(1)), "window.end_time must be after window.start_time"),
    ],
)
async def test_invalid_window(
    ledger: Ledger, bad: ledger_pb2.GetStatsRequest, message: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await get_stats(ledger.pool, bad)
    assert raised.value.message == message
    assert raised.value.status.name == "INVALID_ARGUMENT"
