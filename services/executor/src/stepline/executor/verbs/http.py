"""``http.request``: one HTTP call to a host on the executor's allow-list.

Args: ``method`` (default GET), ``url`` (http or https), ``headers`` (names to
strings), ``json`` (any JSON value, sent as JSON) or ``body`` (a string),
``timeout_s`` (for the whole call, default 30), ``fail_on_status`` (default
true: a status outside 2xx fails the step), ``follow_redirects`` (default
false; every hop's host is checked against the allow-list).

Output: ``{"status": int, "headers": {...}, "body": ...}``: header names in
lower case (``set-cookie`` left out: session secrets do not belong in step
outputs), the body parsed when the response says it is JSON, its text
otherwise. Error messages name the method, scheme, host and path, never the
query, credentials or headers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from stepline.api.common.v1 import common_pb2
from stepline.common.errors import ConfigError
from stepline.executor.verbs.arguments import Args, invalid, shown
from stepline.executor.verbs.base import VerbContext, VerbError

NAME = "http.request"
DEFAULT_TIMEOUT_S = 30.0
#: the largest response body kept as a step output
MAX_BODY_BYTES = 1024 * 1024
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_DROPPED_HEADERS = frozenset({"set-cookie"})
_ARGS = (
    "method",
    "url",
    "headers",
    "json",
    "body",
    "timeout_s",
    "fail_on_status",
    "follow_redirects",
)


class HostAllowList:
    """Hosts ``http.request`` may reach: ``api.example.com`` matches that host
    exactly, ``*.example.com`` any host below example.com (not example.com
    itself). Ports are not part of a pattern. Empty: nothing is reachable."""

    def __init__(self, patterns: Sequence[str]) -> None:
        exact: set[str] = set()
        suffixes: set[str] = set()
        for raw in patterns:
            pattern = raw.strip().lower()
            domain = pattern.removeprefix("*.")
            if not domain or "*" in domain or "/" in domain or any(c.isspace() for c in domain):
                raise ConfigError(
                    f"http allowed host {raw!r} is not a host name or '*.domain' pattern"
                )
            if pattern.startswith("*."):
                suffixes.add("." + domain)
            else:
                exact.add(domain)
        self._exact = frozenset(exact)
        self._suffixes = tuple(sorted(suffixes))
        self.patterns = tuple(patterns)

    def allows(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self._exact or any(host.endswith(suffix) for suffix in self._suffixes)


def _shown_url(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"


def _not_allowed(host: str) -> VerbError:
    return VerbError(
        f"{NAME}: host {host!r} is not in the executor's allowed http hosts",
        reason=common_pb2.FAILURE_REASON_VERB_NOT_ALLOWED,
        details={"host": host},
    )


class _Call:
    """One call's checked args."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        parsed = Args(NAME, args, known=_ARGS)
        self.method = parsed.text("method", "GET").upper()
        if self.method not in METHODS:
            raise invalid(
                NAME,
                f"args.method must be one of {', '.join(sorted(METHODS))}, "
                f"got {shown(parsed.raw('method'))}",
            )
        try:
            self.url = httpx.URL(parsed.text("url"))
        except httpx.InvalidURL as error:
            raise invalid(NAME, f"args.url is not a URL: {error}") from None
        if self.url.scheme not in ("http", "https") or not self.url.host:
            raise invalid(NAME, "args.url must be an http or https URL with a host")
        self.headers = parsed.text_mapping("headers", {})
        if parsed.present("json") and parsed.present("body"):
            raise invalid(NAME, "args.json and args.body cannot both be given")
        self.json = parsed.raw("json")
        self.body = parsed.text("body") if parsed.present("body") else None
        self.timeout_s = parsed.positive("timeout_s", DEFAULT_TIMEOUT_S)
        self.fail_on_status = parsed.boolean("fail_on_status", True)
        self.follow_redirects = parsed.boolean("follow_redirects", False)

    @property
    def shown(self) -> str:
        return f"{self.method} {_shown_url(self.url)}"


class HttpRequest:
    """The ``http.request`` verb, bound to one executor's allow-list."""

    def __init__(
        self, *, allowed_hosts: HostAllowList | Sequence[str], max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        if not isinstance(allowed_hosts, HostAllowList):
            allowed_hosts = HostAllowList(allowed_hosts)
        self.allowed_hosts = allowed_hosts
        self.max_body_bytes = max_body_bytes
        # one TLS context for every call: building one costs tens of milliseconds
        self._ssl_context = httpx.create_ssl_context(trust_env=False)

    async def __call__(self, ctx: VerbContext, args: Mapping[str, Any]) -> Mapping[str, Any]:
        call = _Call(args)
        if not self.allowed_hosts.allows(call.url.host):
            raise _not_allowed(call.url.host)
        try:
            async with asyncio.timeout(call.timeout_s):
                status, headers, body = await self._send(call)
        except (TimeoutError, httpx.TimeoutException):
            raise VerbError(
                f"{NAME}: {call.shown} timed out after {call.timeout_s:g}s",
                reason=common_pb2.FAILURE_REASON_TIMEOUT,
            ) from None
        except httpx.HTTPError as error:
            raise VerbError(
                f"{NAME}: {call.shown} failed: {type(error).__name__}: {error}"
            ) from None
        if call.fail_on_status and not 200 <= status < 300:
            excerpt = body if isinstance(body, str) else json.dumps(body)
            raise VerbError(
                f"{NAME}: {call.shown} returned status {status}",
                details={"status": status, "body": excerpt[:1000]},
            )
        return {"status": status, "headers": headers, "body": body}

    async def _send(self, call: _Call) -> tuple[int, dict[str, str], Any]:
        async def check_host(request: httpx.Request) -> None:
            if not self.allowed_hosts.allows(request.url.host):
                raise _not_allowed(request.url.host)

        client = httpx.AsyncClient(
            timeout=call.timeout_s,
            follow_redirects=call.follow_redirects,
            event_hooks={"request": [check_host]},
            trust_env=False,
            verify=self._ssl_context,
        )
        async with (
            client,
            client.stream(
                call.method,
                call.url,
                headers=call.headers,
                json=call.json,
                content=call.body,
            ) as response,
        ):
            content = await self._read(call, response)
            headers = {
                name: value
                for name, value in response.headers.items()
                if name.lower() not in _DROPPED_HEADERS
            }
            return response.status_code, headers, _decode(response, content)

    async def _read(self, call: _Call, response: httpx.Response) -> bytes:
        content = bytearray()
        async for piece in response.aiter_bytes():
            content.extend(piece)
            if len(content) > self.max_body_bytes:
                raise VerbError(
                    f"{NAME}: {call.shown} returned a body over {self.max_body_bytes} bytes"
                )
        return bytes(content)


def _decode(response: httpx.Response, content: bytes) -> Any:
    text = content.decode(response.encoding or "utf-8", errors="replace")
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text
