"""Outbound webhooks: subscriptions, signed deliveries, retries and their record."""

from __future__ import annotations

import json

import grpc
import pytest

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.approvals import signing
from stepline.common.testing import eventually

from .conftest import HOOK_SECRET, Harness, Receiver, policy

D = pb.DeliveryState


def subscribe_request(
    url: str, request_id: str = "sub-1", **fields: object
) -> pb.CreateSubscriptionRequest:
    return pb.CreateSubscriptionRequest(
        request_id=request_id,
        subscription=pb.Subscription(url=url, secret_ref="hooks", **fields),  # type: ignore[arg-type]
    )


async def subscribe(h: Harness, url: str, **fields: object) -> pb.Subscription:
    response = await h.as_("alice").CreateSubscription(subscribe_request(url, "sub-1", **fields))
    return response.subscription


async def deliveries(h: Harness, **filters: object) -> list[pb.Delivery]:
    response = await h.as_("alice").ListDeliveries(pb.ListDeliveriesRequest(**filters))  # type: ignore[arg-type]
    return list(response.deliveries)


async def test_deliveries_are_signed_and_retried_until_the_receiver_answers_2xx(
    harness: Harness, receiver: Receiver
) -> None:
    h = harness
    receiver.fail_first = 2
    sub = await subscribe(h, receiver.url, event_types=[pb.APPROVAL_EVENT_TYPE_REQUESTED])
    assert sub.created_by.id == "alice"
    approval = await h.create()

    async def delivered() -> list[pb.Delivery] | None:
        found = await deliveries(h, approval_id=approval.approval_id)
        return found if found and found[0].state == D.DELIVERY_STATE_DELIVERED else None

    [delivery] = await eventually(delivered, what="the delivery to succeed")
    assert delivery.attempts == 3
    assert delivery.last_status_code == 204
    assert delivery.last_error == ""
    assert delivery.subscription_id == sub.subscription_id
    assert delivery.event_type == pb.APPROVAL_EVENT_TYPE_REQUESTED
    assert not delivery.HasField("next_attempt_time")

    # Every attempt reached the receiver, signed over its own timestamp.
    assert len(receiver.requests) == 3
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1  # the same body each time
    for headers, body in receiver.requests:
        signing.verify(
            HOOK_SECRET,
            headers[signing.TIMESTAMP_HEADER],
            body,
            headers[signing.SIGNATURE_HEADER],
        )
        assert headers[signing.DELIVERY_ID_HEADER] == delivery.delivery_id
        assert headers[signing.EVENT_HEADER] == "APPROVAL_EVENT_TYPE_REQUESTED"
        assert headers["Content-Type"] == "application/json"
        with pytest.raises(signing.SignatureError):
            signing.verify(
                "wrong", headers[signing.TIMESTAMP_HEADER], body, headers[signing.SIGNATURE_HEADER]
            )
    payload = json.loads(bodies.pop())
    assert payload["delivery_id"] == delivery.delivery_id
    assert payload["event_type"] == "APPROVAL_EVENT_TYPE_REQUESTED"
    assert payload["approval"]["approval_id"] == approval.approval_id
    assert payload["approval"]["state"] == "APPROVAL_STATE_PENDING"
    assert payload["approval"]["context"] == {"amount": 125}

    attempts = await h.pool.fetch(
        "SELECT attempt_number, status_code, error, duration_ms FROM delivery_attempts"
        " WHERE delivery_id = $1::uuid ORDER BY attempt_number",
        delivery.delivery_id,
    )
    assert [(a["attempt_number"], a["status_code"], a["error"]) for a in attempts] == [
        (1, 500, "HTTP 500"),
        (2, 500, "HTTP 500"),
        (3, 204, ""),
    ]
    assert all(a["duration_ms"] >= 0 for a in attempts)

    # Only REQUESTED was subscribed to: the decision makes no delivery.
    await h.approve("bob", approval.approval_id)
    assert len(await deliveries(h)) == 1


async def test_a_delivery_fails_after_max_attempts(harness: Harness, receiver: Receiver) -> None:
    h = harness
    receiver.fail_first = 100
    await subscribe(h, receiver.url)
    approval = await h.create()

    async def failed() -> list[pb.Delivery] | None:
        found = await deliveries(h, states=[D.DELIVERY_STATE_FAILED])
        return found or None

    [delivery] = await eventually(failed, what="the delivery to fail")
    assert delivery.attempts == h.settings.webhooks.max_attempts == 4
    assert delivery.last_status_code == 500
    assert delivery.approval_id == approval.approval_id
    assert len(receiver.requests) == 4


async def test_filters_choose_which_notifications_become_deliveries(
    harness: Harness, receiver: Receiver
) -> None:
    h = harness
    decided = await h.as_("alice").CreateSubscription(
        subscribe_request(
            receiver.url,
            "s-decided",
            event_types=[pb.APPROVAL_EVENT_TYPE_DECIDED, pb.APPROVAL_EVENT_TYPE_CANCELLED],
            workflow_names=["payout"],
            labels={"tenant": "acme"},
        )
    )
    other = await h.as_("alice").CreateSubscription(
        subscribe_request(receiver.url, "s-other", workflow_names=["refund"])
    )
    acme = await h.create(labels={"tenant": "acme", "team": "x"}, policy=policy())
    globex = await h.create(labels={"tenant": "globex"})
    await h.approve("bob", acme.approval_id)
    await h.approve("bob", globex.approval_id)

    async def one() -> list[pb.Delivery] | None:
        found = await deliveries(h, states=[D.DELIVERY_STATE_DELIVERED])
        return found or None

    [delivery] = await eventually(one, what="one delivery")
    assert delivery.subscription_id == decided.subscription.subscription_id
    assert delivery.approval_id == acme.approval_id
    assert delivery.event_type == pb.APPROVAL_EVENT_TYPE_DECIDED
    payload = json.loads(receiver.requests[0][1])
    assert payload["approval"]["state"] == "APPROVAL_STATE_APPROVED"
    assert [d["actor"]["id"] for d in payload["approval"]["decisions"]] == ["bob"]
    assert await deliveries(h, subscription_id=other.subscription.subscription_id) == []
    assert len(await deliveries(h)) == 1


async def test_subscriptions_are_checked_listed_and_deleted(
    harness: Harness, receiver: Receiver
) -> None:
    h = harness
    for url, problem in [
        ("http://hooks.example.com/x", "must use https://"),
        ("ftp://127.0.0.1/x", "must use https://"),
        ("https://user:pw@hooks.example.com/x", "must not carry credentials"),
        ("not a url", "needs a host"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.as_("alice").CreateSubscription(subscribe_request(url, "bad"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert problem in (info.value.details() or "")
    unknown = subscribe_request("https://hooks.example.com/x", "bad")
    unknown.subscription.secret_ref = "nope"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.as_("alice").CreateSubscription(unknown)
    assert "names no secret" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.as_("bob").CreateSubscription(subscribe_request(receiver.url))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await h.pool.fetchval("SELECT count(*) FROM subscriptions") == 0

    first = await h.as_("alice").CreateSubscription(subscribe_request(receiver.url, "a"))
    again = await h.as_("alice").CreateSubscription(subscribe_request(receiver.url, "a"))
    assert again == first
    second = await h.as_("admin").CreateSubscription(
        subscribe_request("https://hooks.example.com/x", "b")
    )
    third = await h.as_("admin").CreateSubscription(subscribe_request("http://localhost:9/x", "c"))
    page = await h.as_("alice").ListSubscriptions(pb.ListSubscriptionsRequest(page_size=2))
    rest = await h.as_("alice").ListSubscriptions(
        pb.ListSubscriptionsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [s.subscription_id for s in [*page.subscriptions, *rest.subscriptions]] == [
        first.subscription.subscription_id,
        second.subscription.subscription_id,
        third.subscription.subscription_id,
    ]
    assert rest.next_page_token == ""

    # Deleting drops the pending deliveries to it.
    await h.create()
    dead = second.subscription.subscription_id
    await h.as_("alice").DeleteSubscription(
        pb.DeleteSubscriptionRequest(request_id="d1", subscription_id=dead)
    )
    assert await deliveries(h, subscription_id=dead) == []
    listed = await h.as_("alice").ListSubscriptions(pb.ListSubscriptionsRequest())
    assert dead not in [s.subscription_id for s in listed.subscriptions]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.as_("alice").DeleteSubscription(
            pb.DeleteSubscriptionRequest(request_id="d2", subscription_id="missing")
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
