"""The broker's PostgreSQL statements (schema ``device_broker``).

Every state change is one small transaction whose WHERE clause restates what
the in-memory view assumed (the device is AVAILABLE and bound to the lease's
account, the lease is live and carries this token, ...), so the database stays
right even when the view is behind; a partial unique index keeps one live lease
per device whatever happens. Each change of a device bumps its ``version``,
which the view uses to apply changes in commit order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import asyncpg
from google.protobuf.message import Message

from stepline.common.errors import Aborted
from stepline.common.requests import fingerprint
from stepline.device_broker.model import AVAILABLE, CLEANING, LEASED, OFFLINE, QUARANTINED, Ask

M = TypeVar("M", bound=Message)
Row: TypeAlias = Mapping[str, Any]

DEVICE_VIEW = """
SELECT d.*,
       l.lease_id AS l_lease_id, l.token AS l_token, l.account AS l_account,
       l.executor_id AS l_executor_id, l.run_id AS l_run_id, l.task_id AS l_task_id,
       l.chunk_id AS l_chunk_id, l.grant_time AS l_grant_time, l.expire_time AS l_expire_time,
       q.reason AS q_reason, q.evidence AS q_evidence, q.actor_id AS q_actor_id,
       q.actor_roles AS q_actor_roles, q.quarantine_time AS q_time
  FROM devices d
  LEFT JOIN leases l ON l.lease_id = d.lease_id
  LEFT JOIN quarantines q ON q.quarantine_id = d.quarantine_id
"""

_BUMP = "version = version + 1, update_time = clock_timestamp()"

# A grant's parameters, in this order (see _grant_params), numbered from $n in
# the statements that grant: the device passes to the new lease with its next
# token (_lease_device) and the lease row is inserted (_new_lease).
_GRANT_PARAMS = (
    "lease_id",
    "request_id",
    "fingerprint",
    "executor_id",
    "run_id",
    "task_id",
    "chunk_id",
    "account",
    "ttl_s",
)


def _numbered(first: int) -> dict[str, str]:
    return {name: f"${first + i}" for i, name in enumerate(_GRANT_PARAMS)}


def _lease_device(first: int) -> str:
    """SET items of the device row: LEASED to the new lease, with its next token."""
    p = _numbered(first)
    return f"state = {LEASED}, last_token = last_token + 1, lease_id = {p['lease_id']}, {_BUMP}"


def _new_lease(first: int) -> str:
    """The new lease row, from the device updated in the CTE ``d``."""
    p = _numbered(first)
    return f"""
    INSERT INTO leases (lease_id, request_id, fingerprint, serial, token, executor_id, run_id,
                        task_id, chunk_id, account, grant_time, expire_time)
    SELECT {p["lease_id"]}, {p["request_id"]}, {p["fingerprint"]}, d.serial, d.last_token,
           {p["executor_id"]}, {p["run_id"]}, {p["task_id"]}, {p["chunk_id"]}, {p["account"]},
           clock_timestamp(), clock_timestamp() + make_interval(secs => {p["ttl_s"]})
      FROM d
 RETURNING token, grant_time, expire_time"""


def _grant_params(lease_id: str, ask: Ask) -> tuple[object, ...]:
    """What a grant of ``ask`` as lease ``lease_id`` writes, in _GRANT_PARAMS order."""
    holder = ask.request.holder
    return (
        lease_id,
        ask.request.request_id,
        ask.fingerprint,
        holder.executor_id,
        holder.run_id,
        holder.task_id,
        holder.chunk_id,
        ask.selector.account,
        ask.ttl_s,
    )


# The grant's parameters from $1, then the serial ($10).
_GRANT = f"""
WITH d AS (
    UPDATE devices SET {_lease_device(1)}
     WHERE serial = $10 AND state = {AVAILABLE} AND bound_account = {_numbered(1)["account"]}
 RETURNING serial, last_token, version
), l AS ({_new_lease(1)}
)
SELECT l.token, l.grant_time, l.expire_time, d.version FROM l, d
"""

_RENEW = """
UPDATE leases SET expire_time = clock_timestamp() + make_interval(secs => $3)
 WHERE lease_id = $1 AND token = $2 AND end_time IS NULL AND expire_time > clock_timestamp()
RETURNING *
"""

# A release's parameters: lease_id ($1), token, outcome, message, request_id ($5).
_RELEASED = (
    "end_time = clock_timestamp(), end_reason = 'released', outcome = $3, message = $4,"
    " release_request_id = $5"
)
_LIVE = "lease_id = $1 AND token = $2 AND end_time IS NULL"

_RELEASE = f"""
WITH l AS (
    UPDATE leases
       SET {_RELEASED},
           cleanup_result = CASE WHEN $6::smallint = {CLEANING} THEN NULL ELSE 'skipped' END
     WHERE {_LIVE}
 RETURNING lease_id, serial
)
UPDATE devices d
   SET state = $6, lease_id = NULL, cleaning_reason = $7,
       cleaning_lease_id = CASE WHEN $6::smallint = {CLEANING} THEN l.lease_id END, {_BUMP}
  FROM l
 WHERE d.serial = l.serial
RETURNING d.serial, d.state, d.version
"""

# A release whose device goes at once to the next waiting Lease: the lease ends
# and the device, still LEASED, passes to a new lease with the next token, in
# one statement (a release then a grant, without the AVAILABLE in between). The
# old lease ends only if the device serves the new lease's account. The
# release's parameters, then the grant's from $6.
_HAND_OVER = f"""
WITH l AS (
    UPDATE leases
       SET {_RELEASED}, cleanup_result = 'skipped'
     WHERE {_LIVE}
       AND EXISTS (SELECT 1 FROM devices
                    WHERE serial = leases.serial AND lease_id = $1
                      AND bound_account = {_numbered(6)["account"]})
 RETURNING serial
), d AS (
    UPDATE devices d SET {_lease_device(6)}, cleaning_reason = '', cleaning_lease_id = NULL
      FROM l
     WHERE d.serial = l.serial
 RETURNING d.serial, d.last_token, d.version
), n AS ({_new_lease(6)}
)
SELECT n.token, n.grant_time, n.expire_time, d.version FROM n, d
"""

_REAP = f"""
WITH l AS (
    UPDATE leases SET end_time = clock_timestamp(), end_reason = 'expired'
     WHERE end_time IS NULL AND expire_time <= clock_timestamp()
 RETURNING lease_id, serial, run_id
)
UPDATE devices d
   SET state = {CLEANING}, lease_id = NULL, cleaning_reason = 'expired',
       cleaning_lease_id = l.lease_id, {_BUMP}
  FROM l
 WHERE d.serial = l.serial
RETURNING d.serial, d.version, l.lease_id, l.run_id
"""


@dataclass(frozen=True)
class Granted:
    token: int
    grant_time: datetime
    expire_time: datetime
    version: int


@dataclass(frozen=True)
class Quarantined:
    quarantine: Row
    revoked_lease: Row | None
    version: int


class Store:
    """``pool`` serves everything but the lease statements and commits
    synchronously. ``hot`` (grants, renewals) commits synchronously too: a
    grant or renewal is durable before it is answered. ``relaxed`` serves
    releases with ``synchronous_commit = off``: a release lost in a database
    crash leaves a lease that expires (its device is then cleaned), and any
    later grant's synchronous commit makes the release durable first (the
    write-ahead log is flushed in order). See :mod:`stepline.device_broker.pools`.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        hot: asyncpg.Pool | None = None,
        relaxed: asyncpg.Pool | None = None,
    ) -> None:
        self.pool = pool
        self.hot = hot or pool
        self.relaxed = relaxed or pool

    # --- start-up --------------------------------------------------------------------

    async def load(self) -> tuple[list[Row], list[Row]]:
        """Every device, and every live lease."""
        async with self.pool.acquire() as conn:
            devices = await conn.fetch("SELECT * FROM devices ORDER BY serial")
            leases = await conn.fetch("SELECT * FROM leases WHERE end_time IS NULL")
        return list(devices), list(leases)

    async def configure(
        self, serial: str, *, pool: str, labels: Mapping[str, str], profile: str
    ) -> None:
        """Apply the configured pool, labels and cleanup profile to a known device."""
        await self.pool.execute(
            "UPDATE devices SET pool = $2, labels = $3, cleanup_profile = $4,"
            " update_time = clock_timestamp()"
            " WHERE serial = $1 AND (pool, labels, cleanup_profile) IS DISTINCT FROM ($2, $3, $4)",
            serial,
            pool,
            dict(labels),
            profile,
        )

    # --- inventory -------------------------------------------------------------------

    async def add_device(
        self,
        *,
        serial: str,
        adb_server: str,
        model: str,
        product: str,
        pool: str,
        labels: Mapping[str, str],
        profile: str,
    ) -> Row | None:
        """Register a device seen for the first time (CLEANING: intake); None if known."""
        row: Row | None = await self.pool.fetchrow(
            "INSERT INTO devices (serial, adb_server, model, product, pool, labels,"
            " cleanup_profile, state, online, cleaning_reason, last_seen_time)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, {CLEANING}, true, 'intake', clock_timestamp())"
            " ON CONFLICT (serial) DO NOTHING RETURNING *",
            serial,
            adb_server,
            model,
            product,
            pool,
            dict(labels),
            profile,
        )
        return row

    async def seen(self, serials: Sequence[str]) -> datetime | None:
        """Record that the adb servers list these devices online now."""
        if not serials:
            return None
        now: datetime | None = await self.pool.fetchval(
            "UPDATE devices SET last_seen_time = clock_timestamp() WHERE serial = ANY($1::text[])"
            " RETURNING last_seen_time",
            list(serials),
        )
        return now

    async def came_online(self, serial: str, adb_server: str) -> Row:
        """The device is listed again: OFFLINE becomes CLEANING (for the reason it
        was cleaning when adb lost it, else ``reconnect``)."""
        row: Row = await self.pool.fetchrow(
            "UPDATE devices SET online = true, adb_server = $2, last_seen_time = clock_timestamp(),"
            f" cleaning_reason = CASE WHEN state = {OFFLINE} AND cleaning_reason = ''"
            " THEN 'reconnect' ELSE cleaning_reason END,"
            f" state = CASE WHEN state = {OFFLINE} THEN {CLEANING} ELSE state END, {_BUMP}"
            " WHERE serial = $1 RETURNING *",
            serial,
            adb_server,
        )
        return row

    async def went_offline(self, serial: str) -> Row:
        """The device is gone from adb: AVAILABLE or CLEANING becomes OFFLINE (it is
        cleaned when it returns); a leased or quarantined device keeps its state."""
        row: Row = await self.pool.fetchrow(
            "UPDATE devices SET online = false,"
            f" state = CASE WHEN state IN ({AVAILABLE}, {CLEANING}) THEN {OFFLINE} ELSE state END,"
            f" {_BUMP} WHERE serial = $1 RETURNING *",
            serial,
        )
        return row

    async def record_health(self, serial: str, health: dict[str, Any], when: datetime) -> None:
        await self.pool.execute(
            "UPDATE devices SET health = $2, health_time = $3 WHERE serial = $1",
            serial,
            health,
            when,
        )

    # --- leases ----------------------------------------------------------------------

    async def grant(self, serial: str, lease_id: str, ask: Ask) -> Granted | None:
        """One statement: the device AVAILABLE -> LEASED with the next token, and the
        lease row ``lease_id`` for ``ask``. None if the device was not AVAILABLE (for
        that account). Raises asyncpg.UniqueViolationError if request_id was used before."""
        row = await self.hot.fetchrow(_GRANT, *_grant_params(lease_id, ask), serial)
        if row is None:
            return None
        return Granted(row["token"], row["grant_time"], row["expire_time"], row["version"])

    async def lease_by_request(self, request_id: str) -> Row | None:
        row: Row | None = await self.pool.fetchrow(
            "SELECT * FROM leases WHERE request_id = $1", request_id
        )
        return row

    async def lease(self, lease_id: str) -> Row | None:
        row: Row | None = await self.pool.fetchrow(
            "SELECT *, clock_timestamp() AS now FROM leases WHERE lease_id = $1", lease_id
        )
        return row

    async def renew(self, lease_id: str, token: int, ttl_s: float) -> Row | None:
        row: Row | None = await self.hot.fetchrow(_RENEW, lease_id, token, ttl_s)
        return row

    async def release(
        self,
        *,
        lease_id: str,
        token: int,
        outcome: int,
        message: str,
        request_id: str,
        next_state: int,
        cleaning_reason: str,
    ) -> Row | None:
        """The lease ends; its device goes ``next_state`` (CLEANING, or AVAILABLE
        for a pool without cleanup). None if the lease was not live with that token."""
        row: Row | None = await self.relaxed.fetchrow(
            _RELEASE,
            lease_id,
            token,
            outcome,
            message,
            request_id,
            next_state,
            cleaning_reason if next_state == CLEANING else "",
        )
        return row

    async def hand_over(
        self,
        *,
        lease_id: str,
        token: int,
        outcome: int,
        message: str,
        request_id: str,
        next_lease_id: str,
        ask: Ask,
    ) -> Granted | None:
        """One statement, committed synchronously: the lease ends (released) and its
        device passes to a new lease ``next_lease_id`` for ``ask`` with the next
        token. None if the lease was not live with that token (nothing changed).
        Raises asyncpg.UniqueViolationError if the grant's request_id was used before."""
        row = await self.hot.fetchrow(
            _HAND_OVER,
            lease_id,
            token,
            outcome,
            message,
            request_id,
            *_grant_params(next_lease_id, ask),
        )
        if row is None:
            return None
        return Granted(row["token"], row["grant_time"], row["expire_time"], row["version"])

    async def reap(self) -> list[Row]:
        """End every lease past its expiry; their devices go CLEANING."""
        return list(await self.pool.fetch(_REAP))

    # --- cleanup, health, quarantine -------------------------------------------------

    async def cleaning_context(self, serial: str) -> Row:
        """The device's baseline and the lease whose end started the cleanup."""
        row: Row = await self.pool.fetchrow(
            "SELECT d.baseline_packages, d.cleaning_reason, d.cleaning_lease_id,"
            " l.executor_id, l.run_id, l.task_id, l.outcome, l.message, l.end_reason"
            " FROM devices d LEFT JOIN leases l ON l.lease_id = d.cleaning_lease_id"
            " WHERE d.serial = $1",
            serial,
        )
        return row

    async def finish_cleaning(
        self,
        serial: str,
        *,
        health: dict[str, Any],
        health_time: datetime,
        baseline: list[str],
        lease_id: str | None,
        started: datetime,
        finished: datetime,
    ) -> int | None:
        """CLEANING -> AVAILABLE with the new health and baseline. Returns the
        device's version, or None if it left CLEANING meanwhile."""
        async with self.pool.acquire() as conn, conn.transaction():
            version: int | None = await conn.fetchval(
                f"UPDATE devices SET state = {AVAILABLE}, health = $2, health_time = $3,"
                " baseline_packages = $4, cleaning_reason = '', cleaning_lease_id = NULL,"
                f" {_BUMP} WHERE serial = $1 AND state = {CLEANING} RETURNING version",
                serial,
                health,
                health_time,
                baseline,
            )
            if version is not None and lease_id is not None:
                await self._cleanup_times(conn, lease_id, started, finished, "clean")
        return version

    async def lost_while_cleaning(self, serial: str) -> Row | None:
        """A cleanup lost the device: CLEANING -> OFFLINE (cleaned when it returns)."""
        row: Row | None = await self.pool.fetchrow(
            f"UPDATE devices SET state = {OFFLINE}, online = false, {_BUMP}"
            f" WHERE serial = $1 AND state = {CLEANING} RETURNING *",
            serial,
        )
        return row

    @staticmethod
    async def _cleanup_times(
        conn: asyncpg.Connection, lease_id: str, started: datetime, finished: datetime, result: str
    ) -> None:
        await conn.execute(
            "UPDATE leases SET cleanup_start_time = $2, cleanup_end_time = $3, cleanup_result = $4"
            " WHERE lease_id = $1",
            lease_id,
            started,
            finished,
            result,
        )

    async def quarantine(
        self,
        serial: str,
        *,
        reason: str,
        evidence: Mapping[str, Any],
        actor_id: str,
        actor_roles: Sequence[str],
        only_from: Sequence[int] | None = None,
        health: dict[str, Any] | None = None,
        health_time: datetime | None = None,
        cleanup: tuple[str, datetime, datetime] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> Quarantined | None:
        """The device (in any state, or only in ``only_from``) -> QUARANTINED with the
        evidence; its live lease is revoked. None if it was not in ``only_from``."""
        if conn is None:
            async with self.pool.acquire() as own, own.transaction():
                return await self.quarantine(
                    serial,
                    reason=reason,
                    evidence=evidence,
                    actor_id=actor_id,
                    actor_roles=actor_roles,
                    only_from=only_from,
                    health=health,
                    health_time=health_time,
                    cleanup=cleanup,
                    conn=own,
                )
        device = await conn.fetchrow(
            "SELECT state, lease_id FROM devices WHERE serial = $1 FOR UPDATE", serial
        )
        if device is None or (only_from is not None and device["state"] not in only_from):
            return None
        revoked = None
        if device["state"] == LEASED and device["lease_id"] is not None:
            revoked = await conn.fetchrow(
                "UPDATE leases SET end_time = clock_timestamp(), end_reason = 'revoked'"
                " WHERE lease_id = $1 AND end_time IS NULL RETURNING *",
                device["lease_id"],
            )
        quarantine = await conn.fetchrow(
            "INSERT INTO quarantines (serial, reason, evidence, actor_id, actor_roles)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING *",
            serial,
            reason,
            dict(evidence),
            actor_id,
            list(actor_roles),
        )
        version: int = await conn.fetchval(
            f"UPDATE devices SET state = {QUARANTINED}, lease_id = NULL, quarantine_id = $2,"
            " cleaning_reason = '', cleaning_lease_id = NULL,"
            " health = coalesce($3, health), health_time = coalesce($4, health_time),"
            f" {_BUMP} WHERE serial = $1 RETURNING version",
            serial,
            quarantine["quarantine_id"],
            health,
            health_time,
        )
        if cleanup is not None:
            await self._cleanup_times(conn, *cleanup, "quarantined")
        return Quarantined(quarantine, revoked, version)

    async def return_to_service(
        self, conn: asyncpg.Connection, serial: str, *, actor_id: str, reason: str
    ) -> Row | None:
        """QUARANTINED -> CLEANING (reason ``operator``); None if not QUARANTINED."""
        row: Row | None = await conn.fetchrow(
            f"UPDATE devices SET state = {CLEANING}, cleaning_reason = 'operator',"
            f" cleaning_lease_id = NULL, {_BUMP}"
            f" WHERE serial = $1 AND state = {QUARANTINED} RETURNING *",
            serial,
        )
        if row is not None and row["quarantine_id"] is not None:
            await conn.execute(
                "UPDATE quarantines SET release_time = clock_timestamp(), released_by = $2,"
                " release_reason = $3 WHERE quarantine_id = $1",
                row["quarantine_id"],
                actor_id,
                reason,
            )
        return row

    # --- account bindings ------------------------------------------------------------

    @staticmethod
    async def lock_device(conn: asyncpg.Connection, serial: str) -> Row | None:
        row: Row | None = await conn.fetchrow(
            "SELECT * FROM devices WHERE serial = $1 FOR UPDATE", serial
        )
        return row

    @staticmethod
    async def live_leases_of_account(conn: asyncpg.Connection, account: str) -> list[Row]:
        """Run after locking the device, so that a grant committed meanwhile is seen."""
        return list(
            await conn.fetch(
                "SELECT lease_id, serial FROM leases WHERE account = $1 AND end_time IS NULL",
                account,
            )
        )

    @staticmethod
    async def bound_elsewhere(conn: asyncpg.Connection, account: str, serial: str) -> str | None:
        other: str | None = await conn.fetchval(
            "SELECT serial FROM devices WHERE bound_account = $1 AND serial <> $2", account, serial
        )
        return other

    @staticmethod
    async def set_binding(
        conn: asyncpg.Connection, serial: str, account: str, *, actor_id: str
    ) -> Row:
        """Bind (``account``) or unbind (``''``); raises UniqueViolationError if the
        account is bound to another device."""
        await conn.execute(
            "UPDATE bindings SET unbind_time = clock_timestamp(), unbound_by = $2"
            " WHERE serial = $1 AND unbind_time IS NULL",
            serial,
            actor_id,
        )
        row: Row = await conn.fetchrow(
            f"UPDATE devices SET bound_account = $2, {_BUMP} WHERE serial = $1 RETURNING *",
            serial,
            account,
        )
        if account:
            await conn.execute(
                "INSERT INTO bindings (serial, account, bound_by) VALUES ($1, $2, $3)",
                serial,
                account,
                actor_id,
            )
        return row

    # --- idempotency of operator requests --------------------------------------------

    @staticmethod
    async def replayed(
        conn: asyncpg.Connection, request: Message, response_type: type[M]
    ) -> M | None:
        """The stored response of an earlier identical request; ABORTED if it differed."""
        request_id: str = request.request_id  # type: ignore[attr-defined]
        row = await conn.fetchrow(
            "SELECT fingerprint, response FROM requests WHERE method = $1 AND request_id = $2",
            request.DESCRIPTOR.name,
            request_id,
        )
        if row is None:
            return None
        if row["fingerprint"] != fingerprint(request):
            raise Aborted(
                f"request_id {request_id!r} was already used for a different "
                f"{request.DESCRIPTOR.name}; use a new request_id for a new request"
            )
        return response_type.FromString(row["response"])

    @staticmethod
    async def remember(conn: asyncpg.Connection, request: Message, response: Message) -> None:
        await conn.execute(
            "INSERT INTO requests (method, request_id, fingerprint, response)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            request.DESCRIPTOR.name,
            request.request_id,  # type: ignore[attr-defined]
            fingerprint(request),
            response.SerializeToString(),
        )

    # --- reads -----------------------------------------------------------------------

    async def device_row(self, serial: str, conn: asyncpg.Connection | None = None) -> Row | None:
        source: Any = conn if conn is not None else self.pool
        row: Row | None = await source.fetchrow(DEVICE_VIEW + " WHERE d.serial = $1", serial)
        return row

    async def list_devices(
        self,
        *,
        pool: str,
        states: Sequence[int],
        model: str,
        labels: Mapping[str, str],
        account: str,
        after: str,
        limit: int,
    ) -> list[Row]:
        return list(
            await self.pool.fetch(
                DEVICE_VIEW + " WHERE ($1 = '' OR d.pool = $1)"
                " AND (cardinality($2::smallint[]) = 0 OR d.state = ANY($2::smallint[]))"
                " AND ($3 = '' OR d.model = $3) AND d.labels @> $4::jsonb"
                " AND ($5 = '' OR d.bound_account = $5) AND d.serial > $6"
                " ORDER BY d.serial LIMIT $7",
                pool,
                list(states),
                model,
                dict(labels),
                account,
                after,
                limit,
            )
        )
