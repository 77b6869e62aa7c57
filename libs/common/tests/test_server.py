"""The gRPC bootstrap over real loopback gRPC: auth, limits, deadlines, errors, health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepline.common import embedded
from stepline.common.auth import Authenticator, Principal, current_principal
from stepline.common.client import check_health, open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.errors import NotFound
from stepline.common.server import GrpcHost

TOKEN = "test-token-123"
LIMIT = 64 * 1024
SERVICE = "stepline.test.Echo"
Context = grpc.aio.ServicerContext[bytes, bytes]


class EchoHandlers:
    def __init__(self) -> None:
        self.calls = 0

    async def echo(self, request: bytes, context: Context) -> bytes:
        self.calls += 1
        return current_principal().id.encode() + b":" + request

    async def remaining(self, request: bytes, context: Context) -> bytes:
        return repr(context.time_remaining()).encode()

    async def hang(self, request: bytes, context: Context) -> bytes:
        await asyncio.Event().wait()
        return b""

    async def not_found(self, request: bytes, context: Context) -> bytes:
        raise NotFound("run 'r-1' does not exist")

    async def crash(self, request: bytes, context: Context) -> bytes:
        raise RuntimeError("password=hunter2 leaked in a bug")

    async def unimplemented(self, request: bytes, context: Context) -> bytes:
        raise NotImplementedError("Method not implemented!")

    async def stream(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"one"
        raise NotFound("stream ran out")


def _register(handlers: EchoHandlers) -> Any:
    unary = {
        "Echo": handlers.echo,
        "Remaining": handlers.remaining,
        "Hang": handlers.hang,
        "NotFound": handlers.not_found,
        "Crash": handlers.crash,
        "Unimplemented": handlers.unimplemented,
    }
    methods: dict[str, Any] = {
        name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in unary.items()
    }
    methods["Stream"] = grpc.unary_stream_rpc_method_handler(handlers.stream)
    generic = grpc.method_handlers_generic_handler(SERVICE, methods)
    return lambda server: server.add_generic_rpc_handlers((generic,))


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, EchoHandlers]]:
    handlers = EchoHandlers()
    host = GrpcHost(
        settings=ServerSettings(service="echo", max_message_bytes=LIMIT, shutdown_grace_s=0.5),
        authenticator=Authenticator.from_tokens([(TOKEN, Principal("alice"))]),
    )
    host.add(SERVICE, _register(handlers))
    port = await host.start()
    await host.set_serving(True)
    try:
        yield f"127.0.0.1:{port}", handlers
    finally:
        await host.stop()


def _client(target: str, token: str | None = TOKEN, timeout_s: float = 5.0) -> grpc.aio.Channel:
    settings = ClientSettings(default_timeout_s=timeout_s, max_message_bytes=4 * LIMIT)
    return open_channel(target, settings=settings, token=token)


def _method(channel: grpc.aio.Channel, name: str) -> Any:
    return channel.unary_unary(f"/{SERVICE}/{name}")


async def test_valid_token_reaches_handler_with_principal(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target) as channel:
        assert await _method(channel, "Echo")(b"hi") == b"alice:hi"


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
async def test_missing_or_invalid_token_is_unauthenticated(
    echo_server: Any, token: str | None
) -> None:
    target, handlers = echo_server
    async with _client(target, token=token) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Echo")(b"hi")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert handlers.calls == 0


async def test_malformed_authorization_header_is_unauthenticated(echo_server: Any) -> None:
    target, _ = echo_server
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Echo")(
                b"hi", metadata=(("authorization", f"Basic {TOKEN}"),), timeout=5
            )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (info.value.details() or "")


async def test_health_needs_no_token_and_reports_serving(echo_server: Any) -> None:
    target, _ = echo_server
    assert await check_health(target)
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_oversized_message_is_refused_before_the_handler(echo_server: Any) -> None:
    target, handlers = echo_server
    async with _client(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Echo")(b"x" * (LIMIT + 1))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert handlers.calls == 0
        # A message within the limit still goes through on the same channel.
        assert await _method(channel, "Echo")(b"x" * 100) == b"alice:" + b"x" * 100


async def test_calls_through_the_helper_always_carry_a_deadline(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target, timeout_s=7.0) as channel:
        remaining = float(await _method(channel, "Remaining")(b""))
        assert 5.0 < remaining <= 7.5  # the default deadline, though the caller set none
        explicit = float(await _method(channel, "Remaining")(b"", timeout=2.0))
        assert 0 < explicit <= 2.5  # an explicit deadline wins


async def test_a_hanging_call_ends_at_the_default_deadline(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target, timeout_s=0.3) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Hang")(b"")
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_stepline_errors_map_to_their_status(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "NotFound")(b"")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "run 'r-1' does not exist"


async def test_unexpected_errors_are_internal_without_details(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Crash")(b"")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (info.value.details() or "")


async def test_methods_not_written_yet_are_unimplemented(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _method(channel, "Unimplemented")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_streaming_handler_errors_map_to_their_status(echo_server: Any) -> None:
    target, _ = echo_server
    async with _client(target) as channel:
        method: Any = channel.unary_stream(f"/{SERVICE}/Stream")
        call = method(b"")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _item in call:
                pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "stream ran out"


async def test_stop_reports_not_serving() -> None:
    host = GrpcHost(
        settings=ServerSettings(service="echo", shutdown_grace_s=0.2),
        authenticator=Authenticator.from_tokens([]),
    )
    host.add(SERVICE, _register(EchoHandlers()))
    port = await host.start()
    target = f"127.0.0.1:{port}"
    assert not await check_health(target)  # NOT_SERVING until the service is ready
    await host.set_serving(True)
    assert await check_health(target)
    await host.stop()
    assert not await check_health(target, timeout_s=0.5)


async def test_services_wait_for_a_peer_that_is_still_starting() -> None:
    port = embedded.free_port()
    target = f"127.0.0.1:{port}"
    request = health_pb2.HealthCheckRequest()
    impatient = open_channel(target, settings=ClientSettings(default_timeout_s=5))
    async with impatient:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(impatient).Check(request)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # interactive clients fail fast

    patient = open_channel(
        target, settings=ClientSettings(default_timeout_s=10, wait_for_ready=True)
    )
    async with patient:
        call = asyncio.ensure_future(health_pb2_grpc.HealthStub(patient).Check(request))
        await asyncio.sleep(0)  # the call is under way before the peer listens
        host = GrpcHost(
            settings=ServerSettings(service="late", listen=target, shutdown_grace_s=0.2),
            authenticator=Authenticator.from_tokens([]),
        )
        await host.start()
        await host.set_serving(True)
        try:
            response = await call
        finally:
            await host.stop()
    assert response.status == health_pb2.HealthCheckResponse.SERVING
