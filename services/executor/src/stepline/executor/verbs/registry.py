"""The verbs an executor can run, by name, and the least-privilege check on each use.

A workflow lists the verbs it may use (``allowed_verbs``): an entry matches a
name exactly, or ``prefix.*`` matches every name under ``prefix.``.
:meth:`VerbRegistry.resolve` refuses any other name before looking it up, so a
workflow learns nothing about verbs it may not use.

Plugins: a package declares entry points in the group ``stepline.verbs``; the
entry point's name is the verb's name (dotted, lower case, outside the
built-in namespaces ``core``, ``http`` and ``android``) and it loads an async
callable ``(ctx, args)``. The callable may carry the attributes
``generator = True`` (a ChunkedDispatch generator) and ``cancellable = False``
(let it finish when its run is cancelled). A plugin that fails to load or is
not a verb is logged and skipped; the executor starts without it.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from stepline.api.common.v1 import common_pb2
from stepline.common.errors import ConfigError
from stepline.executor.verbs import android, core
from stepline.executor.verbs.base import GeneratorVerb, Verb, VerbError
from stepline.executor.verbs.http import HttpRequest

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "stepline.verbs"
#: namespaces only the executor's own verbs may use
RESERVED_NAMESPACES = frozenset({"core", "http", "android"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


@dataclass(frozen=True)
class RegisteredVerb:
    name: str
    verb: Verb | GeneratorVerb
    generator: bool
    cancellable: bool


def is_allowed(name: str, allowed: Iterable[str]) -> bool:
    """Whether ``name`` matches an entry of a workflow's ``allowed_verbs``."""
    for entry in allowed:
        if entry == name:
            return True
        if entry.endswith(".*") and len(entry) > 2 and name.startswith(entry[:-1]):
            return True
    return False


class VerbRegistry:
    """Verbs by name. Build it once at start-up; it is read-only afterwards."""

    def __init__(self) -> None:
        self._verbs: dict[str, RegisteredVerb] = {}

    def register(
        self,
        name: str,
        verb: Verb | GeneratorVerb,
        *,
        generator: bool = False,
        cancellable: bool = True,
    ) -> None:
        """Adds a verb; raises ConfigError for a malformed or already used name."""
        if not _NAME.match(name):
            raise ConfigError(
                f"verb name {name!r} must be dotted lower-case words, e.g. 'acme.send_mail'"
            )
        if name in self._verbs:
            raise ConfigError(f"verb {name!r} is already registered")
        if not callable(verb):
            raise ConfigError(f"verb {name!r} is not callable")
        self._verbs[name] = RegisteredVerb(name, verb, generator, cancellable)

    def names(self) -> list[str]:
        return sorted(self._verbs)

    def __contains__(self, name: object) -> bool:
        return name in self._verbs

    def _lookup(self, name: str, allowed: Sequence[str] | None) -> RegisteredVerb:
        if isinstance(allowed, str):
            raise TypeError("allowed must be a sequence of verb names, not one string")
        if allowed is not None and not is_allowed(name, allowed):
            raise VerbError(
                f"verb {name!r} is not in the workflow's allowed_verbs",
                reason=common_pb2.FAILURE_REASON_VERB_NOT_ALLOWED,
                details={"verb": name},
            )
        registered = self._verbs.get(name)
        if registered is None:
            raise VerbError(
                f"no verb {name!r} is registered on this executor",
                reason=common_pb2.FAILURE_REASON_VERB_NOT_FOUND,
                details={"verb": name},
            )
        return registered

    def resolve(self, name: str, *, allowed: Sequence[str]) -> Verb:
        """The verb ``name`` if the workflow allows it and it is registered.

        Raises VerbError with FAILURE_REASON_VERB_NOT_ALLOWED (checked first) or
        FAILURE_REASON_VERB_NOT_FOUND. A generator verb is returned too (its
        call returns a list of records: see :meth:`resolve_generator`).
        """
        return cast(Verb, self._lookup(name, allowed).verb)

    def resolve_generator(self, name: str, *, allowed: Sequence[str]) -> GeneratorVerb:
        """Like :meth:`resolve`, for a ChunkedDispatch generator; a verb that is not
        a generator fails with FAILURE_REASON_INVALID_INPUT."""
        registered = self._lookup(name, allowed)
        if not registered.generator:
            raise VerbError(
                f"verb {name!r} is not a generator verb (it cannot produce chunk records)",
                reason=common_pb2.FAILURE_REASON_INVALID_INPUT,
                details={"verb": name},
            )
        return cast(GeneratorVerb, registered.verb)

    def is_generator(self, name: str) -> bool:
        """Raises VerbError (VERB_NOT_FOUND) for an unknown name."""
        return self._lookup(name, None).generator

    def is_cancellable(self, name: str) -> bool:
        """Raises VerbError (VERB_NOT_FOUND) for an unknown name."""
        return self._lookup(name, None).cancellable

    def interrupted_by_cancel(self, name: str, allowed: Iterable[str]) -> bool:
        """Whether a run's cancel interrupts ``name`` while it runs. A verb that
        is not registered or that the workflow may not use counts as
        cancellable: its attempt fails at once anyway."""
        if name not in self or not is_allowed(name, allowed):
            return True
        return self.is_cancellable(name)

    @classmethod
    def default(
        cls,
        *,
        http_allowed_hosts: Sequence[str] = (),
        plugins: Iterable[EntryPoint] | None = None,
    ) -> VerbRegistry:
        """The built-in verbs plus plugins; ``plugins`` defaults to the installed
        entry points of the group ``stepline.verbs``."""
        registry = cls()
        register_builtins(registry, http_allowed_hosts=http_allowed_hosts)
        if plugins is None:
            plugins = entry_points(group=ENTRY_POINT_GROUP)
        load_plugins(registry, plugins)
        return registry


def register_builtins(registry: VerbRegistry, *, http_allowed_hosts: Sequence[str] = ()) -> None:
    registry.register("core.noop", core.noop)
    registry.register("core.echo", core.echo)
    registry.register("core.sleep", core.sleep)
    registry.register("core.fail", core.fail)
    registry.register("core.range", core.range_, generator=True)
    registry.register("core.items", core.items, generator=True)
    registry.register("http.request", HttpRequest(allowed_hosts=http_allowed_hosts))
    for name in ANDROID_VERBS:
        registry.register(f"android.{name}", getattr(android, name))


#: the android.* verbs (functions of stepline.executor.verbs.android)
ANDROID_VERBS = (
    "shell",
    "launch",
    "tap",
    "swipe",
    "text",
    "key",
    "screenshot",
    "push",
    "pull",
    "install",
)


def load_plugins(registry: VerbRegistry, plugins: Iterable[EntryPoint]) -> list[str]:
    """Registers each plugin verb; logs and skips a bad one. Returns the names added."""
    added: list[str] = []
    for entry_point in plugins:
        try:
            _load_plugin(registry, entry_point)
        except Exception as error:  # a broken plugin must not stop the executor
            logger.error(
                "skipping verb plugin %r (%s): %s: %s",
                entry_point.name,
                entry_point.value,
                type(error).__name__,
                error,
            )
        else:
            added.append(entry_point.name)
            logger.info("loaded verb plugin %r from %s", entry_point.name, entry_point.value)
    return added


def _load_plugin(registry: VerbRegistry, entry_point: EntryPoint) -> None:
    name = entry_point.name
    namespace = name.split(".", 1)[0]
    if namespace in RESERVED_NAMESPACES:
        raise ConfigError(f"the namespace {namespace!r} is reserved for built-in verbs")
    loaded: Any = entry_point.load()
    if not _is_async_callable(loaded):
        raise ConfigError(f"{type(loaded).__name__} {loaded!r} is not an async callable")
    generator = getattr(loaded, "generator", False)
    cancellable = getattr(loaded, "cancellable", True)
    if not isinstance(generator, bool) or not isinstance(cancellable, bool):
        raise ConfigError("its 'generator' and 'cancellable' attributes must be booleans")
    registry.register(name, loaded, generator=generator, cancellable=cancellable)


def _is_async_callable(value: Any) -> bool:
    if inspect.iscoroutinefunction(value):
        return True
    call = getattr(value, "__call__", None)  # noqa: B004 - an instance with async __call__
    return not inspect.isclass(value) and inspect.iscoroutinefunction(call)
