"""Checking a verb's (rendered) args, with messages that say which arg and why.

Args come from a ``google.protobuf.Struct``, so every number arrives as a
float: an integer arg accepts ``3.0`` and refuses ``3.5``. Booleans are never
numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from typing import Any

from stepline.api.common.v1 import common_pb2
from stepline.executor.verbs.base import VerbError

_MISSING: Any = object()


def invalid(verb: str, message: str) -> VerbError:
    return VerbError(f"{verb}: {message}", reason=common_pb2.FAILURE_REASON_INVALID_INPUT)


def shown(value: Any) -> str:
    """A short JSON-ish view of a bad value for an error message."""
    try:
        text = json.dumps(value, default=repr)
    except ValueError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Args:
    """Typed access to one call's args; every failure is INVALID_INPUT."""

    def __init__(self, verb: str, args: Mapping[str, Any], *, known: Collection[str]) -> None:
        if not isinstance(args, Mapping):
            raise invalid(verb, f"args must be a mapping, got {shown(args)}")
        unknown = sorted(str(name) for name in args if name not in known)
        if unknown:
            raise invalid(
                verb,
                f"unknown args {', '.join(unknown)} "
                f"(accepted: {', '.join(sorted(known)) or 'none'})",
            )
        self.verb = verb
        self.args = args

    def _get(self, name: str, default: Any) -> Any:
        value = self.args.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise invalid(self.verb, f"args.{name} is required")
            return default
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        """A finite number >= 0."""
        value = self._get(name, default)
        if not _finite(value) or value < 0:
            raise invalid(
                self.verb, f"args.{name} must be a non-negative number, got {shown(value)}"
            )
        return float(value)

    def positive(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if not _finite(value) or value <= 0:
            raise invalid(self.verb, f"args.{name} must be a positive number, got {shown(value)}")
        return float(value)

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        value = self._get(name, default)
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            raise invalid(self.verb, f"args.{name} must be an integer, got {shown(value)}")
        if minimum is not None and value < minimum:
            raise invalid(self.verb, f"args.{name} must be >= {minimum}, got {shown(value)}")
        return int(value)

    def text(self, name: str, default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise invalid(self.verb, f"args.{name} must be a string, got {shown(value)}")
        return value

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise invalid(self.verb, f"args.{name} must be true or false, got {shown(value)}")
        return value

    def array(self, name: str, default: Any = _MISSING) -> list[Any]:
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            raise invalid(self.verb, f"args.{name} must be a list, got {shown(value)}")
        return list(value)

    def text_mapping(self, name: str, default: Any = _MISSING) -> dict[str, str]:
        value = self._get(name, default)
        if not isinstance(value, Mapping) or not all(
            isinstance(key, str) and isinstance(item, str) for key, item in value.items()
        ):
            raise invalid(
                self.verb, f"args.{name} must map names to string values, got {shown(value)}"
            )
        return dict(value)

    def present(self, name: str) -> bool:
        return self.args.get(name) is not None

    def raw(self, name: str) -> Any:
        return self.args.get(name)
