"""Verbs: built-ins, templating, the registry's least-privilege checks, plugins, http.request."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import types
from collections.abc import AsyncIterator, Mapping
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from stepline.api.common.v1 import common_pb2
from stepline.common.errors import ConfigError
from stepline.executor.verbs import (
    ENTRY_POINT_GROUP,
    HostAllowList,
    HttpRequest,
    VerbContext,
    VerbError,
    VerbRegistry,
    check_template,
    render,
)

INVALID = common_pb2.FAILURE_REASON_INVALID_INPUT
NOT_ALLOWED = common_pb2.FAILURE_REASON_VERB_NOT_ALLOWED
NOT_FOUND = common_pb2.FAILURE_REASON_VERB_NOT_FOUND


def context(**changes: Any) -> VerbContext:
    values: dict[str, Any] = {
        "run_id": "run-1",
        "task_id": "run-1/step",
        "step_id": "step",
        "attempt_number": 1,
        "workflow_name": "wf",
        "inputs": {},
        "outputs": {},
    }
    values.update(changes)
    return VerbContext(**values)


@pytest.fixture
def registry() -> VerbRegistry:
    return VerbRegistry.default(http_allowed_hosts=["127.0.0.1"], plugins=[])


async def call(
    registry: VerbRegistry, name: str, args: Mapping[str, Any], **ctx: Any
) -> Mapping[str, Any]:
    verb = registry.resolve(name, allowed=[name])
    return await verb(context(**ctx), args)


async def generate(
    registry: VerbRegistry, name: str, args: Mapping[str, Any]
) -> list[Mapping[str, Any]]:
    verb = registry.resolve_generator(name, allowed=[name])
    return await verb(context(), args)


# --- core verbs --------------------------------------------------------------------


async def test_noop_and_echo(registry: VerbRegistry) -> None:
    assert await call(registry, "core.noop", {}) == {}
    args = {"a": 1.0, "nested": {"b": [True, None]}}
    assert await call(registry, "core.echo", args) == args


async def test_unknown_args_are_refused(registry: VerbRegistry) -> None:
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.noop", {"x": 1})
    assert caught.value.reason == INVALID
    assert caught.value.message == "core.noop: unknown args x (accepted: none)"


async def test_sleep_returns_and_heartbeats(registry: VerbRegistry) -> None:
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        beats += 1

    out = await call(
        registry, "core.sleep", {"seconds": 0.05, "heartbeat_s": 0.01}, heartbeat=heartbeat
    )
    assert out == {"slept": 0.05}
    assert beats >= 1
    assert await call(registry, "core.sleep", {"seconds": 0}) == {"slept": 0.0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"seconds": "x"}, 'core.sleep: args.seconds must be a non-negative number, got "x"'),
        ({"seconds": -1}, "core.sleep: args.seconds must be a non-negative number, got -1"),
        ({"seconds": True}, "core.sleep: args.seconds must be a non-negative number, got true"),
        ({}, "core.sleep: args.seconds is required"),
        (
            {"seconds": 1, "heartbeat_s": 0},
            "core.sleep: args.heartbeat_s must be a positive number, got 0",
        ),
    ],
)
async def test_sleep_bad_args(registry: VerbRegistry, args: dict[str, Any], message: str) -> None:
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.sleep", args)
    assert caught.value.reason == INVALID
    assert caught.value.message == message


async def test_sleep_stops_at_once_when_cancelled(registry: VerbRegistry) -> None:
    assert registry.is_cancellable("core.sleep")
    task = asyncio.create_task(call(registry, "core.sleep", {"seconds": 60}))
    await asyncio.sleep(0)  # let it start sleeping
    loop = asyncio.get_running_loop()
    started = loop.time()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.time() - started < 1.0


async def test_fail_raises_with_reason(registry: VerbRegistry) -> None:
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.fail", {"message": "no luck"})
    assert (caught.value.message, caught.value.reason) == (
        "no luck",
        common_pb2.FAILURE_REASON_VERB_ERROR,
    )
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.fail", {"message": "slow", "reason": "timeout"})
    assert caught.value.reason == common_pb2.FAILURE_REASON_TIMEOUT
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.fail", {"message": "m", "reason": "FAILURE_REASON_REJECTED"})
    assert caught.value.reason == common_pb2.FAILURE_REASON_REJECTED
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.fail", {"message": "m", "reason": "bogus"})
    assert caught.value.reason == INVALID
    assert caught.value.message.startswith('core.fail: args.reason "bogus" is not one of ')
    with pytest.raises(VerbError) as caught:
        await call(registry, "core.fail", {})
    assert caught.value.message == "core.fail: args.message is required"


async def test_generators(registry: VerbRegistry) -> None:
    assert registry.is_generator("core.range") and registry.is_generator("core.items")
    assert not registry.is_generator("core.noop")
    assert await generate(registry, "core.range", {"count": 3.0, "start": 10}) == [
        {"index": 0, "value": 10},
        {"index": 1, "value": 11},
        {"index": 2, "value": 12},
    ]
    assert await generate(registry, "core.range", {"count": 0}) == []
    assert await generate(registry, "core.items", {"items": ["a", {"b": 1}]}) == [
        {"index": 0, "item": "a"},
        {"index": 1, "item": {"b": 1}},
    ]
    with pytest.raises(VerbError) as caught:
        await generate(registry, "core.range", {"count": 2.5})
    assert caught.value.message == "core.range: args.count must be an integer, got 2.5"
    with pytest.raises(VerbError) as caught:
        await generate(registry, "core.items", {"items": "abc"})
    assert caught.value.message == 'core.items: args.items must be a list, got "abc"'
    with pytest.raises(VerbError) as caught:
        registry.resolve_generator("core.noop", allowed=["core.*"])
    assert caught.value.reason == INVALID


# --- templating --------------------------------------------------------------------


def test_render_keeps_types_and_nests() -> None:
    inputs = {"count": 3.0, "user": {"email": "a@b.c"}, "tags": ["x", "y"]}
    outputs = {"fetch": {"status": 200, "body": {"id": 7}}}
    args = {
        "n": "{{ inputs.count }}",
        "user": "{{inputs.user}}",
        "line": "to {{ inputs.user.email }} ({{ inputs.count }}) {{ steps.fetch.body }}",
        "list": ["{{ steps.fetch.status }}", {"deep": "{{ inputs.tags.1 }}"}],
        "plain": 5,
        "{{ inputs.count }}": "keys are not rendered",
    }
    assert render(args, inputs=inputs, outputs=outputs) == {
        "n": 3.0,
        "user": {"email": "a@b.c"},
        "line": 'to a@b.c (3) {"id":7}',
        "list": [200, {"deep": "y"}],
        "plain": 5,
        "{{ inputs.count }}": "keys are not rendered",
    }


def test_render_record_and_chunk() -> None:
    record = {"index": 2, "item": {"sku": "A-1"}}
    args = {"sku": "{{ record.item.sku }}", "same": "{{ chunk.record.index }}"}
    assert render(args, inputs={}, outputs={}, record=record) == {"sku": "A-1", "same": 2}
    assert render("{{ chunk.index }}", inputs={}, outputs={}, record={}, chunk_index=4) == 4


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ inputs.nope }}", "unknown reference 'inputs.nope': inputs has no 'nope'"),
        (
            "{{ steps.later.x }}",
            "unknown reference 'steps.later.x': no output of a step 'later' "
            "(only earlier steps' outputs can be referenced)",
        ),
        ("{{ record.x }}", "unknown reference 'record.x': not rendering a chunk"),
        (
            "{{ inputs.tags.5 }}",
            "unknown reference 'inputs.tags.5': inputs.tags is a list of 2, no index '5'",
        ),
        (
            "{{ inputs.name.first }}",
            "unknown reference 'inputs.name.first': inputs.name is a str, not a mapping or list",
        ),
        (
            "x {{ secrets.key }}",
            "template 'x {{ secrets.key }}': unknown reference 'secrets.key' "
            "(a reference starts with one of inputs, steps, record, chunk)",
        ),
    ],
)
def test_render_unknown_reference(template: str, message: str) -> None:
    with pytest.raises(VerbError) as caught:
        render(
            {"a": [template]},
            inputs={"tags": ["x", "y"], "name": "ann"},
            outputs={"fetch": {}},
        )
    assert caught.value.reason == INVALID
    assert caught.value.message == message


def test_check_template() -> None:
    value = {
        "a": "{{ inputs.x }} and {{ steps.s1.out }}",
        "b": ["{{ inputs.x }}", {"c": "{{ record.id }}"}],
        "d": 3,
    }
    assert check_template(value) == ["inputs.x", "steps.s1.out", "record.id"]
    assert check_template("no placeholders") == []
    for bad in ("{{ inputs.x", "{{ }}", "{{ a b }}", "{{ env.HOME }}", "{{ chunk.other }}"):
        with pytest.raises(VerbError) as caught:
            check_template({"k": bad})
        assert caught.value.reason == INVALID, bad


# --- registry ----------------------------------------------------------------------


def test_resolve_checks_allowed_then_registered(registry: VerbRegistry) -> None:
    assert registry.resolve("core.noop", allowed=["core.noop"]) is not None
    assert registry.resolve("core.sleep", allowed=["http.request", "core.*"]) is not None
    with pytest.raises(VerbError) as caught:
        registry.resolve("core.sleep", allowed=["core.noop", "core", "core.sleep.*", "*"])
    assert caught.value.reason == NOT_ALLOWED
    assert "core.sleep" in caught.value.message
    with pytest.raises(VerbError) as caught:
        registry.resolve("corex.noop", allowed=["core.*"])
    assert caught.value.reason == NOT_ALLOWED
    with pytest.raises(VerbError) as caught:
        registry.resolve("core.nope", allowed=["core.*"])
    assert caught.value.reason == NOT_FOUND
    assert caught.value.message == "no verb 'core.nope' is registered on this executor"
    with pytest.raises(VerbError) as caught:
        registry.is_cancellable("core.nope")
    assert caught.value.reason == NOT_FOUND


def test_register_refuses_bad_or_duplicate_names(registry: VerbRegistry) -> None:
    async def verb(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {}

    with pytest.raises(ConfigError, match="already registered"):
        registry.register("core.noop", verb)
    with pytest.raises(ConfigError, match="dotted lower-case"):
        registry.register("Noop", verb)
    registry.register("acme.slow", verb, cancellable=False)
    assert not registry.is_cancellable("acme.slow")


def test_host_allow_list() -> None:
    hosts = HostAllowList(["api.example.com", "*.Corp.example", "127.0.0.1"])
    assert hosts.allows("api.example.com") and hosts.allows("API.example.com.")
    assert hosts.allows("a.corp.example") and hosts.allows("a.b.corp.example")
    assert not hosts.allows("corp.example")
    assert not hosts.allows("evilcorp.example")
    assert not hosts.allows("api.example.com.evil")
    assert hosts.allows("127.0.0.1") and not hosts.allows("localhost")
    assert not HostAllowList([]).allows("127.0.0.1")
    for bad in ("", "*", "*.", "a.*.b", "http://x"):
        with pytest.raises(ConfigError):
            HostAllowList([bad])


# --- plugins -----------------------------------------------------------------------


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch) -> str:
    module = types.ModuleType("stepline_test_plugin")

    async def ping(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"pong": args.get("n")}

    async def pages(ctx: VerbContext, args: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return [{"page": 1}]

    pages.generator = True  # type: ignore[attr-defined]

    class Counter:
        cancellable = False

        async def __call__(self, ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
            return {"count": 1}

    def not_async(ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {}

    module.ping = ping  # type: ignore[attr-defined]
    module.pages = pages  # type: ignore[attr-defined]
    module.counter = Counter()  # type: ignore[attr-defined]
    module.not_async = not_async  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def entry(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


async def test_plugins_load_and_bad_ones_are_skipped(
    plugin_module: str, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = [
        entry("acme.ping", f"{plugin_module}:ping"),
        entry("acme.pages", f"{plugin_module}:pages"),
        entry("acme.counter", f"{plugin_module}:counter"),
        entry("acme.missing", "stepline_no_such_module:verb"),
        entry("acme.sync", f"{plugin_module}:not_async"),
        entry("core.ping", f"{plugin_module}:ping"),
        entry("acme.ping", f"{plugin_module}:counter"),
        entry("NotDotted", f"{plugin_module}:ping"),
    ]
    with caplog.at_level(logging.ERROR, logger="stepline.executor.verbs.registry"):
        registry = VerbRegistry.default(plugins=plugins)
    verb = registry.resolve("acme.ping", allowed=["acme.*"])
    assert await verb(context(), {"n": 2}) == {"pong": 2}
    assert registry.is_generator("acme.pages")
    assert not registry.is_cancellable("acme.counter")
    assert "acme.missing" not in registry and "acme.sync" not in registry
    assert "core.ping" not in registry
    assert "core.noop" in registry
    skipped = [record.getMessage() for record in caplog.records]
    assert len(skipped) == 5
    assert skipped[0].startswith(
        "skipping verb plugin 'acme.missing' (stepline_no_such_module:verb): ModuleNotFoundError"
    )
    assert "is not an async callable" in skipped[1]
    assert "the namespace 'core' is reserved for built-in verbs" in skipped[2]
    assert "verb 'acme.ping' is already registered" in skipped[3]
    assert "dotted lower-case" in skipped[4]


# --- http.request --------------------------------------------------------------------


class HttpServer:
    """A tiny HTTP/1.1 server on 127.0.0.1:0 (one request per connection)."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.strip().split("\r\n")
        method, target, _ = request_line.split(" ")
        headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append({"method": method, "path": target, "headers": headers})
        if target == "/hang":
            await reader.read()  # answers nothing; returns when the client gives up
            writer.close()
            return
        status, content_type, content, extra = self.route(method, target, headers, body)
        lines = [
            f"HTTP/1.1 {status} X",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(content)}",
            "Connection: close",
            *extra,
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + content)
        await writer.drain()
        writer.close()

    def route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes, list[str]]:
        if target.startswith("/json"):
            echoed = {
                "method": method,
                "path": target,
                "token": headers.get("x-token"),
                "body": body.decode(),
            }
            return 201, "application/json", json.dumps(echoed).encode(), ["Set-Cookie: s=1"]
        path = target.split("?", 1)[0]
        if path == "/fail":
            return 503, "text/plain; charset=utf-8", b"down for maintenance", []
        if path == "/redirect":
            return 302, "text/plain", b"", [f"Location: http://localhost:{self.port}/text"]
        if path == "/big":
            return 200, "text/plain", b"x" * 5000, []
        return 200, "text/plain; charset=utf-8", "héllo".encode(), []


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    server = HttpServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


async def test_http_request_json_and_text(registry: VerbRegistry, http_server: HttpServer) -> None:
    base = f"http://127.0.0.1:{http_server.port}"
    out = await call(
        registry,
        "http.request",
        {
            "method": "post",
            "url": f"{base}/json?q=1",
            "headers": {"X-Token": "t0k"},
            "json": {"a": 1},
        },
    )
    assert out["status"] == 201
    assert out["body"] == {
        "method": "POST",
        "path": "/json?q=1",
        "token": "t0k",
        "body": '{"a":1}',
    }
    assert out["headers"]["content-type"] == "application/json"
    assert "set-cookie" not in out["headers"]
    text = await call(registry, "http.request", {"url": f"{base}/text", "body": "raw"})
    assert (text["status"], text["body"]) == (200, "héllo")
    assert http_server.requests[-1]["method"] == "GET"


async def test_http_request_non_2xx(registry: VerbRegistry, http_server: HttpServer) -> None:
    url = f"http://127.0.0.1:{http_server.port}/fail?token=secret"
    with pytest.raises(VerbError) as caught:
        await call(registry, "http.request", {"url": url})
    error = caught.value
    assert error.reason == common_pb2.FAILURE_REASON_VERB_ERROR
    assert error.message == (
        f"http.request: GET http://127.0.0.1:{http_server.port}/fail returned status 503"
    )
    assert error.details == {"status": 503, "body": "down for maintenance"}
    out = await call(registry, "http.request", {"url": url, "fail_on_status": False})
    assert (out["status"], out["body"]) == (503, "down for maintenance")


async def test_http_request_refuses_hosts_off_the_list(
    registry: VerbRegistry, http_server: HttpServer
) -> None:
    with pytest.raises(VerbError) as caught:
        await call(registry, "http.request", {"url": f"http://localhost:{http_server.port}/"})
    assert caught.value.reason == NOT_ALLOWED
    assert caught.value.message == (
        "http.request: host 'localhost' is not in the executor's allowed http hosts"
    )
    assert http_server.requests == []
    redirect = f"http://127.0.0.1:{http_server.port}/redirect"
    with pytest.raises(VerbError) as caught:
        await call(registry, "http.request", {"url": redirect, "follow_redirects": True})
    assert caught.value.reason == NOT_ALLOWED
    assert len(http_server.requests) == 1
    out = await call(registry, "http.request", {"url": redirect, "fail_on_status": False})
    assert out["status"] == 302


async def test_http_request_bad_args_and_limits(
    registry: VerbRegistry, http_server: HttpServer
) -> None:
    base = f"http://127.0.0.1:{http_server.port}"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "ftp://127.0.0.1/x"}, "http.request: args.url must be an http or https URL"),
        ({"url": base, "method": "BREW"}, "http.request: args.method must be one of"),
        ({"url": base, "json": {}, "body": "x"}, "http.request: args.json and args.body"),
        ({"url": base, "headers": {"a": 1}}, "http.request: args.headers must map names"),
        ({"url": base, "timeout_s": 0}, "http.request: args.timeout_s must be a positive"),
        ({}, "http.request: args.url is required"),
    ]
    for args, prefix in cases:
        with pytest.raises(VerbError) as caught:
            await call(registry, "http.request", args)
        assert caught.value.reason == INVALID
        assert caught.value.message.startswith(prefix), caught.value.message
    small = VerbRegistry()
    small.register("http.request", HttpRequest(allowed_hosts=["127.0.0.1"], max_body_bytes=100))
    with pytest.raises(VerbError, match="returned a body over 100 bytes"):
        await call(small, "http.request", {"url": f"{base}/big"})


async def test_http_request_connection_refused(registry: VerbRegistry) -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(VerbError) as caught:
        await call(registry, "http.request", {"url": f"http://127.0.0.1:{port}/x?k=secret"})
    assert caught.value.reason == common_pb2.FAILURE_REASON_VERB_ERROR
    assert caught.value.message.startswith(
        f"http.request: GET http://127.0.0.1:{port}/x failed: ConnectError"
    )
    assert "secret" not in caught.value.message


async def test_http_request_times_out(registry: VerbRegistry, http_server: HttpServer) -> None:
    url = f"http://127.0.0.1:{http_server.port}/hang"
    with pytest.raises(VerbError) as caught:
        await call(registry, "http.request", {"url": url, "timeout_s": 0.2})
    assert caught.value.reason == common_pb2.FAILURE_REASON_TIMEOUT
    assert caught.value.message == f"http.request: GET {url} timed out after 0.2s"
