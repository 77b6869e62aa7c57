"""Connection pools of the lease path.

The service's main pool comes from :func:`stepline.common.db.create_pool` (it
migrates the schema). The lease statements (grant, renew, release) get two
small pools of their own, made here:

* both skip asyncpg's session reset when a connection goes back to the pool
  (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``, one
  more round trip after every statement): the lease statements are single
  statements that leave no session state behind, and asyncpg still rolls back
  a transaction left open;
* ``relaxed`` runs with ``synchronous_commit = off`` and serves releases only
  (see :class:`stepline.device_broker.store.Store`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

#: concurrent grants (and renewals); releases get half as many connections
POOL_SIZE = 16


@dataclass(frozen=True)
class LeasePools:
    hot: asyncpg.Pool
    relaxed: asyncpg.Pool


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset (see the module's doc)."""


async def _pool(dsn: str, schema: str, *, synchronous_commit: bool) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=2,
        max_size=POOL_SIZE if synchronous_commit else POOL_SIZE // 2,
        reset=_no_reset,
        server_settings={
            "search_path": schema,
            "application_name": f"stepline-{schema}-leases",
            "synchronous_commit": "on" if synchronous_commit else "off",
        },
    )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def lease_pools(dsn: str, schema: str) -> AsyncIterator[LeasePools]:
    """The two pools, closed when the block exits (the schema is migrated already)."""
    hot = await _pool(dsn, schema, synchronous_commit=True)
    try:
        relaxed = await _pool(dsn, schema, synchronous_commit=False)
        try:
            yield LeasePools(hot, relaxed)
        finally:
            await relaxed.close()
    finally:
        await hot.close()
