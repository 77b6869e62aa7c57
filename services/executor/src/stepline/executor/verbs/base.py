"""What a verb is: the contract between the executor's step loop and the operations it runs.

A verb is an async callable registered under a dotted name (``core.noop``,
``http.request``, ``android.tap``, or a plugin's entry point). The step loop
renders a step's arguments (templating of inputs and earlier outputs) before
the call, runs it under the step's timeout and cancellation, and persists what
it returns as the step's output.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from stepline.api.common.v1 import common_pb2


class VerbError(Exception):
    """A verb's explicit failure: the step fails with ``reason`` and ``message``.

    Any other exception raised by a verb is a failure with reason
    ``FAILURE_REASON_VERB_ERROR`` and the exception's text.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: int = common_pb2.FAILURE_REASON_VERB_ERROR,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.details = dict(details or {})


@dataclass
class VerbContext:
    """What a verb may know about where it runs."""

    run_id: str
    task_id: str
    step_id: str
    attempt_number: int
    workflow_name: str
    inputs: Mapping[str, Any]
    #: outputs of earlier steps, by step id
    outputs: Mapping[str, Any]
    #: the chunk's record for a chunk verb; None otherwise
    record: Mapping[str, Any] | None = None
    #: a device lease for steps that declared one (android verbs); None otherwise
    device: Any = None
    #: called by long verbs to show progress (keeps the job alive)
    heartbeat: Callable[[], Awaitable[None]] | None = None
    #: free-form, for plugins
    extras: dict[str, Any] = field(default_factory=dict)


class Verb(Protocol):
    async def __call__(self, ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]: ...


class GeneratorVerb(Protocol):
    """A ChunkedDispatch generator: returns the records, one ChunkRun each."""

    async def __call__(
        self, ctx: VerbContext, args: Mapping[str, Any]
    ) -> list[Mapping[str, Any]]: ...
