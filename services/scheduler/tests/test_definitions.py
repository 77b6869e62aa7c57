"""Definitions: parsing, pointed validation errors, the plan, run inputs, examples."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from stepline.api.common.v1 import workflow_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2
from stepline.common.auth import Principal
from stepline.common.errors import InvalidArgument, PermissionDenied
from stepline.common.plan import plan
from stepline.scheduler import access
from stepline.scheduler.definitions import (
    digest,
    parse_source,
    to_source,
    validate_definition,
    validate_inputs,
)

YAML = workflow_service_pb2.SOURCE_FORMAT_YAML
JSON = workflow_service_pb2.SOURCE_FORMAT_JSON
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

BASE: dict[str, Any] = {
    "name": "orders",
    "allowed_verbs": ["core.*", "http.request"],
    "input_schema": {"fields": [{"name": "account", "type": "INPUT_TYPE_STRING"}]},
    "steps": [
        {
            "id": "fetch",
            "atomic": {"verb": "http.request", "args": {"url": "{{ inputs.account }}"}},
        },
        {"id": "charge", "atomic": {"verb": "core.echo", "args": {"v": "{{ steps.fetch.body }}"}}},
    ],
}


def definition(**changes: Any) -> workflow_pb2.WorkflowDefinition:
    document = copy.deepcopy(BASE)
    document.update(changes)
    return json_format.ParseDict(document, workflow_pb2.WorkflowDefinition())


def with_step(index: int, step: dict[str, Any]) -> workflow_pb2.WorkflowDefinition:
    steps = copy.deepcopy(BASE["steps"])
    steps[index] = step
    return definition(steps=steps)


def atomic(step_id: str, verb: str = "core.noop", **args: Any) -> dict[str, Any]:
    return {"id": step_id, "atomic": {"verb": verb, "args": args}}


def test_base_definition_is_valid() -> None:
    validate_definition(definition())


INVALID: list[tuple[str, workflow_pb2.WorkflowDefinition, str]] = [
    ("name", definition(name="Bad Name"), 'name: "Bad Name" must be lowercase'),
    ("no steps", definition(steps=[]), "steps: a workflow needs at least one step"),
    (
        "verb not allowed",
        with_step(1, atomic("charge", "android.tap")),
        'steps[1] "charge": atomic.verb "android.tap" is not in allowed_verbs',
    ),
    (
        "verb missing",
        with_step(1, atomic("charge", "")),
        'steps[1] "charge": atomic.verb: is required',
    ),
    (
        "no kind",
        with_step(1, {"id": "charge"}),
        'steps[1] "charge": exactly one of atomic, workflow_ref, chunked, govern, parallel',
    ),
    ("bad id", with_step(1, atomic("Charge!")), 'steps[1] "Charge!": id must be lowercase'),
    (
        "duplicate id in a branch",
        with_step(
            1,
            {
                "id": "group",
                "parallel": {"branches": [{"id": "a", "steps": [atomic("fetch")]}]},
            },
        ),
        'steps[1] "group".parallel.branches[0].steps[0] "fetch": duplicate step id "fetch"',
    ),
    (
        "duplicate branch id",
        with_step(
            1,
            {
                "id": "group",
                "parallel": {
                    "branches": [
                        {"id": "a", "steps": [atomic("x")]},
                        {"id": "a", "steps": [atomic("y")]},
                    ]
                },
            },
        ),
        'steps[1] "group": parallel.branches[1] "a": duplicate branch id "a"',
    ),
    (
        "sibling branch reference",
        with_step(
            1,
            {
                "id": "group",
                "parallel": {
                    "branches": [
                        {"id": "a", "steps": [atomic("x")]},
                        {"id": "b", "steps": [atomic("y", "core.echo", v="{{ steps.x.out }}")]},
                    ]
                },
            },
        ),
        'refers to step "x", which does not run before this step',
    ),
    (
        "chunk verb not allowed",
        with_step(
            1,
            {
                "id": "charge",
                "chunked": {"generator_verb": "core.range", "chunk_verb": "adb.shell"},
            },
        ),
        'steps[1] "charge": chunked.chunk_verb "adb.shell" is not in allowed_verbs',
    ),
    (
        "chunk limits",
        with_step(
            1,
            {
                "id": "charge",
                "chunked": {
                    "generator_verb": "core.range",
                    "chunk_verb": "core.noop",
                    "max_concurrency": -1,
                },
            },
        ),
        'steps[1] "charge": chunked.max_concurrency: must not be negative',
    ),
    (
        "record outside chunk args",
        with_step(1, atomic("charge", "core.echo", v="{{ record.id }}")),
        "record.* is only available in chunked.chunk_args",
    ),
    (
        "workflow_ref without a name",
        with_step(1, {"id": "charge", "workflow_ref": {"version": 2}}),
        'steps[1] "charge": workflow_ref.workflow_name: is required',
    ),
    (
        "workflow_ref to itself",
        with_step(1, {"id": "charge", "workflow_ref": {"workflow_name": "orders"}}),
        "a workflow may not run itself",
    ),
    (
        "govern without approvers",
        with_step(1, {"id": "charge", "govern": {"policy": {"required_approvals": 1}}}),
        'steps[1] "charge": govern.policy: approver_principals or approver_roles is required',
    ),
    (
        "govern unreachable approvals",
        with_step(
            1,
            {
                "id": "charge",
                "govern": {"policy": {"approver_principals": ["bob"], "required_approvals": 2}},
            },
        ),
        "govern.policy.required_approvals: 2 approvals can never be reached",
    ),
    (
        "retry attempts",
        with_step(1, {**atomic("charge"), "retry": {"max_attempts": -1}}),
        'steps[1] "charge": retry.max_attempts: must not be negative',
    ),
    (
        "retry multiplier",
        with_step(1, {**atomic("charge"), "retry": {"backoff_multiplier": 0.5}}),
        'steps[1] "charge": retry.backoff_multiplier: must be at least 1',
    ),
    (
        "retry backoff",
        with_step(1, {**atomic("charge"), "retry": {"initial_backoff": "-1s"}}),
        'steps[1] "charge": retry.initial_backoff: must not be negative',
    ),
    (
        "timeout",
        with_step(1, {**atomic("charge"), "timeout": "-5s"}),
        'steps[1] "charge": timeout: must not be negative',
    ),
    (
        "span to an earlier step",
        with_step(1, {**atomic("charge"), "device": {"span_until_step_id": "fetch"}}),
        'steps[1] "charge": device.span_until_step_id: "fetch" is not a later step',
    ),
    (
        "undeclared input",
        with_step(1, atomic("charge", "core.echo", v="{{ inputs.acount }}")),
        'steps[1] "charge": atomic.args.v: {{ inputs.acount }} refers to undeclared input "acount"',
    ),
    (
        "later step",
        with_step(0, atomic("fetch", "core.echo", v="{{ steps.charge.x }}")),
        'steps[0] "fetch": atomic.args.v: {{ steps.charge.x }} refers to step "charge", which',
    ),
    (
        "unknown step",
        with_step(1, atomic("charge", "core.echo", v=["a", "{{ steps.nope }}"])),
        'atomic.args.v[1]: {{ steps.nope }} refers to unknown step "nope"',
    ),
    (
        "malformed placeholder",
        with_step(1, atomic("charge", "core.echo", v="{{ inputs account }}")),
        "malformed placeholder",
    ),
    (
        "unknown root",
        with_step(1, atomic("charge", "core.echo", v="{{ run.run_id }}")),
        "unknown reference 'run.run_id' (a reference starts with one of inputs, steps,",
    ),
    (
        "unbalanced braces",
        with_step(1, atomic("charge", "core.echo", v="{{ inputs.account }} {{")),
        "'{{' without a closing '}}'",
    ),
    (
        "input without type",
        definition(input_schema={"fields": [{"name": "account"}]}),
        'input_schema.fields[0] "account": type is required',
    ),
    (
        "duplicate input",
        definition(
            input_schema={
                "fields": [
                    {"name": "account", "type": "INPUT_TYPE_STRING"},
                    {"name": "account", "type": "INPUT_TYPE_INT"},
                ]
            }
        ),
        'input_schema.fields[1] "account": duplicate input name',
    ),
    (
        "default of the wrong type",
        definition(
            input_schema={"fields": [{"name": "account", "type": "INPUT_TYPE_INT", "default": "x"}]}
        ),
        'input_schema.fields[0] "account": default must be int, got a string',
    ),
    (
        "too many steps",
        definition(steps=[atomic(f"s{i}") for i in range(1001)]),
        "steps: more than 1000 steps in all",
    ),
]


@pytest.mark.parametrize(
    ("bad", "expected"), [(d, m) for _, d, m in INVALID], ids=[c for c, _, _ in INVALID]
)
def test_invalid_definitions_are_refused_with_pointed_messages(
    bad: workflow_pb2.WorkflowDefinition, expected: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(bad)
    assert expected in caught.value.message


def gate(policy: dict[str, Any], **fields: Any) -> workflow_pb2.WorkflowDefinition:
    """BASE with a GOVERN step "approve" between fetch and charge."""
    steps = copy.deepcopy(BASE["steps"])
    steps.insert(1, {"id": "approve", "govern": {"policy": policy, **fields}})
    return definition(steps=steps)


ROLES = {"approver_roles": ["approver"]}
GOVERN_INVALID: list[tuple[str, workflow_pb2.WorkflowDefinition, str]] = [
    (
        "no approvers",
        gate({"required_approvals": 2}),
        'steps[1] "approve": govern.policy: approver_principals or approver_roles is required',
    ),
    (
        "empty principal",
        gate({"approver_principals": ["alice", " "]}),
        'steps[1] "approve": govern.policy.approver_principals[1]: is empty',
    ),
    (
        "duplicate role",
        gate({"approver_roles": ["approver", "approver"]}),
        'steps[1] "approve": govern.policy.approver_roles[1]: duplicate "approver"',
    ),
    (
        "negative quorum",
        gate({**ROLES, "required_approvals": -1}),
        'steps[1] "approve": govern.policy.required_approvals: must not be negative',
    ),
    (
        "quorum beyond the principals",
        gate({"approver_principals": ["alice", "bob"], "required_approvals": 3}),
        "govern.policy.required_approvals: 3 approvals can never be reached by 2 approver",
    ),
    (
        "huge quorum",
        gate({**ROLES, "required_approvals": 1000}),
        "govern.policy.required_approvals: must be at most 100",
    ),
    (
        "negative expiry",
        gate({**ROLES, "expiry": "-60s"}),
        'steps[1] "approve": govern.policy.expiry: must not be negative',
    ),
    (
        "zero expiry",
        gate({**ROLES, "expiry": "0s"}),
        "govern.policy.expiry: must be longer than 0s (leave it unset for no expiry)",
    ),
    (
        "expiry beyond a year",
        gate({**ROLES, "expiry": "31622401s"}),
        "govern.policy.expiry: must be at most 366 days",
    ),
    (
        "too many approvers",
        gate({"approver_principals": [f"p{i}" for i in range(101)]}),
        "govern.policy.approver_principals: more than 100 entries",
    ),
    (
        "unknown expiry outcome",
        gate({**ROLES, "expiry_outcome": 7}),
        "govern.policy.expiry_outcome: unknown value 7",
    ),
    (
        "context key of a later step",
        gate(ROLES, context_keys=["steps.charge.total"]),
        'steps[1] "approve": govern.context_keys[0]: {{ steps.charge.total }} refers to step '
        '"charge", which does not run before this step',
    ),
    (
        "context key of an undeclared input",
        gate(ROLES, context_keys=["inputs.amount"]),
        "govern.context_keys[0]: {{ inputs.amount }} refers to undeclared input",
    ),
    (
        "malformed context key",
        gate(ROLES, context_keys=["{{ inputs.account }}"]),
        "govern.context_keys[0]: '{{ inputs.account }}' is not a dotted name",
    ),
    (
        "chunk record as context",
        gate(ROLES, context_keys=["record.id"]),
        "govern.context_keys[0]: {{ record.id }}: record.* is only available in chunked",
    ),
    (
        "duplicate context key",
        gate(ROLES, context_keys=["inputs.account", "inputs.account"]),
        'govern.context_keys[1]: duplicate key "inputs.account"',
    ),
    (
        "retry on a gate",
        with_step(1, {"id": "charge", "govern": {"policy": ROLES}, "retry": {"max_attempts": 2}}),
        'steps[1] "charge": retry: is not supported on a govern step',
    ),
    (
        "device on a gate",
        with_step(1, {"id": "charge", "govern": {"policy": ROLES}, "device": {"pool": "x"}}),
        'steps[1] "charge": device: is not supported on a govern step',
    ),
]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [(d, m) for _, d, m in GOVERN_INVALID],
    ids=[c for c, _, _ in GOVERN_INVALID],
)
def test_invalid_govern_steps_are_refused_with_pointed_messages(
    bad: workflow_pb2.WorkflowDefinition, expected: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(bad)
    assert expected in caught.value.message


def test_a_govern_step_maps_onto_the_proto() -> None:
    text = """
name: gated
allowed_verbs: [core.echo]
input_schema:
  fields: [{name: amount, type: INPUT_TYPE_INT}]
steps:
  - id: prep
    atomic: {verb: core.echo, args: {total: "{{ inputs.amount }}"}}
  - id: approve
    govern:
      policy:
        approver_principals: [alice, bob]
        approver_roles: [finance]
        required_approvals: 2
        allow_initiator: true
        expiry: 3600s
        expiry_outcome: APPROVAL_EXPIRY_OUTCOME_FAILED
      context_keys: [inputs.amount, steps.prep.total]
      hold_device: true
"""
    parsed = parse_source(text, YAML)
    validate_definition(parsed)
    govern = parsed.steps[1].govern
    assert list(govern.policy.approver_principals) == ["alice", "bob"]
    assert list(govern.policy.approver_roles) == ["finance"]
    assert govern.policy.required_approvals == 2
    assert govern.policy.allow_initiator
    assert govern.policy.expiry.seconds == 3600
    assert govern.policy.expiry_outcome == workflow_pb2.APPROVAL_EXPIRY_OUTCOME_FAILED
    assert list(govern.context_keys) == ["inputs.amount", "steps.prep.total"]
    assert govern.hold_device
    assert parse_source(to_source(parsed, YAML), YAML) == parsed
    # principals only: a quorum of all of them is reachable
    validate_definition(gate({"approver_principals": ["alice", "bob"], "required_approvals": 2}))


def test_every_problem_is_reported() -> None:
    bad = with_step(1, {**atomic("charge", "nope.verb"), "timeout": "-1s"})
    with pytest.raises(InvalidArgument) as caught:
        validate_definition(bad)
    assert 'steps[1] "charge": timeout: must not be negative' in caught.value.message
    assert 'atomic.verb "nope.verb" is not in allowed_verbs' in caught.value.message


def test_parse_yaml_and_json_sources() -> None:
    text = """
name: orders
run_timeout: 30s
allowed_verbs: [core.echo]
steps:
  - id: a
    atomic: {verb: core.echo, args: {when: 2024-01-01}}
"""
    parsed = parse_source(text, YAML)
    assert parsed.run_timeout.seconds == 30
    assert parsed.steps[0].atomic.args["when"] == "2024-01-01"  # dates stay strings
    assert parse_source(to_source(parsed, JSON), JSON) == parsed
    assert parse_source(to_source(parsed, YAML), YAML) == parsed


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        ("name: a\nname: b\n", YAML, "duplicate key"),
        ("- a\n", YAML, "the document must be a mapping"),
        ("{", JSON, "invalid JSON"),
        ("name: a\nstepz: []\n", YAML, 'no field named "stepz"'),
        ("name: a\nrun_timeout: 3 minutes\n", YAML, "run_timeout"),
        ("name: a\n", 0, "SOURCE_FORMAT_YAML or SOURCE_FORMAT_JSON"),
    ],
)
def test_parse_errors(text: str, fmt: int, expected: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_source(text, fmt)
    assert expected in caught.value.message


def test_plan_lists_nested_parallel_steps_depth_first() -> None:
    nested = {
        "id": "outer",
        "parallel": {
            "branches": [
                {
                    "id": "b1",
                    "steps": [
                        atomic("a1"),
                        {
                            "id": "inner",
                            "parallel": {
                                "branches": [
                                    {"id": "x", "steps": [atomic("x1")]},
                                    {
                                        "id": "y",
                                        "steps": [
                                            {
                                                "id": "y1",
                                                "chunked": {
                                                    "generator_verb": "core.range",
                                                    "chunk_verb": "core.echo",
                                                },
                                            }
                                        ],
                                    },
                                ]
                            },
                        },
                    ],
                },
                {
                    "id": "b2",
                    "steps": [
                        {"id": "c1", "workflow_ref": {"workflow_name": "child", "version": 3}}
                    ],
                },
            ]
        },
    }
    wf = definition(
        steps=[atomic("first"), nested, atomic("last", "core.echo", v="{{ steps.y1.n }}")]
    )
    validate_definition(wf)
    tasks = plan(wf)
    assert [t.step_path for t in tasks] == [
        "first",
        "outer",
        "outer/b1/a1",
        "outer/b1/inner",
        "outer/b1/inner/x/x1",
        "outer/b1/inner/y/y1",
        "outer/b2/c1",
        "last",
    ]
    assert [t.kind for t in tasks] == [
        workflow_pb2.STEP_KIND_ATOMIC,
        workflow_pb2.STEP_KIND_PARALLEL,
        workflow_pb2.STEP_KIND_ATOMIC,
        workflow_pb2.STEP_KIND_PARALLEL,
        workflow_pb2.STEP_KIND_ATOMIC,
        workflow_pb2.STEP_KIND_CHUNKED,
        workflow_pb2.STEP_KIND_WORKFLOW_REF,
        workflow_pb2.STEP_KIND_ATOMIC,
    ]
    assert tasks[5].verb == "core.echo" and tasks[5].step_id == "y1"
    assert tasks[6].child_workflow_version == 3 and tasks[1].verb == ""


def schema_definition() -> workflow_pb2.WorkflowDefinition:
    fields = [
        {"name": "s", "type": "INPUT_TYPE_STRING", "required": True},
        {"name": "n", "type": "INPUT_TYPE_INT", "default": 3},
        {"name": "f", "type": "INPUT_TYPE_FLOAT"},
        {"name": "b", "type": "INPUT_TYPE_BOOL"},
        {"name": "j", "type": "INPUT_TYPE_JSON", "default": {"k": [1]}},
    ]
    return definition(input_schema={"fields": fields})


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


def test_validate_inputs_applies_defaults() -> None:
    result = validate_inputs(schema_definition(), struct({"s": "x", "f": 1.5, "b": True}))
    assert json_format.MessageToDict(result) == {
        "s": "x",
        "n": 3.0,
        "f": 1.5,
        "b": True,
        "j": {"k": [1.0]},
    }


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, "inputs.s: is required"),
        ({"s": "x", "extra": 1}, 'inputs.extra: is not an input of workflow "orders"'),
        ({"s": 1}, "inputs.s: must be string, got a number"),
        ({"s": "x", "n": 1.5}, "inputs.n: must be an integer, got 1.5"),
        ({"s": "x", "b": "yes"}, "inputs.b: must be bool, got a string"),
        ({"s": "x", "f": None}, "inputs.f: must be float, got null"),
    ],
)
def test_validate_inputs_refuses(given: dict[str, Any], expected: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_inputs(schema_definition(), struct(given))
    assert expected in caught.value.message


def test_digest_ignores_version_only() -> None:
    one, two = definition(), definition()
    two.version = 7
    assert digest(one) == digest(two)
    two.description = "changed"
    assert digest(one) != digest(two)


def test_access_defaults_and_lists() -> None:
    wf = definition()
    operator = Principal("alice", frozenset({"operator"}))
    viewer = Principal("bob", frozenset({"viewer"}))
    admin = Principal("root", frozenset({"admin"}))
    access.check(wf, "start", operator)
    access.check(wf, "define", admin)
    with pytest.raises(PermissionDenied, match="may not start workflow 'orders'"):
        access.check(wf, "start", viewer)
    wf.permissions.start.principals.append("bob")
    access.check(wf, "start", viewer)
    access.check(wf, "read", viewer)  # whoever may start may read
    with pytest.raises(PermissionDenied):
        access.check(wf, "start", operator)  # the list replaces the defaults
    with pytest.raises(PermissionDenied):
        access.check_create("new", viewer)
    access.check_create("new", operator)


def test_every_example_parses_and_validates() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert any(f.name == "hello.yaml" for f in files)
    names = set()
    kinds: set[str | None] = set()
    for path in files:
        wf = parse_source(path.read_text(encoding="utf-8"), YAML)
        validate_definition(wf)
        assert wf.name == path.stem, f"{path.name}: name should be the file's stem"
        names.add(wf.name)
        kinds.update(step.WhichOneof("kind") for step in wf.steps)
        for step in wf.steps:
            if step.WhichOneof("kind") == "workflow_ref":
                assert step.workflow_ref.workflow_name in {f.stem for f in files}
    assert kinds >= {"atomic", "workflow_ref", "chunked", "govern", "parallel"}


def test_the_documented_example_validates() -> None:
    text = (EXAMPLES.parent / "docs" / "workflows.md").read_text(encoding="utf-8")
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    wf = parse_source(block, YAML)
    validate_definition(wf)
    assert [t.step_path for t in plan(wf)][-2:] == [
        "notify/email/send-email",
        "notify/audit/audit-log",
    ]
