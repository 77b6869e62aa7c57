"""Client channels to Stepline services.

Every call made through :func:`open_channel` carries a deadline (the caller's,
or the default from :class:`~stepline.common.config.ClientSettings`) and the
caller's bearer token: a call without a deadline cannot be made through here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import grpc

from stepline.common.config import ClientSettings
from stepline.common.errors import from_rpc_error

T = TypeVar("T")


class _Defaults:
    """Fills in the default deadline, wait-for-ready and the bearer token on every call."""

    def __init__(
        self, *, default_timeout_s: float, token: str | None, wait_for_ready: bool = False
    ) -> None:
        self._default_timeout_s = default_timeout_s
        self._wait_for_ready = wait_for_ready
        self._auth: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        timeout = details.timeout if details.timeout is not None else self._default_timeout_s
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._auth)
        ready = details.wait_for_ready
        return grpc.aio.ClientCallDetails(
            details.method,
            timeout,
            metadata,
            details.credentials,
            self._wait_for_ready if ready is None else ready,
        )


# grpc.aio files each interceptor under one call kind only, so one class per kind.
class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._defaults.details(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._defaults.details(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._defaults.details(details), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, defaults: _Defaults) -> None:
        self._defaults = defaults

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._defaults.details(details), requests)


async def rpc(call: Awaitable[T]) -> T:
    """Await a call to another Stepline service, turning its failure back into the
    :class:`~stepline.common.errors.SteplineError` it was on the other side."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


def open_channel(
    target: str,
    *,
    settings: ClientSettings,
    token: str | None = None,
) -> grpc.aio.Channel:
    """An insecure (loopback/mesh) channel whose every call has a deadline and the token.

    ``token`` defaults to the service's own token from ``settings``.
    """
    limit = settings.max_message_bytes
    defaults = _Defaults(
        default_timeout_s=settings.default_timeout_s,
        token=token if token is not None else settings.service_token,
        wait_for_ready=settings.wait_for_ready,
    )
    return grpc.aio.insecure_channel(
        target,
        interceptors=[
            _UnaryUnary(defaults),
            _UnaryStream(defaults),
            _StreamUnary(defaults),
            _StreamStream(defaults),
        ],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )


async def check_health(target: str, *, timeout_s: float = 2.0, service: str = "") -> bool:
    """True when ``target`` answers SERVING on ``grpc.health.v1`` within the timeout."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with open_channel(
        target, settings=ClientSettings(default_timeout_s=timeout_s)
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
