"""The shared ``__main__`` of every Stepline service: settings from the
environment, logging, then the service's ``serve`` coroutine."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from stepline.common.config import Env, ServerSettings
from stepline.common.errors import ConfigError
from stepline.common.logs import configure_logging


class HasServer(Protocol):
    @property
    def server(self) -> ServerSettings: ...


S = TypeVar("S", bound=HasServer)


def run_service(
    name: str, load: Callable[[Env], S], serve: Callable[[S], Coroutine[Any, Any, None]]
) -> None:
    """Build the settings from ``STEPLINE_*`` variables and run ``serve`` until it returns.

    A configuration error exits with status 2 and a one-line message.
    """
    try:
        settings = load(Env())
        configure_logging(
            service=name, level=settings.server.log_level, json_output=settings.server.log_json
        )
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"stepline-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
