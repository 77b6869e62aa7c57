"""Templated values: ``{{ inputs.x }}``, ``{{ steps.<id>.<key> }}``, ``{{ record.<key> }}``.

One syntax, parsed here for both sides: the scheduler checks templates when a
definition is registered, the executor renders them right before an attempt.

A placeholder is a dotted path inside ``{{ }}``. Its first segment names where
the value comes from:

- ``inputs``: the run's inputs (``inputs.account``);
- ``steps``: the outputs of earlier steps, by step id (``steps.fetch.body``);
- ``record``: the chunk's record, for a chunk verb (``record.sku``);
- ``chunk``: ``chunk.record.<key>`` is the same as ``record.<key>``, and
  ``chunk.index`` is the chunk's index.

Later segments walk into mappings by key and into lists by index. A string
that is exactly one placeholder takes the value itself, type included (a
number stays a number, a mapping a mapping); a placeholder inside a longer
string is replaced by the value's text (strings as they are, anything else as
JSON). Strings are rendered inside mappings and lists recursively; mapping keys
are left alone. There is no escape: a literal ``{{`` cannot appear in a value.

Problems raise :class:`TemplateError` (an ``InvalidArgument``); callers that
report failures differently (the executor's verbs) map it at their edge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepline.common.errors import InvalidArgument

ROOTS = ("inputs", "steps", "record", "chunk")

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*$")


class TemplateError(InvalidArgument):
    """A malformed template, or a reference that names nothing."""


@dataclass(frozen=True)
class Placeholder:
    """One ``{{ path }}`` of a string: ``text[start:end]`` is the placeholder."""

    start: int
    end: int
    path: str


def placeholders(text: str) -> list[Placeholder]:
    """The placeholders of ``text`` in order; TemplateError for bad syntax
    (nested or unbalanced ``{{``, a placeholder that is not a dotted name).
    Whether a path's root is known is :func:`check_reference`'s job."""
    found: list[Placeholder] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        if "{{" in text[position : match.start()]:
            raise TemplateError("nested or unbalanced '{{'")
        path = match.group(1).strip()
        if not _PATH.match(path):
            raise TemplateError(
                f"malformed placeholder {match.group(0)!r} (a placeholder is a dotted name)"
            )
        found.append(Placeholder(match.start(), match.end(), path))
        position = match.end()
    if "{{" in text[position:]:
        raise TemplateError("'{{' without a closing '}}'")
    return found


def check_reference(path: str) -> None:
    """TemplateError unless ``path`` is a dotted name under one of :data:`ROOTS`
    (``chunk`` offering only ``chunk.index`` and ``chunk.record...``)."""
    if not _PATH.match(path):
        raise TemplateError(f"{path!r} is not a dotted name")
    segments = path.split(".")
    if segments[0] not in ROOTS:
        raise TemplateError(
            f"unknown reference {path!r} (a reference starts with one of {', '.join(ROOTS)})"
        )
    if segments[0] == "chunk" and path != "chunk.index" and segments[1:2] != ["record"]:
        raise TemplateError(
            f"unknown reference {path!r} (chunk offers chunk.record and chunk.index)"
        )


def strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """``(location, text)`` of every string inside ``value`` (mappings and lists
    walked recursively, keys left alone); locations look like ``a.b[2]``."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from strings(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for index, item in enumerate(value):
            yield from strings(item, f"{where}[{index}]")


def _parse(text: str) -> list[Placeholder]:
    """Placeholders with known roots; errors name the template."""
    try:
        found = placeholders(text)
        for placeholder in found:
            check_reference(placeholder.path)
    except TemplateError as exc:
        raise TemplateError(f"template {text!r}: {exc.message}") from None
    return found


def check_template(value: Any) -> list[str]:
    """The references in ``value`` (strings, mappings, lists), in order, each once.

    For validation before anything runs: raises TemplateError for a malformed
    placeholder or an unknown root; whether ``inputs.x`` or ``steps.y`` exist
    is for the caller to check against the definition.
    """
    names = [p.path for _, text in strings(value) for p in _parse(text)]
    return list(dict.fromkeys(names))


def render(
    value: Any,
    *,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    record: Mapping[str, Any] | None = None,
    chunk_index: int | None = None,
) -> Any:
    """``value`` with every placeholder replaced; TemplateError naming an unknown
    reference. ``outputs`` are earlier steps' outputs by step id."""
    scope = _Scope(inputs=inputs, outputs=outputs, record=record, chunk_index=chunk_index)
    return _render(value, scope)


class _Scope:
    def __init__(
        self,
        *,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any],
        record: Mapping[str, Any] | None,
        chunk_index: int | None,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.record = record
        self.chunk_index = chunk_index

    def lookup(self, path: str) -> Any:
        segments = path.split(".")
        root, rest = segments[0], segments[1:]
        if root == "chunk":
            if rest == ["index"]:
                if self.chunk_index is None:
                    raise TemplateError(f"unknown reference {path!r}: not rendering a chunk")
                return self.chunk_index
            root, rest = "record", rest[1:]
        if root == "inputs":
            current: Any = self.inputs
        elif root == "steps":
            current = self.outputs
            if rest and rest[0] not in self.outputs:
                raise TemplateError(
                    f"unknown reference {path!r}: no output of a step {rest[0]!r} "
                    "(only earlier steps' outputs can be referenced)"
                )
        else:
            if self.record is None:
                raise TemplateError(f"unknown reference {path!r}: not rendering a chunk")
            current = self.record
        walked = root
        for segment in rest:
            current = _step_into(current, segment, path=path, walked=walked)
            walked = f"{walked}.{segment}"
        return current


def _step_into(current: Any, segment: str, *, path: str, walked: str) -> Any:
    if isinstance(current, Mapping):
        if segment in current:
            return current[segment]
        raise TemplateError(f"unknown reference {path!r}: {walked} has no {segment!r}")
    if isinstance(current, Sequence) and not isinstance(current, str | bytes | bytearray):
        if segment.isdigit() and int(segment) < len(current):
            return current[int(segment)]
        raise TemplateError(
            f"unknown reference {path!r}: {walked} is a list of {len(current)}, "
            f"no index {segment!r}"
        )
    raise TemplateError(
        f"unknown reference {path!r}: {walked} is a {type(current).__name__}, not a mapping or list"
    )


def _render(value: Any, scope: _Scope) -> Any:
    if isinstance(value, str):
        return _render_text(value, scope)
    if isinstance(value, Mapping):
        return {key: _render(item, scope) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, scope) for item in value]
    return value


def _render_text(text: str, scope: _Scope) -> Any:
    found = _parse(text)
    if not found:
        return text
    if len(found) == 1 and (found[0].start, found[0].end) == (0, len(text)):
        return scope.lookup(found[0].path)
    parts: list[str] = []
    position = 0
    for placeholder in found:
        parts.append(text[position : placeholder.start])
        parts.append(_as_text(scope.lookup(placeholder.path)))
        position = placeholder.end
    parts.append(text[position:])
    return "".join(parts)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        # protobuf Struct numbers are floats: "item 3", not "item 3.0"
        return str(int(value))
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
