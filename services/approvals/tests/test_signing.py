"""The signing helper shared by outbound and inbound webhooks."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from stepline.approvals import signing


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signing.sign("s3cret", 1700000000, body) == f"v1={expected}"
    assert signing.sign(b"s3cret", 1700000000, body.decode()) == f"v1={expected}"


def test_verify_accepts_a_fresh_good_signature_and_one_of_several() -> None:
    body = "payload"
    signature = signing.sign("k", 1000, body)
    assert signing.verify("k", "1000", body, signature, now=1000) == 1000
    assert signing.verify("k", 1000, body, f"v1=00ff, {signature}", now=1299) == 1000


@pytest.mark.parametrize(
    ("timestamp", "signature", "now", "message"),
    [
        ("1000", None, 1000, "missing Stepline-Signature"),
        (None, "v1=ab", 1000, "missing Stepline-Timestamp"),
        ("soon", "v1=ab", 1000, "unix seconds"),
        ("1000", "v1=" + "0" * 64, 1000, "does not match"),
        ("1000", "sha256=whatever", 1000, "does not match"),
        ("1000", "GOOD", 1301, "more than 300s"),
        ("1000", "GOOD", 699, "more than 300s"),
    ],
)
def test_verify_refuses(
    timestamp: str | None, signature: str | None, now: float, message: str
) -> None:
    if signature == "GOOD":
        signature = signing.sign("k", 1000, "payload")
    with pytest.raises(signing.SignatureError, match=message) as info:
        signing.verify("k", timestamp, "payload", signature, now=now)
    assert "k" not in str(info.value).split()  # never echoes the secret


def test_a_changed_body_or_secret_fails() -> None:
    signature = signing.sign("k", 1000, "payload")
    with pytest.raises(signing.SignatureError):
        signing.verify("k", 1000, "payload!", signature, now=1000)
    with pytest.raises(signing.SignatureError):
        signing.verify("other", 1000, "payload", signature, now=1000)


def test_signed_headers_carry_id_timestamp_event_and_signature() -> None:
    headers = signing.signed_headers("k", "b", delivery_id="d1", event="E", timestamp=5)
    assert headers == {
        "Stepline-Delivery-Id": "d1",
        "Stepline-Timestamp": "5",
        "Stepline-Event": "E",
        "Stepline-Signature": signing.sign("k", 5, "b"),
    }
