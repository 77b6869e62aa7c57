"""The inbound decision webhook: ``POST /v1/decisions`` (aiohttp), and ``GET /healthz``.

A chat bot, a ticketing system or another approvals front end sends a decision
on behalf of a person::

    POST /v1/decisions
    Stepline-Delivery-Id: <unique per request>
    Stepline-Timestamp: <unix seconds>
    Stepline-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

    {"approval_id": "...", "outcome": "approved" | "rejected",
     "reason": "...", "actor": "<principal id>"}

signed with the secret named by ``STEPLINE_APPROVALS_INBOUND_SECRET``. Refused
before anything is written: a missing or wrong signature, or a timestamp more
than the tolerance from now (401); a delivery id seen before (409); a
malformed body (400); an actor unknown to the auth file (403). Then the
decision follows the same rules as ``Approve``/``Reject`` over gRPC, with the
actor's roles from the auth file and channel WEBHOOK; the delivery id is stored
with the decision, in its transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.approvals import convert
from stepline.approvals.config import WebhookSettings
from stepline.approvals.secret_store import SecretStore
from stepline.approvals.signing import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify,
)
from stepline.approvals.store import ApprovalStore, Replayed
from stepline.common.auth import Principal
from stepline.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SteplineError,
)

log = logging.getLogger(__name__)

PATH = "/v1/decisions"
MAX_BODY_BYTES = 64 * 1024
MAX_DELIVERY_ID = 200
OUTCOMES = {"approved": pb.DECISION_OUTCOME_APPROVED, "rejected": pb.DECISION_OUTCOME_REJECTED}
_HTTP_STATUS: list[tuple[type[SteplineError], int]] = [
    (Replayed, 409),
    (InvalidArgument, 400),
    (NotFound, 404),
    (PermissionDenied, 403),
    (FailedPrecondition, 409),
    (Aborted, 409),
]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _parse(body: bytes, delivery_id: str) -> tuple[str, int, str, str]:
    """(approval_id, outcome, reason, actor) of a decision body, or InvalidArgument."""
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise InvalidArgument("the body must be a JSON object") from None
    if not isinstance(document, dict):
        raise InvalidArgument("the body must be a JSON object")
    unknown = sorted(set(document) - {"approval_id", "outcome", "reason", "actor", "delivery_id"})
    if unknown:
        raise InvalidArgument(f"unknown fields {unknown}")
    values: dict[str, str] = {}
    for name in ("approval_id", "outcome", "reason", "actor", "delivery_id"):
        value = document.get(name, "")
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string")
        values[name] = value
    for name in ("approval_id", "outcome", "actor"):
        if not values[name]:
            raise InvalidArgument(f"{name} is required")
    if values["outcome"] not in OUTCOMES:
        raise InvalidArgument("outcome must be 'approved' or 'rejected'")
    if values["delivery_id"] and values["delivery_id"] != delivery_id:
        raise InvalidArgument(f"delivery_id in the body differs from {DELIVERY_ID_HEADER}")
    return values["approval_id"], OUTCOMES[values["outcome"]], values["reason"], values["actor"]


class DecisionEndpoint:
    """Handlers of the inbound HTTP server."""

    def __init__(
        self,
        *,
        store: ApprovalStore,
        secrets: SecretStore,
        settings: WebhookSettings,
        principals: Mapping[str, Principal],
    ) -> None:
        self._store = store
        self._secrets = secrets
        self._settings = settings
        self._principals = dict(principals)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(PATH, self.decide)
        app.router.add_get("/healthz", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def decide(self, request: web.Request) -> web.Response:
        secret = self._secrets.get(self._settings.inbound_secret)
        if secret is None:
            return _error(
                503,
                "unavailable",
                "inbound decisions are off: the secrets file has no secret named "
                f"{self._settings.inbound_secret!r}",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"the body must be at most {MAX_BODY_BYTES} bytes")
        try:
            verify(
                secret,
                request.headers.get(TIMESTAMP_HEADER),
                body,
                request.headers.get(SIGNATURE_HEADER),
                tolerance_s=self._settings.tolerance_s,
            )
        except SignatureError as exc:
            log.warning("inbound decision refused: %s", exc)
            return _error(401, "unauthenticated", str(exc))
        delivery_id = request.headers.get(DELIVERY_ID_HEADER, "").strip()
        try:
            if not delivery_id or len(delivery_id) > MAX_DELIVERY_ID:
                raise InvalidArgument(
                    f"{DELIVERY_ID_HEADER} is required (a unique id of at most "
                    f"{MAX_DELIVERY_ID} characters)"
                )
            approval_id, outcome, reason, actor_id = _parse(body, delivery_id)
            actor = self._principals.get(actor_id)
            if actor is None:
                raise PermissionDenied(f"actor {actor_id!r} is not a known principal")
            approval = await self._store.decide(
                approval_id=approval_id,
                actor=actor,
                outcome=outcome,
                reason=reason,
                channel=pb.DECISION_CHANNEL_WEBHOOK,
                inbound_delivery_id=delivery_id,
            )
        except SteplineError as exc:
            status = next((s for cls, s in _HTTP_STATUS if isinstance(exc, cls)), 500)
            code = "replayed" if isinstance(exc, Replayed) else exc.code
            log.warning("inbound decision %s refused (%d): %s", delivery_id, status, exc)
            return _error(status, code, exc.message)
        return web.json_response({"approval": convert.to_json(approval)})
