"""Workflow definitions: parsing YAML/JSON sources, validation, run inputs.

The canonical form of a definition is ``stepline.api.common.v1.WorkflowDefinition``.
YAML and JSON sources are mapped onto it with the proto JSON mapping (field names
as in the proto, durations as ``"30s"``, enums by name); see docs/workflows.md.

:func:`validate_definition` checks everything that can be checked without the
store (whether child workflows exist is checked by
:class:`stepline.scheduler.workflows.WorkflowStore` at registration). Its errors
name the step and the field, e.g. ``steps[2] "charge": atomic.verb "core.nope" is
not in allowed_verbs``; every problem found is reported, joined by ``"; "``.
Templates are parsed by :mod:`stepline.common.templating`, the executor's
syntax. :func:`plan` is :func:`stepline.common.plan.plan`, re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from google.protobuf import duration_pb2, json_format, struct_pb2

from stepline.api.common.v1 import common_pb2, workflow_pb2
from stepline.api.scheduler.v1 import workflow_service_pb2
from stepline.common import templating
from stepline.common.errors import InvalidArgument
from stepline.common.plan import plan as plan  # re-exported: the plan lives in stepline.common
from stepline.common.templating import TemplateError

WorkflowDefinition = workflow_pb2.WorkflowDefinition

# Size limits. A definition is stored and copied onto every run it starts.
MAX_SOURCE_BYTES = 1 << 20
MAX_DEFINITION_BYTES = 1 << 20
MAX_STEPS = 1000
MAX_NESTING = 8
MAX_INPUTS = 100
MAX_ALLOWED_VERBS = 200
MAX_LABELS = 64
MAX_DESCRIPTION = 4096
MAX_PROBLEMS = 20
MAX_REQUIRED_APPROVALS = 100
MAX_CONTEXT_KEYS = 50
# The approvals service refuses requests beyond these (stepline.approvals.policy).
MAX_APPROVERS = 100
MAX_EXPIRY_S = 366 * 24 * 3600

NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,127}$")
STEP_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
INPUT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
VERB_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./-]{0,61}[A-Za-z0-9])?$")
MAX_LABEL_VALUE = 256

_INT64 = 2**63


def _q(value: object) -> str:
    """A value quoted for messages: strings in double quotes, as in JSON."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


# --- sources ---------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML without implicit timestamps (a date stays a string) and with
    duplicate keys refused instead of silently overwritten."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_q(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_source(text: str, fmt: int) -> WorkflowDefinition:
    """Parse YAML or JSON text (``fmt`` is a ``SourceFormat``) into a definition.

    Only the mapping is checked here; call :func:`validate_definition` next.
    """
    if len(text.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise InvalidArgument(f"source_text.text is larger than {MAX_SOURCE_BYTES} bytes")
    document: Any
    if fmt == workflow_service_pb2.SOURCE_FORMAT_YAML:
        try:
            document = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"source_text: invalid YAML: {exc}") from None
    elif fmt == workflow_service_pb2.SOURCE_FORMAT_JSON:
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"source_text: invalid JSON: {exc}") from None
    else:
        raise InvalidArgument("source_text.format must be SOURCE_FORMAT_YAML or SOURCE_FORMAT_JSON")
    if not isinstance(document, dict):
        raise InvalidArgument("source_text: the document must be a mapping of definition fields")
    definition = WorkflowDefinition()
    try:
        json_format.ParseDict(document, definition)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"source_text: {exc}") from None
    definition.version = 0
    return definition


def to_source(definition: WorkflowDefinition, fmt: int) -> str:
    """The definition as YAML or JSON text in the documented format (proto field names)."""
    document = json_format.MessageToDict(definition, preserving_proto_field_name=True)
    if fmt == workflow_service_pb2.SOURCE_FORMAT_YAML:
        return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    if fmt == workflow_service_pb2.SOURCE_FORMAT_JSON:
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    raise InvalidArgument("format must be SOURCE_FORMAT_YAML or SOURCE_FORMAT_JSON")


# --- validation ------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}" if where else message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_PROBLEMS]
        more = len(self.items) - len(shown)
        suffix = f"; and {more} more" if more > 0 else ""
        raise InvalidArgument("; ".join(shown) + suffix)


class _Validator:
    def __init__(self, definition: WorkflowDefinition) -> None:
        self.definition = definition
        self.problems = _Problems()
        self.inputs = {field.name for field in definition.input_schema.fields}
        self.all_ids: set[str] = set()
        self.step_count = 0

    def run(self) -> None:
        d = self.definition
        if not d.name:
            self.problems.add("name", "is required")
        elif not NAME_RE.match(d.name):
            self.problems.add(
                "name",
                f"{_q(d.name)} must be lowercase letters, digits, '_', '-' or '.', "
                "start with a letter and be at most 128 characters",
            )
        if len(d.description) > MAX_DESCRIPTION:
            self.problems.add("description", f"is longer than {MAX_DESCRIPTION} characters")
        if d.ByteSize() > MAX_DEFINITION_BYTES:
            self.problems.add("", f"the definition is larger than {MAX_DEFINITION_BYTES} bytes")
        self.allowed_verbs()
        self.input_schema()
        if d.failure_policy not in workflow_pb2.FailurePolicy.values():
            self.problems.add("failure_policy", f"unknown value {d.failure_policy}")
        self.duration("run_timeout", d.run_timeout if d.HasField("run_timeout") else None)
        self.labels("labels", d.labels)
        self.permissions()
        if not d.steps:
            self.problems.add("steps", "a workflow needs at least one step")
        self.collect_ids(d.steps, "steps", 0)
        if self.step_count > MAX_STEPS:
            self.problems.add("steps", f"more than {MAX_STEPS} steps in all")
        self.step_list(d.steps, "steps", set(), depth=0)
        self.problems.raise_if_any()

    # definition-level fields

    def allowed_verbs(self) -> None:
        entries = self.definition.allowed_verbs
        if len(entries) > MAX_ALLOWED_VERBS:
            self.problems.add("allowed_verbs", f"more than {MAX_ALLOWED_VERBS} entries")
        for index, entry in enumerate(entries):
            name = entry[:-2] if entry.endswith(".*") else entry
            if not VERB_RE.match(name):
                self.problems.add(
                    f"allowed_verbs[{index}]",
                    f"{_q(entry)} must be a verb name (e.g. 'core.echo') or a prefix "
                    "wildcard (e.g. 'core.*')",
                )

    def input_schema(self) -> None:
        fields = self.definition.input_schema.fields
        if len(fields) > MAX_INPUTS:
            self.problems.add("input_schema.fields", f"more than {MAX_INPUTS} inputs")
        seen: set[str] = set()
        for index, field in enumerate(fields):
            where = f"input_schema.fields[{index}] {_q(field.name)}"
            if not INPUT_NAME_RE.match(field.name):
                self.problems.add(
                    where, "name must be letters, digits or '_', not starting with a digit"
                )
            elif field.name in seen:
                self.problems.add(where, f"duplicate input name {_q(field.name)}")
            seen.add(field.name)
            if field.type not in workflow_pb2.InputType.values() or (
                field.type == workflow_pb2.INPUT_TYPE_UNSPECIFIED
            ):
                self.problems.add(where, "type is required (INPUT_TYPE_STRING, _INT, ...)")
            elif field.HasField("default"):
                error = type_error(field.type, field.default)
                if error:
                    self.problems.add(where, f"default {error}")

    def labels(self, where: str, labels: Any) -> None:
        if len(labels) > MAX_LABELS:
            self.problems.add(where, f"more than {MAX_LABELS} labels")
        for key, value in labels.items():
            if not LABEL_KEY_RE.match(key):
                self.problems.add(
                    f"{where}[{_q(key)}]",
                    "key must be 1-63 letters, digits, '_', '.', '/' or '-', "
                    "starting and ending with a letter or digit",
                )
            if len(value) > MAX_LABEL_VALUE:
                self.problems.add(f"{where}[{_q(key)}]", f"value is longer than {MAX_LABEL_VALUE}")

    def permissions(self) -> None:
        permissions = self.definition.permissions
        for action in ("read", "start", "cancel", "define"):
            acl = getattr(permissions, action)
            for index, principal in enumerate(acl.principals):
                if not principal.strip():
                    self.problems.add(f"permissions.{action}.principals[{index}]", "is empty")
            for index, role in enumerate(acl.roles):
                if not role.strip():
                    self.problems.add(f"permissions.{action}.roles[{index}]", "is empty")

    def duration(self, where: str, value: duration_pb2.Duration | None) -> None:
        if value is not None and (value.seconds < 0 or value.nanos < 0):
            self.problems.add(where, "must not be negative")

    # steps

    def collect_ids(self, steps: Sequence[workflow_pb2.Step], where: str, depth: int) -> None:
        """Record every step id (and report duplicates) before templates are checked."""
        for index, step in enumerate(steps):
            self.step_count += 1
            at = f"{where}[{index}] {_q(step.id)}" if step.id else f"{where}[{index}]"
            if not step.id:
                self.problems.add(at, "id is required")
            elif not STEP_ID_RE.match(step.id):
                self.problems.add(
                    at,
                    "id must be lowercase letters, digits, '_' or '-', start with a letter "
                    "and be at most 64 characters",
                )
            elif step.id in self.all_ids:
                self.problems.add(
                    at,
                    f"duplicate step id {_q(step.id)} (ids are unique across "
                    "the whole workflow, parallel branches included)",
                )
            self.all_ids.add(step.id)
            if step.WhichOneof("kind") == "parallel" and depth < MAX_NESTING:
                for b_index, branch in enumerate(step.parallel.branches):
                    self.collect_ids(
                        branch.steps, f"{at}.parallel.branches[{b_index}].steps", depth + 1
                    )

    def step_list(
        self, steps: Sequence[workflow_pb2.Step], where: str, earlier: set[str], *, depth: int
    ) -> set[str]:
        """Validate steps run in sequence after the steps ``earlier``; returns the ids
        that have run once the list is done (``earlier`` plus every step in it)."""
        done = set(earlier)
        for index, step in enumerate(steps):
            at = f"{where}[{index}] {_q(step.id)}" if step.id else f"{where}[{index}]"
            done = self.step(step, at, done, depth=depth)
        self.device_spans(steps, where)
        return done

    def step(self, step: workflow_pb2.Step, at: str, earlier: set[str], *, depth: int) -> set[str]:
        kind = step.WhichOneof("kind")
        self.duration(f"{at}: timeout", step.timeout if step.HasField("timeout") else None)
        if step.HasField("retry"):
            self.retry(step.retry, at)
        if step.HasField("device"):
            self.device(step.device, at, earlier)
        done = set(earlier)
        if kind is None:
            self.problems.add(
                at, "exactly one of atomic, workflow_ref, chunked, govern, parallel is required"
            )
        elif kind == "atomic":
            self.verb(step.atomic.verb, f"{at}: atomic.verb")
            self.templates(step.atomic.args, f"{at}: atomic.args", earlier)
        elif kind == "workflow_ref":
            self.workflow_ref(step.workflow_ref, at, earlier)
        elif kind == "chunked":
            self.chunked(step.chunked, at, earlier)
        elif kind == "govern":
            self.govern(step, at, earlier)
        else:
            done |= self.parallel(step, at, earlier, depth=depth)
        done.add(step.id)
        return done

    def verb(self, verb: str, where: str) -> None:
        if not verb:
            self.problems.add(where, "is required")
        elif not VERB_RE.match(verb):
            self.problems.items.append(f"{where} {_q(verb)} is not a verb name (e.g. 'core.echo')")
        elif not verb_allowed(verb, self.definition.allowed_verbs):
            hint = "" if self.definition.allowed_verbs else " (allowed_verbs is empty)"
            self.problems.items.append(f"{where} {_q(verb)} is not in allowed_verbs{hint}")

    def workflow_ref(self, ref: workflow_pb2.WorkflowRef, at: str, earlier: set[str]) -> None:
        if not ref.workflow_name:
            self.problems.add(f"{at}: workflow_ref.workflow_name", "is required")
        elif not NAME_RE.match(ref.workflow_name):
            self.problems.add(
                f"{at}: workflow_ref.workflow_name",
                f"{_q(ref.workflow_name)} is not a workflow name",
            )
        elif ref.workflow_name == self.definition.name:
            self.problems.add(f"{at}: workflow_ref.workflow_name", "a workflow may not run itself")
        if ref.version < 0:
            self.problems.add(f"{at}: workflow_ref.version", "must not be negative (0 = latest)")
        self.templates(ref.inputs, f"{at}: workflow_ref.inputs", earlier)

    def chunked(self, chunked: workflow_pb2.ChunkedDispatch, at: str, earlier: set[str]) -> None:
        self.verb(chunked.generator_verb, f"{at}: chunked.generator_verb")
        self.verb(chunked.chunk_verb, f"{at}: chunked.chunk_verb")
        for name in ("max_concurrency", "tolerated_failures", "max_chunks"):
            if getattr(chunked, name) < 0:
                self.problems.add(f"{at}: chunked.{name}", "must not be negative")
        self.templates(chunked.generator_args, f"{at}: chunked.generator_args", earlier)
        self.templates(chunked.chunk_args, f"{at}: chunked.chunk_args", earlier, chunk=True)

    def govern(self, step: workflow_pb2.Step, at: str, earlier: set[str]) -> None:
        govern = step.govern
        policy = govern.policy
        where = f"{at}: govern.policy"
        if not policy.approver_principals and not policy.approver_roles:
            self.problems.add(
                where, "approver_principals or approver_roles is required (who may approve)"
            )
        for name in ("approver_principals", "approver_roles"):
            if len(getattr(policy, name)) > MAX_APPROVERS:
                self.problems.add(f"{where}.{name}", f"more than {MAX_APPROVERS} entries")
            seen: set[str] = set()
            for index, value in enumerate(getattr(policy, name)):
                if not value.strip():
                    self.problems.add(f"{where}.{name}[{index}]", "is empty")
                elif value in seen:
                    self.problems.add(f"{where}.{name}[{index}]", f"duplicate {_q(value)}")
                seen.add(value)
        if policy.required_approvals < 0:
            self.problems.add(f"{where}.required_approvals", "must not be negative (0 means 1)")
        elif policy.required_approvals > MAX_REQUIRED_APPROVALS:
            self.problems.add(
                f"{where}.required_approvals", f"must be at most {MAX_REQUIRED_APPROVALS}"
            )
        elif (
            not policy.approver_roles
            and policy.approver_principals
            and policy.required_approvals > len(set(policy.approver_principals))
        ):
            self.problems.add(
                f"{where}.required_approvals",
                f"{policy.required_approvals} approvals can never be reached by "
                f"{len(set(policy.approver_principals))} approver principals",
            )
        if policy.HasField("expiry"):
            self.duration(f"{where}.expiry", policy.expiry)
            expiry_s = policy.expiry.ToTimedelta().total_seconds()
            if expiry_s == 0:
                self.problems.add(
                    f"{where}.expiry", "must be longer than 0s (leave it unset for no expiry)"
                )
            elif expiry_s > MAX_EXPIRY_S:
                self.problems.add(f"{where}.expiry", "must be at most 366 days (31622400s)")
        if policy.expiry_outcome not in workflow_pb2.ApprovalExpiryOutcome.values():
            self.problems.add(f"{where}.expiry_outcome", f"unknown value {policy.expiry_outcome}")
        if len(govern.context_keys) > MAX_CONTEXT_KEYS:
            self.problems.add(f"{at}: govern.context_keys", f"more than {MAX_CONTEXT_KEYS} keys")
        keys: set[str] = set()
        for index, key in enumerate(govern.context_keys):
            here = f"{at}: govern.context_keys[{index}]"
            if key in keys:
                self.problems.add(here, f"duplicate key {_q(key)}")
            keys.add(key)
            self.reference(key, here, earlier, chunk=False)
        if step.HasField("retry"):
            self.problems.add(
                f"{at}: retry", "is not supported on a govern step (a decision is not retried)"
            )
        if step.HasField("device"):
            self.problems.add(
                f"{at}: device",
                "is not supported on a govern step: it uses no device (hold_device keeps the "
                "device of an enclosing span)",
            )

    def parallel(
        self, step: workflow_pb2.Step, at: str, earlier: set[str], *, depth: int
    ) -> set[str]:
        if depth + 1 > MAX_NESTING:
            self.problems.add(at, f"parallel groups are nested deeper than {MAX_NESTING}")
            return set()
        for name in ("retry", "device"):
            if step.HasField(name):
                self.problems.add(f"{at}: {name}", "is not supported on a parallel group")
        if not step.parallel.branches:
            self.problems.add(f"{at}: parallel.branches", "a parallel group needs a branch")
        joined: set[str] = set()
        branch_ids: set[str] = set()
        for index, branch in enumerate(step.parallel.branches):
            where = f"{at}: parallel.branches[{index}] {_q(branch.id)}"
            if not STEP_ID_RE.match(branch.id):
                self.problems.add(
                    where, "id must be lowercase letters, digits, '_' or '-', start with a letter"
                )
            elif branch.id in branch_ids:
                self.problems.add(where, f"duplicate branch id {_q(branch.id)}")
            branch_ids.add(branch.id)
            if not branch.steps:
                self.problems.add(where, "a branch needs at least one step")
            # A branch sees the steps before the group and its own earlier steps,
            # never its sibling branches (they run concurrently).
            joined |= self.step_list(
                branch.steps, f"{at}.parallel.branches[{index}].steps", earlier, depth=depth + 1
            )
        return joined

    def retry(self, retry: workflow_pb2.RetryPolicy, at: str) -> None:
        where = f"{at}: retry"
        if retry.max_attempts < 0:
            self.problems.add(f"{where}.max_attempts", "must not be negative")
        for name in ("initial_backoff", "max_backoff"):
            self.duration(f"{where}.{name}", getattr(retry, name) if retry.HasField(name) else None)
        if (
            retry.HasField("initial_backoff")
            and retry.HasField("max_backoff")
            and retry.max_backoff.ToTimedelta() < retry.initial_backoff.ToTimedelta()
        ):
            self.problems.add(f"{where}.max_backoff", "is shorter than initial_backoff")
        multiplier = retry.backoff_multiplier
        if not math.isfinite(multiplier) or (multiplier != 0 and multiplier < 1):
            self.problems.add(f"{where}.backoff_multiplier", "must be at least 1 (0 means 2.0)")
        for index, reason in enumerate(retry.retry_on):
            if reason == common_pb2.FAILURE_REASON_UNSPECIFIED or (
                reason not in common_pb2.FailureReason.values()
            ):
                self.problems.add(
                    f"{where}.retry_on[{index}]", f"is not a failure reason: {reason}"
                )

    def device(self, device: workflow_pb2.DeviceRequirement, at: str, earlier: set[str]) -> None:
        self.labels(f"{at}: device.labels", device.labels)
        self.template_string(device.account, f"{at}: device.account", earlier, chunk=False)

    def device_spans(self, steps: Sequence[workflow_pb2.Step], where: str) -> None:
        ids = [step.id for step in steps]
        for index, step in enumerate(steps):
            until = step.device.span_until_step_id if step.HasField("device") else ""
            if not until:
                continue
            at = f"{where}[{index}] {_q(step.id)}: device.span_until_step_id"
            if until not in ids[index + 1 :]:
                self.problems.add(at, f"{_q(until)} is not a later step in the same step list")
                continue
            end = ids.index(until, index + 1)
            for inner in steps[index + 1 : end + 1]:
                if inner.HasField("device"):
                    self.problems.add(
                        at,
                        f"step {_q(inner.id)} inside the device span declares its own device",
                    )

    # templates

    def templates(
        self, args: struct_pb2.Struct, where: str, earlier: set[str], *, chunk: bool = False
    ) -> None:
        for path, text in templating.strings(json_format.MessageToDict(args)):
            self.template_string(text, f"{where}.{path}", earlier, chunk=chunk)

    def template_string(self, text: str, where: str, earlier: set[str], *, chunk: bool) -> None:
        try:
            found = templating.placeholders(text)
        except TemplateError as exc:
            self.problems.add(where, exc.message)
            return
        for placeholder in found:
            self.reference(placeholder.path, where, earlier, chunk=chunk)

    def reference(self, path: str, where: str, earlier: set[str], *, chunk: bool) -> None:
        try:
            templating.check_reference(path)
        except TemplateError as exc:
            self.problems.add(where, exc.message)
            return
        root, _, rest = path.partition(".")
        name = rest.split(".", 1)[0]
        if root == "inputs":
            if name not in self.inputs:
                self.problems.add(where, f"{{{{ {path} }}}} refers to undeclared input {_q(name)}")
        elif root == "steps":
            if name in earlier:
                return
            if name in self.all_ids:
                self.problems.add(
                    where,
                    f"{{{{ {path} }}}} refers to step {_q(name)}, which does not run before "
                    "this step",
                )
            else:
                self.problems.add(where, f"{{{{ {path} }}}} refers to unknown step {_q(name)}")
        elif not chunk:
            self.problems.add(
                where, f"{{{{ {path} }}}}: {root}.* is only available in chunked.chunk_args"
            )


def verb_allowed(verb: str, allowed: Sequence[str]) -> bool:
    """Whether ``verb`` matches an entry exactly or a ``prefix.*`` wildcard."""
    for entry in allowed:
        if entry == verb or (entry.endswith(".*") and verb.startswith(entry[:-1])):
            return True
    return False


def validate_definition(definition: WorkflowDefinition) -> None:
    """Raise InvalidArgument listing every problem, each naming its step and field."""
    _Validator(definition).run()


def locate_steps(
    steps: Sequence[workflow_pb2.Step], where: str = "steps"
) -> Iterator[tuple[str, workflow_pb2.Step]]:
    """Every step with its location as validation errors name it, in plan order."""
    for index, step in enumerate(steps):
        at = f"{where}[{index}] {_q(step.id)}"
        yield at, step
        if step.WhichOneof("kind") == "parallel":
            for b_index, branch in enumerate(step.parallel.branches):
                yield from locate_steps(branch.steps, f"{at}.parallel.branches[{b_index}].steps")


def workflow_refs(definition: WorkflowDefinition) -> list[tuple[str, workflow_pb2.WorkflowRef]]:
    """Every WorkflowRef of the definition with its step's location, in plan order."""
    return [
        (at, step.workflow_ref)
        for at, step in locate_steps(definition.steps)
        if step.WhichOneof("kind") == "workflow_ref"
    ]


# --- inputs ----------------------------------------------------------------


def type_error(input_type: int, value: struct_pb2.Value) -> str | None:
    """Why ``value`` does not have ``input_type``; None if it does."""
    kind = value.WhichOneof("kind")
    if input_type == workflow_pb2.INPUT_TYPE_JSON:
        return None if kind is not None else "must be set"
    if input_type == workflow_pb2.INPUT_TYPE_STRING and kind == "string_value":
        return None
    if input_type == workflow_pb2.INPUT_TYPE_BOOL and kind == "bool_value":
        return None
    if input_type == workflow_pb2.INPUT_TYPE_FLOAT and kind == "number_value":
        return None if math.isfinite(value.number_value) else "must be a finite number"
    if input_type == workflow_pb2.INPUT_TYPE_INT and kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and -_INT64 <= number < _INT64:
            return None
        return f"must be an integer, got {_q(number)}"
    expected = (
        workflow_pb2.InputType.Name(workflow_pb2.InputType.ValueType(input_type))
        .removeprefix("INPUT_TYPE_")
        .lower()
    )
    got = _kind_names.get(kind or "", "nothing")
    return f"must be {expected}, got {got}"


_kind_names = {
    "null_value": "null",
    "number_value": "a number",
    "string_value": "a string",
    "bool_value": "a bool",
    "struct_value": "an object",
    "list_value": "a list",
}


def validate_inputs(definition: WorkflowDefinition, inputs: struct_pb2.Struct) -> struct_pb2.Struct:
    """The run's inputs with defaults applied; InvalidArgument naming the input otherwise."""
    fields = {field.name: field for field in definition.input_schema.fields}
    problems = _Problems()
    for name in inputs.fields:
        if name not in fields:
            declared = ", ".join(sorted(fields)) or "none"
            problems.add(
                f"inputs.{name}",
                f"is not an input of workflow {_q(definition.name)} (declared: {declared})",
            )
    result = struct_pb2.Struct()
    for name, field in fields.items():
        if name in inputs.fields:
            error = type_error(field.type, inputs.fields[name])
            if error:
                problems.add(f"inputs.{name}", error)
            result.fields[name].CopyFrom(inputs.fields[name])
        elif field.HasField("default"):
            result.fields[name].CopyFrom(field.default)
        elif field.required:
            problems.add(f"inputs.{name}", "is required")
    problems.raise_if_any()
    return result


def digest(definition: WorkflowDefinition) -> str:
    """Hex SHA-256 of the deterministic serialization with the version cleared."""
    copy = WorkflowDefinition()
    copy.CopyFrom(definition)
    copy.version = 0
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()
