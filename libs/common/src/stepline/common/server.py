"""The gRPC server every Stepline service runs on.

:class:`GrpcHost` adds what each service needs and should not write itself: the
authentication/error interceptor, ``grpc.health.v1`` (NOT_SERVING until the
service says it is ready), reflection, message size limits, and a graceful stop
on SIGTERM/SIGINT (report NOT_SERVING, refuse new calls, let calls in flight
finish within the grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from stepline.common.auth import Authenticator, AuthInterceptor
from stepline.common.config import ServerSettings, parse_address
from stepline.common.errors import ConfigError

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], None]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def load_authenticator(settings: ServerSettings) -> Authenticator:
    """The authenticator of the server's auth file (required: every RPC is authenticated)."""
    if settings.auth_file is None:
        raise ConfigError("STEPLINE_AUTH_FILE is required: every RPC is authenticated")
    return Authenticator.from_file(settings.auth_file)


class GrpcHost:
    """One gRPC server with health, reflection, auth and graceful shutdown."""

    def __init__(
        self,
        *,
        settings: ServerSettings,
        authenticator: Authenticator | None = None,
    ) -> None:
        if authenticator is None:
            authenticator = load_authenticator(settings)
        self.settings = settings
        self.health = HealthServicer()
        self._service_names: list[str] = []
        self._stop_requested = asyncio.Event()
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0

    def add(self, service_name: str, register: Register) -> None:
        """Register a servicer; ``service_name`` is its full proto name."""
        register(self.server)
        self._service_names.append(service_name)

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); returns the bound port."""
        host, port = parse_address(self.settings.listen, name="STEPLINE_LISTEN")
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reflection.enable_server_reflection(
            [*self._service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ConfigError(f"could not bind {address}")
        await self.set_serving(False)
        await self.server.start()
        log.info("%s listening on %s:%d", self.settings.service, host, self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING (or NOT_SERVING) for the server and every service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop (see :meth:`wait_for_stop`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def wait_for_stop(self) -> None:
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """NOT_SERVING first, then stop taking calls and give those in flight the grace."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        log.info("%s stopped", self.settings.service)


@contextlib.asynccontextmanager
async def serving(host: GrpcHost) -> AsyncIterator[GrpcHost]:
    """Start ``host`` and report SERVING; on exit, stop it gracefully."""
    await host.start()
    await host.set_serving(True)
    try:
        yield host
    finally:
        await host.stop()


async def wait_until_stopped(host: GrpcHost) -> None:
    """Wait for SIGTERM/SIGINT (or :meth:`GrpcHost.request_stop`)."""
    host.install_signal_handlers()
    await host.wait_for_stop()
    log.info("%s: stop requested, draining", host.settings.service)


async def serve_until_stopped(host: GrpcHost) -> None:
    """Start ``host``, report SERVING, wait for SIGTERM/SIGINT, stop gracefully.

    A service's ``serve`` opens its dependencies (pool, NATS) first, registers its
    servicers, calls this, and closes the dependencies after it returns.
    """
    async with serving(host):
        await wait_until_stopped(host)
