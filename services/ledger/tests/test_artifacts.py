"""PutArtifact and GetArtifact: files kept with an attempt's record, under its claim."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.api.ledger.v1 import ledger_pb2_grpc
from stepline.common.client import open_channel
from stepline.common.config import ClientSettings, NatsSettings, ServerSettings
from stepline.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from stepline.common.jetstream import Streams
from stepline.common.testing import Credentials
from stepline.ledger import artifacts, queries
from stepline.ledger.checks import MAX_ARTIFACT_BYTES
from stepline.ledger.config import MIN_MESSAGE_BYTES, LedgerSettings
from stepline.ledger.events import subject_kind
from stepline.ledger.server import running

from .conftest import ACTOR, EXECUTOR, Ledger, claimed_run, create_request

R = common_pb2.WorkflowRunState
T = common_pb2.TaskRunState
E = run_pb2.RunEventType
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
_ids = itertools.count()


def rid() -> str:
    return f"req-{next(_ids)}"


async def running_task(ledger: Ledger, step: str = "a", **kwargs: Any) -> tuple[str, int]:
    """A claimed RUNNING run whose task ``step`` is RUNNING (attempt 1)."""
    run_id, epoch = await claimed_run(ledger, **kwargs)
    await ledger.store.transition_run(
        pb.TransitionRunRequest(
            request_id=rid(),
            run_id=run_id,
            epoch=epoch,
            actor=ACTOR,
            state=R.WORKFLOW_RUN_STATE_RUNNING,
        )
    )
    await move_task(ledger, run_id, epoch, step, T.TASK_RUN_STATE_RUNNING)
    return run_id, epoch


async def move_task(
    ledger: Ledger, run_id: str, epoch: int, step: str, state: int
) -> pb.TransitionTaskResponse:
    return await ledger.store.transition_task(
        pb.TransitionTaskRequest(
            request_id=rid(),
            run_id=run_id,
            task_id=f"{run_id}/{step}",
            epoch=epoch,
            actor=ACTOR,
            state=state,  # type: ignore[arg-type]
        )
    )


def put(
    run_id: str,
    epoch: int,
    name: str = "shot.png",
    content: bytes = PNG,
    *,
    step: str = "a",
    attempt: int = 1,
    request_id: str | None = None,
    **extra: Any,
) -> pb.PutArtifactRequest:
    request = pb.PutArtifactRequest(
        request_id=request_id or rid(),
        run_id=run_id,
        task_id=f"{run_id}/{step}",
        epoch=epoch,
        attempt_number=attempt,
        name=name,
        content_type="image/png",
        content=content,
        actor=ACTOR,
    )
    for key, value in extra.items():
        setattr(request, key, value)
    return request


async def written(ledger: Ledger) -> tuple[int, int, int, int]:
    """Artifacts, events, events waiting for the relay and stored requests: what a
    write adds to."""
    row = await ledger.pool.fetchrow(
        "SELECT (SELECT count(*) FROM artifacts) AS a, (SELECT count(*) FROM events) AS e,"
        " (SELECT count(*) FROM events e, relay_position p"
        "  WHERE (e.xid, e.run_id, e.sequence) > (p.xid, p.run_id, p.sequence)) AS o,"
        " (SELECT count(*) FROM requests) AS q"
    )
    return row["a"], row["e"], row["o"], row["q"]


async def full_run(ledger: Ledger, run_id: str) -> pb.GetRunResponse:
    return await queries.get_run(
        ledger.pool, pb.GetRunRequest(run_id=run_id, view=run_pb2.RUN_VIEW_FULL)
    )


async def test_put_and_get_round_trip(ledger: Ledger) -> None:
    run_id, epoch = await running_task(ledger)
    task_id = f"{run_id}/a"
    first = await ledger.store.put_artifact(put(run_id, epoch, "shot.png", PNG))
    log = b"line one\nline two\n"
    second = await ledger.store.put_artifact(
        put(run_id, epoch, "adb-log.txt", log, content_type="text/plain; charset=utf-8")
    )

    stored = first.artifact
    assert stored.artifact_id == f"{task_id}:1:shot.png"
    assert (stored.run_id, stored.task_id, stored.chunk_id) == (run_id, task_id, "")
    assert (stored.attempt_number, stored.name, stored.content_type) == (1, "shot.png", "image/png")
    assert stored.size_bytes == len(PNG)
    assert stored.sha256 == hashlib.sha256(PNG).hexdigest()
    assert stored.HasField("create_time")
    assert second.artifact.sha256 == hashlib.sha256(log).hexdigest()

    got = await artifacts.get_artifact(
        ledger.pool, pb.GetArtifactRequest(artifact_id=stored.artifact_id)
    )
    assert got.artifact == stored and got.content == PNG

    # Listed with the task, oldest first, in every view that lists tasks.
    expected = [first.artifact, second.artifact]
    for view in (run_pb2.RUN_VIEW_TASKS, run_pb2.RUN_VIEW_FULL):
        fetched = await queries.get_run(ledger.pool, pb.GetRunRequest(run_id=run_id, view=view))
        assert list(fetched.run.tasks[0].artifacts) == expected
        assert [list(t.artifacts) for t in fetched.run.tasks[1:]] == [[], []]
    # ...and in the run of a new claim, and in a transition's task.
    again = await ledger.store.claim_run(
        pb.ClaimRunRequest(request_id=rid(), run_id=run_id, executor_id=EXECUTOR)
    )
    assert list(again.run.tasks[0].artifacts) == expected
    epoch = again.claim.epoch
    done = await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED)
    assert list(done.task.artifacts) == expected

    # One ARTIFACT_RECORDED event each, by the actor, relayed on the task's subject.
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=run_id))
    recorded = [e for e in history.events if e.type == E.RUN_EVENT_TYPE_ARTIFACT_RECORDED]
    assert [e.task_id for e in recorded] == [task_id, task_id]
    assert recorded[0].actor.id == EXECUTOR
    payload = dict(recorded[0].payload)
    assert payload == {
        "artifact_id": stored.artifact_id,
        "attempt_number": 1,
        "name": "shot.png",
        "content_type": "image/png",
        "size_bytes": len(PNG),
        "sha256": stored.sha256,
    }
    assert [subject_kind(e.type) for e in recorded] == ["task", "task"]
    sequences = [e.sequence for e in history.events]
    assert sequences == list(range(1, len(sequences) + 1))  # no gaps


async def test_get_artifact_refuses_unknown_and_empty_ids(ledger: Ledger) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        await artifacts.get_artifact(ledger.pool, pb.GetArtifactRequest(artifact_id="x:1:y"))
    with pytest.raises(InvalidArgument, match="artifact_id is required"):
        await artifacts.get_artifact(ledger.pool, pb.GetArtifactRequest())


async def test_replays_return_the_same_artifact_and_conflicts_are_refused(
    ledger: Ledger,
) -> None:
    run_id, epoch = await running_task(ledger)
    request = put(run_id, epoch, request_id="shot-1")
    first = await ledger.store.put_artifact(request)
    before = await written(ledger)
    assert await ledger.store.put_artifact(request) == first
    assert await written(ledger) == before

    # Same request id, other content: refused, nothing changes.
    with pytest.raises(Aborted, match="already used"):
        await ledger.store.put_artifact(put(run_id, epoch, content=b"other", request_id="shot-1"))
    # A new request for a name the attempt already used: refused as well.
    with pytest.raises(AlreadyExists, match="once per attempt"):
        await ledger.store.put_artifact(put(run_id, epoch, content=b"other"))
    assert await written(ledger) == before
    got = await artifacts.get_artifact(
        ledger.pool, pb.GetArtifactRequest(artifact_id=first.artifact.artifact_id)
    )
    assert got.content == PNG
    # The replay still answers after the claim is gone.
    await ledger.store.release_claim(
        pb.ReleaseClaimRequest(request_id=rid(), run_id=run_id, executor_id=EXECUTOR, epoch=epoch)
    )
    assert await ledger.store.put_artifact(request) == first


async def test_fencing_and_attempts(ledger: Ledger) -> None:
    run_id, epoch = await running_task(ledger)
    before = await written(ledger)
    refusals: list[tuple[type[Exception], str, pb.PutArtifactRequest]] = [
        (FailedPrecondition, "stale epoch", put(run_id, epoch - 1)),
        (FailedPrecondition, "stale epoch", put(run_id, epoch + 1)),
        (FailedPrecondition, "not its current attempt 1", put(run_id, epoch, attempt=2)),
        (FailedPrecondition, "no open attempt", put(run_id, epoch, step="b")),
        (NotFound, "not part of run", put(run_id, epoch, step="nope")),
        (NotFound, "run 'missing' does not exist", put("missing", epoch)),
    ]
    for error, message, request in refusals:
        with pytest.raises(error, match=message):
            await ledger.store.put_artifact(request)
    assert await written(ledger) == before

    # A retry: attempt 1 ends, attempt 2 starts; only attempt 2 may add files.
    await ledger.store.transition_task(
        pb.TransitionTaskRequest(
            request_id=rid(),
            run_id=run_id,
            task_id=f"{run_id}/a",
            epoch=epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(
                attempt_number=1,
                state=T.TASK_RUN_STATE_FAILED,
                failure=common_pb2.Failure(reason=common_pb2.FAILURE_REASON_VERB_ERROR),
            ),
        )
    )
    await ledger.store.transition_task(
        pb.TransitionTaskRequest(
            request_id=rid(),
            run_id=run_id,
            task_id=f"{run_id}/a",
            epoch=epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_RUNNING,
            attempt=pb.AttemptUpdate(attempt_number=2, state=T.TASK_RUN_STATE_RUNNING),
        )
    )
    with pytest.raises(FailedPrecondition, match=r"attempt 1 of task .* not its current attempt 2"):
        await ledger.store.put_artifact(put(run_id, epoch, attempt=1))
    retried = await ledger.store.put_artifact(put(run_id, epoch, attempt=2))
    assert retried.artifact.artifact_id == f"{run_id}/a:2:shot.png"

    # A terminal task takes no more files.
    await move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED)
    with pytest.raises(FailedPrecondition, match="is SUCCEEDED"):
        await ledger.store.put_artifact(put(run_id, epoch, "late.png", attempt=2))

    # An expired or released claim fences writes too.
    await move_task(ledger, run_id, epoch, "b", T.TASK_RUN_STATE_RUNNING)
    await ledger.pool.execute(
        "UPDATE runs SET claim_expire = clock_timestamp() - interval '1 second' WHERE run_id = $1",
        run_id,
    )
    with pytest.raises(FailedPrecondition, match="has expired"):
        await ledger.store.put_artifact(put(run_id, epoch, step="b"))
    # The next claim's epoch is the live one; the old epoch stays refused.
    claim = await ledger.store.claim_run(
        pb.ClaimRunRequest(request_id=rid(), run_id=run_id, executor_id="executor-b")
    )
    with pytest.raises(FailedPrecondition, match="stale epoch"):
        await ledger.store.put_artifact(put(run_id, epoch, step="b"))
    stored = await ledger.store.put_artifact(put(run_id, claim.claim.epoch, step="b"))
    assert stored.artifact.task_id == f"{run_id}/b"


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({"content": b"\0" * (MAX_ARTIFACT_BYTES + 1)}, "content is 8388609 bytes; the limit"),
    ({"name": ""}, "name is required"),
    ({"name": "shots/1.png"}, "must be 1 to 100 letters"),
    ({"name": "a b.png"}, "must be 1 to 100 letters"),
    ({"name": "é.png"}, "must be 1 to 100 letters"),
    ({"name": "x" * 101}, "must be 1 to 100 letters"),
    ({"content_type": ""}, "content_type is required"),
    ({"content_type": "png"}, "not a MIME type"),
    ({"content_type": "image/png\r\nX: y"}, "not a MIME type"),
    ({"attempt_number": 0}, "attempt_number must be positive"),
    ({"request_id": ""}, "request_id is required"),
    ({"task_id": ""}, "task_id is required"),
    ({"actor": common_pb2.Principal()}, "actor.id is required"),
]


async def test_bad_input_is_refused_and_writes_nothing(ledger: Ledger) -> None:
    run_id, epoch = await running_task(ledger)
    before = await written(ledger)
    for change, message in BAD_INPUT:
        request = put(run_id, epoch)
        for key, value in change.items():
            if isinstance(value, common_pb2.Principal):
                getattr(request, key).CopyFrom(value)
            else:
                setattr(request, key, value)
        with pytest.raises(InvalidArgument, match=message):
            await ledger.store.put_artifact(request)
    assert await written(ledger) == before


async def test_the_size_limit_is_inclusive(ledger: Ledger) -> None:
    run_id, epoch = await running_task(ledger)
    content = bytes(range(256)) * (MAX_ARTIFACT_BYTES // 256)
    assert len(content) == MAX_ARTIFACT_BYTES
    stored = await ledger.store.put_artifact(put(run_id, epoch, "full.bin", content))
    assert stored.artifact.size_bytes == MAX_ARTIFACT_BYTES
    got = await artifacts.get_artifact(
        ledger.pool, pb.GetArtifactRequest(artifact_id=stored.artifact.artifact_id)
    )
    assert got.content == content


async def test_chunk_artifacts_are_fenced_by_the_chunk_claim(ledger: Ledger) -> None:
    run_id, run_epoch = await running_task(ledger, "b", chunked="b")
    task_id = f"{run_id}/b"
    chunks = pb.CreateChunksRequest(
        request_id=rid(),
        run_id=run_id,
        task_id=task_id,
        epoch=run_epoch,
        actor=ACTOR,
        last_batch=True,
    )
    for index in range(2):
        chunks.records.add().update({"n": index})
    await ledger.store.create_chunks(chunks)
    chunk_id = f"{task_id}#1"
    # Make the chunk's epoch differ from the run's, so the two cannot be confused.
    for _ in range(2):
        claim = await ledger.store.claim_run(
            pb.ClaimRunRequest(
                request_id=rid(),
                run_id=run_id,
                chunk_id=chunk_id,
                executor_id="executor-c",
                lease_duration=Duration(seconds=30),
            )
        )
    chunk_epoch = claim.claim.epoch
    assert chunk_epoch != run_epoch
    await ledger.store.transition_chunk(
        pb.TransitionChunkRequest(
            request_id=rid(),
            run_id=run_id,
            chunk_id=chunk_id,
            epoch=chunk_epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_RUNNING,
        )
    )
    before = await written(ledger)
    with pytest.raises(FailedPrecondition, match=f"stale epoch {run_epoch} for chunk"):
        await ledger.store.put_artifact(put(run_id, run_epoch, step="b", chunk_id=chunk_id))
    with pytest.raises(NotFound, match="not part of task"):
        await ledger.store.put_artifact(put(run_id, chunk_epoch, step="a", chunk_id=chunk_id))
    assert await written(ledger) == before
    pending = await ledger.store.claim_run(
        pb.ClaimRunRequest(
            request_id=rid(), run_id=run_id, chunk_id=f"{task_id}#0", executor_id="executor-c"
        )
    )
    before = await written(ledger)
    with pytest.raises(FailedPrecondition, match="no open attempt"):
        await ledger.store.put_artifact(
            put(run_id, pending.claim.epoch, step="b", chunk_id=f"{task_id}#0")
        )
    assert await written(ledger) == before

    stored = await ledger.store.put_artifact(
        put(run_id, chunk_epoch, "record.png", step="b", chunk_id=chunk_id)
    )
    assert stored.artifact.artifact_id == f"{chunk_id}:1:record.png"
    assert (stored.artifact.task_id, stored.artifact.chunk_id) == (task_id, chunk_id)

    full = await full_run(ledger, run_id)
    chunk = next(c for c in full.chunks if c.chunk_id == chunk_id)
    assert list(chunk.artifacts) == [stored.artifact]
    assert all(not c.artifacts for c in full.chunks if c.chunk_id != chunk_id)
    assert all(not t.artifacts for t in full.run.tasks)  # a chunk's files are not its task's
    listed = await queries.list_chunks(
        ledger.pool, pb.ListChunksRequest(run_id=run_id, task_id=task_id)
    )
    assert [list(c.artifacts) for c in listed.chunks] == [[], [stored.artifact]]
    claimed_again = await ledger.store.claim_run(
        pb.ClaimRunRequest(
            request_id=rid(), run_id=run_id, chunk_id=chunk_id, executor_id="executor-c"
        )
    )
    assert list(claimed_again.chunk.artifacts) == [stored.artifact]
    done = await ledger.store.transition_chunk(
        pb.TransitionChunkRequest(
            request_id=rid(),
            run_id=run_id,
            chunk_id=chunk_id,
            epoch=claimed_again.claim.epoch,
            actor=ACTOR,
            state=T.TASK_RUN_STATE_SUCCEEDED,
        )
    )
    assert list(done.chunk.artifacts) == [stored.artifact]
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=run_id))
    recorded = [e for e in history.events if e.type == E.RUN_EVENT_TYPE_ARTIFACT_RECORDED]
    assert [(e.task_id, e.chunk_id) for e in recorded] == [(task_id, chunk_id)]


async def test_concurrent_writes_of_a_run_keep_its_history_gapless(ledger: Ledger) -> None:
    """Artifacts share commits with transitions of the same run: applied in the
    order submitted, one gapless sequence."""
    run_id, epoch = await running_task(ledger)
    writes: list[Awaitable[object]] = [
        ledger.store.put_artifact(put(run_id, epoch, f"shot-{n}.png")) for n in range(6)
    ]
    writes.insert(3, move_task(ledger, run_id, epoch, "b", T.TASK_RUN_STATE_RUNNING))
    writes.insert(6, move_task(ledger, run_id, epoch, "a", T.TASK_RUN_STATE_SUCCEEDED))
    results = await asyncio.gather(*writes, return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert [type(r) for r in refused] == [FailedPrecondition]  # shot-5, after SUCCEEDED
    assert results[-1] is refused[0]
    history = await queries.get_run_history(ledger.pool, pb.GetRunHistoryRequest(run_id=run_id))
    sequences = [e.sequence for e in history.events]
    assert sequences == list(range(1, history.last_sequence + 1))
    recorded = [e for e in history.events if e.type == E.RUN_EVENT_TYPE_ARTIFACT_RECORDED]
    assert [e.payload["name"] for e in recorded] == [f"shot-{n}.png" for n in range(5)]
    full = await full_run(ledger, run_id)
    assert [a.name for a in full.run.tasks[0].artifacts] == [f"shot-{n}.png" for n in range(5)]


async def test_artifacts_over_grpc_fit_the_message_limit(
    database_url: str, nats_url: str, streams: Streams, credentials: Credentials
) -> None:
    # A configured limit (4 MiB) below an artifact's: the ledger raises its own.
    settings = LedgerSettings(
        server=ServerSettings(
            service="ledger", auth_file=credentials.auth_file, max_message_bytes=4 * 1024 * 1024
        ),
        database_url=database_url,
        nats=NatsSettings(url=nats_url, stream_prefix=streams.prefix),
    )
    assert settings.server.max_message_bytes < MAX_ARTIFACT_BYTES
    client = ClientSettings(max_message_bytes=2 * MIN_MESSAGE_BYTES)
    content = bytes(range(256)) * (MAX_ARTIFACT_BYTES // 256)
    async with running(settings) as host:
        target = f"127.0.0.1:{host.port}"
        async with open_channel(target, settings=client, token=credentials.service_token) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            created = await stub.CreateRun(create_request("over-grpc"))
            run_id = created.run.run_id
            claim = await stub.ClaimRun(
                pb.ClaimRunRequest(request_id="claim", run_id=run_id, executor_id=EXECUTOR)
            )
            epoch = claim.claim.epoch
            await stub.TransitionRun(
                pb.TransitionRunRequest(
                    request_id="run",
                    run_id=run_id,
                    epoch=epoch,
                    actor=ACTOR,
                    state=R.WORKFLOW_RUN_STATE_RUNNING,
                )
            )
            await stub.TransitionTask(
                pb.TransitionTaskRequest(
                    request_id="a",
                    run_id=run_id,
                    task_id=f"{run_id}/a",
                    epoch=epoch,
                    actor=ACTOR,
                    state=T.TASK_RUN_STATE_RUNNING,
                )
            )
            stored = await stub.PutArtifact(put(run_id, epoch, "full.bin", content))
            got = await stub.GetArtifact(
                pb.GetArtifactRequest(artifact_id=stored.artifact.artifact_id)
            )
            assert got.content == content and got.artifact == stored.artifact
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.PutArtifact(put(run_id, epoch, "over.bin", content + b"!"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the limit is 8388608" in (info.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetArtifact(pb.GetArtifactRequest(artifact_id=f"{run_id}/a:1:nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # People (role operator) may not call the ledger, artifacts included.
        async with open_channel(target, settings=client, token=credentials.user_token) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            for call in (
                stub.PutArtifact(put(run_id, epoch, "mine.png")),
                stub.GetArtifact(pb.GetArtifactRequest(artifact_id=stored.artifact.artifact_id)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An administrator may.
        async with open_channel(target, settings=client, token=credentials.admin_token) as ch:
            stub = ledger_pb2_grpc.LedgerServiceStub(ch)
            got = await stub.GetArtifact(
                pb.GetArtifactRequest(artifact_id=stored.artifact.artifact_id)
            )
            assert got.artifact.sha256 == hashlib.sha256(content).hexdigest()
