"""Webhook subscriptions, and the deliveries each notification becomes.

Every notification (a request created, decided, expired or cancelled) becomes
one ``deliveries`` row per matching subscription, written in the transaction
of the change, with the JSON body fixed then::

    {"delivery_id": "...", "event_type": "APPROVAL_EVENT_TYPE_DECIDED",
     "approval": {<the Approval, proto JSON with proto field names>}}

:mod:`stepline.approvals.webhooks` POSTs them.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.approvals import convert
from stepline.approvals.idempotency import RequestKey, remember, replayed
from stepline.approvals.secret_store import SecretStore
from stepline.common import paging
from stepline.common.auth import Principal
from stepline.common.errors import InvalidArgument, NotFound
from stepline.common.requests import fingerprint

MAX_URL = 2048
MAX_DESCRIPTION = 1024
MAX_FILTER_ENTRIES = 100
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?$")


def event_type_name(event_type: int) -> str:
    return pb.ApprovalEventType.Name(event_type)  # type: ignore[arg-type]


def delivery_body(delivery_id: str, event_type: int, approval: pb.Approval) -> str:
    """The JSON POSTed for one delivery."""
    document = {
        "delivery_id": delivery_id,
        "event_type": event_type_name(event_type),
        "approval": convert.to_json(approval),
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


async def enqueue(conn: asyncpg.Connection, approval: pb.Approval, event_type: int) -> int:
    """Write a delivery of ``approval``'s notification for every matching subscription."""
    rows = await conn.fetch(
        "SELECT subscription_id FROM subscriptions WHERE delete_time IS NULL"
        " AND (cardinality(workflow_names) = 0 OR $1 = ANY(workflow_names))"
        " AND $2::jsonb @> labels"
        " AND (cardinality(event_types) = 0 OR $3::smallint = ANY(event_types))"
        " ORDER BY create_time, subscription_id",
        approval.workflow_name,
        dict(approval.labels),
        event_type,
    )
    if not rows:
        return 0
    now = datetime.now(UTC)
    deliveries = []
    for row in rows:
        delivery_id = str(uuid.uuid4())
        deliveries.append(
            (
                uuid.UUID(delivery_id),
                row["subscription_id"],
                approval.approval_id,
                event_type,
                delivery_body(delivery_id, event_type, approval),
                pb.DELIVERY_STATE_PENDING,
                now,
                now,
            )
        )
    await conn.executemany(
        "INSERT INTO deliveries (delivery_id, subscription_id, approval_id, event_type, body,"
        " state, create_time, next_attempt_time) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        deliveries,
    )
    return len(deliveries)


def check_url(url: str) -> None:
    """HTTPS, or plain HTTP to a loopback host (tests, a local relay)."""
    where = "subscription.url"
    if not url:
        raise InvalidArgument(f"{where} is required")
    if len(url) > MAX_URL:
        raise InvalidArgument(f"{where} must be at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parses the port; raises on a bad one)
    except ValueError:
        raise InvalidArgument(f"{where} is not a URL") from None
    host = parts.hostname or ""
    if not host:
        raise InvalidArgument(f"{where} needs a host, e.g. https://hooks.example.com/stepline")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(f"{where} must not carry credentials; requests are signed instead")
    if parts.fragment:
        raise InvalidArgument(f"{where} must not have a #fragment")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise InvalidArgument(
        f"{where} must use https:// (plain http:// only to a loopback host such as 127.0.0.1)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(subscription: pb.Subscription, secrets: SecretStore) -> None:
    check_url(subscription.url)
    if not subscription.secret_ref:
        raise InvalidArgument(
            "subscription.secret_ref is required: the name of a signing secret "
            "in the approvals service's secrets file"
        )
    if subscription.secret_ref not in secrets:
        raise InvalidArgument(
            f"subscription.secret_ref {subscription.secret_ref!r} names no secret in the "
            "approvals service's secrets file (STEPLINE_APPROVALS_SECRETS_FILE)"
        )
    if len(subscription.workflow_names) > MAX_FILTER_ENTRIES:
        raise InvalidArgument(f"subscription.workflow_names: at most {MAX_FILTER_ENTRIES}")
    for index, name in enumerate(subscription.workflow_names):
        if not name:
            raise InvalidArgument(f"subscription.workflow_names[{index}] must not be empty")
    if len(subscription.labels) > MAX_FILTER_ENTRIES:
        raise InvalidArgument(f"subscription.labels: at most {MAX_FILTER_ENTRIES}")
    for key in subscription.labels:
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"subscription.labels: {key!r} is not a label key")
    known = set(pb.ApprovalEventType.values()) - {pb.APPROVAL_EVENT_TYPE_UNSPECIFIED}
    for index, event_type in enumerate(subscription.event_types):
        if event_type not in known:
            raise InvalidArgument(
                f"subscription.event_types[{index}]: {event_type} is not an event type "
                "(REQUESTED, DECIDED, EXPIRED or CANCELLED)"
            )
    if len(subscription.description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"subscription.description: at most {MAX_DESCRIPTION} characters")


class SubscriptionStore:
    """Subscribers and their deliveries."""

    def __init__(self, pool: asyncpg.Pool, *, secrets: SecretStore) -> None:
        self.pool = pool
        self.secrets = secrets

    async def create(
        self, request: pb.CreateSubscriptionRequest, caller: Principal
    ) -> pb.CreateSubscriptionResponse:
        key = RequestKey.of(
            "CreateSubscription", request.request_id, fingerprint(request, caller.id)
        )
        given = request.subscription
        _check(given, self.secrets)
        async with self.pool.acquire() as conn, conn.transaction():
            done = await replayed(conn, key, pb.CreateSubscriptionResponse)
            if done is not None:
                return done
            row = await conn.fetchrow(
                "INSERT INTO subscriptions (subscription_id, url, secret_ref, workflow_names,"
                " labels, event_types, description, created_by_id, created_by_roles, create_time)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, clock_timestamp()) RETURNING *",
                str(uuid.uuid4()),
                given.url,
                given.secret_ref,
                list(dict.fromkeys(given.workflow_names)),
                dict(given.labels),
                sorted(set(given.event_types)),
                given.description,
                caller.id,
                sorted(caller.roles),
            )
            response = pb.CreateSubscriptionResponse(subscription=convert.subscription(row))
            await remember(conn, key, response)
        return response

    async def list(self, request: pb.ListSubscriptionsRequest) -> pb.ListSubscriptionsResponse:
        size = paging.page_size(request.page_size)
        position = paging.after_position(request.page_token)
        args: list[Any] = [size + 1]
        after = ""
        if position is not None:
            args += list(position)
            after = " AND (create_time, subscription_id) > ($2, $3)"
        rows = await self.pool.fetch(
            f"SELECT * FROM subscriptions WHERE delete_time IS NULL{after}"
            " ORDER BY create_time, subscription_id LIMIT $1",
            *args,
        )
        return pb.ListSubscriptionsResponse(
            subscriptions=[convert.subscription(r) for r in rows[:size]],
            next_page_token=paging.next_token(rows, size, "subscription_id"),
        )

    async def delete(
        self, request: pb.DeleteSubscriptionRequest, caller: Principal
    ) -> pb.DeleteSubscriptionResponse:
        if not request.subscription_id:
            raise InvalidArgument("subscription_id is required")
        key = RequestKey.of(
            "DeleteSubscription", request.request_id, fingerprint(request, caller.id)
        )
        async with self.pool.acquire() as conn, conn.transaction():
            done = await replayed(conn, key, pb.DeleteSubscriptionResponse)
            if done is not None:
                return done
            found = await conn.fetchval(
                "UPDATE subscriptions SET delete_time = coalesce(delete_time, clock_timestamp())"
                " WHERE subscription_id = $1 RETURNING subscription_id",
                request.subscription_id,
            )
            if found is None:
                raise NotFound(f"subscription {request.subscription_id!r} does not exist")
            # Pending deliveries are dropped; delivered and failed ones stay as history.
            await conn.execute(
                "DELETE FROM deliveries WHERE subscription_id = $1 AND state = $2",
                request.subscription_id,
                pb.DELIVERY_STATE_PENDING,
            )
            response = pb.DeleteSubscriptionResponse()
            await remember(conn, key, response)
        return response

    async def deliveries(self, request: pb.ListDeliveriesRequest) -> pb.ListDeliveriesResponse:
        size = paging.page_size(request.page_size)
        position = paging.after_position(request.page_token)
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if request.subscription_id:
            where.append(f"subscription_id = {arg(request.subscription_id)}")
        if request.approval_id:
            where.append(f"approval_id = {arg(request.approval_id)}")
        if request.states:
            where.append(f"state = ANY({arg(list(request.states))}::smallint[])")
        if position is not None:
            when, last_id = position
            try:
                last = uuid.UUID(last_id)
            except ValueError:
                raise InvalidArgument("page_token is malformed") from None
            where.append(f"(create_time, delivery_id) < ({arg(when)}, {arg(last)})")
        sql = "SELECT * FROM deliveries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY create_time DESC, delivery_id DESC LIMIT {arg(size + 1)}"
        rows = await self.pool.fetch(sql, *args)
        return pb.ListDeliveriesResponse(
            deliveries=[convert.delivery(r) for r in rows[:size]],
            next_page_token=paging.next_token(rows, size, "delivery_id"),
        )
