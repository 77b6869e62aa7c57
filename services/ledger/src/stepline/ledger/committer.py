"""Group commit: concurrent writes share transactions.

Each write is an *operation*: a coroutine that takes a connection, reads and
validates (raising a :class:`SteplineError` before it writes anything), then
writes. Operations queue per shard; a shard's worker takes everything queued,
runs it in one transaction on its own connection and commits once, so many
runs' transitions cost one commit. Operations are sharded by run id, so the
writes of one run are applied in order by one worker and two workers never
wait on each other's row locks.

If a statement fails mid-batch, the transaction is rolled back and each
operation of the batch is retried alone, so one bad write never takes others
down with it; an operation's own error reaches only its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from stepline.common.errors import SteplineError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[asyncpg.Connection], Awaitable[T]]
_Item = tuple[Operation[Any], "asyncio.Future[Any]"]


class GroupCommitter:
    def __init__(self, pool: asyncpg.Pool, *, shards: int = 4, max_batch: int = 128) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._queues: list[asyncio.Queue[_Item]] = [asyncio.Queue() for _ in range(shards)]
        self._workers: list[asyncio.Task[None]] = []
        self.batches = 0
        self.operations = 0

    async def start(self) -> None:
        for index, queue in enumerate(self._queues):
            self._workers.append(
                asyncio.create_task(self._work(queue), name=f"ledger-commit-{index}")
            )

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers.clear()

    async def submit(self, key: str, operation: Operation[T]) -> T:
        """Apply ``operation`` in the next commit of ``key``'s shard; returns its result."""
        if not self._workers:
            raise Unavailable("the ledger is not accepting writes")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        shard = zlib.crc32(key.encode()) % len(self._queues)
        self._queues[shard].put_nowait((operation, future))
        return await future

    async def _work(self, queue: asyncio.Queue[_Item]) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self._max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if conn is None or conn.is_closed():
                    conn = await self._pool.acquire()
                await self._commit(conn, batch)
        finally:
            if conn is not None:
                await self._pool.release(conn)

    async def _commit(self, conn: asyncpg.Connection, batch: list[_Item]) -> None:
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            async with conn.transaction():
                for operation, future in batch:
                    try:
                        outcomes.append((future, await operation(conn), None))
                    except SteplineError as exc:
                        outcomes.append((future, None, exc))
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(Unavailable("the ledger is shutting down"))
            raise
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    await self._commit(conn, [item])
                return
            log.exception("ledger write failed")
            future = batch[0][1]
            if not future.done():
                future.set_exception(exc)
            return
        self.batches += 1
        self.operations += len(batch)
        for future, value, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
