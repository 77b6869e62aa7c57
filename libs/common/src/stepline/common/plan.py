"""The plan of a workflow definition: every step with its path (docs/architecture.md).

The scheduler sends the plan to the ledger when it creates a run; the executor
finds steps by the paths the ledger recorded. Every step is listed depth-first
in definition order: a parallel group's own step first, then each branch's
steps in branch order. ``step_path`` joins the ids from the top with ``/``,
with the branch id between a group and its steps: top-level ``notify`` is
``notify``, step ``send`` in branch ``email`` of group ``fanout`` is
``fanout/email/send``. The ledger's task id is ``<run_id>/<step_path>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from stepline.api.common.v1 import workflow_pb2
from stepline.api.ledger.v1 import ledger_pb2

_KINDS: dict[str, workflow_pb2.StepKind.ValueType] = {
    "atomic": workflow_pb2.STEP_KIND_ATOMIC,
    "workflow_ref": workflow_pb2.STEP_KIND_WORKFLOW_REF,
    "chunked": workflow_pb2.STEP_KIND_CHUNKED,
    "govern": workflow_pb2.STEP_KIND_GOVERN,
    "parallel": workflow_pb2.STEP_KIND_PARALLEL,
}


def step_kind(step: workflow_pb2.Step) -> workflow_pb2.StepKind.ValueType:
    """The StepKind of the step's ``kind`` oneof (UNSPECIFIED when none is set)."""
    which = step.WhichOneof("kind")
    return _KINDS[which] if which else workflow_pb2.STEP_KIND_UNSPECIFIED


def walk(
    steps: Iterable[workflow_pb2.Step], prefix: str = ""
) -> Iterator[tuple[str, workflow_pb2.Step]]:
    """``(step_path, step)`` for every step, depth-first in definition order."""
    for step in steps:
        path = prefix + step.id
        yield path, step
        if step.WhichOneof("kind") == "parallel":
            for branch in step.parallel.branches:
                yield from walk(branch.steps, f"{path}/{branch.id}/")


def steps_by_path(definition: workflow_pb2.WorkflowDefinition) -> dict[str, workflow_pb2.Step]:
    """Every step of the definition by its step path."""
    return dict(walk(definition.steps))


def plan(definition: workflow_pb2.WorkflowDefinition) -> list[ledger_pb2.PlannedTask]:
    """One PlannedTask per step, in plan order.

    ``verb`` is AtomicOp.verb or ChunkedDispatch.chunk_verb (empty otherwise);
    ``child_workflow_version`` is WorkflowRef.version as written (0 = latest,
    which the scheduler pins to a concrete version before CreateRun).
    """
    tasks: list[ledger_pb2.PlannedTask] = []
    for path, step in walk(definition.steps):
        task = ledger_pb2.PlannedTask(step_id=step.id, step_path=path, kind=step_kind(step))
        which = step.WhichOneof("kind")
        if which == "atomic":
            task.verb = step.atomic.verb
        elif which == "chunked":
            task.verb = step.chunked.chunk_verb
        elif which == "workflow_ref":
            task.child_workflow_version = step.workflow_ref.version
        tasks.append(task)
    return tasks
