"""Rendering a step's arguments for its verb.

The syntax and the renderer are :mod:`stepline.common.templating`, shared with
the scheduler's validation. Here a bad template or an unknown reference
becomes the step's failure: VerbError with reason INVALID_INPUT.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stepline.api.common.v1 import common_pb2
from stepline.common import templating
from stepline.common.templating import TemplateError
from stepline.executor.verbs.base import VerbError


def _invalid(exc: TemplateError) -> VerbError:
    return VerbError(exc.message, reason=common_pb2.FAILURE_REASON_INVALID_INPUT)


def render(
    value: Any,
    *,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    record: Mapping[str, Any] | None = None,
    chunk_index: int | None = None,
) -> Any:
    """:func:`stepline.common.templating.render`, raising VerbError (INVALID_INPUT)."""
    try:
        return templating.render(
            value, inputs=inputs, outputs=outputs, record=record, chunk_index=chunk_index
        )
    except TemplateError as exc:
        raise _invalid(exc) from None


def check_template(value: Any) -> list[str]:
    """:func:`stepline.common.templating.check_template`, raising VerbError (INVALID_INPUT)."""
    try:
        return templating.check_template(value)
    except TemplateError as exc:
        raise _invalid(exc) from None
