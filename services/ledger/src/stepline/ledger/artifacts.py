"""Reading artifacts: the files kept with an attempt's record (e.g. screenshots).

``PutArtifact`` (in :mod:`stepline.ledger.store`, with the other writes) stores
one under the attempt's claim. Descriptions travel with their task or chunk
(``TaskRun.artifacts``, ``ChunkRun.artifacts``, oldest first); the content only
through ``GetArtifact``, so listing a run never moves file content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.errors import InvalidArgument, NotFound
from stepline.ledger import convert

# Every column but the content, in a description's order (oldest first).
DESCRIPTION_COLUMNS = (
    "artifact_id, owner_id, run_id, task_id, chunk_id, attempt_number, name,"
    " content_type, size_bytes, sha256, create_time"
)
ORDER = "ORDER BY create_time, artifact_id"
MAX_ARTIFACT_ID_LENGTH = 1024


def artifact_id(owner_id: str, attempt_number: int, name: str) -> str:
    """``<task_id or chunk_id>:<attempt_number>:<name>``."""
    return f"{owner_id}:{attempt_number}:{name}"


async def of_run(
    conn: asyncpg.Connection, run_id: str, *, chunks: bool
) -> dict[str, list[asyncpg.Record]]:
    """Descriptions of a run's task artifacts (or, with ``chunks``, its chunk
    artifacts), by owner id, oldest first."""
    rows = await conn.fetch(
        f"SELECT {DESCRIPTION_COLUMNS} FROM artifacts WHERE run_id = $1"
        f" AND (chunk_id IS NOT NULL) = $2 {ORDER}",
        run_id,
        chunks,
    )
    return convert.group_by(list(rows), "owner_id")


async def of_owners(
    conn: asyncpg.Connection | asyncpg.Pool, owner_ids: Sequence[str]
) -> dict[str, list[Any]]:
    """Descriptions of the artifacts of some tasks or chunks, by owner id, oldest first."""
    if not owner_ids:
        return {}
    rows = await conn.fetch(
        f"SELECT {DESCRIPTION_COLUMNS} FROM artifacts WHERE owner_id = ANY($1::text[]) {ORDER}",
        list(owner_ids),
    )
    return convert.group_by(list(rows), "owner_id")


async def get_artifact(
    pool: asyncpg.Pool, request: pb.GetArtifactRequest
) -> pb.GetArtifactResponse:
    if not request.artifact_id:
        raise InvalidArgument("artifact_id is required, e.g. from TaskRun.artifacts")
    if len(request.artifact_id) > MAX_ARTIFACT_ID_LENGTH:
        raise InvalidArgument(
            f"artifact_id is {len(request.artifact_id)} characters; "
            f"the limit is {MAX_ARTIFACT_ID_LENGTH}"
        )
    row = await pool.fetchrow(
        f"SELECT {DESCRIPTION_COLUMNS}, content FROM artifacts WHERE artifact_id = $1",
        request.artifact_id,
    )
    if row is None:
        raise NotFound(f"artifact {request.artifact_id!r} does not exist")
    return pb.GetArtifactResponse(artifact=convert.artifact(row), content=row["content"])
