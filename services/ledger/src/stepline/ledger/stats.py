"""LedgerService.GetStats: aggregate figures of runs, attempts and approvals over a window.

Three read-only queries, run in one snapshot, compute every figure of
``WorkflowStats``: counted facts, failure reasons and duration distributions.
Each groups by ``GROUPING SETS`` so one pass yields the figures per workflow and
over all matching workflows (the ``total``, whose ``is_total`` column is true).
Every query takes the same parameters: $1 and $2 the window's bounds (start
inclusive, end exclusive) and $3 the workflow name ('' for all workflows).

Definitions, beyond the comments of ledger.proto:

- A run "ended" in the window when its end_time is in it and its state is terminal.
- tasks_started counts the tasks and chunks (attempt owners) with an attempt that
  ended in the window; of those, tasks_retried counts the owners with more than one
  attempt started before the window's end (so a closed window's figures do not
  change as later attempts are recorded).
- A failure without a reason, or with a name this build does not know, is counted
  as FAILURE_REASON_UNSPECIFIED; reasons are ordered by count, most first, then by
  reason number.
- approval_latency pairs a GOVERN task's TASK_STATE_CHANGED event into SUSPENDED
  with the task's next TASK_STATE_CHANGED event, when that one leaves SUSPENDED
  (to any state: approved, rejected, expired or cancelled); a pair counts when its
  leaving event is in the window.
- recovery_time measures, for each successful attempt that ended in the window,
  from the end of the first FAILED or TIMED_OUT attempt of the same owner since
  its previous successful attempt (a rerun can re-run a succeeded task) to the end
  of the successful attempt; a success with no such failure before it is no sample.
- Percentiles are PostgreSQL's ``percentile_cont``: with the n samples sorted,
  the p-th percentile is linearly interpolated at the zero-based position
  p * (n - 1) (as numpy's default "linear" method, or PERCENTILE.INC). The average
  is PostgreSQL's ``avg`` of intervals (microsecond resolution).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import asyncpg
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.common.v1 import common_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.common.errors import InvalidArgument

# The runs of the requested workflow (all workflows when $3 is empty); every
# figure reaches runs, attempts and events through it.
_SCOPED = """
scoped AS (
    SELECT run_id, workflow_name, state, create_time, start_time, end_time, failure
    FROM runs
    WHERE $3::text = '' OR workflow_name = $3::text
)"""

# Counted facts: one row per run, task or chunk that a figure counts, named by
# the WorkflowStats field it adds to.
_COUNTS_SQL = f"""
WITH {_SCOPED},
ended_runs AS (
    SELECT workflow_name, state
    FROM scoped
    WHERE end_time >= $1 AND end_time < $2 AND state IN (5, 6, 7, 8)
),
started_owners AS (  -- tasks and chunks with an attempt that ended in the window
    SELECT DISTINCT a.owner_id, s.workflow_name
    FROM attempts a JOIN scoped s USING (run_id)
    WHERE a.end_time >= $1 AND a.end_time < $2
),
owner_attempts AS (  -- their attempts started before the window's end
    SELECT o.owner_id, o.workflow_name, count(*) AS attempts
    FROM started_owners o JOIN attempts a USING (owner_id)
    WHERE a.start_time < $2
    GROUP BY o.owner_id, o.workflow_name
),
facts AS (
    SELECT workflow_name, 'runs_started' AS fact
    FROM scoped WHERE create_time >= $1 AND create_time < $2
    UNION ALL
    SELECT workflow_name, 'runs_ended' FROM ended_runs
    UNION ALL
    SELECT workflow_name, CASE state
        WHEN 5 THEN 'runs_succeeded'
        WHEN 6 THEN 'runs_failed'
        WHEN 7 THEN 'runs_cancelled'
        ELSE 'runs_timed_out'
    END
    FROM ended_runs
    UNION ALL
    SELECT workflow_name, 'tasks_started' FROM owner_attempts
    UNION ALL
    SELECT workflow_name, 'tasks_retried' FROM owner_attempts WHERE attempts > 1
)
SELECT fact AS figure, workflow_name, GROUPING(workflow_name) = 1 AS is_total,
       count(*) AS n
FROM facts
GROUP BY GROUPING SETS ((fact, workflow_name), (fact))
"""

# Failure reasons (enum names, NULL when absent) of unsuccessful runs and of
# unsuccessful task and chunk attempts that ended in the window.
_REASONS_SQL = f"""
WITH {_SCOPED},
failures AS (
    SELECT 'run_failure_reasons' AS figure, workflow_name, failure->>'reason' AS reason
    FROM scoped
    WHERE end_time >= $1 AND end_time < $2 AND state IN (6, 7, 8)
    UNION ALL
    SELECT 'attempt_failure_reasons', s.workflow_name, a.failure->>'reason'
    FROM attempts a JOIN scoped s USING (run_id)
    WHERE a.end_time >= $1 AND a.end_time < $2 AND a.state IN (5, 6, 7)
)
SELECT figure, workflow_name, GROUPING(workflow_name) = 1 AS is_total, reason,
       count(*) AS n
FROM failures
GROUP BY GROUPING SETS ((figure, reason, workflow_name), (figure, reason))
"""

# Duration samples, named by the WorkflowStats field they describe.
_DURATIONS_SQL = f"""
WITH {_SCOPED},
execution AS (
    SELECT workflow_name, end_time - start_time AS duration
    FROM scoped
    WHERE end_time >= $1 AND end_time < $2 AND state IN (5, 6, 7, 8)
      AND start_time IS NOT NULL
),
govern_moves AS (  -- state changes of GOVERN tasks, each with the task's next one
    SELECT e.run_id, e.time, e.payload->>'to_state' AS to_state,
           lead(e.time) OVER next AS next_time,
           lead(e.payload->>'from_state') OVER next AS next_from_state
    FROM events e JOIN tasks t ON t.task_id = e.task_id
    WHERE e.type = 3 AND t.kind = 4 AND e.time < $2
      AND e.run_id IN (SELECT run_id FROM scoped)
    WINDOW next AS (PARTITION BY e.run_id, e.task_id ORDER BY e.sequence)
),
approval AS (
    SELECT s.workflow_name, m.next_time - m.time AS duration
    FROM govern_moves m JOIN scoped s USING (run_id)
    WHERE m.to_state = 'SUSPENDED' AND m.next_from_state = 'SUSPENDED'
      AND m.next_time >= $1
),
streaks AS (  -- attempts of owners that succeeded in the window, numbered by the
              -- successes before them: a streak ends with (at most) one success
    SELECT a.owner_id, a.run_id, a.state, a.end_time,
           count(*) FILTER (WHERE a.state = 4) OVER (
               PARTITION BY a.owner_id ORDER BY a.attempt_number
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
           ) AS streak
    FROM attempts a
    WHERE a.run_id IN (SELECT run_id FROM scoped)
      AND a.owner_id IN (
          SELECT owner_id FROM attempts
          WHERE state = 4 AND end_time >= $1 AND end_time < $2
      )
),
recoveries AS (
    SELECT run_id,
           min(end_time) FILTER (WHERE state IN (5, 6)) AS first_failure,
           max(end_time) FILTER (WHERE state = 4) AS success
    FROM streaks
    GROUP BY owner_id, run_id, streak
),
recovery AS (
    SELECT s.workflow_name, r.success - r.first_failure AS duration
    FROM recoveries r JOIN scoped s USING (run_id)
    WHERE r.first_failure IS NOT NULL AND r.success >= $1 AND r.success < $2
),
samples AS (
    SELECT 'execution_time' AS figure, workflow_name, duration FROM execution
    UNION ALL
    SELECT 'approval_latency', workflow_name, duration FROM approval
    UNION ALL
    SELECT 'recovery_time', workflow_name, duration FROM recovery
)
SELECT figure, workflow_name, GROUPING(workflow_name) = 1 AS is_total,
       count(*) AS n,
       avg(duration) AS average,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration) AS p95,
       max(duration) AS max
FROM samples
GROUP BY GROUPING SETS ((figure, workflow_name), (figure))
"""


async def get_stats(
    pool: asyncpg.Pool, request: ledger_pb2.GetStatsRequest
) -> ledger_pb2.GetStatsResponse:
    """Figures of the runs (of request.workflow_name, or all) over request.window."""
    start, end = _window(request)
    args = (start, end, request.workflow_name)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        counts = await conn.fetch(_COUNTS_SQL, *args)
        reasons = await conn.fetch(_REASONS_SQL, *args)
        durations = await conn.fetch(_DURATIONS_SQL, *args)

    stats = _StatsTable()
    for row in counts:
        setattr(stats.of(row), row["figure"], row["n"])
    _add_reasons(stats, reasons)
    for row in durations:
        getattr(stats.of(row), row["figure"]).CopyFrom(_duration_stats(row))
    return stats.response()


def _window(request: ledger_pb2.GetStatsRequest) -> tuple[datetime, datetime]:
    window = request.window
    start = _bound(window.start_time, "window.start_time", set_=window.HasField("start_time"))
    end = _bound(window.end_time, "window.end_time", set_=window.HasField("end_time"))
    if end <= start:
        raise InvalidArgument("window.end_time must be after window.start_time")
    return start, end


def _bound(stamp: Timestamp, field: str, *, set_: bool) -> datetime:
    if not set_:
        raise InvalidArgument(f"{field} is required")
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as error:
        raise InvalidArgument(f"{field} is not a valid timestamp") from error


class _StatsTable:
    """WorkflowStats by workflow name; the total under ''."""

    def __init__(self) -> None:
        self.by_name: dict[str, ledger_pb2.WorkflowStats] = {"": ledger_pb2.WorkflowStats()}

    def of(self, row: asyncpg.Record) -> ledger_pb2.WorkflowStats:
        name = "" if row["is_total"] else row["workflow_name"]
        if name not in self.by_name:
            self.by_name[name] = ledger_pb2.WorkflowStats(workflow_name=name)
        return self.by_name[name]

    def response(self) -> ledger_pb2.GetStatsResponse:
        for stats in self.by_name.values():
            stats.completion_rate = _ratio(stats.runs_succeeded, stats.runs_ended)
            stats.retry_rate = _ratio(stats.tasks_retried, stats.tasks_started)
        total = self.by_name.pop("")
        return ledger_pb2.GetStatsResponse(
            total=total, workflows=[self.by_name[name] for name in sorted(self.by_name)]
        )


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _add_reasons(stats: _StatsTable, rows: list[asyncpg.Record]) -> None:
    """Append the FailureReasonCounts, most frequent first, ties by reason number."""
    tallies: defaultdict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    targets: dict[tuple[str, str], ledger_pb2.WorkflowStats] = {}
    for row in rows:
        target = stats.of(row)
        key = (target.workflow_name, row["figure"])
        targets[key] = target
        tallies[key][_reason(row["reason"])] += row["n"]
    for key, tally in tallies.items():
        counts = getattr(targets[key], key[1])
        for reason, n in sorted(tally.items(), key=lambda item: (-item[1], item[0])):
            counts.add(reason=reason, count=n)


def _reason(name: str | None) -> common_pb2.FailureReason.ValueType:
    try:
        return common_pb2.FailureReason.Value(name or "FAILURE_REASON_UNSPECIFIED")
    except ValueError:
        return common_pb2.FAILURE_REASON_UNSPECIFIED


def _duration_stats(row: asyncpg.Record) -> ledger_pb2.DurationStats:
    return ledger_pb2.DurationStats(
        count=row["n"],
        average=_duration(row["average"]),
        p50=_duration(row["p50"]),
        p95=_duration(row["p95"]),
        max=_duration(row["max"]),
    )


def _duration(value: timedelta) -> Duration:
    result = Duration()
    result.FromTimedelta(value)
    return result
