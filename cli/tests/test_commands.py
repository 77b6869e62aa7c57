"""The client commands against a real gRPC server on loopback.

The server is a GrpcHost (auth interceptor, health) serving small in-test
WorkflowService and SchedulerService servicers that record each request and
answer with canned protos: what is checked here is the CLI's side (arguments,
the requests it sends, exit codes and output), not the scheduler's behaviour.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from stepline.api.common.v1 import common_pb2, run_pb2, workflow_pb2
from stepline.api.scheduler.v1 import scheduler_service_pb2 as spb
from stepline.api.scheduler.v1 import scheduler_service_pb2_grpc, workflow_service_pb2_grpc
from stepline.api.scheduler.v1 import workflow_service_pb2 as wpb
from stepline.cli import mesh
from stepline.cli.__main__ import build_parser, run_async
from stepline.common.auth import Authenticator, Principal, current_principal
from stepline.common.config import ServerSettings
from stepline.common.embedded import ProcessRecord
from stepline.common.errors import NotFound
from stepline.common.server import GrpcHost, serving

TOKEN = "cli-test-token"
Context = grpc.aio.ServicerContext[Any, Any]
E = run_pb2.RunEventType
S = common_pb2.WorkflowRunState


@dataclass
class Fake:
    """Requests received (with the caller's id) and the answers to give."""

    requests: list[tuple[str, Message]] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    workflow: wpb.WorkflowVersion = field(default_factory=wpb.WorkflowVersion)
    created: bool = True
    workflow_pages: list[list[str]] = field(default_factory=list)
    run: run_pb2.WorkflowRun = field(default_factory=run_pb2.WorkflowRun)
    run_pages: list[list[run_pb2.WorkflowRun]] = field(default_factory=list)
    events: list[run_pb2.RunEvent] = field(default_factory=list)
    # The watch stream waits here (before its last event) until set; None: it does not.
    hold_watch: asyncio.Event | None = None

    def record(self, name: str, request: Message) -> None:
        self.requests.append((name, request))
        self.callers.append(current_principal().id)

    def sent(self, name: str) -> list[Any]:
        return [request for rpc, request in self.requests if rpc == name]


class Workflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    async def RegisterWorkflow(
        self, request: wpb.RegisterWorkflowRequest, context: Context
    ) -> wpb.RegisterWorkflowResponse:
        self.fake.record("RegisterWorkflow", request)
        return wpb.RegisterWorkflowResponse(workflow=self.fake.workflow, created=self.fake.created)

    async def GetWorkflow(
        self, request: wpb.GetWorkflowRequest, context: Context
    ) -> wpb.GetWorkflowResponse:
        self.fake.record("GetWorkflow", request)
        if request.name != self.fake.workflow.definition.name:
            raise NotFound(f"workflow {request.name!r} not found")
        return wpb.GetWorkflowResponse(workflow=self.fake.workflow)

    async def ListWorkflows(
        self, request: wpb.ListWorkflowsRequest, context: Context
    ) -> wpb.ListWorkflowsResponse:
        self.fake.record("ListWorkflows", request)
        page = int(request.page_token or 0)
        names = self.fake.workflow_pages[page]
        more = page + 1 < len(self.fake.workflow_pages)
        return wpb.ListWorkflowsResponse(
            workflows=[wpb.WorkflowSummary(name=n, latest_version=1) for n in names],
            next_page_token=str(page + 1) if more else "",
        )

    async def ListWorkflowVersions(
        self, request: wpb.ListWorkflowVersionsRequest, context: Context
    ) -> wpb.ListWorkflowVersionsResponse:
        self.fake.record("ListWorkflowVersions", request)
        return wpb.ListWorkflowVersionsResponse(versions=[self.fake.workflow])


class Runs(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    async def StartRun(
        self, request: spb.StartRunRequest, context: Context
    ) -> spb.StartRunResponse:
        self.fake.record("StartRun", request)
        started = run_pb2.WorkflowRun(
            run_id=self.fake.run.run_id,
            workflow_name=request.workflow_name,
            workflow_version=7,
            state=S.WORKFLOW_RUN_STATE_PENDING,
        )
        return spb.StartRunResponse(run=started, created=self.fake.created)

    async def GetRun(self, request: spb.GetRunRequest, context: Context) -> spb.GetRunResponse:
        self.fake.record("GetRun", request)
        return spb.GetRunResponse(run=self.fake.run)

    async def ListRuns(
        self, request: spb.ListRunsRequest, context: Context
    ) -> spb.ListRunsResponse:
        self.fake.record("ListRuns", request)
        page = int(request.page_token or 0)
        more = page + 1 < len(self.fake.run_pages)
        return spb.ListRunsResponse(
            runs=self.fake.run_pages[page], next_page_token=str(page + 1) if more else ""
        )

    async def WatchRun(
        self, request: spb.WatchRunRequest, context: Context
    ) -> AsyncIterator[spb.WatchRunResponse]:
        self.fake.record("WatchRun", request)
        for i, event in enumerate(self.fake.events):
            if i == len(self.fake.events) - 1 and self.fake.hold_watch is not None:
                await self.fake.hold_watch.wait()
            yield spb.WatchRunResponse(event=event)

    async def CancelRun(
        self, request: spb.CancelRunRequest, context: Context
    ) -> spb.CancelRunResponse:
        self.fake.record("CancelRun", request)
        return spb.CancelRunResponse(run=self.fake.run)

    async def PauseRun(
        self, request: spb.PauseRunRequest, context: Context
    ) -> spb.PauseRunResponse:
        self.fake.record("PauseRun", request)
        return spb.PauseRunResponse(run=self.fake.run)

    async def ResumeRun(
        self, request: spb.ResumeRunRequest, context: Context
    ) -> spb.ResumeRunResponse:
        self.fake.record("ResumeRun", request)
        return spb.ResumeRunResponse(run=self.fake.run)

    async def RerunFrom(
        self, request: spb.RerunFromRequest, context: Context
    ) -> spb.RerunFromResponse:
        self.fake.record("RerunFrom", request)
        return spb.RerunFromResponse(run=self.fake.run)


@dataclass
class Server:
    fake: Fake
    address: str


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    fake = Fake()
    fake.run.run_id = "run-1"
    host = GrpcHost(
        settings=ServerSettings(service="scheduler", shutdown_grace_s=0.2),
        authenticator=Authenticator.from_tokens(
            [(TOKEN, Principal("alice", frozenset({"operator"})))]
        ),
    )
    host.add(
        "stepline.api.scheduler.v1.WorkflowService",
        lambda s: workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(
            Workflows(fake), s
        ),
    )
    host.add(
        "stepline.api.scheduler.v1.SchedulerService",
        lambda s: scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
            Runs(fake),  # type: ignore[abstract]  # schedule RPCs: tested against the mesh (test_schedules_commands.py)
            s,
        ),
    )
    async with serving(host):
        yield Server(fake, f"127.0.0.1:{host.port}")


Cli = Callable[..., Any]


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Callable[..., Any]:
    """``await cli("runs", "list")`` -> (exit status, stdout, stderr), pointed at the
    test server through flags, with an empty environment and state directory."""

    async def call(*argv: str, connect: bool = True) -> tuple[int, str, str]:
        capsys.readouterr()
        flags = ["--scheduler", server.address, "--token", TOKEN] if connect else []
        code = await run_async(["--state-dir", str(tmp_path / "none"), *flags, *argv], environ={})
        out, err = capsys.readouterr()
        return code, out, err

    return call


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    value = struct_pb2.Struct()
    value.update(data)
    return value


def event(seq: int, kind: int, *, task: str = "", **payload: Any) -> run_pb2.RunEvent:
    return run_pb2.RunEvent(
        run_id="run-1",
        sequence=seq,
        type=kind,  # type: ignore[arg-type]
        task_id=f"run-1/{task}" if task else "",
        time=Timestamp(seconds=1_740_830_400 + seq),  # 2025-03-01 12:00:00Z + seq
        payload=struct(payload),
    )


# --- workflows ----------------------------------------------------------------------


async def test_apply_sends_the_file_as_source_text_in_its_format(
    server: Server, cli: Cli, tmp_path: Path
) -> None:
    server.fake.workflow.definition.name = "hello"
    server.fake.workflow.definition.version = 2
    yaml_file = tmp_path / "hello.yaml"
    yaml_file.write_text("name: hello\nsteps: []\n", encoding="utf-8")
    code, out, _ = await cli("workflows", "apply", str(yaml_file))
    assert (code, out) == (0, "workflow hello version 2 created\n")
    (request,) = server.fake.sent("RegisterWorkflow")
    assert request.source_text == wpb.WorkflowSource(
        format=wpb.SOURCE_FORMAT_YAML, text="name: hello\nsteps: []\n"
    )
    assert request.request_id and not request.validate_only
    assert server.fake.callers == ["alice"]

    server.fake.created = False
    json_file = tmp_path / "hello.json"
    json_file.write_text('{"name": "hello"}', encoding="utf-8")
    code, out, _ = await cli("workflows", "apply", str(json_file))
    assert (code, out) == (0, "workflow hello version 2 unchanged\n")
    assert server.fake.sent("RegisterWorkflow")[1].source_text.format == wpb.SOURCE_FORMAT_JSON

    code, out, _ = await cli("workflows", "apply", str(json_file), "--validate-only", "--json")
    assert code == 0 and json.loads(out)["workflow"]["definition"]["name"] == "hello"
    assert server.fake.sent("RegisterWorkflow")[2].validate_only


async def test_apply_refuses_an_unknown_extension_without_calling(
    server: Server, cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "hello.toml"
    path.write_text("x", encoding="utf-8")
    code, out, err = await cli("workflows", "apply", str(path))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "use .yaml, .yml or .json" in err
    assert server.fake.requests == []


async def test_list_follows_every_page(server: Server, cli: Cli) -> None:
    server.fake.workflow_pages = [["alpha", "beta"], ["gamma"]]
    code, out, _ = await cli("workflows", "list", "--prefix", "a")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["NAME", "alpha", "beta", "gamma"]
    first, second = server.fake.sent("ListWorkflows")
    assert (first.name_prefix, first.page_token, second.page_token) == ("a", "", "1")
    code, out, _ = await cli("workflows", "list", "--json")
    assert [w["name"] for w in json.loads(out)["workflows"]] == ["alpha", "beta", "gamma"]


async def test_show_asks_for_the_version_and_reports_not_found(server: Server, cli: Cli) -> None:
    definition = server.fake.workflow.definition
    definition.name, definition.version = "deploy", 3
    definition.steps.add(id="build").atomic.verb = "core.http"
    code, out, _ = await cli("workflows", "show", "deploy", "--version", "3")
    assert code == 0 and "workflow:" in out and "core.http" in out
    assert server.fake.sent("GetWorkflow")[0] == wpb.GetWorkflowRequest(name="deploy", version=3)

    code, out, _ = await cli("workflows", "show", "deploy", "--versions")
    assert code == 0 and out.split()[:4] == ["VERSION", "REGISTERED", "BY", "DIGEST"]

    code, out, err = await cli("workflows", "show", "nope")
    assert (code, out) == (2, "")
    assert err == "error: NOT_FOUND: workflow 'nope' not found\n"


# --- starting and following runs -----------------------------------------------------


async def test_run_sends_inputs_labels_version_and_idempotency_key(
    server: Server, cli: Cli
) -> None:
    code, out, _ = await cli(
        "run", "nightly",
        "--input-json", '{"count": 1, "tags": ["a"]}',
        "--input", "count=3", "--input", "region=eu-west", "--input", "dry=true",
        "--label", "team=core", "--version", "7", "--idempotency-key", "nightly-2025-03-01",
    )  # fmt: skip
    assert code == 0
    assert out == "run run-1 started: nightly v7 (PENDING)\n"
    (request,) = server.fake.sent("StartRun")
    assert request.request_id == "nightly-2025-03-01"
    assert (request.workflow_name, request.workflow_version) == ("nightly", 7)
    assert request.inputs == struct({"count": 3, "tags": ["a"], "region": "eu-west", "dry": True})
    assert dict(request.labels) == {"team": "core"}
    assert server.fake.sent("WatchRun") == []

    server.fake.created = False
    code, out, _ = await cli("run", "nightly", "--json")
    assert code == 0 and json.loads(out)["run"]["runId"] == "run-1"
    assert server.fake.sent("StartRun")[1].request_id  # a fresh UUID when no key is given


async def test_run_rejects_a_malformed_input_without_calling(server: Server, cli: Cli) -> None:
    code, _, err = await cli("run", "nightly", "--input", "novalue")
    assert code == 2 and "expected KEY=VALUE" in err
    assert server.fake.requests == []


def _succeeding_events() -> list[run_pb2.RunEvent]:
    return [
        event(1, E.RUN_EVENT_TYPE_RUN_CREATED, workflow_name="nightly", workflow_version=7),
        event(2, E.RUN_EVENT_TYPE_DISPATCHED, dispatch_epoch=1),
        event(3, E.RUN_EVENT_TYPE_CLAIMED, epoch=1),
        event(4, E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, from_state="PENDING", to_state="RUNNING"),
        event(5, E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, task="fetch", from_state="PENDING",
              to_state="RUNNING", attempt_number=1),
        event(6, E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, task="fetch", from_state="RUNNING",
              to_state="SUCCEEDED", attempt_number=1),
        event(7, E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, from_state="RUNNING", to_state="SUCCEEDED"),
    ]  # fmt: skip


async def test_run_wait_prints_transitions_live_and_exits_0_on_success(
    server: Server, cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    server.fake.events = _succeeding_events()
    server.fake.run.state = S.WORKFLOW_RUN_STATE_SUCCEEDED
    server.fake.hold_watch = asyncio.Event()
    task = asyncio.create_task(cli("run", "nightly", "--wait"))

    async def printed(text: str) -> str:
        seen = ""
        while text not in seen:  # the CLI runs on this loop; let it go on
            await asyncio.sleep(0.01)
            seen += capsys.readouterr().out
        return seen

    # the step's success is on screen while the stream is still open
    so_far = await asyncio.wait_for(printed("RUNNING -> SUCCEEDED"), timeout=10)
    assert not task.done()
    server.fake.hold_watch.set()
    code, rest, _ = await asyncio.wait_for(task, timeout=10)
    out = so_far + rest
    assert code == 0
    assert out.splitlines() == [
        "run run-1 started: nightly v7 (PENDING)",
        "12:00:04.000  run  PENDING -> RUNNING",
        "12:00:05.000  fetch  PENDING -> RUNNING (attempt 1)",
        "12:00:06.000  fetch  RUNNING -> SUCCEEDED (attempt 1)",
        "12:00:07.000  run  RUNNING -> SUCCEEDED",
        "run run-1 SUCCEEDED",
    ]
    (watch,) = server.fake.sent("WatchRun")
    assert watch == spb.WatchRunRequest(run_id="run-1", after_sequence=0)


async def test_run_wait_exits_1_with_the_failure_when_the_run_fails(
    server: Server, cli: Cli
) -> None:
    failure = {"reason": "FAILURE_REASON_VERB_ERROR", "message": "card declined"}
    server.fake.events = [
        event(1, E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, from_state="PENDING", to_state="RUNNING"),
        event(2, E.RUN_EVENT_TYPE_TASK_STATE_CHANGED, task="charge", from_state="RUNNING",
              to_state="FAILED", attempt_number=3, failure=failure),
        event(3, E.RUN_EVENT_TYPE_RUN_STATE_CHANGED, from_state="RUNNING", to_state="FAILED",
              failure=failure),
    ]  # fmt: skip
    server.fake.run.state = S.WORKFLOW_RUN_STATE_FAILED
    server.fake.run.failure.reason = common_pb2.FAILURE_REASON_VERB_ERROR
    server.fake.run.failure.message = "step charge: card declined"
    code, out, _ = await cli("run", "pay", "--wait")
    assert code == 1
    assert "run run-1 FAILED: VERB_ERROR: step charge: card declined" in out
    assert "failed step charge: RUNNING -> FAILED (attempt 3): VERB_ERROR: card declined" in out


async def test_run_wait_json_is_one_message_per_line(server: Server, cli: Cli) -> None:
    server.fake.events = _succeeding_events()
    server.fake.run.state = S.WORKFLOW_RUN_STATE_CANCELLED
    code, out, _ = await cli("run", "nightly", "--wait", "--json")
    assert code == 1
    documents = [json.loads(line) for line in out.splitlines()]
    assert [d["event"]["sequence"] for d in documents[:-1]] == [str(i) for i in range(1, 8)]
    assert documents[-1]["run"]["state"] == "WORKFLOW_RUN_STATE_CANCELLED"


# --- reading runs --------------------------------------------------------------------


async def test_runs_list_filters_and_stops_at_the_limit(server: Server, cli: Cli) -> None:
    server.fake.run_pages = [
        [run_pb2.WorkflowRun(run_id=f"r{i}", workflow_name="w", state=S.WORKFLOW_RUN_STATE_FAILED)
         for i in range(p * 2, p * 2 + 2)]
        for p in range(3)
    ]  # fmt: skip
    code, out, _ = await cli(
        "runs", "list", "--workflow", "w", "--state", "failed", "--state", "TIMED_OUT",
        "--limit", "3",
    )  # fmt: skip
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["RUN", "r0", "r1", "r2"]
    first, second = server.fake.sent("ListRuns")
    assert first.filter == run_pb2.RunFilter(
        workflow_name="w", states=[S.WORKFLOW_RUN_STATE_FAILED, S.WORKFLOW_RUN_STATE_TIMED_OUT]
    )
    assert (first.page_size, second.page_token) == (3, "1")

    code, out, _ = await cli("runs", "list", "--json", "--limit", "100")
    assert [r["runId"] for r in json.loads(out)["runs"]] == [f"r{i}" for i in range(6)]


async def test_runs_list_refuses_an_unknown_state(server: Server, cli: Cli) -> None:
    code, _, err = await cli("runs", "list", "--state", "done")
    assert code == 2 and "unknown run state 'done'" in err
    assert server.fake.requests == []


async def test_runs_show_prints_the_timeline(server: Server, cli: Cli) -> None:
    run = server.fake.run
    run.workflow_name, run.state = "crawl", S.WORKFLOW_RUN_STATE_RUNNING
    task = run.tasks.add(
        step_id="pages",
        step_path="pages",
        kind=workflow_pb2.STEP_KIND_CHUNKED,
        state=common_pb2.TASK_RUN_STATE_RUNNING,
        chunk_counts=run_pb2.ChunkCounts(total=4, succeeded=3, running=1, complete=True),
    )
    task.attempts.add(attempt_number=1, state=common_pb2.TASK_RUN_STATE_RUNNING)
    code, out, _ = await cli("runs", "show", "run-1")
    assert code == 0
    assert "state:     RUNNING" in out
    assert "3/4 succeeded, 1 running" in out
    assert server.fake.sent("GetRun") == [
        spb.GetRunRequest(run_id="run-1", view=run_pb2.RUN_VIEW_TASKS)
    ]
    code, out, _ = await cli("runs", "show", "run-1", "--json")
    assert json.loads(out)["run"]["tasks"][0]["chunkCounts"]["total"] == "4"


async def test_runs_history_of_an_ended_run_reads_the_whole_stream(
    server: Server, cli: Cli
) -> None:
    server.fake.events = _succeeding_events()
    server.fake.run.state = S.WORKFLOW_RUN_STATE_SUCCEEDED
    code, out, _ = await cli("runs", "history", "run-1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "EVENT", "SUBJECT", "ACTOR", "DETAIL"]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in range(1, 8)]
    assert "claimed" in out and "dispatched (epoch 1)" in out


async def test_runs_history_of_a_live_run_stops_when_the_stream_goes_quiet(
    server: Server, cli: Cli
) -> None:
    server.fake.events = _succeeding_events()
    server.fake.run.state = S.WORKFLOW_RUN_STATE_RUNNING
    server.fake.hold_watch = asyncio.Event()  # the last event never comes
    code, out, _ = await asyncio.wait_for(cli("runs", "history", "run-1", "--json"), timeout=10)
    assert code == 0
    assert [json.loads(line)["event"]["sequence"] for line in out.splitlines()] == [
        str(i) for i in range(1, 7)
    ]


# --- controlling runs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "rpc"),
    [("cancel", "CancelRun"), ("pause", "PauseRun"), ("resume", "ResumeRun")],
)
async def test_control_commands_send_the_run_and_reason(
    server: Server, cli: Cli, command: str, rpc: str
) -> None:
    server.fake.run.state = S.WORKFLOW_RUN_STATE_RUNNING
    server.fake.run.pending_control = run_pb2.CONTROL_ACTION_CANCEL
    code, out, _ = await cli("runs", command, "run-1", "--reason", "bad input")
    assert code == 0
    assert out.startswith("run run-1 RUNNING (")
    (request,) = server.fake.sent(rpc)
    assert (request.run_id, request.reason) == ("run-1", "bad input")
    assert len(request.request_id) == 36  # a UUID: each command is a new request
    code, out, _ = await cli("runs", command, "run-1", "--json")
    assert json.loads(out)["run"]["pendingControl"] == "CONTROL_ACTION_CANCEL"


async def test_rerun_sends_the_step_and_chunk_scope(server: Server, cli: Cli) -> None:
    server.fake.run.state = S.WORKFLOW_RUN_STATE_PENDING
    server.fake.run.rerun_count = 1
    code, out, _ = await cli(
        "runs", "rerun", "run-1", "--from", "pages", "--failed-chunks-only", "--reason", "retry"
    )
    assert code == 0
    assert out == "run run-1 reopened from the failed chunks of step pages (rerun 1): PENDING\n"
    (request,) = server.fake.sent("RerunFrom")
    assert (request.run_id, request.step_id, request.failed_chunks_only, request.reason) == (
        "run-1",
        "pages",
        True,
        "retry",
    )
    code, _, err = await cli("runs", "rerun", "run-1")
    assert code == 2 and "--from" in err


# --- finding the scheduler and the token ----------------------------------------------


async def test_a_missing_token_is_reported_as_the_grpc_status(server: Server) -> None:
    code = await run_async(["workflows", "list", "--scheduler", server.address], environ={})
    assert code == 2


async def test_error_line_names_the_status(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_async(
        ["runs", "show", "r", "--scheduler", server.address, "--token", "wrong"], environ={}
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: UNAUTHENTICATED: ")


async def test_address_and_token_come_from_the_environment(
    server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server.fake.workflow_pages = [["alpha"]]
    environ = {
        "STEPLINE_SCHEDULER_ADDR": server.address,
        "STEPLINE_TOKEN": TOKEN,
        "STEPLINE_STATE_DIR": str(tmp_path),
    }
    assert await run_async(["workflows", "list"], environ=environ) == 0
    assert "alpha" in capsys.readouterr().out


async def test_address_and_token_come_from_the_state_of_stepline_up(
    server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server.fake.workflow_pages = [["alpha"]]
    state = mesh.MeshState(
        tmp_path,
        [ProcessRecord(name="scheduler", pid=1, create_time=0.0, log="", endpoint=server.address)],
    )
    state.save()
    (tmp_path / mesh.CREDENTIALS_FILE).write_text(
        json.dumps({"admin_token": TOKEN, "service_token": "x"}), encoding="utf-8"
    )
    assert await run_async(["--state-dir", str(tmp_path), "workflows", "list"], environ={}) == 0
    assert "alpha" in capsys.readouterr().out
    # the subcommand also takes --state-dir after its name
    assert await run_async(["workflows", "list", "--state-dir", str(tmp_path)], environ={}) == 0


async def test_no_scheduler_anywhere_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = await run_async(["--state-dir", str(tmp_path), "runs", "list"], environ={})
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no scheduler address: pass --scheduler HOST:PORT")


# --- principals (--as), other services, the phone --------------------------------------


def _mesh_credentials(state_dir: Path, address: str, tokens: dict[str, str]) -> None:
    state = mesh.MeshState(
        state_dir,
        [ProcessRecord(name="scheduler", pid=1, create_time=0.0, log="", endpoint=address)],
    )
    state.save()
    document = {"admin_token": tokens.get("admin", ""), "service_token": "s", "tokens": tokens}
    (state_dir / mesh.CREDENTIALS_FILE).write_text(json.dumps(document), encoding="utf-8")


async def test_as_picks_a_principals_token_from_the_mesh_credentials(
    server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server.fake.workflow_pages = [["alpha"]]
    _mesh_credentials(tmp_path, server.address, {"admin": "wrong", "approver": TOKEN})
    base = ["--state-dir", str(tmp_path)]
    assert await run_async([*base, "--as", "approver", "workflows", "list"], environ={}) == 0
    assert await run_async([*base, "workflows", "list", "--as", "approver"], environ={}) == 0
    assert server.fake.callers == ["alice", "alice"]
    # --as wins over STEPLINE_TOKEN; without it, STEPLINE_TOKEN over the admin token
    environ = {"STEPLINE_TOKEN": "wrong"}
    assert await run_async([*base, "--as", "approver", "workflows", "list"], environ=environ) == 0
    capsys.readouterr()
    assert await run_async([*base, "workflows", "list"], environ=environ) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert await run_async([*base, "workflows", "list"], environ={"STEPLINE_TOKEN": TOKEN}) == 0


async def test_as_an_unknown_principal_or_with_token_is_refused_before_any_call(
    server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _mesh_credentials(tmp_path, server.address, {"admin": TOKEN, "approver": "a"})
    base = ["--state-dir", str(tmp_path)]
    credentials = tmp_path / mesh.CREDENTIALS_FILE
    capsys.readouterr()
    assert await run_async([*base, "--as", "nobody", "runs", "list"], environ={}) == 2
    assert capsys.readouterr().err == (
        f"error: --as nobody: no such principal in {credentials} (known: admin, approver)\n"
    )
    code = await run_async([*base, "--as", "approver", "--token", TOKEN, "runs", "list"])
    assert code == 2
    assert capsys.readouterr().err == "error: give --token or --as, not both\n"
    assert server.fake.requests == []


async def test_each_service_is_found_by_flag_variable_or_mesh_state(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for argv, flag, variable in (
        (["devices", "list"], "--device-broker", "STEPLINE_DEVICE_BROKER_ADDR"),
        (["approvals", "show", "ap-1"], "--approvals", "STEPLINE_APPROVALS_ADDR"),
        (["runs", "artifact", "a:1:x", "-o", "-"], "--ledger", "STEPLINE_LEDGER_ADDR"),
    ):
        code = await run_async(["--state-dir", str(tmp_path), *argv], environ={})
        assert code == 2
        err = capsys.readouterr().err
        assert f"pass {flag} HOST:PORT, set {variable}, or start the mesh" in err, err
    code = await run_async(["devices", "list", "--device-broker", "nope"], environ={})
    assert code == 2
    assert "the device-broker address must be host:port" in capsys.readouterr().err


async def test_a_decision_needs_an_approval_id_or_a_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["--state-dir", str(tmp_path), "--approvals", "127.0.0.1:1", "--token", "t"]
    for argv in (["approve"], ["approve", "ap-1", "--run", "r1"]):
        assert await run_async([*base, "approvals", *argv], environ={}) == 2
        assert "give its ID or --run RUN_ID (not both)" in capsys.readouterr().err
    assert await run_async([*base, "approvals", "reject", "ap-1"], environ={}) == 2
    assert "the following arguments are required: --reason" in capsys.readouterr().err


def test_phone_arguments_go_to_the_phone_untouched() -> None:
    args = build_parser().parse_args(["phone", "--port", "5555", "--serial-name", "p1"])
    assert args.argv == ["--port", "5555", "--serial-name", "p1"]
    assert build_parser().parse_args(["phone", "--help"]).argv == ["--help"]
