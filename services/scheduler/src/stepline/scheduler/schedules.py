"""Cron schedules: their store, and the ticker that fires them.

Exactly once
    A due firing is claimed in PostgreSQL: one transaction moves the schedule's
    ``next_fire_time`` on with a compare-and-set on its old value and inserts a
    ``schedule_fires`` row for the due time, so of several scheduler replicas
    ticking together exactly one claims it. The claimer then starts the run
    through the same path as ``StartRun``, with the idempotency key
    ``schedule:<schedule_id>:<fire time, RFC 3339 UTC>``, and marks the firing
    done. A firing left undone (the claimer died in between) is retried by any
    replica once its claim is older than ``retry_after_s``; the key makes that
    retry return the same run instead of a second one.

No backfill
    A schedule whose due time passed while no scheduler ran fires once, at
    once, for its earliest missed time; its next time is the first one after
    now.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from croniter import croniter

from stepline.api.ledger.v1 import ledger_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as pb
from stepline.common import auth, paging
from stepline.common.client import rpc
from stepline.common.errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    RemoteError,
    SteplineError,
    Unavailable,
)
from stepline.common.states import RUN_TERMINAL
from stepline.scheduler import access
from stepline.scheduler.definitions import validate_inputs
from stepline.scheduler.scheduler_service import (
    Runs,
    principal_of,
    principal_proto,
)

if TYPE_CHECKING:
    from google.protobuf.timestamp_pb2 import Timestamp

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
S = pb.ScheduleState


def wall_clock() -> datetime:
    return datetime.now(UTC)


def fire_key(schedule_id: str, fire_time: datetime) -> str:
    """The StartRun idempotency key of one firing."""
    return f"schedule:{schedule_id}:{fire_time.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}"


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            f"schedule.timezone {name!r} is not an IANA time zone (e.g. Asia/Shanghai)"
        ) from None


def next_fire(expression: str, timezone: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``expression`` matches, in UTC."""
    start = after.astimezone(_zone(timezone))
    result = croniter(expression, start).get_next(datetime)
    assert isinstance(result, datetime)
    return result.astimezone(UTC)


def _check_cron(expression: str) -> None:
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise InvalidArgument(
            f"schedule.cron_expression {expression!r} must be a five-field cron expression "
            "(minute hour day-of-month month day-of-week)"
        )


def _stamp(target: Timestamp, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def _fingerprint(spec: pb.Schedule, paused: bool, principal: auth.Principal) -> str:
    digest = hashlib.sha256(spec.SerializeToString(deterministic=True))
    digest.update(f"|{paused}|{principal.id}".encode())
    return digest.hexdigest()


def to_schedule(row: Mapping[str, Any]) -> pb.Schedule:
    schedule = pb.Schedule()
    schedule.ParseFromString(row["spec"])
    schedule.schedule_id = row["schedule_id"]
    schedule.state = row["state"]
    schedule.created_by.CopyFrom(
        principal_proto(auth.Principal(row["created_by_id"], frozenset(row["created_by_roles"])))
    )
    _stamp(schedule.create_time, row["create_time"])
    _stamp(schedule.update_time, row["update_time"])
    _stamp(schedule.next_fire_time, row["next_fire_time"])
    _stamp(schedule.last_fire_time, row["last_fire_time"])
    schedule.last_run_id = row["last_run_id"]
    return schedule


class ScheduleStore:
    """Schedules in the scheduler's schema. Callers check permissions first."""

    def __init__(self, pool: asyncpg.Pool, runs: Runs, *, clock: Clock = wall_clock) -> None:
        self.pool = pool
        self.runs = runs
        self.clock = clock

    async def create(
        self,
        given: pb.Schedule,
        *,
        request_id: str,
        paused: bool,
        principal: auth.Principal,
    ) -> pb.Schedule:
        if not given.workflow_name:
            raise InvalidArgument("schedule.workflow_name is required")
        if given.workflow_version < 0:
            raise InvalidArgument("schedule.workflow_version must be 0 (latest) or a version")
        _check_cron(given.cron_expression)
        _zone(given.timezone)
        version = await self.runs.workflows.get(given.workflow_name, given.workflow_version)
        access.check(version.definition, "start", principal)
        spec = pb.Schedule(
            workflow_name=given.workflow_name,
            workflow_version=given.workflow_version,
            cron_expression=given.cron_expression,
            timezone=given.timezone,
            inputs=validate_inputs(version.definition, given.inputs),
            labels=given.labels,
            overlap_policy=given.overlap_policy or pb.OVERLAP_POLICY_SKIP,
            description=given.description,
        )
        fingerprint = _fingerprint(spec, paused, principal)
        now = self.clock()
        row = await self.pool.fetchrow(
            "INSERT INTO schedules (schedule_id, request_id, fingerprint, workflow_name, spec,"
            " state, created_by_id, created_by_roles, create_time, update_time, next_fire_time)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)"
            " ON CONFLICT (request_id) DO NOTHING RETURNING *",
            str(uuid.uuid4()),
            request_id or None,
            fingerprint,
            spec.workflow_name,
            spec.SerializeToString(deterministic=True),
            S.SCHEDULE_STATE_PAUSED if paused else S.SCHEDULE_STATE_ACTIVE,
            principal.id,
            sorted(principal.roles),
            now,
            None if paused else next_fire(spec.cron_expression, spec.timezone, now),
        )
        if row is None:  # a replay of request_id
            row = await self.pool.fetchrow(
                "SELECT * FROM schedules WHERE request_id = $1", request_id
            )
            if row is None:
                raise NotFound(f"the schedule created by request_id {request_id!r} was deleted")
            if row["fingerprint"] != fingerprint:
                raise Aborted(
                    f"request_id {request_id!r} was already used for a different schedule"
                )
        return to_schedule(row)

    async def get(self, schedule_id: str) -> pb.Schedule:
        if not schedule_id:
            raise InvalidArgument("schedule_id is required")
        row = await self.pool.fetchrow(
            "SELECT * FROM schedules WHERE schedule_id = $1", schedule_id
        )
        if row is None:
            raise NotFound(f"schedule {schedule_id!r} does not exist")
        return to_schedule(row)

    async def list(
        self, *, workflow_name: str, page_size: int, page_token: str
    ) -> tuple[list[pb.Schedule], str]:
        size = paging.page_size(page_size)
        args: list[Any] = [size + 1]
        where = ["true"]
        if workflow_name:
            args.append(workflow_name)
            where.append(f"workflow_name = ${len(args)}")
        after = paging.after_position(page_token)
        if after is not None:
            args += list(after)
            where.append(f"(create_time, schedule_id) > (${len(args) - 1}, ${len(args)})")
        rows = await self.pool.fetch(
            f"SELECT * FROM schedules WHERE {' AND '.join(where)}"
            " ORDER BY create_time, schedule_id LIMIT $1",
            *args,
        )
        token = paging.next_token(rows, size, "schedule_id")
        return [to_schedule(r) for r in rows[:size]], token

    async def set_paused(self, schedule_id: str, *, paused: bool) -> pb.Schedule:
        """Pause, or resume from the next due time after now; a no-op if already so."""
        current = await self.get(schedule_id)
        target = S.SCHEDULE_STATE_PAUSED if paused else S.SCHEDULE_STATE_ACTIVE
        if current.state == target:
            return current
        now = self.clock()
        due = None if paused else next_fire(current.cron_expression, current.timezone, now)
        row = await self.pool.fetchrow(
            "UPDATE schedules SET state = $2, next_fire_time = $3, update_time = $4"
            " WHERE schedule_id = $1 RETURNING *",
            schedule_id,
            target,
            due,
            now,
        )
        if row is None:
            raise NotFound(f"schedule {schedule_id!r} does not exist")
        return to_schedule(row)

    async def delete(self, schedule_id: str) -> None:
        await self.pool.execute("DELETE FROM schedules WHERE schedule_id = $1", schedule_id)


class Ticker:
    """Fires due schedules; safe to run in every scheduler replica at once."""

    def __init__(
        self,
        store: ScheduleStore,
        *,
        batch_size: int = 100,
        retry_after_s: float = 60.0,
    ) -> None:
        self.store = store
        self.pool = store.pool
        self.batch_size = batch_size
        self.retry_after_s = retry_after_s

    async def tick(self) -> int:
        """Fire what is due now (and retry firings left undone); returns firings made."""
        now = self.store.clock()
        fired = 0
        due = await self.pool.fetch(
            "SELECT * FROM schedules WHERE state = $1 AND next_fire_time <= $2"
            " ORDER BY next_fire_time LIMIT $3",
            S.SCHEDULE_STATE_ACTIVE,
            now,
            self.batch_size,
        )
        for row in due:
            claimed = await self._claim(row, now)
            if claimed is not None:
                await self._fire_logged(claimed, row["next_fire_time"])
                fired += 1
        for schedule, fire_time in await self._claim_stale(now):
            await self._fire_logged(schedule, fire_time)
            fired += 1
        return fired

    async def _fire_logged(self, row: Mapping[str, Any], fire_time: datetime) -> None:
        try:
            await self._fire(row, fire_time)
        except Exception:  # left undone, retried after retry_after_s
            log.exception("schedule %s: firing %s failed", row["schedule_id"], fire_time)

    async def _claim(self, row: Mapping[str, Any], now: datetime) -> asyncpg.Record | None:
        spec = to_schedule(row)
        due: datetime = row["next_fire_time"]
        following = next_fire(spec.cron_expression, spec.timezone, max(now, due))
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchrow(
                "UPDATE schedules SET next_fire_time = $3, last_fire_time = $2"
                " WHERE schedule_id = $1 AND state = $4 AND next_fire_time = $2 RETURNING *",
                row["schedule_id"],
                due,
                following,
                S.SCHEDULE_STATE_ACTIVE,
            )
            if claimed is None:
                return None  # another replica claimed it, or it was paused or deleted
            await conn.execute(
                "INSERT INTO schedule_fires (schedule_id, fire_time, claim_time)"
                " VALUES ($1, $2, $3)",
                row["schedule_id"],
                due,
                now,
            )
        return claimed

    async def _claim_stale(self, now: datetime) -> list[tuple[asyncpg.Record, datetime]]:
        """Firings some replica claimed but did not finish; taken over one by one."""
        stale = await self.pool.fetch(
            "UPDATE schedule_fires f SET claim_time = $1 FROM ("
            "  SELECT schedule_id, fire_time FROM schedule_fires"
            "  WHERE NOT done AND claim_time < $2 LIMIT $3 FOR UPDATE SKIP LOCKED) o"
            " WHERE f.schedule_id = o.schedule_id AND f.fire_time = o.fire_time"
            " RETURNING f.schedule_id, f.fire_time",
            now,
            now - timedelta(seconds=self.retry_after_s),
            self.batch_size,
        )
        result: list[tuple[asyncpg.Record, datetime]] = []
        for fire in stale:
            row = await self.pool.fetchrow(
                "SELECT * FROM schedules WHERE schedule_id = $1", fire["schedule_id"]
            )
            if row is not None:
                result.append((row, fire["fire_time"]))
        return result

    async def _fire(self, row: Mapping[str, Any], fire_time: datetime) -> None:
        schedule = to_schedule(row)
        schedule_id = schedule.schedule_id
        try:
            previous = await self._still_running(row["latest_run_id"])
            if previous and schedule.overlap_policy != pb.OVERLAP_POLICY_ALLOW:
                await self._finish(schedule_id, fire_time, "", f"skipped: run {previous} running")
                return
            request = pb.StartRunRequest(
                request_id=fire_key(schedule_id, fire_time),
                workflow_name=schedule.workflow_name,
                workflow_version=schedule.workflow_version,
                inputs=schedule.inputs,
                labels=schedule.labels,
            )
            started = await self.store.runs.start(
                request, principal_of(schedule.created_by), schedule_id=schedule_id
            )
        except SteplineError as exc:
            if isinstance(exc, Unavailable | DeadlineExceeded | RemoteError):
                log.warning(
                    "schedule %s: firing %s failed, will retry: %s", schedule_id, fire_time, exc
                )
                return  # left undone: retried after retry_after_s
            log.warning("schedule %s: firing %s refused: %s", schedule_id, fire_time, exc)
            await self._finish(schedule_id, fire_time, "", f"refused: {exc}")
            return
        await self._finish(schedule_id, fire_time, started.run.run_id, "started")

    async def _still_running(self, run_id: str) -> str:
        if not run_id:
            return ""
        try:
            got = await rpc(self.store.runs.ledger.GetRun(ledger_pb2.GetRunRequest(run_id=run_id)))
        except NotFound:
            return ""
        return "" if got.run.state in RUN_TERMINAL else run_id

    async def _finish(
        self, schedule_id: str, fire_time: datetime, run_id: str, outcome: str
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE schedule_fires SET done = true, run_id = $3, outcome = $4"
                " WHERE schedule_id = $1 AND fire_time = $2",
                schedule_id,
                fire_time,
                run_id,
                outcome,
            )
            await conn.execute(
                "UPDATE schedules SET last_run_id = $3,"
                " latest_run_id = CASE WHEN $3 = '' THEN latest_run_id ELSE $3 END"
                " WHERE schedule_id = $1 AND last_fire_time <= $2",
                schedule_id,
                fire_time,
                run_id,
            )
