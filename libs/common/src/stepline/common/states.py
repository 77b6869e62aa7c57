"""Facts about run states that every service and client shares (DESIGN.md §3).

The state machines themselves are the ledger's (``stepline.ledger.states``).
"""

from __future__ import annotations

from stepline.api.common.v1.common_pb2 import WorkflowRunState as _R

#: final states of a WorkflowRun: nothing changes a run in one of these
RUN_TERMINAL = frozenset(
    {
        _R.WORKFLOW_RUN_STATE_SUCCEEDED,
        _R.WORKFLOW_RUN_STATE_FAILED,
        _R.WORKFLOW_RUN_STATE_CANCELLED,
        _R.WORKFLOW_RUN_STATE_TIMED_OUT,
    }
)
