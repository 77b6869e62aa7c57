"""``WorkflowService``: register and read workflow definitions.

Every RPC acts for the authenticated caller (``current_principal``) and checks
the workflow's permissions (:mod:`stepline.scheduler.access`): ``define`` to
register a new version (a default define role to create a workflow), ``read``
to get or list it. Listing returns only the workflows the caller may read.
"""

from __future__ import annotations

from typing import Any

import grpc

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2 as pb
from stepline.api.scheduler.v1 import workflow_service_pb2_grpc
from stepline.common.auth import Principal, current_principal
from stepline.common.errors import InvalidArgument
from stepline.scheduler import access
from stepline.scheduler.definitions import parse_source
from stepline.scheduler.workflows import WorkflowStore

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name


def principal_message(principal: Principal) -> common_pb2.Principal:
    return common_pb2.Principal(id=principal.id, roles=sorted(principal.roles))


def requested_definition(request: pb.RegisterWorkflowRequest) -> workflow_pb2.WorkflowDefinition:
    """The definition of a RegisterWorkflow request, from the message or its source text."""
    source = request.WhichOneof("source")
    if source == "definition":
        definition = workflow_pb2.WorkflowDefinition()
        definition.CopyFrom(request.definition)
        definition.version = 0
        return definition
    if source == "source_text":
        return parse_source(request.source_text.text, request.source_text.format)
    raise InvalidArgument("definition or source_text is required")


class WorkflowServicer(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, store: WorkflowStore) -> None:
        self.store = store

    async def RegisterWorkflow(
        self, request: pb.RegisterWorkflowRequest, context: Context
    ) -> pb.RegisterWorkflowResponse:
        principal = current_principal()
        definition = requested_definition(request)

        def authorize(latest: workflow_pb2.WorkflowDefinition | None) -> None:
            if latest is None:
                access.check_create(definition.name, principal)
            else:
                access.check(latest, "define", principal)

        version, created = await self.store.register(
            definition,
            principal=principal_message(principal),
            request_id=request.request_id,
            authorize=authorize,
            validate_only=request.validate_only,
        )
        return pb.RegisterWorkflowResponse(workflow=version, created=created)

    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Context
    ) -> pb.GetWorkflowResponse:
        principal = current_principal()
        # Permissions are those of the latest version, whichever version is read.
        latest = await self.store.get(request.name)
        access.check(latest.definition, "read", principal)
        if request.version in (0, latest.definition.version):
            return pb.GetWorkflowResponse(workflow=latest)
        version = await self.store.get(request.name, request.version)
        return pb.GetWorkflowResponse(workflow=version)

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Context
    ) -> pb.ListWorkflowsResponse:
        principal = current_principal()
        return await self.store.list(
            request, readable=lambda definition: access.allowed(definition, "read", principal)
        )

    async def ListWorkflowVersions(
        self, request: pb.ListWorkflowVersionsRequest, context: Context
    ) -> pb.ListWorkflowVersionsResponse:
        principal = current_principal()
        latest = await self.store.get(request.name)
        access.check(latest.definition, "read", principal)
        return await self.store.list_versions(request)
