"""Fixtures for the ledger's tests: a migrated schema in a fresh database and a
store whose writes go through the group committer, as in the service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.db import create_pool, load_migrations
from stepline.ledger.committer import GroupCommitter
from stepline.ledger.store import LedgerStore

EXECUTOR = "executor-a"
ACTOR = common_pb2.Principal(id=EXECUTOR, roles=["service"])
OPERATOR = common_pb2.Principal(id="alice", roles=["operator"])


@dataclass
class Ledger:
    pool: asyncpg.Pool
    store: LedgerStore
    dsn: str


@pytest.fixture
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await create_pool(
        database_url, schema="ledger", migrations=load_migrations("stepline.ledger")
    )
    committer = GroupCommitter(pool)
    await committer.start()
    try:
        yield Ledger(pool, LedgerStore(pool, committer), database_url)
    finally:
        await committer.close()
        await pool.close()


def definition(
    name: str = "wf", steps: tuple[str, ...] = ("a", "b", "c")
) -> workflow_pb2.WorkflowDefinition:
    result = workflow_pb2.WorkflowDefinition(name=name, version=1, allowed_verbs=["core.noop"])
    for step in steps:
        result.steps.add(id=step, atomic=workflow_pb2.AtomicOp(verb="core.noop"))
    return result


def create_request(
    request_id: str = "req-1",
    *,
    name: str = "wf",
    steps: tuple[str, ...] = ("a", "b", "c"),
    chunked: str | None = None,
) -> pb.CreateRunRequest:
    request = pb.CreateRunRequest(
        request_id=request_id, definition=definition(name, steps), initiator=OPERATOR
    )
    request.inputs.update({"who": "world"})
    for step in steps:
        kind = workflow_pb2.STEP_KIND_CHUNKED if step == chunked else workflow_pb2.STEP_KIND_ATOMIC
        request.tasks.add(step_id=step, step_path=step, kind=kind, verb="core.noop")
    return request


async def claimed_run(
    ledger: Ledger, request_id: str = "req-1", **kwargs: object
) -> tuple[str, int]:
    """A run created and claimed by EXECUTOR; returns (run_id, epoch)."""
    created = await ledger.store.create_run(create_request(request_id, **kwargs))  # type: ignore[arg-type]
    run_id = created.run.run_id
    claim = await ledger.store.claim_run(
        pb.ClaimRunRequest(
            request_id=f"claim-{run_id}",
            run_id=run_id,
            executor_id=EXECUTOR,
            lease_duration=Duration(seconds=30),
        )
    )
    return run_id, claim.claim.epoch


async def running_run(ledger: Ledger, request_id: str) -> tuple[str, int]:
    """A claimed run moved to RUNNING; returns (run_id, epoch)."""
    run_id, epoch = await claimed_run(ledger, request_id)
    await ledger.store.transition_run(
        pb.TransitionRunRequest(
            request_id=f"{request_id}-running",
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=common_pb2.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    return run_id, epoch


def task_request(
    run_id: str, epoch: int, step: str, state: int, request_id: str = "", **fields: Any
) -> pb.TransitionTaskRequest:
    """A transition of task ``step`` of the run to ``state`` (request id: from the
    three, unless given)."""
    return pb.TransitionTaskRequest(
        request_id=request_id or f"{run_id}-{step}-{state}",
        run_id=run_id,
        task_id=f"{run_id}/{step}",
        epoch=epoch,
        actor=ACTOR,
        state=state,  # type: ignore[arg-type]
        **fields,
    )


async def move_task(
    ledger: Ledger, run_id: str, epoch: int, step: str, state: int, **fields: Any
) -> None:
    """Move task ``step`` of the run to ``state``."""
    await ledger.store.transition_task(task_request(run_id, epoch, step, state, **fields))
