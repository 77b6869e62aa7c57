"""The plan convention: step paths, kinds, verbs and child versions, depth-first."""

from __future__ import annotations

from google.protobuf import json_format

from stepline.api.common.v1 import workflow_pb2
from stepline.common.plan import plan, step_kind, steps_by_path

W = workflow_pb2

DEFINITION = json_format.ParseDict(
    {
        "name": "fan",
        "steps": [
            {"id": "fetch", "atomic": {"verb": "http.request"}},
            {
                "id": "fanout",
                "parallel": {
                    "branches": [
                        {
                            "id": "email",
                            "steps": [
                                {"id": "send", "chunked": {"chunk_verb": "mail.send"}},
                                {"id": "ok", "govern": {}},
                            ],
                        },
                        {
                            "id": "audit",
                            "steps": [{"id": "log", "workflow_ref": {"workflow_name": "a"}}],
                        },
                    ]
                },
            },
            {"id": "child", "workflow_ref": {"workflow_name": "b", "version": 3}},
        ],
    },
    W.WorkflowDefinition(),
)


def test_plan_lists_every_step_depth_first() -> None:
    rows = [
        (t.step_id, t.step_path, t.kind, t.verb, t.child_workflow_version) for t in plan(DEFINITION)
    ]
    assert rows == [
        ("fetch", "fetch", W.STEP_KIND_ATOMIC, "http.request", 0),
        ("fanout", "fanout", W.STEP_KIND_PARALLEL, "", 0),
        ("send", "fanout/email/send", W.STEP_KIND_CHUNKED, "mail.send", 0),
        ("ok", "fanout/email/ok", W.STEP_KIND_GOVERN, "", 0),
        ("log", "fanout/audit/log", W.STEP_KIND_WORKFLOW_REF, "", 0),
        ("child", "child", W.STEP_KIND_WORKFLOW_REF, "", 3),
    ]


def test_steps_by_path_and_kind() -> None:
    steps = steps_by_path(DEFINITION)
    assert list(steps) == [t.step_path for t in plan(DEFINITION)]
    assert steps["fanout/email/send"].chunked.chunk_verb == "mail.send"
    assert step_kind(W.Step(id="empty")) == W.STEP_KIND_UNSPECIFIED
