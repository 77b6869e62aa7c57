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
one statement (see :mod:`stepline.ledger.unit`). A unit type may keep rows in
a shard's *memory* between batches, so that a later batch on the same runs
reads nothing before its write: every other operation forgets its key (run)
there before and after it runs, and a failed batch clears the shard's memory.

A run's creation and the claim of a whole run are the exceptions
(:meth:`GroupCommitter.apply_alone`): they are applied beside the shards, each
in a transaction of its own, and a claim forgets its run in the shard's
memory (one that started the run's first task then leaves there the rows it
wrote: :meth:`GroupCommitter.memory`). Each is a run's first write on an
executor's path (StartRun → job → claim → first step), and in a shard's
batch its several statements held up every other run of the batch. A
shard's batch that meets such a write on the same run is guarded as against
a write of another replica (the run's ``last_sequence``; see
:mod:`stepline.ledger.unit`).

If a statement fails mid-batch, the transaction is rolled back and each
operation of the batch is retried alone, so one bad write never takes others
down with it; an operation's own error reaches only its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import asyncpg

from stepline.common.errors import Aborted, SteplineError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: operations applied alone (:meth:`GroupCommitter.apply_alone`) at once, each
#: on a connection of the pool: size the pool for the shards, these and queries
MAX_ALONE = 4


class Unit(Protocol):
    """A unit of work shared by consecutive :class:`UnitOperation` of one batch.

    ``unsure`` is set when an operation applied to remembered rows failed or
    did something that only a fresh read can confirm (e.g. a replay): the
    batch is then applied again to a unit loaded without memory.
    """

    unsure: bool
    remembers: bool  # some of its rows came from memory

    async def flush(self, conn: asyncpg.Connection) -> None: ...

    def remember(self) -> None:
        """After a successful write: keep what later batches may reuse."""
        ...


class Memory(Protocol):
    """What a unit type keeps in one shard between batches, by operation key."""

    def forget(self, key: str) -> None: ...

    def clear(self) -> None: ...


class UnitOperation(Generic[T]):
    """An operation applied in memory to a unit of work instead of on the connection.

    ``apply`` validates (raising a :class:`SteplineError` before it changes
    anything in the unit) and then applies the change to the unit.
    """

    # has ``async load(conn, ops, memory, *, fresh=False) -> Unit`` (fresh: read
    # everything, use nothing remembered) and ``memory() -> Memory``
    unit_type: ClassVar[Any]

    def apply(self, unit: Any) -> T:
        raise NotImplementedError


Operation = Callable[[asyncpg.Connection], Awaitable[T]] | UnitOperation[T]
_Item = tuple[Operation[Any], "asyncio.Future[Any]", str]  # operation, future, key


class _Shard:
    """A shard's queue and the memories of the unit types it applied."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.memories: dict[Any, Memory] = {}
        self.remembered = False  # the batch being applied used remembered rows

    def memory(self, unit_type: Any) -> Memory:
        memory = self.memories.get(unit_type)
        if memory is None:
            memory = self.memories[unit_type] = unit_type.memory()
        return memory

    def forget(self, batch: Sequence[_Item]) -> None:
        """Forget the keys of the batch's other operations in every memory."""
        for operation, _, key in batch:
            if not isinstance(operation, UnitOperation):
                self.forget_key(key)

    def forget_key(self, key: str) -> None:
        for memory in self.memories.values():
            memory.forget(key)

    def clear(self) -> None:
        for memory in self.memories.values():
            memory.clear()


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
        self._shards = [_Shard() for _ in range(shards)]
        self._workers: list[asyncio.Task[None]] = []
        self.batches = 0
        self.operations = 0
        # Keys of operations applied alone, in flight: one at a time per key.
        self._alone: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._alone_slots = asyncio.Semaphore(MAX_ALONE)

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    async def start(self) -> None:
        for index, shard in enumerate(self._shards):
            self._workers.append(
                asyncio.create_task(self._work(shard), name=f"ledger-commit-{index}")
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
        self._shard(key).queue.put_nowait((operation, future, key))
        return await future

    async def apply_alone(
        self, key: str, operation: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        """Apply ``operation`` on a pool connection of its own, beside the shards:
        for a write that nothing else of its run is waiting behind (a run's
        creation, its claim), which would hold up a shard's batch. The operation
        opens a transaction if it makes more than one statement. Operations of
        one ``key`` are applied one at a time, and at most :data:`MAX_ALONE` at
        once (they draw on the pool that queries use); ``key`` is forgotten in
        its shard's memory before and after."""
        if not self._workers:
            raise Unavailable("the ledger is not accepting writes")
        lock = self._alone.setdefault(key, asyncio.Lock())
        shard = self._shard(key)
        async with lock, self._alone_slots, self._pool.acquire() as conn:
            shard.forget_key(key)
            try:
                return await operation(conn)
            except asyncpg.SerializationError as exc:
                raise _conflict(exc) from exc
            finally:
                shard.forget_key(key)
                # also when the caller was cancelled, the commit perhaps made: a
                # wake-up too many costs the relay one pass
                if self.on_commit is not None:
                    self.on_commit()

    def memory(self, key: str, unit_type: Any) -> Memory:
        """What ``unit_type`` keeps in ``key``'s shard (to keep there the rows of a
        unit applied beside the shards, after its commit)."""
        return self._shard(key).memory(unit_type)

    def _shard(self, key: str) -> _Shard:
        return self._shards[zlib.crc32(key.encode()) % len(self._shards)]

    async def _work(self, shard: _Shard) -> None:
        conn: asyncpg.Connection | None = None
        queue = shard.queue
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self._max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if conn is None or conn.is_closed():
                    shard.clear()  # a new connection: nothing read before counts
                    conn = await self._pool.acquire()
                    await conn.execute(_SESSION_SQL)
                await self._commit(conn, shard, batch)
        finally:
            if conn is not None:
                await self._pool.release(conn)

    async def _commit(self, conn: asyncpg.Connection, shard: _Shard, batch: list[_Item]) -> None:
        outcomes: list[_Outcome] = []
        shard.remembered = False
        try:
            if len(_same_unit(batch, 0)) == len(batch):
                # Only unit operations: their one write statement is the transaction.
                outcomes = await _apply_unit(conn, shard, batch)
            else:
                shard.forget(batch)
                outcomes = await self._apply_in_transaction(conn, shard, batch)
                shard.forget(batch)
        except asyncio.CancelledError:
            shard.clear()
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(Unavailable("the ledger is shutting down"))
            raise
        except Exception as exc:
            # Rows remembered while applying the batch were never committed, and
            # remembered rows may be out of date (another writer): read afresh.
            stale = shard.remembered
            shard.clear()
            if len(batch) > 1 or stale:
                log.warning("batch of %d failed, retrying singly: %r", len(batch), exc)
                for item in batch:
                    await self._commit(conn, shard, [item])
                return
            future = batch[0][1]
            if isinstance(exc, asyncpg.SerializationError):
                failure: BaseException = _conflict(exc)
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
        self, conn: asyncpg.Connection, shard: _Shard, batch: list[_Item]
    ) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        batch = _grouped(batch)
        async with conn.transaction():
            index = 0
            while index < len(batch):
                operation, future, _ = batch[index]
                if isinstance(operation, UnitOperation):
                    group = _same_unit(batch, index)
                    outcomes.extend(await _apply_unit(conn, shard, group))
                    index += len(group)
                    continue
                try:
                    outcomes.append((future, await operation(conn), None))
                except SteplineError as exc:
                    outcomes.append((future, None, exc))
                index += 1
        return outcomes


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def in_transaction(
    operation: Callable[[asyncpg.Connection], Awaitable[T]],
) -> Callable[[asyncpg.Connection], Awaitable[T]]:
    """``operation`` in a transaction of its own (for :meth:`GroupCommitter.apply_alone`)."""

    async def applied(conn: asyncpg.Connection) -> T:
        async with conn.transaction():
            return await operation(conn)

    return applied


def _conflict(exc: asyncpg.SerializationError) -> Aborted:
    """Another writer changed the run between read and write: the caller may retry."""
    log.warning("ledger write conflicted: %s", exc)
    return Aborted(f"the run changed concurrently, retry: {exc}")


def _grouped(batch: list[_Item]) -> list[_Item]:
    """The batch with its unit operations together (one unit, one read and one
    write), before or after the others, where that keeps the order of every
    key's operations; otherwise as it came."""
    units = [item for item in batch if isinstance(item[0], UnitOperation)]
    if len({op.unit_type for op, _, _ in units}) != 1:  # type: ignore[union-attr]
        return batch
    others = [item for item in batch if not isinstance(item[0], UnitOperation)]
    unit_keys: set[str] = set()
    other_keys: set[str] = set()
    unit_after_other = other_after_unit = False
    for operation, _, key in batch:
        if isinstance(operation, UnitOperation):
            unit_after_other = unit_after_other or key in other_keys
            unit_keys.add(key)
        else:
            other_after_unit = other_after_unit or key in unit_keys
            other_keys.add(key)
    if not unit_after_other:
        return units + others
    if not other_after_unit:
        return others + units
    return batch


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


async def _apply_unit(
    conn: asyncpg.Connection, shard: _Shard, group: list[_Item]
) -> list[_Outcome]:
    ops = [op for op, _, _ in group]
    unit_type = ops[0].unit_type  # type: ignore[union-attr]
    memory = shard.memory(unit_type)
    unit: Unit = await unit_type.load(conn, ops, memory)
    shard.remembered = shard.remembered or unit.remembers
    outcomes = _apply_all(unit, group)
    if unit.unsure:
        # Remembered rows could not settle an operation: read them afresh (the
        # failed attempt changed them in memory only) and apply the batch again.
        for _, _, key in group:
            memory.forget(key)
        unit = await unit_type.load(conn, ops, memory, fresh=True)
        outcomes = _apply_all(unit, group)
    await unit.flush(conn)
    unit.remember()
    return outcomes


def _apply_all(unit: Unit, group: list[_Item]) -> list[_Outcome]:
    outcomes: list[_Outcome] = []
    for op, future, _ in group:
        assert isinstance(op, UnitOperation)
        try:
            outcomes.append((future, op.apply(unit), None))
        except SteplineError as exc:
            outcomes.append((future, None, exc))
    return outcomes
