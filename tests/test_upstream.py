"""Upstream pools and faults, over real sockets: scripted upstreams that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from router.upstream import FAIL_TIMEOUT

from conftest import poll

RULES = """
format: 1
upstreams:
  app:
    endpoints: [{endpoints}]
    read_timeout: 2s
{extra}
routes:
  - name: all
    to: app
"""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Scripted:
    """A raw upstream whose answer to the n-th request on a connection is scripted."""

    def __init__(self, answer: Callable[[int, int], bytes | None]) -> None:
        self.answer = answer  # (connection number, request number) -> bytes, None = close
        self.connections = 0
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                n += 1
                self.requests += 1
                reply = self.answer(conn_no, n)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    started: list[Scripted] = []

    async def start(answer: Callable[[int, int], bytes | None]) -> Scripted:
        s = Scripted(answer)
        await s.start()
        started.append(s)
        return s

    yield start
    for s in started:
        assert s.server is not None
        s.server.close()


def rules(*ports: int, extra: str = "") -> str:
    return RULES.format(endpoints=", ".join(f'"127.0.0.1:{p}"' for p in ports), extra=extra)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_refused_endpoint_is_skipped_for_a_while(scripted: Any, proxy: Any) -> None:
    up = await scripted(lambda c, n: OK)
    dead = free_port()
    rp = await proxy(rules(dead, up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(10):
            assert (await client.get("/")).status_code == 200
    # One refusal, then round-robin leaves the dead endpoint out.
    assert rp.metrics.errors[("app", "connect")] == 1
    assert FAIL_TIMEOUT >= 1


async def test_active_health_check_takes_an_endpoint_out_and_back(
    scripted: Any, proxy: Any
) -> None:
    healthy = {"b": False}

    def answer_b(c: int, n: int) -> bytes:
        return OK if healthy["b"] else b"HTTP/1.1 503 No\r\nContent-Length: 0\r\n\r\n"

    a = await scripted(lambda c, n: OK)
    b = await scripted(answer_b)
    extra = "    health_check: {path: /healthz, interval: 100ms}"
    rp = await proxy(rules(a.port, b.port, extra=extra))
    await asyncio.sleep(0.3)
    b_before = b.requests
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(10):
            assert (await client.get("/")).status_code == 200
    # Only health checks reached b (about one per 100 ms), no traffic.
    assert b.requests - b_before <= 3
    healthy["b"] = True
    await asyncio.sleep(0.3)
    b_before = b.requests
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(10):
            assert (await client.get("/")).status_code == 200
    assert b.requests - b_before >= 5


async def test_stale_keepalive_connection_is_retried_once_for_get(
    scripted: Any, proxy: Any
) -> None:
    # The upstream closes each connection when a second request arrives on it, without
    # answering: the race of a keep-alive timeout on the upstream side.
    up = await scripted(lambda c, n: OK if n == 1 else None)
    rp = await proxy(rules(up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
        # A request with a body is not retried: it may have been acted on.
        r = await client.post("/", content=b"x")
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unavailable"


async def test_ambiguous_response_framing_is_502_and_not_reused(scripted: Any, proxy: Any) -> None:
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    up = await scripted(lambda c, n: bad if c == 1 else OK)
    rp = await proxy(rules(up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/")
        assert r.status_code == 502
        assert r.json()["error"] == "upstream_bad_response"
        assert (await client.get("/")).status_code == 200
    assert up.connections == 2


async def test_upstream_closing_mid_response_closes_the_client(proxy: Any) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    rp = await proxy(rules(server.sockets[0].getsockname()[1]))
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    server.close()
    # The client sees the connection close before Content-Length bytes: never complete.
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\nonly part")
    assert rp.metrics.errors[("app", "reset")] == 1


async def test_response_delimited_by_close_is_forwarded_whole(scripted: Any, proxy: Any) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"q" * 100000)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rp = await proxy(rules(port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/")
    assert r.status_code == 200
    assert r.content == b"q" * 100000
    assert r.headers["transfer-encoding"] == "chunked"
    server.close()


async def test_connect_timeout_is_504(proxy: Any) -> None:
    # A listener whose accept queue is full drops new SYNs: connect() hangs, as it would
    # towards a host that is gone, without leaving this machine.
    import contextlib
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    rp = await proxy(rules(port).replace("read_timeout: 2s", "connect_timeout: 200ms"))
    async with httpx.AsyncClient(base_url=rp.url, timeout=5) as client:
        r = await client.get("/")
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"
    assert rp.metrics.errors[("app", "timeout")] == 1
    for s in fillers:
        s.close()
    listener.close()


async def _one_shot_upstream(behave: Callable[[asyncio.StreamWriter], None]) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        behave(writer)
        await reader.read()  # until the router lets go
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _half_close(writer: asyncio.StreamWriter) -> None:
    writer.write_eof()


@pytest.mark.parametrize("behave", [_reset, _half_close], ids=["reset", "half-close"])
async def test_upstream_that_resets_or_half_closes_before_answering_is_502(
    proxy: Any, behave: Callable[[asyncio.StreamWriter], None]
) -> None:
    server = await _one_shot_upstream(behave)
    rp = await proxy(rules(server.sockets[0].getsockname()[1]))
    async with httpx.AsyncClient(base_url=rp.url, timeout=5) as client:
        r = await client.post("/", content=b"payload")
    server.close()
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unavailable"
    assert rp.metrics.errors[("app", "reset")] == 1


async def test_bytes_after_a_response_mean_the_connection_is_not_reused(
    scripted: Any, proxy: Any
) -> None:
    # The first answer carries a second, unasked-for response after it: a reused
    # connection would hand that to the next request.
    smuggled = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
    up = await scripted(lambda c, n: smuggled if c == 1 else OK)
    rp = await proxy(rules(up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        first = await client.get("/")
        second = await client.get("/")
    assert first.content == b"ok"
    assert second.content == b"ok"
    assert up.connections == 2


async def test_response_headers_named_in_connection_are_not_forwarded(
    scripted: Any, proxy: Any
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: secret\r\n"
        b"X-Public: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
    )
    up = await scripted(lambda c, n: answer)
    rp = await proxy(rules(up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/")
    assert r.headers["x-public"] == "1"
    assert "x-internal" not in r.headers
    assert "keep-alive" not in r.headers


async def test_a_pool_follows_endpoint_changes_and_keeps_connections_that_stay(
    scripted: Any, proxy: Any
) -> None:
    """Endpoints from DNS change while the router runs: the pool is kept, keep-alive
    connections to endpoints that stay are reused, those to endpoints that left are closed,
    and with no endpoint at all the answer is a 503 that names the upstream."""
    from router.rules.effective import Effective, apply_effective

    a, b, c = [await scripted(lambda conn, n: OK) for _ in range(3)]
    rp = await proxy(rules(a.port, b.port))
    base = rp.router.snapshot
    pool = rp.router.pools["app"]

    def install(*ports: int) -> None:
        endpoints = tuple(("127.0.0.1", p) for p in ports)
        rp.router.install(apply_effective(base, Effective().with_endpoints("app", endpoints)))

    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(4):
            assert (await client.get("/")).status_code == 200
        assert (a.requests, a.connections, b.requests, b.connections) == (2, 1, 2, 1)
        install(b.port, c.port)
        assert rp.router.pools["app"] is pool
        assert pool.endpoints == (("127.0.0.1", b.port), ("127.0.0.1", c.port))
        for _ in range(4):
            assert (await client.get("/")).status_code == 200
        # b's connection was reused; c got one; a got nothing more.
        assert (a.requests, b.requests, b.connections, c.requests, c.connections) == (
            2, 4, 1, 2, 1,
        )  # fmt: skip
        assert pool.idle_count == 2  # the connection to a was closed, not kept idle
        install()
        response = await client.get("/")
        assert response.status_code == 503
        assert response.json() == {
            "error": "no_endpoints",
            "detail": "upstream 'app' has no endpoints",
        }
        assert pool.idle_count == 0
        install(c.port)
        assert (await client.get("/")).status_code == 200
        assert rp.router.pools["app"] is pool
        assert (c.requests, c.connections) == (3, 2)
        # A change of anything else than the endpoints builds a new pool.
        rp.reload(rules(c.port).replace("read_timeout: 2s", "read_timeout: 3s"))
        assert rp.router.pools["app"] is not pool
        assert (await client.get("/")).status_code == 200


async def test_max_fails_refusals_within_fail_timeout_take_an_endpoint_out(
    scripted: Any, proxy: Any
) -> None:
    """nginx's `server ... max_fails=3 fail_timeout=30s`: the third refusal takes it out."""
    up = await scripted(lambda c, n: OK)
    dead = free_port()
    rp = await proxy(rules(dead, up.port, extra="    max_fails: 3\n    fail_timeout: 30s\n"))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(12):
            assert (await client.get("/")).status_code == 200
    # Round-robin reaches the dead endpoint every other request until it is out.
    assert rp.metrics.errors[("app", "connect")] == 3
    pool = rp.router.pools["app"]
    assert (pool.max_fails, pool.fail_timeout) == (3, 30.0)
    assert [state for _, state, _ in pool.endpoint_states()] == ["passive", "up"]


async def test_max_fails_zero_never_takes_an_endpoint_out(scripted: Any, proxy: Any) -> None:
    up = await scripted(lambda c, n: OK)
    dead = free_port()
    rp = await proxy(rules(dead, up.port, extra="    max_fails: 0\n"))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(8):
            assert (await client.get("/")).status_code == 200
    assert rp.metrics.errors[("app", "connect")] == 4  # every other request tries it
    assert [s for _, s, _ in rp.router.pools["app"].endpoint_states()] == ["up", "up"]


@pytest.mark.parametrize(("limit", "status"), [(4096, 502), (8192, 200)])
async def test_response_header_section_over_the_limit_is_502(
    raw_upstream: Any, proxy: Any, limit: int, status: int
) -> None:
    """nginx: "upstream sent too big header while reading response header from
    upstream" past proxy_buffer_size (one page, 4 KiB) -> 502; the connection is dropped."""
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 5000 + b"\r\nContent-Length: 2\r\n\r\nok"
    up = await raw_upstream(lambda c, n: big if c == 1 else OK)
    rp = await proxy(rules(up.port), max_response_header_bytes=limit)
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/")
        assert r.status_code == status
        if status == 502:
            assert r.json()["error"] == "upstream_bad_response"
        assert (await client.get("/")).status_code == 200
    assert len(up.received) == (2 if status == 502 else 1)


async def test_response_head_spread_over_reads_is_limited_too(proxy: Any) -> None:
    finished = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        try:
            for _ in range(20):
                writer.write(b"s" * 500)
                await writer.drain()
                await asyncio.sleep(0.01)
            await reader.read()
        except ConnectionError:
            pass  # the router let go at the limit
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        finished.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    rp = await proxy(rules(server.sockets[0].getsockname()[1]))
    async with httpx.AsyncClient(base_url=rp.url, timeout=5) as client:
        r = await client.get("/")
    await asyncio.wait_for(finished.wait(), 5)
    server.close()
    assert r.status_code == 502


async def test_connection_the_upstream_said_close_on_is_not_reused(
    raw_upstream: Any, proxy: Any
) -> None:
    """RFC 9112 9.6: after `Connection: close` in a response the connection is done, even
    if the upstream has not closed its end yet: the next request gets a new one."""
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    up = await raw_upstream(lambda c, n: closing)  # and never closes
    rp = await proxy(rules(up.port))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(3):
            assert (await client.get("/")).status_code == 200
    assert len(up.received) == 3
    assert all(bytes(r).count(b"GET / HTTP/1.1") == 1 for r in up.received)


async def test_a_refused_endpoint_is_tried_again_after_fail_timeout(
    scripted: Any, proxy: Any
) -> None:
    """nginx's fail_timeout: an endpoint left out after a refused connection gets its
    turn again once the timeout is over (the deadline and the clock are the same clock)."""
    up = await scripted(lambda c, n: OK)
    dead = free_port()
    rp = await proxy(rules(dead, up.port), fail_timeout=2.0)
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(4):
            assert (await client.get("/")).status_code == 200
        assert rp.metrics.errors[("app", "connect")] == 1  # left out meanwhile

        async def tried_again() -> bool:
            assert (await client.get("/")).status_code == 200
            return rp.metrics.errors[("app", "connect")] >= 2

        await poll(tried_again)
