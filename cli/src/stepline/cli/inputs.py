"""Run inputs and labels from the command line.

``--input-json '{...}'`` gives a base object; each ``--input key=value`` then
sets one key over it. A value is taken as JSON when it parses as JSON
(``count=3`` is the number 3, ``dry=true`` a boolean, ``ids=[1,2]`` a list),
otherwise as the literal string (``region=eu-west``). Quote a JSON string to
keep digits a string: ``code='"007"'``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2

from stepline.common.errors import InvalidArgument


def parse_value(text: str) -> Any:
    """``text`` as JSON if it parses, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split(pair: str, *, flag: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidArgument(f"{flag} {pair!r}: expected KEY=VALUE")
    return key, value


def parse_inputs(
    pairs: Sequence[str], json_text: str | None = None, *, flag: str = "--input"
) -> struct_pb2.Struct:
    """The run's inputs: the ``--input-json`` object, then each ``--input`` over it
    (``flag`` names the option in errors, for other KEY=VALUE objects)."""
    values: dict[str, Any] = {}
    if json_text is not None:
        try:
            base = json.loads(json_text)
        except ValueError as exc:
            raise InvalidArgument(f"--input-json is not valid JSON: {exc}") from None
        if not isinstance(base, dict):
            raise InvalidArgument("--input-json must be a JSON object")
        values.update(base)
    for pair in pairs:
        key, value = _split(pair, flag=flag)
        values[key] = parse_value(value)
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """``--label key=value`` pairs; values are kept as strings."""
    return dict(_split(pair, flag="--label") for pair in pairs)
