"""PostgreSQL access: an asyncpg pool whose service schema is migrated at start.

Each service owns one schema. Its migrations are numbered SQL files shipped in
its package (``migrations/0001_initial.sql``, ...). At start the service applies
the pending ones in a single transaction under an advisory lock, so several
replicas starting together migrate once. A migration already applied is never
edited: if its checksum changed, start-up fails instead of diverging silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from stepline.common.errors import ConfigError

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def load_migrations(package: str, directory: str = "migrations") -> list[Migration]:
    """Read ``NNNN_name.sql`` files from ``package``/``directory``, in order, 1..N."""
    root = resources.files(package).joinpath(directory)
    migrations: list[Migration] = []
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(entry.name)
        if match is None:
            raise ConfigError(f"migration file {entry.name!r} must be named NNNN_name.sql")
        migrations.append(
            Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
        )
    migrations.sort(key=lambda m: m.version)
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise ConfigError(f"migrations in {package} must be numbered 1..N without gaps")
    return migrations


def _check_schema(schema: str) -> str:
    if not _SCHEMA_RE.match(schema):
        raise ConfigError(f"schema name {schema!r} must be a lower-case SQL identifier")
    return schema


async def apply_migrations(
    conn: asyncpg.Connection, *, schema: str, migrations: list[Migration]
) -> list[int]:
    """Apply pending migrations to ``schema`` atomically; returns the versions applied."""
    _check_schema(schema)
    applied_now: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"stepline:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
        done = {row["version"]: row["checksum"] for row in rows}
        known = {m.version for m in migrations}
        unknown = sorted(set(done) - known)
        if unknown:
            raise ConfigError(
                f"schema {schema} has migrations {unknown} this build does not know; "
                "is an older version of the service running against a newer database?"
            )
        await conn.execute(f"SET LOCAL search_path TO {schema}")
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise ConfigError(
                        f"migration {migration.version:04d}_{migration.name} of schema {schema} "
                        "was edited after it was applied; add a new migration instead"
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, name, checksum) "
                "VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied_now.append(migration.version)
    if applied_now:
        log.info("schema %s: applied migrations %s", schema, applied_now)
    return applied_now


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + json.dumps(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def _set_json_codecs(conn: asyncpg.Connection) -> None:
    # Binary format, so that json values inside composite rows and arrays decode too.
    await conn.set_type_codec(
        "json",
        encoder=lambda value: json.dumps(value).encode(),
        decoder=json.loads,
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )


async def create_pool(
    dsn: str,
    *,
    schema: str,
    migrations: list[Migration],
    min_size: int = 2,
    max_size: int = 10,
    command_timeout_s: float = 30.0,
    json_codecs: bool = True,
) -> asyncpg.Pool:
    """Migrate ``schema``, then return a pool whose connections use it by default.

    With ``json_codecs``, ``json`` and ``jsonb`` values arrive as Python objects
    and are sent from them.
    """
    _check_schema(schema)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await apply_migrations(conn, schema=schema, migrations=migrations)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout_s,
        server_settings={"search_path": schema, "application_name": f"stepline-{schema}"},
        init=_set_json_codecs if json_codecs else None,
    )
    assert pool is not None
    return pool
