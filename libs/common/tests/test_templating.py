"""Template syntax shared by the scheduler's validation and the executor's renderer.

Rendering itself (types, nesting, lookups) is tested through the executor's
verbs in services/executor/tests/test_verbs.py.
"""

from __future__ import annotations

import pytest

from stepline.common.errors import InvalidArgument
from stepline.common.templating import (
    Placeholder,
    TemplateError,
    check_reference,
    check_template,
    placeholders,
    render,
    strings,
)


def test_placeholders_positions_and_paths() -> None:
    text = "a {{ inputs.x }}-{{steps.y.z}}"
    assert placeholders(text) == [Placeholder(2, 16, "inputs.x"), Placeholder(17, 30, "steps.y.z")]
    assert placeholders("no placeholders") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{{ inputs.x", "'{{' without a closing '}}'"),
        ("{{ {{ inputs.x }}", "malformed placeholder '{{ {{ inputs.x }}'"),
        ("{{ a }} {{ b {{ c }}", "malformed placeholder '{{ b {{ c }}'"),
        ("{{ inputs x }}", "malformed placeholder '{{ inputs x }}'"),
        ("{{ }}", "malformed placeholder '{{ }}'"),
    ],
)
def test_placeholders_refuse_bad_syntax(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        placeholders(text)
    assert caught.value.message.startswith(message)
    assert isinstance(caught.value, InvalidArgument)


def test_check_reference() -> None:
    for path in ("inputs.x", "steps.a.b.0", "record.k", "chunk.record.k", "chunk.index"):
        check_reference(path)
    for path, message in [
        ("run.run_id", "unknown reference 'run.run_id' (a reference starts with one of"),
        ("chunk.other", "unknown reference 'chunk.other' (chunk offers chunk.record and"),
        ("inputs x", "'inputs x' is not a dotted name"),
    ]:
        with pytest.raises(TemplateError) as caught:
            check_reference(path)
        assert caught.value.message.startswith(message), path


def test_strings_locations() -> None:
    value = {"a": ["x", {"b": "y"}], "c": 1, "d": "z"}
    assert list(strings(value)) == [("a[0]", "x"), ("a[1].b", "y"), ("d", "z")]


def test_check_template_and_render_name_the_template() -> None:
    assert check_template({"a": ["{{ inputs.x }}-{{steps.y.z}}", "{{ inputs.x }}"], "b": 1}) == [
        "inputs.x",
        "steps.y.z",
    ]
    with pytest.raises(TemplateError) as caught:
        check_template(["{{ env.HOME }}"])
    assert caught.value.message.startswith("template '{{ env.HOME }}': unknown reference")
    assert render("n={{ inputs.n }}", inputs={"n": 3.0}, outputs={}) == "n=3"
