"""Routes that answer by themselves (direct_response, redirect) and path rewrites toward the
upstream: the checks, the decisions, and the bytes through the real router."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from router.rules import RequestView, Snapshot, check_text, decide, load_snapshot_text

HEAD = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v2: {endpoints: ["127.0.0.1:9002"]}
user_id:
  - header: X-User-Id
routes:
"""


def snap(routes: str) -> Snapshot:
    return load_snapshot_text(HEAD + textwrap.dedent(routes), "rules.yaml")


def view(
    target: str, host: str = "api.example.com", headers: dict[str, str] | None = None
) -> RequestView:
    path, _, query = target.partition("?")
    return RequestView("GET", path, query, host, headers or {}, "127.0.0.1")


def errors(routes: str) -> list[str]:
    text = HEAD + textwrap.dedent(routes)
    return [str(p) for p in check_text(text, "rules.yaml") if p.severity == "error"]


# -- checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (
            "  - {name: r, direct_response: {status: '200'}}\n",
            "rules.yaml:8:39: routes[0].direct_response.status: the status is quoted text `200` "
            "(write 200 without quotes)",
        ),
        (
            "  - {name: r, direct_response: {status: 301}}\n",
            "rules.yaml:8:39: routes[0].direct_response.status: 301 is a redirect (use "
            "`redirect:` instead, which sends a Location)",
        ),
        (
            "  - {name: r, direct_response: {status: 99}}\n",
            "rules.yaml:8:39: routes[0].direct_response.status: 99 is not a status a route can "
            "answer (write 200-599, or 444 to close the connection without an answer)",
        ),
        (
            "  - {name: r, direct_response: {status: 204, body: x}}\n",
            "rules.yaml:8:50: routes[0].direct_response.body: status 204 has no body (remove "
            "`body`)",
        ),
        (
            "  - {name: r, direct_response: {body: ok}}\n",
            "rules.yaml:8:30: routes[0].direct_response.status: missing `status` (add `status:` "
            "to routes[0].direct_response)",
        ),
        (
            "  - {name: r, to: v1, direct_response: {status: 200}}\n",
            "rules.yaml:8:21: routes[0].direct_response: a route has one of `to`, `split`, "
            "`split_clients`, `lua`, `direct_response` and `redirect` (keep the one that "
            "decides where this route's requests go)",
        ),
        (
            "  - {name: r, redirect: {status: 200}}\n",
            "rules.yaml:8:32: routes[0].redirect.status: 200 is not a redirect status (write "
            "301, 302, 303, 307 or 308; for another answer use `direct_response:`)",
        ),
        (
            "  - {name: r, redirect: {host: b.com}}\n",
            "rules.yaml:8:24: routes[0].redirect.host: `host` makes the Location absolute, so "
            "it needs a scheme (add `scheme: https` (or http))",
        ),
        (
            "  - {name: r, redirect: {scheme: ftp}}\n",
            "rules.yaml:8:32: routes[0].redirect.scheme: unknown scheme `ftp` (write http or "
            "https)",
        ),
        (
            "  - {name: r, redirect: {path: /a, prefix_rewrite: /b}}\n",
            "rules.yaml:8:34: routes[0].redirect.prefix_rewrite: a redirect has one of `path`, "
            "`prefix_rewrite` and `regex_rewrite` (keep one)",
        ),
        (
            "  - {name: r, redirect: {prefix_rewrite: /b}}\n",
            "rules.yaml:8:40: routes[0].redirect.prefix_rewrite: there is no path_prefix or "
            "path_exact in the route's `match` to replace (add `path_prefix:` to `match`, or "
            "use `regex_rewrite`)",
        ),
        (
            "  - {name: r, to: v1, prefix_rewrite: /b}\n",
            "rules.yaml:8:37: routes[0].prefix_rewrite: there is no path_prefix or path_exact "
            "in the route's `match` to replace (add `path_prefix:` to `match`, or use "
            "`regex_rewrite`)",
        ),
        (
            "  - {name: r, match: {path_prefix: /a}, to: v1, prefix_rewrite: b c}\n",
            "rules.yaml:8:63: routes[0].prefix_rewrite: `b c` does not start with / (write /b c)",
        ),
        (
            "  - {name: r, match: {path_prefix: /a}, to: v1, prefix_rewrite: '/b c'}\n",
            "rules.yaml:8:63: routes[0].prefix_rewrite: `/b c` has spaces, control or non-ASCII "
            "characters (percent-encode them, e.g. %20 for a space)",
        ),
        (
            "  - {name: r, to: v1, regex_rewrite: {pattern: '^/(a)', substitution: '/\\2'}}\n",
            "rules.yaml:8:69: routes[0].regex_rewrite.substitution: `/\\2`: invalid group "
            "reference 2 at position 2 (refer to groups of the pattern as \\1 or \\g<name>; "
            "write \\\\ for a backslash)",
        ),
        (
            "  - {name: r, to: v1, regex_rewrite: {pattern: '^/(a)'}}\n",
            "rules.yaml:8:36: routes[0].regex_rewrite.substitution: missing `substitution` "
            "(add `substitution:` to routes[0].regex_rewrite)",
        ),
        (
            "  - {name: r, match: {path_prefix: /a}, redirect: {scheme: https}, "
            "prefix_rewrite: /b}\n",
            "rules.yaml:8:66: routes[0].prefix_rewrite: this route answers itself, so no path "
            "goes upstream to rewrite (remove it; a redirect takes `prefix_rewrite` inside "
            "`redirect:`)",
        ),
        (
            "  - {name: r, match: {path_prefix: /a}, to: v1, prefix_rewrite: /b, "
            "regex_rewrite: {pattern: a, substitution: b}}\n",
            "rules.yaml:8:67: routes[0].regex_rewrite: a route has one of `prefix_rewrite` and "
            "`regex_rewrite` (keep one)",
        ),
    ],
)
def test_errors(routes: str, message: str) -> None:
    assert errors(routes) == [message]


def test_a_broken_match_does_not_also_blame_the_rewrite() -> None:
    found = errors("  - {name: r, match: {path_prefix: a}, to: v1, prefix_rewrite: /b}\n")
    assert len(found) == 1 and "path_prefix: `a` does not start with /" in found[0]


# -- decisions -----------------------------------------------------------------------------


def test_direct_response() -> None:
    s = snap(
        """\
        - {name: health, match: {path_exact: /health}, direct_response: {status: 200, body: ok}}
        - name: gone
          match: {path_prefix: /old}
          direct_response: {status: 410}
        - name: json
          match: {path_prefix: /j}
          direct_response: {status: 503, body: '{"down": true}', content_type: application/json}
        - {name: drop, match: {path_prefix: /drop}, direct_response: {status: 444}}
        """
    )
    d = decide(s, view("/health"))
    assert (d.route, d.upstream, d.status, d.body, d.reason) == (
        "health",
        None,
        200,
        b"ok",
        "direct_response 200",
    )
    assert d.response_headers == (("Content-Type", "text/plain; charset=utf-8"),)
    assert decide(s, view("/health/x")).route is None  # exact: only /health
    d = decide(s, view("/old/page"))
    assert d.status == 410
    assert orjson.loads(d.body) == {"error": "route_answer", "detail": "route gone answers 410"}
    assert d.as_dict() == {
        "route": "gone",
        "upstream": None,
        "user_id": None,
        "user_id_source": None,
        "reason": "direct_response 410",
        "status": "410",
    }
    d = decide(s, view("/j"))
    assert (d.body, d.response_headers) == (
        b'{"down": true}',
        (("Content-Type", "application/json"),),
    )
    d = decide(s, view("/drop"))
    assert (d.status, d.body) == (444, b"")


def test_pins_still_come_first_on_a_route_that_answers_itself() -> None:
    s = snap(
        """\
        - name: maintenance
          pins: [{to: v2, users: ["qa"]}]
          direct_response: {status: 503, body: back soon}
        """
    )
    assert decide(s, view("/", headers={"x-user-id": "qa"})).upstream == "v2"
    d = decide(s, view("/", headers={"x-user-id": "42"}))
    assert (d.upstream, d.status, d.user_id) == (None, 503, "42")


@pytest.mark.parametrize(
    ("redirect", "target", "host", "location"),
    [
        ("{scheme: https}", "/a/b?x=1", "api.example.com", "https://api.example.com/a/b?x=1"),
        ("{scheme: https}", "/a", "", "/a"),  # no Host: nothing to name, a relative Location
        ("{scheme: https}", "/a", "::1", "https://[::1]/a"),
        ("{scheme: https, port: 8443}", "/a", "b.com", "https://b.com:8443/a"),
        ("{scheme: http, host: new.example.com}", "/a?q", "b.com", "http://new.example.com/a?q"),
        ("{path: /new, strip_query: true}", "/old/x?q=1", "b.com", "/new"),
        ("{path: /new}", "/old/x?q=1", "b.com", "/new?q=1"),
        ("{prefix_rewrite: /v2}", "/old/x?q=1", "b.com", "/v2/x?q=1"),
        (
            "{regex_rewrite: {pattern: '^/old/(.*)$', substitution: '/v2/\\1'}, status: 308}",
            "/old/x/y",
            "b.com",
            "/v2/x/y",
        ),
    ],
)
def test_redirect_location(redirect: str, target: str, host: str, location: str) -> None:
    s = snap(f"  - {{name: r, match: {{path_prefix: /old}}, redirect: {redirect}}}\n"
             if "prefix_rewrite" in redirect
             else f"  - {{name: r, redirect: {redirect}}}\n")  # fmt: skip
    d = decide(s, view(target, host))
    assert d.location == location
    assert d.status == (308 if "308" in redirect else 301)
    assert d.as_dict()["location"] == location


@pytest.mark.parametrize(
    ("route", "target", "sent"),
    [
        ("match: {path_prefix: /api/}, prefix_rewrite: /v1/", "/api/x?a=1", "/v1/x?a=1"),
        ("match: {path_prefix: /api}, prefix_rewrite: /", "/api/x", "//x"),  # as nginx
        ("match: {path_exact: /old}, prefix_rewrite: /new", "/old?q", "/new?q"),
        (
            "regex_rewrite: {pattern: '^/u/(?P<id>[0-9]+)$', substitution: '/users?id=\\g<id>'}",
            "/u/42",
            "/users?id=42",
        ),
        ("regex_rewrite: {pattern: a, substitution: b}", "/aa/ca", "/bb/cb"),  # every match
    ],
)
def test_path_rewrite(route: str, target: str, sent: str) -> None:
    s = snap(f"  - {{name: r, {route}, pins: [{{to: v2, users: [qa]}}], to: v1}}\n")
    d = decide(s, view(target))
    assert (d.upstream, d.target) == ("v1", sent)
    assert d.as_dict()["target"] == sent
    pinned = decide(s, view(target, headers={"x-user-id": "qa"}))
    assert (pinned.upstream, pinned.target) == ("v2", sent)  # pins go upstream too


def test_no_rewrite_leaves_the_target_alone() -> None:
    d = decide(snap("  - {name: r, to: v1}\n"), view("/a?b"))
    assert d.target is None and "target" not in d.as_dict()


# -- through the real router ---------------------------------------------------------------


class RawUpstream:
    """Records the raw request heads it receives; answers each with a fixed 200."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nup")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = await RawUpstream().start()
    yield up
    await up.close()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


def rules(endpoint: str) -> str:
    return f"""\
        format: 1
        upstreams:
          v1: {{endpoints: ["{endpoint}"]}}
        routes:
          - name: health
            match: {{path_exact: /health}}
            direct_response: {{status: 200, body: ok}}
          - name: to-https
            match: {{hosts: ["*.example.com"]}}
            redirect: {{scheme: https}}
          - name: api
            match: {{path_prefix: /api/}}
            prefix_rewrite: /v1/
            to: v1
          - name: drop
            match: {{path_regex: "\\\\.php$"}}
            direct_response: {{status: 444}}
          - name: gone
            match: {{path_prefix: /gone}}
            direct_response: {{status: 410}}
        """


async def test_answers_and_rewrites_through_the_router(
    proxy: Any, raw_upstream: RawUpstream
) -> None:
    rp = await proxy(rules(f"127.0.0.1:{raw_upstream.port}"))
    # nginx's `location = /health { return 200 "ok"; }`: the route answers, nothing goes up.
    got = await exchange(rp.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/plain; charset=utf-8\r\n" in head + b"\r\n"
    assert b"\r\nContent-Length: 2\r\n" in head + b"\r\n"
    assert body == b"ok"
    # HEAD: the same head, no body (RFC 9110 9.3.2)
    got = await exchange(rp.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.endswith(b"\r\n\r\n") and b"Content-Length: 2" in got
    # A wildcard host, redirected to https on the name the client used, query kept.
    got = await exchange(
        rp.port, b"GET /p?q=1 HTTP/1.1\r\nHost: Shop.Example.com:8080\r\nConnection: close\r\n\r\n"
    )
    assert got.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
    assert b"\r\nLocation: https://shop.example.com/p?q=1\r\n" in got
    assert b"\r\nContent-Length: 0\r\n" in got and got.endswith(b"\r\n\r\n")
    # The path sent upstream is rewritten; the rest of the head is the client's.
    got = await exchange(
        rp.port, b"GET /api/orders?id=7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"up")
    assert raw_upstream.heads[-1].startswith(b"GET /v1/orders?id=7 HTTP/1.1\r\nHost: x\r\n")
    # 444: the connection is closed without an answer, and nothing reaches the upstream.
    seen = len(raw_upstream.heads)
    got = await exchange(rp.port, b"GET /x/index.php HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == b""
    # No body written: the router's short JSON error body.
    got = await exchange(rp.port, b"GET /gone HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 410 Gone\r\n")
    assert orjson.loads(got.partition(b"\r\n\r\n")[2]) == {
        "error": "route_answer",
        "detail": "route gone answers 410",
    }
    assert len(raw_upstream.heads) == seen
    assert rp.metrics.requests[("health", "", 200)] == 2
    assert rp.metrics.requests[("api", "v1", 200)] == 1
