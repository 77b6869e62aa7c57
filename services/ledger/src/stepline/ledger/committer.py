"""Group commit: concurrent writes share transactions.

Each write is an *operation*: a coroutine that takes a connection, reads and
validates (raising a :class:`SteplineError` before it writes anything), then
writes. Operations queue per shard; a shard's worker takes everything queued,
runs it in one transaction on its own connection and commits once, so many
runs' transitions cost one commit. Operations are sharded by run id, so the
writes of one run are applied in order by one worker and two workers never
wait on each other's row locks.

Hot operations can instead be :class:`UnitOperation` objects: consecutive ones
of a batch share one *unit of work* that loads every row they need in one
statement, applies them in memory in order, and writes all their changes in
one statement (see :mod:`stepline.ledger.unit`).

If a statement fails mid-batch, the transaction is rolled back and each
operation of the batch is retried alone, so one bad write never takes others
down with it; an operation's own error reaches only its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import asyncpg

from stepline.common.errors import Aborted, SteplineError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class Unit(Protocol):
    """A unit of work shared by consecutive :class:`UnitOperation` of one batch."""

    async def flush(self, conn: asyncpg.Connection) -> None: ...


class UnitOperation(Generic[T]):
    """An operation applied in memory to a unit of work instead of on the connection.

    ``apply`` validates (raising a :class:`SteplineError` before it changes
    anything in the unit) and then applies the change to the unit.
    """

    unit_type: ClassVar[Any]  # has ``async load(conn, ops) -> Unit``

    def apply(self, unit: Any) -> T:
        raise NotImplementedError


Operation = Callable[[asyncpg.Connection], Awaitable[T]] | UnitOperation[T]
_Item = tuple[Operation[Any], "asyncio.Future[Any]"]


# Session settings of the committer's connections. Its statements are few and
# run very often with array parameters: plan them once (generic plans), not at
# every execution, and only as index lookups: a generic plan made while the
# tables are small (a new database) would otherwise scan whole tables for
# ever after (every access of the write path is by key).
_SESSION_SQL = (
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off;"
    " SET enable_hashjoin = off; SET enable_mergejoin = off"
)


class GroupCommitter:
    """Applies operations in shared transactions, one worker per shard.

    ``on_commit``, if given, is called after every commit (e.g. to wake the
    event relay).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        shards: int = 4,
        max_batch: int = 128,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self.on_commit = on_commit
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
                    await conn.execute(_SESSION_SQL)
                await self._commit(conn, batch)
        finally:
            if conn is not None:
                await self._pool.release(conn)

    async def _commit(self, conn: asyncpg.Connection, batch: list[_Item]) -> None:
        outcomes: list[_Outcome] = []
        try:
            if len(_same_unit(batch, 0)) == len(batch):
                # Only unit operations: their one write statement is the transaction.
                outcomes = await _apply_unit(conn, batch)
            else:
                outcomes = await self._apply_in_transaction(conn, batch)
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(Unavailable("the ledger is shutting down"))
            raise
        except Exception as exc:
            if len(batch) > 1:
                log.warning("batch of %d failed, retrying singly: %r", len(batch), exc)
                for item in batch:
                    await self._commit(conn, [item])
                return
            future = batch[0][1]
            if isinstance(exc, asyncpg.SerializationError):
                # Another writer changed the run between read and write.
                log.warning("ledger write conflicted: %s", exc)
                failure: BaseException = Aborted(f"the run changed concurrently, retry: {exc}")
            else:
                log.exception("ledger write failed")
                failure = exc
            if not future.done():
                future.set_exception(failure)
            return
        self.batches += 1
        self.operations += len(batch)
        if self.on_commit is not None:
            self.on_commit()
        for future, value, error in outcomes:
            if future.done():
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    async def _apply_in_transaction(
        self, conn: asyncpg.Connection, batch: list[_Item]
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        async with conn.transaction():
            index = 0
            while index < len(batch):
                operation, future = batch[index]
                if isinstance(operation, UnitOperation):
                    group = _same_unit(batch, index)
                    outcomes.extend(await _apply_unit(conn, group))
                    index += len(group)
                    continue
                try:
                    outcomes.append((future, await operation(conn), None))
                except SteplineError as exc:
                    outcomes.append((future, None, exc))
                index += 1
        return outcomes


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _same_unit(batch: Sequence[_Item], start: int) -> list[_Item]:
    """The run of consecutive unit operations of one unit type from ``start``."""
    first = batch[start][0]
    if not isinstance(first, UnitOperation):
        return []
    group = [batch[start]]
    for item in batch[start + 1 :]:
        op = item[0]
        if not isinstance(op, UnitOperation) or op.unit_type is not first.unit_type:
            break
        group.append(item)
    return group


async def _apply_unit(conn: asyncpg.Connection, group: list[_Item]) -> list[_Outcome]:
    ops = [op for op, _ in group]
    first = ops[0]
    assert isinstance(first, UnitOperation)
    unit: Unit = await first.unit_type.load(conn, ops)
    outcomes: list[_Outcome] = []
    for op, future in group:
        assert isinstance(op, UnitOperation)
        try:
            outcomes.append((future, op.apply(unit), None))
        except SteplineError as exc:
            outcomes.append((future, None, exc))
    await unit.flush(conn)
    return outcomes
