"""The inbound decision webhook: refusals change nothing, a good request decides."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.approvals import signing
from stepline.common.testing import eventually

from .conftest import INBOUND_SECRET, Harness, policy

S = pb.ApprovalState


def body_of(approval_id: str, **fields: str) -> bytes:
    document = {"approval_id": approval_id, "outcome": "approved", "reason": "ok", "actor": "bob"}
    document.update(fields)
    return json.dumps(document).encode()


async def post(
    h: Harness,
    body: bytes,
    *,
    secret: str = INBOUND_SECRET,
    delivery_id: str | None = None,
    timestamp: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    signed = signing.signed_headers(
        secret, body, delivery_id=delivery_id or str(uuid.uuid4()), timestamp=timestamp
    )
    signed.update(headers or {})
    async with httpx.AsyncClient() as client:
        return await client.post(f"{h.webhook_url}/v1/decisions", content=body, headers=signed)


async def state_of(h: Harness) -> dict[str, Any]:
    """Everything a decision could have written."""
    return {
        "decisions": await h.pool.fetchval("SELECT count(*) FROM decisions"),
        "seen": await h.pool.fetchval("SELECT count(*) FROM inbound_deliveries"),
        "ledger": await h.pool.fetchval("SELECT count(*) FROM ledger_outbox"),
        "events": await h.pool.fetchval("SELECT count(*) FROM event_outbox"),
        "states": [
            r["state"] for r in await h.pool.fetch("SELECT state FROM approvals ORDER BY 1")
        ],
    }


async def test_a_signed_request_decides_like_a_grpc_call(harness: Harness) -> None:
    h = harness
    approval = await h.create(policy=policy(required=2))
    response = await post(h, body_of(approval.approval_id, reason="via chat"))
    assert response.status_code == 200, response.text
    assert response.json()["approval"]["state"] == "APPROVAL_STATE_PENDING"
    response = await post(h, body_of(approval.approval_id, actor="carol"))
    assert response.status_code == 200, response.text

    final = await h.get(approval.approval_id)
    assert final.state == S.APPROVAL_STATE_APPROVED
    assert [(d.actor.id, list(d.actor.roles), d.channel, d.reason) for d in final.decisions] == [
        ("bob", ["approver"], pb.DECISION_CHANNEL_WEBHOOK, "via chat"),
        ("carol", ["approver"], pb.DECISION_CHANNEL_WEBHOOK, "ok"),
    ]
    assert await h.pool.fetchval("SELECT count(*) FROM inbound_deliveries") == 2

    async def recorded() -> list[Any] | None:
        rows = await h.pool.fetch("SELECT * FROM ledger_outbox WHERE done_time IS NOT NULL")
        return rows if len(rows) == 2 else None

    await eventually(recorded, what="both decisions in the ledger")


async def test_refusals_are_answered_before_anything_is_written(harness: Harness) -> None:
    h = harness
    approval = await h.create()
    body = body_of(approval.approval_id)
    before = await state_of(h)

    cases: list[tuple[int, str, httpx.Response]] = [
        (401, "wrong secret", await post(h, body, secret="not-the-secret")),
        (
            401,
            "no signature",
            await post(h, body, headers={signing.SIGNATURE_HEADER: ""}),
        ),
        (401, "stale", await post(h, body, timestamp=int(time.time()) - 301)),
        (401, "from the future", await post(h, body, timestamp=int(time.time()) + 330)),
        (
            401,
            "timestamp changed after signing",
            await post(h, body, headers={signing.TIMESTAMP_HEADER: str(int(time.time()) - 1)}),
        ),
        (400, "malformed", await post(h, b"{not json")),
        (400, "bad outcome", await post(h, body_of(approval.approval_id, outcome="maybe"))),
        (400, "no delivery id", await post(h, body, headers={signing.DELIVERY_ID_HEADER: ""})),
        (403, "unknown actor", await post(h, body_of(approval.approval_id, actor="mallory"))),
        (403, "ineligible actor", await post(h, body_of(approval.approval_id, actor="dave"))),
        (403, "the initiator", await post(h, body_of(approval.approval_id, actor="erin"))),
        (404, "unknown approval", await post(h, body_of(str(uuid.uuid4())))),
        (
            400,
            "reject without reason",
            await post(h, body_of(approval.approval_id, outcome="rejected", reason="")),
        ),
    ]
    for status, what, response in cases:
        assert response.status_code == status, (what, response.text)
        assert response.json()["message"], what
    assert await state_of(h) == before
    listed = await h.as_("admin").ListApprovals(pb.ListApprovalsRequest())
    assert [(a.state, len(a.decisions)) for a in listed.approvals] == [
        (S.APPROVAL_STATE_PENDING, 0)
    ]

    # A replayed delivery id is refused, even once the request is final.
    delivery_id = str(uuid.uuid4())
    first = await post(h, body, delivery_id=delivery_id)
    assert first.status_code == 200, first.text
    after = await state_of(h)
    replay = await post(h, body, delivery_id=delivery_id)
    assert replay.status_code == 409
    assert replay.json()["error"] == "replayed"
    other = await post(h, body_of(approval.approval_id, actor="carol"), delivery_id=delivery_id)
    assert other.status_code == 409
    assert await state_of(h) == after
    assert (await h.get(approval.approval_id)).state == S.APPROVAL_STATE_APPROVED
    late = await post(h, body_of(approval.approval_id, actor="carol"))
    assert late.status_code == 409
    assert late.json()["error"] == "failed_precondition"


@pytest.mark.parametrize("path", ["/healthz"])
async def test_health(harness: Harness, path: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{harness.webhook_url}{path}")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
