"""``stepline workflows apply | list | show``: register and read definitions."""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

from stepline.api.scheduler.v1 import workflow_service_pb2 as pb
from stepline.cli import output
from stepline.cli.connect import Clients
from stepline.common.errors import InvalidArgument

FORMATS = {
    ".yaml": pb.SOURCE_FORMAT_YAML,
    ".yml": pb.SOURCE_FORMAT_YAML,
    ".json": pb.SOURCE_FORMAT_JSON,
}
PAGE_SIZE = 100


def source_format(path: Path) -> pb.SourceFormat.ValueType:
    """The format of a definition file, by its extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidArgument(
            f"{path}: unknown definition format {path.suffix!r}; use .yaml, .yml or .json"
        )
    return fmt


def read_source(path: Path) -> pb.WorkflowSource:
    fmt = source_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read {path}: {exc}") from None
    return pb.WorkflowSource(format=fmt, text=text)


async def apply(args: argparse.Namespace, clients: Clients) -> int:
    """Register the definition in FILE as the workflow's next version (if it changed)."""
    request = pb.RegisterWorkflowRequest(
        request_id=str(uuid.uuid4()),
        source_text=read_source(Path(args.file)),
        validate_only=args.validate_only,
    )
    response = await clients.scheduler.workflows.RegisterWorkflow(request)
    if args.json:
        print(output.to_json(response))
        return 0
    definition = response.workflow.definition
    if args.validate_only:
        print(f"workflow {definition.name}: valid")
    else:
        verdict = "created" if response.created else "unchanged"
        print(f"workflow {definition.name} version {definition.version} {verdict}")
    return 0


async def list_workflows(args: argparse.Namespace, clients: Clients) -> int:
    """Every workflow the caller may read, by name (all pages)."""
    scheduler = clients.scheduler
    collected = pb.ListWorkflowsResponse()
    request = pb.ListWorkflowsRequest(name_prefix=args.prefix or "", page_size=PAGE_SIZE)
    while True:
        page = await scheduler.workflows.ListWorkflows(request)
        collected.workflows.extend(page.workflows)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    if args.json:
        print(output.to_json(collected))
    elif not collected.workflows:
        print("no workflows")
    else:
        print(output.workflow_rows(collected.workflows))
    return 0


async def _versions(args: argparse.Namespace, clients: Clients) -> int:
    scheduler = clients.scheduler
    collected = pb.ListWorkflowVersionsResponse()
    request = pb.ListWorkflowVersionsRequest(name=args.name, page_size=PAGE_SIZE)
    while True:
        page = await scheduler.workflows.ListWorkflowVersions(request)
        collected.versions.extend(page.versions)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    print(output.to_json(collected) if args.json else output.version_rows(collected.versions))
    return 0


async def show(args: argparse.Namespace, clients: Clients) -> int:
    """One version of a workflow (the latest by default), or its versions."""
    if args.versions:
        return await _versions(args, clients)
    response = await clients.scheduler.workflows.GetWorkflow(
        pb.GetWorkflowRequest(name=args.name, version=args.version)
    )
    print(output.to_json(response) if args.json else output.workflow_detail(response.workflow))
    return 0
