"""The workflow store: immutable, numbered versions of each workflow definition.

Registering validates the definition (and that the workflows it runs as
children exist, without a cycle back to it), then stores it as version N+1 of
its name, unless its digest equals the latest version's: an unchanged
definition creates nothing. ``request_id`` makes registration idempotent: a
replay returns the original result; the same id with another definition is
ABORTED. Registrations of one name are serialized by a transaction-scoped
advisory lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import asyncpg
from google.protobuf import timestamp_pb2

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2 as pb
from stepline.common import paging
from stepline.common.errors import Aborted, InvalidArgument, NotFound
from stepline.scheduler.definitions import digest, validate_definition, workflow_refs

WorkflowDefinition = workflow_pb2.WorkflowDefinition
Authorize = Callable[[WorkflowDefinition | None], None]

MAX_VERSIONS_PAGE_SIZE = 100
MAX_REFERENCE_WALK = 1000

_VERSION_COLUMNS = "name, version, definition, digest, created_by_id, created_by_roles, create_time"


def _timestamp(value: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _version(row: asyncpg.Record) -> pb.WorkflowVersion:
    definition = WorkflowDefinition.FromString(row["definition"])
    return pb.WorkflowVersion(
        definition=definition,
        create_time=_timestamp(row["create_time"]),
        created_by=common_pb2.Principal(
            id=row["created_by_id"], roles=list(row["created_by_roles"])
        ),
        digest=row["digest"],
    )


def _summary(row: asyncpg.Record, definition: WorkflowDefinition) -> pb.WorkflowSummary:
    return pb.WorkflowSummary(
        name=row["name"],
        description=definition.description,
        latest_version=row["latest_version"],
        labels=dict(definition.labels),
        create_time=_timestamp(row["create_time"]),
        update_time=_timestamp(row["update_time"]),
    )


class WorkflowStore:
    """Workflow definitions in the scheduler's schema (migration 0001_workflows)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # reads

    async def get(self, name: str, version: int = 0) -> pb.WorkflowVersion:
        """One version (0 = the latest); NotFound if there is none."""
        if not name:
            raise InvalidArgument("name is required")
        if version < 0:
            raise InvalidArgument("version must not be negative (0 = latest)")
        async with self.pool.acquire() as conn:
            row = await self._fetch_version(conn, name, version)
        if row is None:
            raise NotFound(self._missing(name, version))
        return _version(row)

    @staticmethod
    def _missing(name: str, version: int) -> str:
        if version:
            return f"workflow {name!r} has no version {version}"
        return f"workflow {name!r} does not exist"

    @staticmethod
    async def _fetch_version(
        conn: asyncpg.Connection, name: str, version: int
    ) -> asyncpg.Record | None:
        if version:
            return await conn.fetchrow(
                f"SELECT {_VERSION_COLUMNS} FROM workflow_versions"
                " WHERE name = $1 AND version = $2",
                name,
                version,
            )
        return await conn.fetchrow(
            f"SELECT {_VERSION_COLUMNS} FROM workflow_versions"
            " WHERE name = $1 ORDER BY version DESC LIMIT 1",
            name,
        )

    async def list(
        self,
        request: pb.ListWorkflowsRequest,
        *,
        readable: Callable[[WorkflowDefinition], bool] | None = None,
    ) -> pb.ListWorkflowsResponse:
        """Workflows by name; ``readable`` filters on the latest definition."""
        size = paging.page_size(request.page_size)
        after: str = paging.decode_value(request.page_token, "name", str) or ""
        labels = json.dumps(dict(request.labels))
        query = (
            "SELECT w.name, w.latest_version, w.create_time, w.update_time, v.definition"
            " FROM workflows w JOIN workflow_versions v"
            "   ON v.name = w.name AND v.version = w.latest_version"
            " WHERE starts_with(w.name, $1) AND w.labels @> $2::text::jsonb AND w.name > $3"
            " ORDER BY w.name LIMIT $4"
        )
        response = pb.ListWorkflowsResponse()
        async with self.pool.acquire() as conn:
            exhausted = False
            while len(response.workflows) < size and not exhausted:
                rows = await conn.fetch(query, request.name_prefix, labels, after, size)
                exhausted = len(rows) < size
                for row in rows:
                    after = row["name"]
                    definition = WorkflowDefinition.FromString(row["definition"])
                    if readable is None or readable(definition):
                        response.workflows.append(_summary(row, definition))
                        if len(response.workflows) == size:
                            break
            if not exhausted and await conn.fetchrow(query, request.name_prefix, labels, after, 1):
                response.next_page_token = paging.encode_token(name=after)
        return response

    async def list_versions(
        self, request: pb.ListWorkflowVersionsRequest
    ) -> pb.ListWorkflowVersionsResponse:
        """Versions of one workflow, newest first; NotFound if it does not exist."""
        if not request.name:
            raise InvalidArgument("name is required")
        size = paging.page_size(request.page_size, MAX_VERSIONS_PAGE_SIZE)
        before = paging.decode_value(request.page_token, "version", int)
        async with self.pool.acquire() as conn:
            latest = await conn.fetchval(
                "SELECT latest_version FROM workflows WHERE name = $1", request.name
            )
            if latest is None:
                raise NotFound(self._missing(request.name, 0))
            rows = await conn.fetch(
                f"SELECT {_VERSION_COLUMNS} FROM workflow_versions"
                " WHERE name = $1 AND version < $2 ORDER BY version DESC LIMIT $3",
                request.name,
                before if before is not None else latest + 1,
                size + 1,
            )
        response = pb.ListWorkflowVersionsResponse(versions=[_version(r) for r in rows[:size]])
        if len(rows) > size:
            response.next_page_token = paging.encode_token(version=rows[size - 1]["version"])
        return response

    # writes

    async def register(
        self,
        definition: WorkflowDefinition,
        *,
        principal: common_pb2.Principal,
        request_id: str,
        authorize: Authorize | None = None,
        validate_only: bool = False,
    ) -> tuple[pb.WorkflowVersion, bool]:
        """Store ``definition`` as the next version of its workflow.

        Returns the version and whether it was created (False when the digest
        equals the latest version's, on a replayed ``request_id``, and with
        ``validate_only``, which stores nothing). ``authorize`` is called with
        the latest stored definition (None for a new workflow) under the
        registration lock, and raises to refuse.
        """
        candidate = WorkflowDefinition()
        candidate.CopyFrom(definition)
        candidate.version = 0
        validate_definition(candidate)
        name = candidate.name
        sha = digest(candidate)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"workflow:{name}")
            if request_id and not validate_only:
                replay = await self._replay(conn, request_id, name, sha)
                if replay is not None:
                    return replay
            latest = await self._fetch_version(conn, name, 0)
            latest_definition = (
                WorkflowDefinition.FromString(latest["definition"]) if latest else None
            )
            if authorize is not None:
                authorize(latest_definition)
            await self._check_references(conn, candidate)
            if latest is not None and latest["digest"] == sha:
                result, created = _version(latest), False
            elif validate_only:
                candidate.version = (latest["version"] if latest else 0) + 1
                return pb.WorkflowVersion(
                    definition=candidate, created_by=principal, digest=sha
                ), False
            else:
                result, created = await self._insert(conn, candidate, sha, principal, latest), True
            if validate_only:
                return result, False
            if request_id:
                await self._record_request(conn, request_id, result, created)
            return result, created

    @staticmethod
    async def _replay(
        conn: asyncpg.Connection, request_id: str, name: str, sha: str
    ) -> tuple[pb.WorkflowVersion, bool] | None:
        row = await conn.fetchrow(
            "SELECT name, version, digest, created FROM workflow_requests WHERE request_id = $1",
            request_id,
        )
        if row is None:
            return None
        if row["name"] != name or row["digest"] != sha:
            raise Aborted(
                f"request_id {request_id!r} was already used to register a different definition"
            )
        stored = await WorkflowStore._fetch_version(conn, row["name"], row["version"])
        assert stored is not None  # versions are never deleted
        return _version(stored), bool(row["created"])

    @staticmethod
    async def _record_request(
        conn: asyncpg.Connection, request_id: str, result: pb.WorkflowVersion, created: bool
    ) -> None:
        inserted = await conn.fetchval(
            "INSERT INTO workflow_requests (request_id, name, version, digest, created)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING RETURNING true",
            request_id,
            result.definition.name,
            result.definition.version,
            result.digest,
            created,
        )
        if not inserted:
            # The same request_id is registering another workflow concurrently.
            raise Aborted(f"request_id {request_id!r} is in use by a concurrent registration")

    @staticmethod
    async def _insert(
        conn: asyncpg.Connection,
        candidate: WorkflowDefinition,
        sha: str,
        principal: common_pb2.Principal,
        latest: asyncpg.Record | None,
    ) -> pb.WorkflowVersion:
        stored = WorkflowDefinition()
        stored.CopyFrom(candidate)
        stored.version = (latest["version"] if latest else 0) + 1
        labels = json.dumps(dict(stored.labels))
        if latest is None:
            await conn.execute(
                "INSERT INTO workflows (name, latest_version, description, labels)"
                " VALUES ($1, $2, $3, $4::text::jsonb)",
                stored.name,
                stored.version,
                stored.description,
                labels,
            )
        else:
            await conn.execute(
                "UPDATE workflows SET latest_version = $2, description = $3,"
                " labels = $4::text::jsonb, update_time = clock_timestamp() WHERE name = $1",
                stored.name,
                stored.version,
                stored.description,
                labels,
            )
        row = await conn.fetchrow(
            "INSERT INTO workflow_versions"
            " (name, version, definition, digest, created_by_id, created_by_roles)"
            f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_VERSION_COLUMNS}",
            stored.name,
            stored.version,
            stored.SerializeToString(deterministic=True),
            sha,
            principal.id,
            list(principal.roles),
        )
        return _version(row)

    async def validate(self, definition: WorkflowDefinition) -> None:
        """Everything registration checks, without storing or authorizing."""
        validate_definition(definition)
        async with self.pool.acquire() as conn:
            await self._check_references(conn, definition)

    async def _check_references(
        self, conn: asyncpg.Connection, definition: WorkflowDefinition
    ) -> None:
        """Child workflows must exist (at the pinned version) and never lead back here."""
        problems: list[str] = []
        pending: list[tuple[str, int, str]] = []
        for at, ref in workflow_refs(definition):
            where = f"{at}: workflow_ref"
            latest = await conn.fetchval(
                "SELECT latest_version FROM workflows WHERE name = $1", ref.workflow_name
            )
            if latest is None:
                problems.append(
                    f"{where}.workflow_name {ref.workflow_name!r} is not a registered "
                    "workflow (register it first)"
                )
            elif ref.version > latest:
                problems.append(
                    f"{where}.version: workflow {ref.workflow_name!r} has no version "
                    f"{ref.version} (latest is {latest})"
                )
            else:
                pending.append((ref.workflow_name, ref.version, at))
        if problems:
            raise InvalidArgument("; ".join(problems))
        seen: set[tuple[str, int]] = set()
        while pending and len(seen) < MAX_REFERENCE_WALK:
            child, version, at = pending.pop()
            if child == definition.name:
                raise InvalidArgument(
                    f"{at}: workflow_ref leads back to workflow {definition.name!r} "
                    "(a workflow may not run itself, directly or through children)"
                )
            if (child, version) in seen:
                continue
            seen.add((child, version))
            row = await self._fetch_version(conn, child, version)
            if row is None:
                continue
            for _, ref in workflow_refs(WorkflowDefinition.FromString(row["definition"])):
                pending.append((ref.workflow_name, ref.version, at))
