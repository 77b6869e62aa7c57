"""The shared ``__main__`` of every Stepline service: settings from the
environment, logging, then the service's ``serve`` coroutine."""

from __future__ import annotations

import asyncio
import gc
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
        tune_gc()
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"stepline-{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


#: net allocations of tracked objects between collections of the youngest
#: generation (Python's default: 700)
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Garbage collection for a long-running service, set before it starts
    serving: what the imports made (modules, protobuf descriptors, ...) is
    frozen, so that a full collection no longer walks it, and the youngest
    generation is collected less often. Nearly every object a request makes
    is freed by reference counting; under load the ledger otherwise ran about
    ten young collections a second (0.5 ms each) and a full one every ten
    seconds or so that stopped every call in flight for 36-44 ms
    (docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
