"""Approval policies: who may decide a request, and how many approvals it needs.

A principal may decide (approve or reject) a request when

* its id is in ``approver_principals``, or it holds a role in
  ``approver_roles``, or it holds the ``admin`` role (break-glass); and
* it is not the run's initiator, unless ``allow_initiator`` is set. This
  separation of duties holds for administrators too.

:func:`refusal` says why a principal may not decide; :func:`eligible_sql` is
the same rule in SQL for ``ListApprovals(actionable_only)``. Keep them in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from stepline.api.common.v1 import workflow_pb2
from stepline.common.auth import Principal
from stepline.common.errors import InvalidArgument

ADMIN_ROLE = "admin"
MAX_EXPIRY = timedelta(days=366)
MAX_APPROVERS = 100


@dataclass(frozen=True)
class Gate:
    """The parts of a request that decide who may decide it."""

    approver_principals: tuple[str, ...]
    approver_roles: tuple[str, ...]
    allow_initiator: bool
    initiator_id: str


def required_approvals(policy: workflow_pb2.ApprovalPolicy) -> int:
    """Distinct approvals needed (0 in the policy means 1)."""
    return max(policy.required_approvals, 1)


def refusal(gate: Gate, actor: Principal) -> str | None:
    """Why ``actor`` may not decide a request behind ``gate``; None if it may."""
    listed = actor.id in gate.approver_principals or actor.has_role(*gate.approver_roles)
    if not listed and not actor.has_role(ADMIN_ROLE):
        who = []
        if gate.approver_principals:
            who.append(f"principals {sorted(gate.approver_principals)}")
        if gate.approver_roles:
            who.append(f"holders of the roles {sorted(gate.approver_roles)}")
        allowed = " or ".join(who)
        return f"principal {actor.id!r} is not an approver of this request (only {allowed})"
    if gate.initiator_id and actor.id == gate.initiator_id and not gate.allow_initiator:
        return (
            f"principal {actor.id!r} started the run and may not decide its approval "
            "(the policy does not set allow_initiator)"
        )
    return None


def eligible_sql(principal_id: str, roles: str, admin: str) -> str:
    """:func:`refusal` as an SQL condition on ``approvals`` rows, given the
    placeholders of the principal's id, roles (``text[]``) and admin flag."""
    return (
        f"(({principal_id} = ANY(approver_principals) OR approver_roles && {roles}::text[]"
        f" OR {admin}::boolean) AND (allow_initiator OR initiator_id <> {principal_id}))"
    )


def _names(values: Sequence[str], where: str, problems: list[str]) -> None:
    if len(values) > MAX_APPROVERS:
        problems.append(f"{where}: at most {MAX_APPROVERS} entries")
    for index, value in enumerate(values):
        if not value.strip():
            problems.append(f"{where}[{index}]: must not be empty")


def validate(policy: workflow_pb2.ApprovalPolicy, *, field: str = "policy") -> None:
    """Refuse a policy no one could ever satisfy, with every problem named."""
    problems: list[str] = []
    if not policy.approver_principals and not policy.approver_roles:
        problems.append(
            f"{field}: approver_principals or approver_roles is required (who may approve)"
        )
    _names(policy.approver_principals, f"{field}.approver_principals", problems)
    _names(policy.approver_roles, f"{field}.approver_roles", problems)
    if policy.required_approvals < 0:
        problems.append(f"{field}.required_approvals: must not be negative (0 means 1)")
    elif (
        not policy.approver_roles
        and policy.approver_principals
        and policy.required_approvals > len(set(policy.approver_principals))
    ):
        problems.append(
            f"{field}.required_approvals: {policy.required_approvals} approvals can never be "
            f"reached by {len(set(policy.approver_principals))} approver principals"
        )
    if policy.HasField("expiry"):
        expiry = policy.expiry.ToTimedelta()
        if expiry <= timedelta(0):
            problems.append(f"{field}.expiry: must be positive (leave it unset for no expiry)")
        elif expiry > MAX_EXPIRY:
            problems.append(f"{field}.expiry: at most {MAX_EXPIRY.days} days")
    if policy.expiry_outcome not in workflow_pb2.ApprovalExpiryOutcome.values():
        problems.append(f"{field}.expiry_outcome: unknown value {policy.expiry_outcome}")
    if problems:
        raise InvalidArgument("; ".join(problems))
