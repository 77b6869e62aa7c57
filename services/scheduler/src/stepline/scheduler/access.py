"""Who may do what with a workflow: its ``WorkflowPermissions``, with defaults.

Each action has an access list in the definition (principal ids and roles). A
caller is allowed when it holds the ``admin`` role, when its id is listed, or
when it holds a listed role. An action whose access list is empty (no
principals, no roles) falls back to :data:`DEFAULT_ROLES`. ``read`` is also
granted to whoever may ``start``, ``cancel`` or ``define`` the workflow.

A workflow that does not exist yet has no access lists of its own: creating
one (its first version) needs a default ``define`` role (:func:`check_create`).
See docs/workflows.md, "Permissions".
"""

from __future__ import annotations

from collections.abc import Mapping

from stepline.api.common.v1 import workflow_pb2
from stepline.common.auth import Principal
from stepline.common.errors import PermissionDenied

ACTIONS = ("read", "start", "cancel", "define")
ADMIN_ROLE = "admin"
DEFAULT_ROLES: Mapping[str, frozenset[str]] = {
    "read": frozenset({"operator", "service"}),
    "start": frozenset({"operator", "service"}),
    "cancel": frozenset({"operator", "service"}),
    "define": frozenset({"operator"}),
}


def _granted_by(acl: workflow_pb2.AccessList, action: str, principal: Principal) -> bool:
    if not acl.principals and not acl.roles:
        return principal.has_role(*DEFAULT_ROLES[action])
    return principal.id in acl.principals or principal.has_role(*acl.roles)


def allowed(definition: workflow_pb2.WorkflowDefinition, action: str, principal: Principal) -> bool:
    """Whether ``principal`` may do ``action`` on the workflow ``definition``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    if principal.has_role(ADMIN_ROLE):
        return True
    permissions = definition.permissions
    if action == "read":
        return any(_granted_by(getattr(permissions, a), a, principal) for a in ACTIONS)
    acl: workflow_pb2.AccessList = getattr(permissions, action)
    return _granted_by(acl, action, principal)


def check(definition: workflow_pb2.WorkflowDefinition, action: str, principal: Principal) -> None:
    """Raise PermissionDenied unless ``principal`` may do ``action`` on the workflow."""
    if allowed(definition, action, principal):
        return
    acl: workflow_pb2.AccessList = getattr(definition.permissions, action)
    if acl.principals or acl.roles:
        needs = f"principals {sorted(acl.principals)} or roles {sorted(acl.roles)}"
    else:
        needs = f"one of the default roles {sorted(DEFAULT_ROLES[action])}"
    raise PermissionDenied(
        f"principal {principal.id!r} may not {action} workflow {definition.name!r} "
        f"(permissions.{action} allows {needs})"
    )


def check_create(name: str, principal: Principal) -> None:
    """Raise PermissionDenied unless ``principal`` may register a new workflow ``name``."""
    if principal.has_role(ADMIN_ROLE, *DEFAULT_ROLES["define"]):
        return
    raise PermissionDenied(
        f"principal {principal.id!r} may not create workflow {name!r} "
        f"(needs one of the roles {sorted({ADMIN_ROLE, *DEFAULT_ROLES['define']})})"
    )
