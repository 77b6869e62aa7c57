"""Request fingerprints: replays match, conflicting reuses of a request_id do not."""

from __future__ import annotations

import hashlib

from stepline.api.common.v1 import common_pb2, run_pb2
from stepline.api.ledger.v1 import ledger_pb2 as pb
from stepline.common.requests import fingerprint


def test_the_request_id_is_left_out_and_everything_else_counts() -> None:
    first = pb.ReleaseClaimRequest(request_id="a", run_id="run-1", executor_id="e", epoch=3)
    replay = pb.ReleaseClaimRequest(request_id="b", run_id="run-1", executor_id="e", epoch=3)
    other = pb.ReleaseClaimRequest(request_id="a", run_id="run-1", executor_id="e", epoch=4)
    assert fingerprint(first) == fingerprint(replay)
    assert fingerprint(first) != fingerprint(other)
    assert first.request_id == "a"  # the caller's message is not changed


def test_the_view_of_the_answer_is_left_out() -> None:
    basic = pb.CreateRunRequest(request_id="a", schedule_id="s", view=run_pb2.RUN_VIEW_BASIC)
    tasks = pb.CreateRunRequest(request_id="a", schedule_id="s", view=run_pb2.RUN_VIEW_TASKS)
    other = pb.CreateRunRequest(request_id="a", schedule_id="t", view=run_pb2.RUN_VIEW_BASIC)
    assert fingerprint(basic) == fingerprint(tasks) != fingerprint(other)


def test_extra_values_tell_callers_apart() -> None:
    request = pb.ReleaseClaimRequest(request_id="a", run_id="run-1")
    assert fingerprint(request, "alice") != fingerprint(request, "bob")
    assert fingerprint(request, "alice") == fingerprint(request, "alice")
    assert fingerprint(request, "ab", "c") != fingerprint(request, "a", "bc")


def test_a_message_without_request_id_is_digested_whole() -> None:
    actor = common_pb2.Principal(id="alice", roles=["operator"])
    expected = hashlib.sha256(actor.SerializeToString(deterministic=True)).hexdigest()
    assert fingerprint(actor) == expected
