"""The ledger's reads: runs, listings with stable pagination, chunks, history,
orphaned runs. Reads use the pool directly; they never wait for a commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from stepline.api.common.v1 import run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import InvalidArgument, NotFound
from stepline.common.paging import decode_token, encode_token, page_size
from stepline.ledger import artifacts, convert
from stepline.ledger.checks import require
from stepline.ledger.store import read_run

DEFAULT_GRACE_S = 30.0
# What a RunEvent shows of an ``events`` row (not the relay's and replays' columns).
EVENT_READ_COLUMNS = (
    "run_id, sequence, event_id, type, actor_id, actor_roles, time, task_id, chunk_id, payload"
)


async def get_run(pool: asyncpg.Pool, request: pb.GetRunRequest) -> pb.GetRunResponse:
    require(request.run_id, "run_id")
    view = request.view or run_pb2.RUN_VIEW_BASIC
    async with pool.acquire() as conn:
        response = pb.GetRunResponse(run=await read_run(conn, request.run_id, view=view))
        if view == run_pb2.RUN_VIEW_FULL:
            chunks = await conn.fetch(
                "SELECT c.* FROM chunks c JOIN tasks t USING (task_id)"
                " WHERE c.run_id = $1 ORDER BY t.ordinal, c.index",
                request.run_id,
            )
            attempts = convert.group_by(
                await conn.fetch(
                    "SELECT * FROM attempts WHERE run_id = $1 AND chunk_id IS NOT NULL"
                    " ORDER BY owner_id, attempt_number",
                    request.run_id,
                ),
                "owner_id",
            )
            files = await artifacts.of_run(conn, request.run_id, chunks=True)
            response.chunks.extend(
                convert.chunk(c, attempts.get(c["chunk_id"], []), files.get(c["chunk_id"], []))
                for c in chunks
            )
    return response


async def list_runs(pool: asyncpg.Pool, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
    size = page_size(request.page_size)
    position = decode_token(request.page_token, "t", "id")
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    f = request.filter
    if f.workflow_name:
        where.append(f"workflow_name = {arg(f.workflow_name)}")
    if f.states:
        where.append(f"state = ANY({arg(list(f.states))}::smallint[])")
    if f.create_time_range.HasField("start_time"):
        where.append(f"create_time >= {arg(f.create_time_range.start_time.ToDatetime())}")
    if f.create_time_range.HasField("end_time"):
        where.append(f"create_time < {arg(f.create_time_range.end_time.ToDatetime())}")
    if f.labels:
        where.append(f"labels @> {arg(dict(f.labels))}::jsonb")
    if f.parent_run_id:
        where.append(f"parent_run_id = {arg(f.parent_run_id)}")
    if f.initiator_id:
        where.append(f"initiator_id = {arg(f.initiator_id)}")
    if f.schedule_id:
        where.append(f"schedule_id = {arg(f.schedule_id)}")
    if position is not None:
        when = datetime.fromisoformat(position["t"])
        where.append(f"(create_time, run_id) < ({arg(when)}, {arg(position['id'])})")
    sql = "SELECT * FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY create_time DESC, run_id DESC LIMIT {arg(size + 1)}"
    rows = await pool.fetch(sql, *args)
    response = pb.ListRunsResponse(runs=[convert.run(r) for r in rows[:size]])
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = encode_token(
            t=last["create_time"].isoformat(), id=last["run_id"]
        )
    return response


async def list_chunks(pool: asyncpg.Pool, request: pb.ListChunksRequest) -> pb.ListChunksResponse:
    require(request.run_id, "run_id")
    require(request.task_id, "task_id")
    size = page_size(request.page_size)
    position = decode_token(request.page_token, "index")
    after = int(position["index"]) if position else -1
    args: list[Any] = [request.run_id, request.task_id, after, size + 1]
    state_filter = ""
    if request.states:
        args.append(list(request.states))
        state_filter = " AND state = ANY($5::smallint[])"
    rows = await pool.fetch(
        "SELECT * FROM chunks WHERE run_id = $1 AND task_id = $2 AND index > $3"
        f"{state_filter} ORDER BY index LIMIT $4",
        *args,
    )
    owners = [r["chunk_id"] for r in rows[:size]]
    attempts = await pool.fetch(
        "SELECT * FROM attempts WHERE owner_id = ANY($1) ORDER BY owner_id, attempt_number",
        owners,
    )
    by_owner = convert.group_by(attempts, "owner_id")
    files = await artifacts.of_owners(pool, owners)
    response = pb.ListChunksResponse(
        chunks=[
            convert.chunk(r, by_owner.get(r["chunk_id"], []), files.get(r["chunk_id"], []))
            for r in rows[:size]
        ]
    )
    if len(rows) > size:
        response.next_page_token = encode_token(index=rows[size - 1]["index"])
    return response


async def get_run_history(
    pool: asyncpg.Pool, request: pb.GetRunHistoryRequest
) -> pb.GetRunHistoryResponse:
    require(request.run_id, "run_id")
    if request.after_sequence < 0:
        raise InvalidArgument("after_sequence must not be negative")
    size = page_size(request.page_size)
    async with pool.acquire() as conn:
        last = await conn.fetchval(
            "SELECT last_sequence FROM runs WHERE run_id = $1", request.run_id
        )
        if last is None:
            raise NotFound(f"run {request.run_id!r} does not exist")
        args: list[Any] = [request.run_id, request.after_sequence, size]
        task_filter = ""
        if request.task_id:
            args.append(request.task_id)
            task_filter = " AND task_id = $4"
        rows = await conn.fetch(
            f"SELECT {EVENT_READ_COLUMNS} FROM events WHERE run_id = $1 AND sequence > $2"
            f"{task_filter} ORDER BY sequence LIMIT $3",
            *args,
        )
    return pb.GetRunHistoryResponse(events=[convert.event(r) for r in rows], last_sequence=last)


async def list_orphaned_runs(
    pool: asyncpg.Pool, request: pb.ListOrphanedRunsRequest
) -> pb.ListOrphanedRunsResponse:
    size = page_size(request.page_size)
    grace_s = request.grace_period.ToTimedelta().total_seconds() or DEFAULT_GRACE_S
    if grace_s < 0:
        raise InvalidArgument("grace_period must not be negative")
    position = decode_token(request.page_token, "t", "id")
    after = ""
    args: list[Any] = [grace_s, size + 1]
    if position is not None:
        args += [datetime.fromisoformat(position["t"]), position["id"]]
        after = " AND (create_time, run_id) > ($3, $4)"
    # States: 1 PENDING, 2 RUNNING, 3 SUSPENDED, 4 PAUSED. A SUSPENDED or PAUSED
    # run waits for a person, not an executor, unless its deadline has passed.
    rows = await pool.fetch(
        "SELECT * FROM (SELECT *, CASE"
        "   WHEN (claim_executor IS NULL OR claim_expire < clock_timestamp())"
        "     AND run_timeout_s IS NOT NULL"
        "     AND create_time + run_timeout_s * interval '1 second' < clock_timestamp() THEN 3"
        "   WHEN state IN (1, 2) AND claim_executor IS NOT NULL"
        "     AND claim_expire < clock_timestamp() THEN 1"
        "   WHEN state IN (1, 2) AND claim_executor IS NULL AND claim_epoch > 0"
        "     AND (claim_expire IS NULL"
        "       OR claim_expire < clock_timestamp() - $1 * interval '1 second') THEN 1"
        "   WHEN state = 1 AND claim_epoch = 0"
        "     AND create_time < clock_timestamp() - $1 * interval '1 second' THEN 2"
        " END AS orphan_reason FROM runs WHERE state IN (1, 2, 3, 4)) o"
        f" WHERE orphan_reason IS NOT NULL{after} ORDER BY create_time, run_id LIMIT $2",
        *args,
    )
    response = pb.ListOrphanedRunsResponse(
        runs=[pb.OrphanedRun(run=convert.run(r), reason=r["orphan_reason"]) for r in rows[:size]]
    )
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = encode_token(
            t=last["create_time"].isoformat(), id=last["run_id"]
        )
    return response
