"""The state machines of runs, tasks and chunks (DESIGN.md §3), as data.

The ledger applies a transition only if it is listed here; anything else is
refused with FAILED_PRECONDITION and changes nothing.
"""

from __future__ import annotations

from stepline.api.common.v1.common_pb2 import TaskRunState, WorkflowRunState
from stepline.common.states import RUN_TERMINAL as RUN_TERMINAL

R = WorkflowRunState
T = TaskRunState


RUN_TRANSITIONS: dict[int, frozenset[int]] = {
    R.WORKFLOW_RUN_STATE_PENDING: frozenset(
        {R.WORKFLOW_RUN_STATE_RUNNING, R.WORKFLOW_RUN_STATE_CANCELLED}
    ),
    R.WORKFLOW_RUN_STATE_RUNNING: frozenset(
        {
            R.WORKFLOW_RUN_STATE_SUSPENDED,
            R.WORKFLOW_RUN_STATE_PAUSED,
            *RUN_TERMINAL,
        }
    ),
    R.WORKFLOW_RUN_STATE_SUSPENDED: frozenset(
        {R.WORKFLOW_RUN_STATE_RUNNING, R.WORKFLOW_RUN_STATE_CANCELLED}
    ),
    R.WORKFLOW_RUN_STATE_PAUSED: frozenset(
        {R.WORKFLOW_RUN_STATE_RUNNING, R.WORKFLOW_RUN_STATE_CANCELLED}
    ),
}

TASK_TERMINAL = frozenset(
    {
        T.TASK_RUN_STATE_SUCCEEDED,
        T.TASK_RUN_STATE_FAILED,
        T.TASK_RUN_STATE_TIMED_OUT,
        T.TASK_RUN_STATE_CANCELLED,
        T.TASK_RUN_STATE_SKIPPED,
    }
)

# A GOVERN step may also end while suspended: expiry (TIMED_OUT), rejection
# (FAILED) or the run's cancellation (CANCELLED).
TASK_TRANSITIONS: dict[int, frozenset[int]] = {
    T.TASK_RUN_STATE_PENDING: frozenset({T.TASK_RUN_STATE_RUNNING, T.TASK_RUN_STATE_SKIPPED}),
    T.TASK_RUN_STATE_RUNNING: frozenset(
        {
            T.TASK_RUN_STATE_RUNNING,  # records an attempt (a retry) without a state change
            T.TASK_RUN_STATE_SUSPENDED,
            T.TASK_RUN_STATE_SUCCEEDED,
            T.TASK_RUN_STATE_FAILED,
            T.TASK_RUN_STATE_TIMED_OUT,
            T.TASK_RUN_STATE_CANCELLED,
        }
    ),
    T.TASK_RUN_STATE_SUSPENDED: frozenset(
        {
            T.TASK_RUN_STATE_RUNNING,
            T.TASK_RUN_STATE_FAILED,
            T.TASK_RUN_STATE_TIMED_OUT,
            T.TASK_RUN_STATE_CANCELLED,
        }
    ),
}

# Task and chunk states that need a Failure, and attempt end states.
NEEDS_FAILURE_TASK = frozenset(
    {T.TASK_RUN_STATE_FAILED, T.TASK_RUN_STATE_TIMED_OUT, T.TASK_RUN_STATE_CANCELLED}
)
NEEDS_FAILURE_RUN = frozenset(
    {R.WORKFLOW_RUN_STATE_FAILED, R.WORKFLOW_RUN_STATE_CANCELLED, R.WORKFLOW_RUN_STATE_TIMED_OUT}
)
ATTEMPT_END = frozenset(
    {
        T.TASK_RUN_STATE_SUCCEEDED,
        T.TASK_RUN_STATE_FAILED,
        T.TASK_RUN_STATE_TIMED_OUT,
        T.TASK_RUN_STATE_CANCELLED,
    }
)


# Names by value, looked up on the hot path (the enum wrappers' Name() is slow).
_RUN_NAMES = {value: name.removeprefix("WORKFLOW_RUN_STATE_") for name, value in R.items()}
_TASK_NAMES = {value: name.removeprefix("TASK_RUN_STATE_") for name, value in T.items()}
TASK_STATES = frozenset(_TASK_NAMES)  # every TaskRunState value, UNSPECIFIED included


def run_state_name(state: int) -> str:
    return _RUN_NAMES.get(state) or str(state)  # type: ignore[call-overload]


def task_state_name(state: int) -> str:
    return _TASK_NAMES.get(state) or str(state)  # type: ignore[call-overload]


def run_transition_allowed(current: int, target: int) -> bool:
    return target in RUN_TRANSITIONS.get(current, frozenset())


def task_transition_allowed(current: int, target: int) -> bool:
    return target in TASK_TRANSITIONS.get(current, frozenset())
