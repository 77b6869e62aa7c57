"""Server-side plumbing shared by the interceptors: wrapping any kind of handler,
and turning Stepline errors into gRPC statuses."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from stepline.common.errors import status_of

Before = Callable[[], None]


def wrap_handler(handler: grpc.RpcMethodHandler[Any, Any], *, before: Before | None = None) -> Any:
    """Return ``handler`` with its behaviour wrapped: ``before`` runs inside the
    call's own task (so context variables it sets reach the handler), and every
    exception is mapped by :func:`abort_with`."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, before),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, before),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, before),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream, before),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap_unary(behavior: Any, before: Before | None) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if before is not None:
                before()
            return await behavior(request, context)
        except Exception as exc:  # every error becomes a status
            await abort_with(context, exc)

    return wrapped


def _wrap_stream(behavior: Any, before: Before | None) -> Any:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            if before is not None:
                before()
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result
        except Exception as exc:  # every error becomes a status
            await abort_with(context, exc)

    return wrapped


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Abort the call with the status that ``exc`` stands for (:func:`status_of`:
    Stepline errors keep their message; anything unexpected is logged and
    reaches the client only as a generic INTERNAL)."""
    if isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
        raise exc
    await context.abort(*status_of(exc))
