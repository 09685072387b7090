"""Tunnels (router/tunnel.py): two real TCP connections joined as the proxy joins them
after a 101, with a test peer on each side: bytes both ways, flow control, half-close,
a side going away, the idle timeout, the limit and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.tunnel import (
    CLIENT_CLOSED,
    DRAIN,
    IDLE_TIMEOUT,
    UPSTREAM_CLOSED,
    Tunnel,
    Tunnels,
)

from conftest import LocalCA, RecordingMetrics, RunningProxy, Serve, poll, scrape, until

EARLY_UP = b"first frame from the client"
EARLY_DOWN = b"first frame from the upstream"


@dataclass
class Joined:
    """A client and an upstream peer, joined by a tunnel in this process."""

    tunnels: Tunnels
    metrics: RecordingMetrics
    tunnel: Tunnel
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    servers: list[asyncio.AbstractServer] = field(default_factory=list)


class _Front(asyncio.Protocol):
    """What the proxy does at the handover: connect upstream, join the two."""

    def __init__(self, tunnels: Tunnels, upstream_port: int, joined: asyncio.Future[Tunnel]):
        self.tunnels = tunnels
        self.upstream_port = upstream_port
        self.joined = joined
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.task = asyncio.get_running_loop().create_task(self.join(transport))

    async def join(self, client: Any) -> None:
        loop = asyncio.get_running_loop()
        port = self.upstream_port
        upstream, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        tunnel = self.tunnels.start(client, upstream, "v1", EARLY_UP, EARLY_DOWN)
        self.joined.set_result(tunnel)


@pytest.fixture
async def join() -> AsyncIterator[Callable[..., Awaitable[Joined]]]:
    made: list[Joined] = []

    async def start(
        idle_timeout: float = 60.0, max_open: int = 10, tunnels: Tunnels | None = None
    ) -> Joined:
        loop = asyncio.get_running_loop()
        metrics = RecordingMetrics()
        if tunnels is None:
            tunnels = Tunnels(metrics, idle_timeout=idle_timeout, max_open=max_open)
        peer: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future()
        )

        async def upstream_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer.set_result((r, w))

        upstream_server = await asyncio.start_server(upstream_peer, "127.0.0.1", 0)
        upstream_port = upstream_server.sockets[0].getsockname()[1]
        joined: asyncio.Future[Tunnel] = loop.create_future()
        front = await loop.create_server(
            lambda: _Front(tunnels, upstream_port, joined), "127.0.0.1", 0
        )
        client = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
        tunnel = await asyncio.wait_for(joined, 10)
        j = Joined(tunnels, metrics, tunnel, client, await peer, [upstream_server, front])
        made.append(j)
        return j

    yield start
    for j in made:
        j.tunnels.close_all()
        for _, writer in (j.client, j.upstream):
            writer.close()
        for server in j.servers:
            server.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a crashed process's kernel may."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


async def test_bytes_both_ways_early_bytes_first(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    assert await read_exactly(c_reader, len(EARLY_DOWN)) == EARLY_DOWN
    assert await read_exactly(u_reader, len(EARLY_UP)) == EARLY_UP
    for i in range(3):
        c_writer.write(b"ping %d" % i)
        assert await read_exactly(u_reader, 6) == b"ping %d" % i
        u_writer.write(b"pong %d" % i)
        assert await read_exactly(c_reader, 6) == b"pong %d" % i
    assert j.metrics.tunnels_opened == {"v1": 1} and not j.metrics.tunnels_closed
    assert j.tunnels.open == {j.tunnel}


@pytest.mark.parametrize("direction", ["down", "up"])
async def test_flow_control_bounds_what_a_slow_reader_costs(
    join: Callable[..., Awaitable[Joined]], direction: str
) -> None:
    """A fast sender and a reader that reads nothing: the tunnel stops reading from the
    sender once the reader's buffer is full, so the sender is held back by TCP instead
    of the router's memory growing; then everything arrives, intact."""
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    if direction == "down":
        sender, receiver = u_writer, c_reader
        reading_side, writing_side = j.tunnel.upstream_end.source, j.tunnel.client_end.source
    else:
        sender, receiver = c_writer, u_reader
        reading_side, writing_side = j.tunnel.client_end.source, j.tunnel.upstream_end.source
    total = 64 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = hashlib.sha256()

    async def send_all() -> None:
        for _ in range(total // len(block)):
            sender.write(block)
            sent.update(block)
            await sender.drain()

    sending = asyncio.get_running_loop().create_task(send_all())

    async def held_back() -> bool:
        return not reading_side.is_reading()

    await poll(held_back)
    await asyncio.sleep(0.2)
    assert not sending.done()  # the sender is blocked: nothing reads its bytes
    assert writing_side.get_write_buffer_size() <= 1024 * 1024  # not 64 MiB
    got = hashlib.sha256()
    received = 0
    while received < total:
        chunk = await asyncio.wait_for(receiver.read(1 << 20), 10)
        assert chunk
        got.update(chunk)
        received += len(chunk)
    await asyncio.wait_for(sending, 10)
    assert received == total and got.digest() == sent.digest()


async def test_half_close_is_passed_on(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    c_writer.write(b"last words")
    c_writer.write_eof()
    assert await asyncio.wait_for(u_reader.read(), 10) == b"last words"  # then EOF
    u_writer.write(b"an answer after the client's EOF")
    u_writer.close()
    assert await asyncio.wait_for(c_reader.read(), 10) == b"an answer after the client's EOF"
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", CLIENT_CLOSED): 1}  # it ended first


async def test_the_upstream_going_away_closes_the_client(
    join: Callable[..., Awaitable[Joined]],
) -> None:
    j = await join()
    (c_reader, _), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    reset(u_writer)  # a crash: no FIN, a reset
    assert await asyncio.wait_for(c_reader.read(), 10) == b""  # closed, not left hanging
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", UPSTREAM_CLOSED): 1}
    assert not j.tunnels.open


async def test_the_client_going_away_closes_the_upstream(
    join: Callable[..., Awaitable[Joined]],
) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, _) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    reset(c_writer)
    assert await asyncio.wait_for(u_reader.read(), 10) == b""
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", CLIENT_CLOSED): 1}


async def test_idle_tunnels_are_closed(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join(idle_timeout=30.0)
    (c_reader, c_writer), (u_reader, _) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    assert j.tunnels.check_idle(time.monotonic() + 29.0) == 0
    c_writer.write(b"still here")  # traffic either way counts
    await read_exactly(u_reader, 10)
    assert j.tunnels.check_idle(time.monotonic() + 29.0) == 0
    assert j.tunnels.check_idle(time.monotonic() + 31.0) == 1
    assert await asyncio.wait_for(c_reader.read(), 10) == b""
    assert await asyncio.wait_for(u_reader.read(), 10) == b""
    assert j.metrics.tunnels_closed == {("v1", IDLE_TIMEOUT): 1}


async def test_limit_and_drain(join: Callable[..., Awaitable[Joined]]) -> None:
    first = await join(max_open=2)
    tunnels = first.tunnels
    assert tunnels.has_room()
    second = await join(tunnels=tunnels)
    assert tunnels.open == {first.tunnel, second.tunnel}
    assert not tunnels.has_room()
    for j in (first, second):
        await read_exactly(j.client[0], len(EARLY_DOWN))
        await read_exactly(j.upstream[0], len(EARLY_UP))
    tunnels.close_all()
    assert not tunnels.open
    assert first.metrics.tunnels_closed == {("v1", DRAIN): 2}
    for j in (first, second):
        for reader in (j.client[0], j.upstream[0]):
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)


# -- WebSocket through the router: `websockets` as client and as upstream ----------------
WS_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id:
  - cookie: uid
  - query: user
routes:
  - name: chat
    split: {{v1: 50, v2: 50}}
"""


@dataclass
class WsUpstream:
    """A websockets server that is also a plain HTTP server: HTTP requests and WebSocket
    handshakes both get its version name; after the handshake it sends its version, then
    echoes. `/forbidden` refuses the handshake (403); a message `die` makes it drop the
    connection without a close frame."""

    version: str
    port: int = 0
    handshakes: list[dict[str, str]] = field(default_factory=list)
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def ws_upstreams() -> AsyncIterator[Callable[..., Awaitable[list[WsUpstream]]]]:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.http11 import Request, Response

    started: list[WsUpstream] = []

    async def start(*versions: str) -> list[WsUpstream]:
        out = []
        for version in versions:
            up = WsUpstream(version)

            def process_request(
                conn: ServerConnection, request: Request, up: WsUpstream = up
            ) -> Response | None:
                if "upgrade" not in request.headers.get("Connection", "").lower():
                    if request.path.startswith("/page"):
                        return html_response(conn, PAGE.replace("@VERSION@", up.version))
                    return conn.respond(200, up.version)
                up.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})
                if request.path.startswith("/forbidden"):
                    return conn.respond(403, "no\n")
                return None

            async def handler(ws: ServerConnection, up: WsUpstream = up) -> None:
                await ws.send(up.version)
                async for message in ws:
                    if message == "die":
                        ws.transport.abort()
                        return
                    await ws.send(message)

            up.server = await serve(
                handler, "127.0.0.1", 0, process_request=process_request, max_size=None
            )
            up.port = up.server.sockets[0].getsockname()[1]
            started.append(up)
            out.append(up)
        return out

    yield start
    for up in started:
        up.server.close()
        await up.server.wait_closed()


# The page a browser loads: it opens a WebSocket to where it came from (the same user),
# sends what the upstream greets it with, and shows the echo.
PAGE = """<!doctype html>
<title>chat</title>
<p>page from <b id="page">@VERSION@</b></p>
<p>socket: <b id="out">connecting</b></p>
<script>
const ws = new WebSocket(`wss://${location.host}/chat${location.search}`);
let greeted = false;
ws.onmessage = (event) => {
  if (!greeted) { greeted = true; ws.send(`echo of ${event.data}`); return; }
  document.getElementById("out").textContent = event.data;
};
ws.onerror = () => { document.getElementById("out").textContent = "error"; };
</script>
"""


def html_response(conn: Any, html: str) -> Any:
    response = conn.respond(200, html)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    return response


def ws_connect(url: str, **kwargs: Any) -> Any:
    from websockets.asyncio.client import connect

    kwargs.setdefault("max_size", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(url, proxy=None, **kwargs)


@pytest.fixture
async def ws_setup(
    ws_upstreams: Callable[..., Awaitable[list[WsUpstream]]], proxy: Any
) -> tuple[RunningProxy, list[WsUpstream]]:
    v1, v2 = await ws_upstreams("v1", "v2")
    rp = await proxy(WS_RULES.format(v1=v1.endpoint, v2=v2.endpoint))
    return rp, [v1, v2]


async def test_a_user_gets_the_same_version_over_websocket_as_over_http(
    ws_setup: tuple[RunningProxy, list[WsUpstream]],
) -> None:
    rp, _ = ws_setup
    ws_url = rp.url.replace("http://", "ws://")
    seen = set()
    async with httpx.AsyncClient(timeout=10.0) as http:
        for i in range(16):
            user = f"user-{i}"
            by_http = (await http.get(f"{rp.url}/chat", params={"user": user})).text
            async with ws_connect(f"{ws_url}/chat?user={user}") as ws:
                assert await ws.recv() == by_http
            # the cookie a browser would send routes the same way
            cookie = {"Cookie": f"uid={user}"}
            async with ws_connect(f"{ws_url}/chat", additional_headers=cookie) as ws:
                assert await ws.recv() == by_http
            seen.add(by_http)
    assert seen == {"v1", "v2"}  # the split is real: both versions got users
    await until(lambda: not rp.router.tunnels.open)
    assert sum(rp.metrics.tunnels_opened.values()) == 32
    assert rp.metrics.requests[("chat", "v1", 101)] + rp.metrics.requests[("chat", "v2", 101)] == 32


async def test_messages_both_ways_large_ones_too(
    ws_setup: tuple[RunningProxy, list[WsUpstream]],
) -> None:
    rp, ups = ws_setup
    async with ws_connect(rp.url.replace("http://", "ws://") + "/chat?user=big") as ws:
        version = await ws.recv()
        (up,) = [u for u in ups if u.version == version]
        for message in ("hello", b"\x00\x01binary", "é" * 1000):
            await ws.send(message)
            assert await ws.recv() == message
        large = bytes(range(256)) * (6 * 4096)  # 6 MiB each way, through flow control
        await ws.send(large)
        echoed = await asyncio.wait_for(ws.recv(), 30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(large).digest()
        text = "x" * (3 * 1024 * 1024)
        await ws.send(text)
        assert await asyncio.wait_for(ws.recv(), 30) == text
    headers = up.handshakes[-1]
    assert headers["upgrade"] == "websocket" and "upgrade" in headers["connection"].lower()
    assert headers["x-forwarded-proto"] == "http" and headers["x-forwarded-for"] == "127.0.0.1"
    assert "sec-websocket-key" in headers


async def test_the_upstream_going_away_closes_the_websocket_client(
    ws_setup: tuple[RunningProxy, list[WsUpstream]],
) -> None:
    from websockets.exceptions import ConnectionClosed

    rp, _ = ws_setup
    async with ws_connect(rp.url.replace("http://", "ws://") + "/chat?user=7") as ws:
        version = await ws.recv()
        await ws.send("die")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    await until(lambda: not rp.router.tunnels.open)
    assert rp.metrics.tunnels_closed == {(version, UPSTREAM_CLOSED): 1}


async def test_an_upgrade_the_upstream_refuses_is_an_ordinary_answer(
    ws_setup: tuple[RunningProxy, list[WsUpstream]],
) -> None:
    from websockets.exceptions import InvalidStatus

    rp, _ = ws_setup
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(rp.url.replace("http://", "ws://") + "/forbidden?user=1"):
            pass
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"no\n"
    assert not rp.metrics.tunnels_opened
    assert sum(n for (_, _, status), n in rp.metrics.requests.items() if status == 403) == 1


async def test_idle_tunnels_close_and_the_limit_answers_503(
    ws_upstreams: Callable[..., Awaitable[list[WsUpstream]]], proxy: Any
) -> None:
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    v1, v2 = await ws_upstreams("v1", "v2")
    rp = await proxy(
        WS_RULES.format(v1=v1.endpoint, v2=v2.endpoint), max_tunnels=1, tunnel_idle_timeout=60
    )
    url = rp.url.replace("http://", "ws://") + "/chat?user=1"
    async with ws_connect(url, ping_interval=None) as first:
        version = await first.recv()
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(url):
                pass
        assert info.value.response.status_code == 503
        assert b"too_many_tunnels" in info.value.response.body
        # 60 s without a byte either way, on the router's clock
        assert rp.router.tunnels.check_idle(time.monotonic() + 59) == 0
        assert rp.router.tunnels.check_idle(time.monotonic() + 61) == 1
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(first.recv(), 10)
    assert rp.metrics.tunnels_closed == {(version, IDLE_TIMEOUT): 1}
    async with ws_connect(url) as again:  # room again
        assert await again.recv() == version


async def test_a_drain_closes_tunnels_after_its_grace(
    ws_setup: tuple[RunningProxy, list[WsUpstream]],
) -> None:
    from websockets.exceptions import ConnectionClosed

    rp, _ = ws_setup
    async with ws_connect(rp.url.replace("http://", "ws://") + "/chat?user=1") as ws:
        await ws.recv()
        started = time.monotonic()
        draining = asyncio.get_running_loop().create_task(rp.router.drain(1.0))
        await asyncio.sleep(0.3)
        await ws.send("still open during the grace")
        assert await ws.recv() == "still open during the grace"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert time.monotonic() - started >= 0.9
        await draining
    assert [reason for (_, reason) in rp.metrics.tunnels_closed] == [DRAIN]


async def test_raw_bytes_early_frames_both_ways(proxy: Any) -> None:
    """The exact bytes: the upgrade request as the upstream gets it, and bytes each side
    sent right after its head (before it saw the other's) arrive first, in order."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nfrom-upstream"
        )
        early = await reader.readexactly(len(b"from-client"))
        got.set_result(head + early)
        writer.write(await reader.readexactly(4))  # echo "more"
        await writer.drain()
        await reader.read()  # until the tunnel closes
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rp = await proxy(
        f'format: 1\nupstreams:\n  v1: {{endpoints: ["127.0.0.1:{port}"]}}\n'
        "routes:\n  - name: ws\n    to: v1\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(
        b"GET /socket HTTP/1.1\r\nHost: chat.test\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\nfrom-client"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n" in head
    assert await asyncio.wait_for(reader.readexactly(13), 10) == b"from-upstream"
    sent = await asyncio.wait_for(got, 10)
    assert sent.startswith(b"GET /socket HTTP/1.1\r\nHost: chat.test\r\n")
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in sent
    assert b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in sent
    assert b"keep-alive" not in sent  # hop-by-hop, not forwarded
    assert sent.endswith(b"\r\n\r\nfrom-client")
    writer.write(b"more")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"more"
    writer.close()
    await until(lambda: not rp.router.tunnels.open)
    server.close()
    await server.wait_closed()


async def test_a_browser_page_over_tls_opens_a_websocket_through_the_router(
    ws_upstreams: Callable[..., Awaitable[list[WsUpstream]]],
    proxy: Any,
    tls_ca: LocalCA,
    chromium: Callable[..., Any],
) -> None:
    """Headless Chromium loads a page over TLS through the router; the page opens a
    WebSocket (wss) through the router to the version that served the page, and shows
    what came back."""
    v1, v2 = await ws_upstreams("v1", "v2")
    pair = tls_ca.issue("chat.test")
    rp = await proxy(WS_RULES.format(v1=v1.endpoint, v2=v2.endpoint), tls=[pair])
    driver = await asyncio.to_thread(chromium, trust=(pair[0],), hosts={"chat.test": "127.0.0.1"})
    for user in ("ann", "bob", "cyd", "dee"):
        url = f"https://chat.test:{rp.tls_port}/page?user={user}"
        await asyncio.to_thread(driver.get, url)

        def shown() -> tuple[str, str]:
            return (
                driver.find_element("id", "page").text,
                driver.find_element("id", "out").text,
            )

        async def echoed() -> tuple[str, str] | None:
            page, out = await asyncio.to_thread(shown)
            return (page, out) if out.startswith("echo of") or out == "error" else None

        page, out = await poll(echoed, timeout=20)
        assert out == f"echo of {page}"  # the socket went to the page's version
    assert {u.version for u in (v1, v2) if u.handshakes} == {"v1", "v2"}
    for handshake in v1.handshakes + v2.handshakes:
        assert handshake["x-forwarded-proto"] == "https"
        assert handshake["host"] == f"chat.test:{rp.tls_port}"
        assert "chrome" in handshake["user-agent"].lower()
    assert sum(rp.metrics.tunnels_opened.values()) == 4
    assert ("chat.test", "TLSv1.3") in rp.metrics.handshakes


async def test_serve_counts_tunnels_and_its_drain_closes_them(
    ws_upstreams: Callable[..., Awaitable[list[WsUpstream]]],
    serve_router: Serve,
    tmp_path: Path,
) -> None:
    from websockets.exceptions import ConnectionClosed

    v1, v2 = await ws_upstreams("v1", "v2")
    rules = tmp_path / "rules.yaml"
    rules.write_text(WS_RULES.format(v1=v1.endpoint, v2=v2.endpoint))
    router = await serve_router(rules, workers=2, args=("--drain-timeout", "2"))
    ws_url = router.url.replace("http://", "ws://")
    async with (
        httpx.AsyncClient(timeout=10.0) as client,
        ws_connect(f"{ws_url}/chat?user=1") as first,
    ):
        version = await first.recv()
        open_now = ("grayroute_tunnels_open", f"upstream={version}")
        async with ws_connect(f"{ws_url}/chat?user=1") as second:
            assert await second.recv() == version

            async def both_open() -> dict[tuple[str, ...], float] | None:
                m = await scrape(client, router)  # summed over the workers
                return m if m.get(open_now) == 2 else None

            m = await poll(both_open)
            assert m[("grayroute_tunnels_total", f"upstream={version}")] == 2

        async def one_open() -> bool:
            return (await scrape(client, router)).get(open_now) == 1

        await poll(one_open)
        router.signal(signal.SIGTERM)
        started = time.monotonic()
        await first.send("during the drain")
        assert await first.recv() == "during the drain"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(first.recv(), 10)
        assert time.monotonic() - started >= 1.5  # --drain-timeout 2, then cut
    assert await asyncio.wait_for(router.proc.wait(), 15) == 0


async def raw_exchange(
    proxy: Any, answer: bytes, request: bytes, **settings: Any
) -> tuple[bytes, bytes, RunningProxy]:
    """`request` through the router to an upstream that answers `answer`: the head the
    client gets, and the head the upstream got."""
    heads: asyncio.Queue[bytes] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            heads.put_nowait(await reader.readuntil(b"\r\n\r\n"))
            writer.write(answer)
            await writer.drain()
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rp = await proxy(
        f'format: 1\nupstreams:\n  v1: {{endpoints: ["127.0.0.1:{port}"]}}\n'
        "routes:\n  - name: all\n    to: v1\n",
        **settings,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head, await asyncio.wait_for(heads.get(), 10), rp
    finally:
        writer.close()
        server.close()


UPGRADE_REQUEST = (
    b"GET /socket HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_101_nobody_asked_for_is_a_bad_response(proxy: Any) -> None:
    head, sent, rp = await raw_exchange(
        proxy,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"upgrade" not in sent.lower()
    assert not rp.metrics.tunnels_opened and not rp.router.tunnels.open


async def test_with_max_tunnels_0_an_upgrade_is_forwarded_without_it(proxy: Any) -> None:
    head, sent, rp = await raw_exchange(
        proxy,
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n",
        UPGRADE_REQUEST,
        max_tunnels=0,
    )
    assert head.startswith(b"HTTP/1.1 426 ")
    assert b"\r\nupgrade:" not in sent.lower() and b"connection: upgrade" not in sent.lower()
    assert b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in sent
    assert not rp.metrics.tunnels_opened
