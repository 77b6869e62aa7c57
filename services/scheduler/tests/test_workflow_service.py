"""The workflow store against PostgreSQL, and WorkflowService over real gRPC with auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2 as pb
from stepline.api.scheduler.v1 import workflow_service_pb2_grpc
from stepline.common.auth import Authenticator, Principal, new_token
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, ServerSettings
from stepline.common.db import create_pool, load_migrations
from stepline.common.errors import Aborted, InvalidArgument, NotFound
from stepline.common.server import GrpcHost, serving
from stepline.scheduler.definitions import parse_source
from stepline.scheduler.workflow_service import SERVICE_NAME, WorkflowServicer
from stepline.scheduler.workflows import WorkflowStore

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
ALICE = common_pb2.Principal(id="alice", roles=["operator"])


def wf(
    name: str = "orders", message: str = "hi", labels: dict[str, str] | None = None
) -> workflow_pb2.WorkflowDefinition:
    args = struct_pb2.Struct()
    args.update({"m": message})
    definition = workflow_pb2.WorkflowDefinition(
        name=name,
        allowed_verbs=["core.*"],
        steps=[
            workflow_pb2.Step(id="say", atomic=workflow_pb2.AtomicOp(verb="core.echo", args=args))
        ],
    )
    definition.labels.update(labels or {})
    return definition


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(
        database_url,
        schema="scheduler",
        migrations=load_migrations("stepline.scheduler"),
        min_size=1,
        max_size=4,
    )
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> WorkflowStore:
    return WorkflowStore(pool)


async def test_versions_are_numbered_and_unchanged_definitions_create_nothing(
    store: WorkflowStore,
) -> None:
    first, created = await store.register(wf(), principal=ALICE, request_id="r1")
    assert created and first.definition.version == 1 and first.created_by.id == "alice"
    same, created = await store.register(wf(), principal=ALICE, request_id="r2")
    assert not created and same.definition.version == 1 and same.digest == first.digest
    second, created = await store.register(wf(message="bye"), principal=ALICE, request_id="r3")
    assert created and second.definition.version == 2 and second.digest != first.digest
    assert (await store.get("orders")).definition.version == 2
    assert (await store.get("orders", 1)).definition.steps[0].atomic.args["m"] == "hi"
    with pytest.raises(NotFound, match="has no version 3"):
        await store.get("orders", 3)
    with pytest.raises(NotFound, match="does not exist"):
        await store.get("nope")


async def test_request_id_replays_and_conflicts(store: WorkflowStore) -> None:
    _, created = await store.register(wf(), principal=ALICE, request_id="same")
    await store.register(wf(message="v2"), principal=ALICE, request_id="other")
    replay, replay_created = await store.register(wf(), principal=ALICE, request_id="same")
    assert (replay.definition.version, replay_created) == (1, created)
    with pytest.raises(Aborted, match="different definition"):
        await store.register(wf(message="v3"), principal=ALICE, request_id="same")


async def test_concurrent_registrations_number_versions_without_gaps(store: WorkflowStore) -> None:
    results = await asyncio.gather(
        *(store.register(wf(message=str(i)), principal=ALICE, request_id=f"c{i}") for i in range(5))
    )
    assert sorted(v.definition.version for v, _ in results) == [1, 2, 3, 4, 5]


async def test_validate_only_stores_nothing(store: WorkflowStore) -> None:
    version, created = await store.register(
        wf(), principal=ALICE, request_id="v", validate_only=True
    )
    assert not created and version.definition.version == 1
    with pytest.raises(NotFound):
        await store.get("orders")


async def test_child_workflows_must_exist_and_not_cycle(store: WorkflowStore) -> None:
    parent = wf("parent")
    parent.steps.append(
        workflow_pb2.Step(id="child", workflow_ref=workflow_pb2.WorkflowRef(workflow_name="kid"))
    )
    with pytest.raises(InvalidArgument, match=r'steps\[1\] "child": workflow_ref.workflow_name'):
        await store.register(parent, principal=ALICE, request_id="p")
    await store.register(wf("kid"), principal=ALICE, request_id="k")
    parent.steps[1].workflow_ref.version = 2
    with pytest.raises(InvalidArgument, match="has no version 2"):
        await store.register(parent, principal=ALICE, request_id="p")
    parent.steps[1].workflow_ref.version = 0
    await store.register(parent, principal=ALICE, request_id="p")
    # kid v2 running parent would loop: parent -> kid -> parent.
    looping = wf("kid")
    looping.steps.append(
        workflow_pb2.Step(id="back", workflow_ref=workflow_pb2.WorkflowRef(workflow_name="parent"))
    )
    with pytest.raises(InvalidArgument, match="leads back to workflow 'kid'"):
        await store.register(looping, principal=ALICE, request_id="loop")


async def test_list_and_list_versions_paginate(store: WorkflowStore) -> None:
    for name in ("a-one", "a-two", "b-three"):
        await store.register(wf(name, labels={"team": name[0]}), principal=ALICE, request_id=name)
    for i in range(3):
        await store.register(
            wf("a-one", str(i), {"team": "a"}), principal=ALICE, request_id=f"v{i}"
        )
    page = await store.list(pb.ListWorkflowsRequest(page_size=2))
    assert [w.name for w in page.workflows] == ["a-one", "a-two"] and page.next_page_token
    assert page.workflows[0].latest_version == 4
    rest = await store.list(pb.ListWorkflowsRequest(page_size=2, page_token=page.next_page_token))
    assert [w.name for w in rest.workflows] == ["b-three"] and not rest.next_page_token
    prefixed = await store.list(pb.ListWorkflowsRequest(name_prefix="a-", labels={"team": "a"}))
    assert [w.name for w in prefixed.workflows] == ["a-one", "a-two"]
    labelled = await store.list(pb.ListWorkflowsRequest(labels={"team": "b"}))
    assert [w.name for w in labelled.workflows] == ["b-three"]
    filtered = await store.list(
        pb.ListWorkflowsRequest(page_size=1), readable=lambda d: d.name == "b-three"
    )
    assert [w.name for w in filtered.workflows] == ["b-three"] and not filtered.next_page_token
    versions = await store.list_versions(pb.ListWorkflowVersionsRequest(name="a-one", page_size=3))
    assert [v.definition.version for v in versions.versions] == [4, 3, 2]
    older = await store.list_versions(
        pb.ListWorkflowVersionsRequest(
            name="a-one", page_size=3, page_token=versions.next_page_token
        )
    )
    assert [v.definition.version for v in older.versions] == [1] and not older.next_page_token
    with pytest.raises(InvalidArgument, match="page_token"):
        await store.list(pb.ListWorkflowsRequest(page_token="garbage"))


async def test_every_example_registers(store: WorkflowStore) -> None:
    pending = {
        path.stem: parse_source(path.read_text(encoding="utf-8"), pb.SOURCE_FORMAT_YAML)
        for path in EXAMPLES.glob("*.yaml")
    }
    # Children first: retry until every example is in (workflow_ref targets must exist).
    for _ in range(len(pending)):
        for name, definition in list(pending.items()):
            try:
                await store.register(definition, principal=ALICE, request_id=name)
            except InvalidArgument:
                continue
            del pending[name]
    assert not pending


# --- over gRPC ---------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    admin: str
    operator: str
    viewer: str


@pytest.fixture
async def service(
    store: WorkflowStore,
) -> AsyncIterator[tuple[int, Tokens]]:
    tokens = Tokens(new_token(), new_token(), new_token())
    authenticator = Authenticator.from_tokens(
        [
            (tokens.admin, Principal("admin", frozenset({"admin"}))),
            (tokens.operator, Principal("alice", frozenset({"operator"}))),
            (tokens.viewer, Principal("bob", frozenset({"viewer"}))),
        ]
    )
    host = GrpcHost(settings=ServerSettings(service="scheduler"), authenticator=authenticator)
    servicer = WorkflowServicer(store)
    host.add(
        SERVICE_NAME,
        lambda server: workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
            servicer, server
        ),
    )
    async with serving(host):
        yield host.port, tokens


def stub(
    port: int, token: str
) -> tuple[grpc.aio.Channel, workflow_service_pb2_grpc.WorkflowServiceAsyncStub]:
    channel = open_channel(f"127.0.0.1:{port}", settings=ClientSettings(), token=token)
    return channel, workflow_service_pb2_grpc.WorkflowServiceStub(channel)


HELLO = (EXAMPLES / "hello.yaml").read_text(encoding="utf-8")


async def test_register_and_read_over_grpc(service: tuple[int, Tokens]) -> None:
    port, tokens = service
    channel, client = stub(port, tokens.operator)
    async with channel:
        source = pb.WorkflowSource(format=pb.SOURCE_FORMAT_YAML, text=HELLO)
        registered = await client.RegisterWorkflow(
            pb.RegisterWorkflowRequest(request_id="r1", source_text=source)
        )
        assert registered.created and registered.workflow.definition.version == 1
        assert registered.workflow.created_by.id == "alice"
        again = await client.RegisterWorkflow(
            pb.RegisterWorkflowRequest(request_id="r2", source_text=source)
        )
        assert not again.created and again.workflow.digest == registered.workflow.digest
        got = await client.GetWorkflow(pb.GetWorkflowRequest(name="hello"))
        assert got.workflow == registered.workflow
        listed = await client.ListWorkflows(pb.ListWorkflowsRequest())
        assert [w.name for w in listed.workflows] == ["hello"]
        versions = await client.ListWorkflowVersions(pb.ListWorkflowVersionsRequest(name="hello"))
        assert [v.definition.version for v in versions.versions] == [1]


async def test_invalid_definitions_store_nothing(service: tuple[int, Tokens]) -> None:
    port, tokens = service
    channel, client = stub(port, tokens.operator)
    async with channel:
        bad = wf()
        bad.steps[0].atomic.verb = "android.tap"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.RegisterWorkflow(
                pb.RegisterWorkflowRequest(request_id="x", definition=bad)
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert 'steps[0] "say": atomic.verb "android.tap" is not in allowed_verbs' in (
            caught.value.details() or ""
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.RegisterWorkflow(
                pb.RegisterWorkflowRequest(
                    request_id="y",
                    source_text=pb.WorkflowSource(format=pb.SOURCE_FORMAT_JSON, text="["),
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        checked = await client.RegisterWorkflow(
            pb.RegisterWorkflowRequest(request_id="z", definition=wf(), validate_only=True)
        )
        assert not checked.created
        listed = await client.ListWorkflows(pb.ListWorkflowsRequest())
        assert not listed.workflows
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.GetWorkflow(pb.GetWorkflowRequest(name="orders"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_permissions_over_grpc(service: tuple[int, Tokens]) -> None:
    port, tokens = service
    admin_channel, admin = stub(port, tokens.admin)
    viewer_channel, viewer = stub(port, tokens.viewer)
    operator_channel, operator = stub(port, tokens.operator)
    async with admin_channel, viewer_channel, operator_channel:
        # bob holds no default role: he may neither create nor read.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await viewer.RegisterWorkflow(
                pb.RegisterWorkflowRequest(request_id="b", definition=wf())
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        locked = wf("locked")
        locked.permissions.define.principals.append("admin")
        locked.permissions.read.principals.append("bob")
        await admin.RegisterWorkflow(pb.RegisterWorkflowRequest(request_id="a", definition=locked))
        await admin.RegisterWorkflow(pb.RegisterWorkflowRequest(request_id="o", definition=wf()))
        # alice may not define "locked" (its define list names only admin) ...
        changed = wf("locked", message="changed")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await operator.RegisterWorkflow(
                pb.RegisterWorkflowRequest(request_id="c", definition=changed)
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await operator.GetWorkflow(pb.GetWorkflowRequest(name="orders"))).workflow
        # ... and bob reads only what lists him.
        await viewer.GetWorkflow(pb.GetWorkflowRequest(name="locked"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await viewer.GetWorkflow(pb.GetWorkflowRequest(name="orders"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await viewer.ListWorkflowVersions(pb.ListWorkflowVersionsRequest(name="orders"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        listed = await viewer.ListWorkflows(pb.ListWorkflowsRequest())
        assert [w.name for w in listed.workflows] == ["locked"]
        assert (await admin.GetWorkflow(pb.GetWorkflowRequest(name="locked"))).workflow
