"""``stepline approvals ...``: approval requests of GOVERN steps (list, show)
and the caller's decisions on them (approve, reject).

A decision is recorded for the caller, so run these with the approver's token:
``--as approver`` on the embedded mesh, or ``--token`` / ``STEPLINE_TOKEN``.
"""

from __future__ import annotations

import argparse
import uuid
from datetime import UTC, datetime

from stepline.api.approvals.v1 import approvals_pb2 as pb
from stepline.cli import output
from stepline.cli.connect import Clients
from stepline.common.errors import FailedPrecondition, InvalidArgument

PAGE_SIZE = 100


def parse_state(text: str) -> pb.ApprovalState.ValueType:
    """``pending``, ``PENDING`` or ``APPROVAL_STATE_PENDING`` (an argparse type)."""
    name = text.strip().upper().removeprefix("APPROVAL_STATE_")
    try:
        value = pb.ApprovalState.Value("APPROVAL_STATE_" + name)
    except ValueError:
        value = pb.APPROVAL_STATE_UNSPECIFIED
    if value == pb.APPROVAL_STATE_UNSPECIFIED:
        known = ", ".join(
            n.removeprefix("APPROVAL_STATE_").lower() for n in pb.ApprovalState.keys()[1:]
        )
        raise argparse.ArgumentTypeError(f"unknown approval state {text!r} (one of: {known})")
    return value


def _now() -> datetime:
    return datetime.now(UTC)


async def list_approvals(args: argparse.Namespace, clients: Clients) -> int:
    """Approval requests, newest first, up to ``--limit``."""
    request = pb.ListApprovalsRequest(
        states=args.state,
        run_id=args.run or "",
        workflow_name=args.workflow or "",
        actionable_only=args.actionable,
        page_size=min(args.limit, PAGE_SIZE),
    )
    collected = pb.ListApprovalsResponse()
    while len(collected.approvals) < args.limit:
        page = await clients.approvals.ListApprovals(request)
        collected.approvals.extend(page.approvals[: args.limit - len(collected.approvals)])
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print(output.to_json(collected))
    elif not collected.approvals:
        print("no approval requests")
    else:
        print(output.approval_rows(collected.approvals, now=_now()))
    return 0


async def show(args: argparse.Namespace, clients: Clients) -> int:
    """One request: its policy, the context shown to approvers, its decisions."""
    response = await clients.approvals.GetApproval(
        pb.GetApprovalRequest(approval_id=args.approval_id)
    )
    if args.json:
        print(output.to_json(response))
    else:
        print(output.approval_detail(response.approval, now=_now()))
    return 0


async def _target(args: argparse.Namespace, clients: Clients) -> str:
    """The approval id given, or the one pending request of ``--run``."""
    if bool(args.approval_id) == bool(args.run):
        raise InvalidArgument("name the approval request: give its ID or --run RUN_ID (not both)")
    if args.approval_id:
        return str(args.approval_id)
    page = await clients.approvals.ListApprovals(
        pb.ListApprovalsRequest(
            run_id=args.run, states=[pb.APPROVAL_STATE_PENDING], page_size=PAGE_SIZE
        )
    )
    pending = [a.approval_id for a in page.approvals]
    if not pending:
        raise FailedPrecondition(f"run {args.run} has no pending approval request")
    if len(pending) > 1:
        raise InvalidArgument(
            f"run {args.run} has {len(pending)} pending approval requests "
            f"({', '.join(pending)}); name one by its ID"
        )
    return pending[0]


async def approve(args: argparse.Namespace, clients: Clients) -> int:
    """Record the caller's approval; the request is APPROVED once enough distinct
    eligible principals approved."""
    approval_id = await _target(args, clients)
    response = await clients.approvals.Approve(
        pb.ApproveRequest(
            request_id=str(uuid.uuid4()), approval_id=approval_id, reason=args.reason or ""
        )
    )
    print(output.to_json(response) if args.json else output.decided(response.approval))
    return 0


async def reject(args: argparse.Namespace, clients: Clients) -> int:
    """Record the caller's rejection: one rejection rejects the request."""
    approval_id = await _target(args, clients)
    response = await clients.approvals.Reject(
        pb.RejectRequest(request_id=str(uuid.uuid4()), approval_id=approval_id, reason=args.reason)
    )
    print(output.to_json(response) if args.json else output.decided(response.approval))
    return 0
