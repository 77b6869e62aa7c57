"""Approval requests and their decisions.

Every change to a request happens in one transaction that holds the request's
row lock (``SELECT ... FOR UPDATE``), so decisions racing on one request are
applied one after the other and the request reaches exactly one final state.
The same transaction writes what the change owes to others (see
:mod:`stepline.approvals.outbox`): the ``ApprovalRequested``/``ApprovalDecided``
event, the ledger record of each decision, and a webhook delivery per matching
subscription.

Rules (see :mod:`stepline.approvals.policy` for who may decide):

* quorum: the request is APPROVED once ``required_approvals`` distinct
  principals approved it; an approval by a principal that already approved is
  not counted again (nor recorded again);
* one rejection by an eligible principal rejects it;
* no decision once it is final or past ``expire_time`` (FAILED_PRECONDITION);
  a request found past its expiry is marked EXPIRED then and there, and the
  sweeper (:meth:`ApprovalStore.expire_due`) marks the others.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.api.common.v1 import common_pb2
from stepline.api.events.v1 import events_pb2
from stepline.api.ledger.v1 import ledger_pb2
from stepline.approvals import convert, outbox, policy, subscriptions
from stepline.approvals.idempotency import RequestKey, remember, replayed
from stepline.common import paging
from stepline.common.auth import Principal
from stepline.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from stepline.common.requests import fingerprint

log = logging.getLogger(__name__)

S = pb.ApprovalState
PENDING = S.APPROVAL_STATE_PENDING
APPROVED = S.APPROVAL_STATE_APPROVED
REJECTED = S.APPROVAL_STATE_REJECTED
EXPIRED = S.APPROVAL_STATE_EXPIRED
CANCELLED = S.APPROVAL_STATE_CANCELLED
SYSTEM = Principal("system:approvals", frozenset())

MAX_ID = 200
CLOCK_SLACK = timedelta(seconds=5)
MAX_REASON = 4096
MAX_CONTEXT_BYTES = 64 * 1024
MAX_LABELS = 64

_EVENT_TYPE: dict[int, int] = {
    APPROVED: pb.APPROVAL_EVENT_TYPE_DECIDED,
    REJECTED: pb.APPROVAL_EVENT_TYPE_DECIDED,
    EXPIRED: pb.APPROVAL_EVENT_TYPE_EXPIRED,
    CANCELLED: pb.APPROVAL_EVENT_TYPE_CANCELLED,
}
_OUTCOME_NAMES: dict[int, str] = {
    pb.DECISION_OUTCOME_APPROVED: "approved",
    pb.DECISION_OUTCOME_REJECTED: "rejected",
}
_CHANNEL_NAMES: dict[int, str] = {
    pb.DECISION_CHANNEL_GRPC: "grpc",
    pb.DECISION_CHANNEL_WEBHOOK: "webhook",
}

Row = Any


class Replayed(AlreadyExists):
    """An inbound delivery id that was seen before."""


def _principal_pb(principal: Principal) -> common_pb2.Principal:
    return convert.principal(principal.id, principal.roles)


def _gate(row: Row) -> policy.Gate:
    return policy.Gate(
        approver_principals=tuple(row["approver_principals"]),
        approver_roles=tuple(row["approver_roles"]),
        allow_initiator=row["allow_initiator"],
        initiator_id=row["initiator_id"],
    )


def _required(value: str, name: str) -> None:
    if not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{name} must be at most {MAX_ID} characters")


def check_reason(reason: str, *, required: bool) -> str:
    if required and not reason.strip():
        raise InvalidArgument("reason is required: say why, it is recorded with the decision")
    if len(reason) > MAX_REASON:
        raise InvalidArgument(f"reason must be at most {MAX_REASON} characters")
    return reason.strip()


def _check_create(request: pb.CreateApprovalRequest) -> None:
    for name in ("run_id", "task_id", "step_id", "workflow_name"):
        _required(getattr(request, name), name)
    if not request.HasField("policy"):
        raise InvalidArgument("policy is required (the GOVERN step's approval policy)")
    policy.validate(request.policy)
    if len(request.labels) > MAX_LABELS:
        raise InvalidArgument(f"labels: at most {MAX_LABELS}")
    if request.context.ByteSize() > MAX_CONTEXT_BYTES:
        raise InvalidArgument(f"context must be at most {MAX_CONTEXT_BYTES} bytes")


class ApprovalStore:
    """Reads and changes of approval requests; ``pulse`` wakes the outbox loops."""

    def __init__(self, pool: asyncpg.Pool, *, pulse: outbox.Pulse | None = None) -> None:
        self.pool = pool
        self.pulse = pulse or outbox.Pulse()

    # --- reads -----------------------------------------------------------------

    async def _read(self, conn: asyncpg.Connection, row: Row) -> pb.Approval:
        decisions = await conn.fetch(
            "SELECT * FROM decisions WHERE approval_id = $1 ORDER BY decide_time, decision_id",
            row["approval_id"],
        )
        return convert.approval(row, decisions)

    async def get(self, approval_id: str) -> pb.Approval:
        _required(approval_id, "approval_id")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM approvals WHERE approval_id = $1", approval_id)
            if row is None:
                raise NotFound(f"approval {approval_id!r} does not exist")
            return await self._read(conn, row)

    async def list(
        self, request: pb.ListApprovalsRequest, caller: Principal
    ) -> pb.ListApprovalsResponse:
        size = paging.page_size(request.page_size)
        position = paging.after_position(request.page_token)
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if request.states:
            where.append(f"state = ANY({arg(list(request.states))}::smallint[])")
        if request.run_id:
            where.append(f"run_id = {arg(request.run_id)}")
        if request.workflow_name:
            where.append(f"workflow_name = {arg(request.workflow_name)}")
        if request.actionable_only:
            who = arg(caller.id)
            roles = arg(sorted(caller.roles))
            admin = arg(caller.has_role(policy.ADMIN_ROLE))
            where.append(f"state = {PENDING}")
            where.append("(expire_time IS NULL OR expire_time > clock_timestamp())")
            where.append(policy.eligible_sql(who, roles, admin))
            # What the caller already approved waits for others, not for it.
            where.append(
                "NOT EXISTS (SELECT 1 FROM decisions d"
                f" WHERE d.approval_id = approvals.approval_id AND d.actor_id = {who})"
            )
        if position is not None:
            when, last_id = position
            where.append(f"(create_time, approval_id) < ({arg(when)}, {arg(last_id)})")
        sql = "SELECT * FROM approvals"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY create_time DESC, approval_id DESC LIMIT {arg(size + 1)}"
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
            page = rows[:size]
            decisions = await conn.fetch(
                "SELECT * FROM decisions WHERE approval_id = ANY($1::text[])"
                " ORDER BY decide_time, decision_id",
                [r["approval_id"] for r in page],
            )
        by_approval: dict[str, list[Row]] = {}
        for d in decisions:
            by_approval.setdefault(d["approval_id"], []).append(d)
        return pb.ListApprovalsResponse(
            approvals=[convert.approval(r, by_approval.get(r["approval_id"], [])) for r in page],
            next_page_token=paging.next_token(rows, size, "approval_id"),
        )

    # --- create ----------------------------------------------------------------

    async def create(
        self, request: pb.CreateApprovalRequest, caller: Principal
    ) -> pb.CreateApprovalResponse:
        """Record a request (idempotent on request_id) and announce it."""
        key = RequestKey.of("CreateApproval", request.request_id, fingerprint(request))
        _check_create(request)
        async with self.pool.acquire() as conn, conn.transaction():
            now: datetime = await conn.fetchval("SELECT clock_timestamp()")
            expire = (
                now + request.policy.expiry.ToTimedelta()
                if request.policy.HasField("expiry")
                else None
            )
            p = request.policy
            row = await conn.fetchrow(
                "INSERT INTO approvals (approval_id, request_id, fingerprint, run_id, task_id,"
                " step_id, workflow_name, labels, state, policy, approver_principals,"
                " approver_roles, required_approvals, allow_initiator, context, initiator_id,"
                " initiator_roles, create_time, expire_time)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,"
                " $16, $17, $18, $19)"
                " ON CONFLICT (request_id) DO NOTHING RETURNING *",
                str(uuid.uuid4()),
                key.request_id,
                key.fingerprint,
                request.run_id,
                request.task_id,
                request.step_id,
                request.workflow_name,
                dict(request.labels),
                PENDING,
                p.SerializeToString(deterministic=True),
                list(dict.fromkeys(p.approver_principals)),
                list(dict.fromkeys(p.approver_roles)),
                policy.required_approvals(p),
                p.allow_initiator,
                convert.to_json(request.context),
                request.initiator.id,
                list(request.initiator.roles),
                now,
                expire,
            )
            if row is None:  # the request_id was used before (or just now, concurrently)
                row = await conn.fetchrow(
                    "SELECT * FROM approvals WHERE request_id = $1", key.request_id
                )
                assert row is not None
                if row["fingerprint"] != key.fingerprint:
                    raise _conflict(key)
                return pb.CreateApprovalResponse(
                    approval=await self._read(conn, row), created=False
                )
            approval = convert.approval(row)
            requested = events_pb2.ApprovalRequested(
                approval_id=approval.approval_id,
                task_id=approval.task_id,
                workflow_name=approval.workflow_name,
            )
            if approval.HasField("expire_time"):
                requested.expire_time.CopyFrom(approval.expire_time)
            await outbox.add_event(
                conn,
                run_id=approval.run_id,
                actor=_principal_pb(caller),
                payload=("approval_requested", requested),
                now=now,
            )
            await subscriptions.enqueue(conn, approval, pb.APPROVAL_EVENT_TYPE_REQUESTED)
        log.info(
            "approval %s requested for task %s of run %s",
            approval.approval_id,
            approval.task_id,
            approval.run_id,
        )
        self.pulse.fire()
        return pb.CreateApprovalResponse(approval=approval, created=True)

    # --- decisions -------------------------------------------------------------

    async def decide(
        self,
        *,
        approval_id: str,
        actor: Principal,
        outcome: int,
        reason: str,
        channel: int,
        key: RequestKey | None = None,
        inbound_delivery_id: str | None = None,
    ) -> pb.Approval:
        """Record ``actor``'s decision; returns the request after it.

        ``key``: the RPC's idempotency key (gRPC). ``inbound_delivery_id``: the
        webhook's delivery id, refused with :class:`Replayed` if seen before and
        stored with the decision otherwise.
        """
        _required(approval_id, "approval_id")
        reason = check_reason(reason, required=outcome == pb.DECISION_OUTCOME_REJECTED)
        expired_now = False
        async with self.pool.acquire() as conn, conn.transaction():
            row = await _lock(conn, approval_id)
            if key is not None:
                done = await replayed(conn, key, pb.Approval)
                if done is not None:
                    return done
            if inbound_delivery_id is not None:
                seen = await conn.fetchval(
                    "SELECT 1 FROM inbound_deliveries WHERE delivery_id = $1", inbound_delivery_id
                )
                if seen:
                    raise Replayed(f"delivery {inbound_delivery_id!r} was already received")
            why = policy.refusal(_gate(row), actor)
            if why is not None:
                raise PermissionDenied(why)
            if row["state"] != PENDING:
                raise FailedPrecondition(
                    f"approval {approval_id!r} is already {convert.STATE_NAMES[row['state']]}; "
                    "it takes no more decisions"
                )
            if row["expire_time"] is not None and row["expire_time"] <= row["now"]:
                await self._close(conn, row, EXPIRED, SYSTEM, "expiry passed")
                expired_now = True
            else:
                approval = await self._apply(conn, row, actor, outcome, reason, channel)
                if key is not None:
                    await remember(conn, key, approval)
                if inbound_delivery_id is not None:
                    await _remember_delivery(conn, inbound_delivery_id, approval_id, actor)
        if expired_now:
            self.pulse.fire()
            raise FailedPrecondition(
                f"approval {approval_id!r} expired at {row['expire_time'].isoformat()}; "
                "it takes no more decisions"
            )
        self.pulse.fire()
        return approval

    async def _apply(
        self,
        conn: asyncpg.Connection,
        row: Row,
        actor: Principal,
        outcome: int,
        reason: str,
        channel: int,
    ) -> pb.Approval:
        """Write one decision on a PENDING request (lock held) and what follows from it."""
        approval_id = row["approval_id"]
        approvers = await conn.fetch(
            "SELECT actor_id FROM decisions WHERE approval_id = $1 AND outcome = $2",
            approval_id,
            pb.DECISION_OUTCOME_APPROVED,
        )
        approver_ids = {r["actor_id"] for r in approvers}
        if outcome == pb.DECISION_OUTCOME_APPROVED and actor.id in approver_ids:
            log.info("approval %s: %s approved again; not counted twice", approval_id, actor.id)
            return await self._read(conn, row)
        if outcome == pb.DECISION_OUTCOME_REJECTED:
            state = REJECTED
        elif len(approver_ids | {actor.id}) >= row["required_approvals"]:
            state = APPROVED
        else:
            state = PENDING
        now: datetime = row["now"]
        decision_id = uuid.uuid4()
        await conn.execute(
            "INSERT INTO decisions (decision_id, approval_id, actor_id, actor_roles, outcome,"
            " reason, channel, decide_time, state_after)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            decision_id,
            approval_id,
            actor.id,
            sorted(actor.roles),
            outcome,
            reason,
            channel,
            now,
            state,
        )
        await outbox.add_ledger_record(
            conn,
            ledger_pb2.RecordApprovalDecisionRequest(
                request_id=str(decision_id),
                run_id=row["run_id"],
                task_id=row["task_id"],
                approval_id=approval_id,
                actor=_principal_pb(actor),
                outcome=_OUTCOME_NAMES[outcome],
                reason=reason,
                channel=_CHANNEL_NAMES[channel],
                approval_state=convert.STATE_NAMES[state],
            ),
        )
        log.info(
            "approval %s: %s by %s via %s; now %s",
            approval_id,
            _OUTCOME_NAMES[outcome],
            actor.id,
            _CHANNEL_NAMES[channel],
            convert.STATE_NAMES[state],
        )
        if state == PENDING:
            return await self._read(conn, row)
        return await self._finish(conn, row, state, actor)

    async def _close(
        self, conn: asyncpg.Connection, row: Row, state: int, actor: Principal, reason: str
    ) -> pb.Approval:
        """End a PENDING request without a decision (EXPIRED or CANCELLED)."""
        await conn.execute(
            "UPDATE approvals SET closed_by = $2, close_reason = $3 WHERE approval_id = $1",
            row["approval_id"],
            actor.id,
            reason,
        )
        log.info(
            "approval %s %s by %s: %s",
            row["approval_id"],
            convert.STATE_NAMES[state],
            actor.id,
            reason,
        )
        return await self._finish(conn, row, state, actor)

    async def _finish(
        self, conn: asyncpg.Connection, row: Row, state: int, actor: Principal
    ) -> pb.Approval:
        """Move a request (lock held) to its final ``state`` and announce it."""
        updated = await conn.fetchrow(
            "UPDATE approvals SET state = $2, decide_time = $3 WHERE approval_id = $1 RETURNING *",
            row["approval_id"],
            state,
            row["now"],
        )
        approval = await self._read(conn, updated)
        await outbox.add_event(
            conn,
            run_id=approval.run_id,
            actor=_principal_pb(actor),
            payload=(
                "approval_decided",
                events_pb2.ApprovalDecided(
                    approval_id=approval.approval_id,
                    task_id=approval.task_id,
                    state=state,  # type: ignore[arg-type]
                ),
            ),
            now=row["now"],
        )
        await subscriptions.enqueue(conn, approval, _EVENT_TYPE[state])
        return approval

    # --- cancel, expiry, ended runs ----------------------------------------------

    async def cancel(
        self, request: pb.CancelApprovalRequest, caller: Principal
    ) -> pb.CancelApprovalResponse:
        _required(request.approval_id, "approval_id")
        reason = check_reason(request.reason, required=False)
        key = RequestKey.of("CancelApproval", request.request_id, fingerprint(request, caller.id))
        async with self.pool.acquire() as conn, conn.transaction():
            row = await _lock(conn, request.approval_id)
            done = await replayed(conn, key, pb.CancelApprovalResponse)
            if done is not None:
                return done
            if row["state"] == CANCELLED:
                approval = await self._read(conn, row)
            elif row["state"] != PENDING:
                raise FailedPrecondition(
                    f"approval {request.approval_id!r} is already "
                    f"{convert.STATE_NAMES[row['state']]}; only a PENDING request can be cancelled"
                )
            else:
                approval = await self._close(
                    conn, row, CANCELLED, caller, reason or "cancelled by request"
                )
            response = pb.CancelApprovalResponse(approval=approval)
            await remember(conn, key, response)
        self.pulse.fire()
        return response

    async def forget_inbound(self, *, older_than_s: float) -> int:
        """Drop seen inbound delivery ids older than ``older_than_s``: a replay that
        old fails the timestamp check anyway."""
        done = await self.pool.execute(
            "DELETE FROM inbound_deliveries"
            " WHERE receive_time < clock_timestamp() - $1 * interval '1 second'",
            older_than_s,
        )
        return int(done.split()[-1])

    async def expire_due(self, *, limit: int = 100) -> int:
        """Mark PENDING requests past their expiry EXPIRED; returns how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM approvals"
                " WHERE state = $1 AND expire_time <= clock_timestamp()"
                " ORDER BY expire_time LIMIT $2 FOR UPDATE SKIP LOCKED",
                PENDING,
                limit,
            )
            for row in await _stamped(conn, rows):
                await self._close(conn, row, EXPIRED, SYSTEM, "expiry passed")
        if rows:
            self.pulse.fire()
        return len(rows)

    async def runs_with_pending(self, run_ids: Sequence[str]) -> set[str]:
        """Which of ``run_ids`` have PENDING requests: one query for many runs,
        where :meth:`cancel_for_run` costs a transaction per run."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT run_id FROM approvals WHERE run_id = ANY($1::text[]) AND state = $2",
            list(run_ids),
            PENDING,
        )
        return {row["run_id"] for row in rows}

    async def cancel_for_run(self, run_id: str, *, state_name: str, ended: datetime) -> int:
        """Cancel the PENDING requests of a run that ended at ``ended``.

        Only requests created before then (plus :data:`CLOCK_SLACK`, as the
        ledger's clock is not ours) are cancelled, so that a late copy of the
        event spares the requests of the run's later rerun.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM approvals"
                " WHERE run_id = $1 AND state = $2 AND create_time <= $3"
                " ORDER BY create_time FOR UPDATE",
                run_id,
                PENDING,
                ended + CLOCK_SLACK,
            )
            for row in await _stamped(conn, rows):
                await self._close(conn, row, CANCELLED, SYSTEM, f"the run ended {state_name}")
        if rows:
            self.pulse.fire()
        return len(rows)


async def _lock(conn: asyncpg.Connection, approval_id: str) -> Row:
    row = await conn.fetchrow(
        "SELECT * FROM approvals WHERE approval_id = $1 FOR UPDATE", approval_id
    )
    if row is None:
        raise NotFound(f"approval {approval_id!r} does not exist")
    return (await _stamped(conn, [row]))[0]


async def _stamped(conn: asyncpg.Connection, rows: list[Row]) -> list[dict[str, Any]]:
    """``rows`` (locked) with ``now``: the time read once the locks are held, so
    the times of serialized changes follow their order."""
    now = await conn.fetchval("SELECT clock_timestamp()")
    return [{**dict(row), "now": now} for row in rows]


async def _remember_delivery(
    conn: asyncpg.Connection, delivery_id: str, approval_id: str, actor: Principal
) -> None:
    try:
        await conn.execute(
            "INSERT INTO inbound_deliveries (delivery_id, approval_id, actor_id)"
            " VALUES ($1, $2, $3)",
            delivery_id,
            approval_id,
            actor.id,
        )
    except asyncpg.UniqueViolationError:
        raise Replayed(f"delivery {delivery_id!r} was already received") from None


def _conflict(key: RequestKey) -> Aborted:
    return Aborted(
        f"request_id {key.request_id!r} was already used for a different {key.method} "
        "request; use a new request_id"
    )
