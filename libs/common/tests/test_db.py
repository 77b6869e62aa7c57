"""Migrations and the pool helper against a real PostgreSQL database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from stepline.common import embedded
from stepline.common.db import Migration, apply_migrations, create_pool, load_migrations
from stepline.common.errors import ConfigError

FIRST = Migration(1, "initial", "CREATE TABLE things (id int PRIMARY KEY, name text NOT NULL);")
SECOND = Migration(2, "more", "ALTER TABLE things ADD COLUMN size int NOT NULL DEFAULT 0;")


async def test_pool_applies_migrations_into_its_schema(database_url: str) -> None:
    pool = await create_pool(database_url, schema="widgets", migrations=[FIRST, SECOND])
    try:
        await pool.execute("INSERT INTO things (id, name, size) VALUES (1, 'a', 3)")
        assert await pool.fetchval("SELECT count(*) FROM widgets.things") == 1
        versions = await pool.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [1, 2]
    finally:
        await pool.close()


async def test_migrations_apply_once_and_only_what_is_new(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await apply_migrations(conn, schema="svc", migrations=[FIRST]) == [1]
        assert await apply_migrations(conn, schema="svc", migrations=[FIRST]) == []
        assert await apply_migrations(conn, schema="svc", migrations=[FIRST, SECOND]) == [2]
    finally:
        await conn.close()


async def test_an_edited_migration_stops_start_up(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await apply_migrations(conn, schema="svc", migrations=[FIRST])
        edited = Migration(1, "initial", FIRST.sql + " -- changed")
        with pytest.raises(ConfigError, match="edited after it was applied"):
            await apply_migrations(conn, schema="svc", migrations=[edited])
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(database_url: str) -> None:
    broken = Migration(2, "broken", "ALTER TABLE things ADD COLUMN x int; SELECT 1/0;")
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await apply_migrations(conn, schema="svc", migrations=[FIRST, broken])
        assert await conn.fetchval("SELECT to_regclass('svc.things')") is None
        await apply_migrations(conn, schema="svc", migrations=[FIRST])
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'svc' AND table_name = 'things'"
        )
        assert {r["column_name"] for r in columns} == {"id", "name"}
    finally:
        await conn.close()


async def test_migrations_unknown_to_this_build_are_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await apply_migrations(conn, schema="svc", migrations=[FIRST, SECOND])
        with pytest.raises(ConfigError, match="does not know"):
            await apply_migrations(conn, schema="svc", migrations=[FIRST])
    finally:
        await conn.close()


async def test_bad_schema_names_are_refused(database_url: str) -> None:
    with pytest.raises(ConfigError, match="identifier"):
        await create_pool(database_url, schema="bad; DROP", migrations=[FIRST])


def _package(root: Path, files: dict[str, str]) -> str:
    package = root / f"fake_service_{root.name.replace('-', '_')}"
    (package / "migrations").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, sql in files.items():
        (package / "migrations" / name).write_text(sql)
    return package.name


def test_load_migrations_reads_files_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _package(tmp_path, {"0002_b.sql": "SELECT 2;", "0001_a.sql": "SELECT 1;"})
    loaded = load_migrations(name)
    assert [(m.version, m.name, m.sql) for m in loaded] == [
        (1, "a", "SELECT 1;"),
        (2, "b", "SELECT 2;"),
    ]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.sql": "", "0003_c.sql": ""}, "without gaps"),
        ({"1_a.sql": ""}, "NNNN_name.sql"),
    ],
)
def test_load_migrations_rejects_bad_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str], message: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message):
        load_migrations(_package(tmp_path, files))


async def test_the_embedded_server_is_reached_through_its_unix_socket(
    postgres_url: str, database_url: str
) -> None:
    if "host=/" not in postgres_url:
        pytest.skip("the suite runs against a given server (STEPLINE_TEST_DATABASE_URL)")
    conn = await asyncpg.connect(database_url)
    try:
        # A Unix-socket session has no client address.
        assert await conn.fetchval("SELECT inet_client_addr()") is None
    finally:
        await conn.close()


def test_a_socket_path_too_long_for_the_kernel_means_tcp_only(tmp_path: Path) -> None:
    assert embedded.socket_dir_for(tmp_path, 5432) == tmp_path.resolve()
    assert embedded.socket_dir_for(tmp_path / ("d" * 120), 5432) is None
    assert embedded.socket_dir_for(tmp_path / "a,b", 5432) is None
    assert embedded.postgres_dsn(5432, "db", socket_dir=Path("/tmp/pg")) == (
        "postgresql://postgres@/db?host=/tmp/pg&port=5432"
    )
    assert embedded.postgres_dsn(5432) == "postgresql://postgres@127.0.0.1:5432/postgres"


def test_a_server_whose_socket_path_is_too_long_serves_over_tcp(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 110)
    port = embedded.free_port()
    record = embedded.start_postgres(data_dir, port=port, log_path=tmp_path / "pg.log")
    try:
        dsn = embedded.record_dsn(record)
        assert dsn == embedded.postgres_dsn(port)

        async def client_address() -> object:
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("SELECT inet_client_addr()::text")
            finally:
                await conn.close()

        assert asyncio.run(client_address()) == "127.0.0.1/32"
    finally:
        embedded.stop(record)
