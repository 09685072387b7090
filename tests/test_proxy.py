"""End to end over real sockets: the hot path in router/proxy.py with real upstreams."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httptools
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lua_compat.runtime import lua_available
from router.demo import RouterProcess

from conftest import Serve, ThreadedProxy
from http_corpus import MALFORMED

RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"]}}
  v2: {{endpoints: ["{v2}"], read_timeout: {read_timeout}}}
user_id:
  - header: X-User-Id
  - cookie: uid
  - query: userId
  - json: user.id
  - form: userId
body_limit: 1KiB
routes:
  - name: api
    match: {{path_prefix: /api}}
    pins:
      - to: v2
        users: ["42", "10086"]
    split: {{v1: 90, v1.1: 10}}
  - name: slow
    match: {{path_prefix: /slow}}
    to: v2
  - name: down
    match: {{path_prefix: /down}}
    to: dead
"""


def rules_for(v1: Any, v11: Any, v2: Any, read_timeout: str = "5s", dead: str = "") -> str:
    text = RULES.format(v1=v1.endpoint, v11=v11.endpoint, v2=v2.endpoint, read_timeout=read_timeout)
    dead = dead or "127.0.0.1:1"
    return text.replace("upstreams:\n", f'upstreams:\n  dead: {{endpoints: ["{dead}"]}}\n', 1)


@pytest.fixture
async def setup(backends: Any, proxy: Any) -> AsyncIterator[tuple[Any, list[Any]]]:
    v1, v11, v2 = await backends("v1", "v1.1", "v2")
    rp = await proxy(rules_for(v1, v11, v2, read_timeout="500ms"))
    yield rp, [v1, v11, v2]


async def raw_exchange(port: int, data: bytes, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(-1), 10)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


# -- user-ID sources -----------------------------------------------------------------------
async def test_user_id_from_each_source(setup: Any) -> None:
    rp, _ = setup
    async with httpx.AsyncClient(base_url=rp.url) as client:
        cases = [
            client.get("/api/x", headers={"X-User-Id": "42"}),
            client.get("/api/x", headers={"Cookie": "a=1; uid=42"}),
            client.get("/api/x?userId=42"),
            client.post("/api/x", json={"user": {"id": 42}}),
            client.post("/api/x", data={"userId": "42"}),
        ]
        for response in await asyncio.gather(*cases):
            assert response.status_code == 200
            assert response.json()["version"] == "v2"


async def test_body_is_forwarded_byte_for_byte(setup: Any) -> None:
    rp, _ = setup
    bodies = [
        b'{"user": {"id": 42}, "x": "' + b"y" * 5000 + b'"}',  # larger than body_limit
        b'{"user": {"id": 42',  # truncated JSON
        b"\xff\xfe not json at all",
        b'{"user": {"id": 4.2}}',
    ]
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for body in bodies:
            r = await client.post(
                "/api/x", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 200
            info = r.json()
            assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
            assert info["body_bytes"] == len(body)
            # none of these yields a user ID, so the pin to v2 cannot hold
            assert info["version"] in ("v1", "v1.1")


async def test_chunked_request_and_response(setup: Any) -> None:
    rp, _ = setup
    pieces = [b"a" * 1000, b"b" * 70000, b"c"]

    async def gen() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.post("/api/up", content=gen(), headers={"X-User-Id": "42"})
        assert r.status_code == 200
        assert r.json()["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
        r = await client.get("/api/down?stream_bytes=300000", headers={"X-User-Id": "42"})
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        assert len(r.content) == 300000


async def test_hop_by_hop_removed_and_forwarded_headers_set(setup: Any) -> None:
    rp, _ = setup
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get(
            "/api/x",
            headers={
                "X-User-Id": "42",
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "hop",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
            },
        )
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    for gone in ("x-secret", "keep-alive", "te"):
        assert gone not in headers
    # The client is not a trusted proxy: what it claims is replaced.
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"


async def test_keep_alive_both_sides(setup: Any) -> None:
    rp, _ = setup
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for _ in range(20):
            r = await client.get("/api/x", headers={"X-User-Id": "42"})
            assert r.status_code == 200
    pool = rp.router.pools["v2"]
    assert pool.idle_count == 1  # one upstream connection served all twenty


# -- HTTP details ----------------------------------------------------------------------------
async def test_head_204_304_have_no_body(setup: Any) -> None:
    rp, _ = setup
    port = rp.port
    head = await raw_exchange(
        port, b"HEAD /api/x HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nConnection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert head.endswith(b"\r\n\r\n")
    assert b"Content-Length" in head
    for status in (204, 304):
        raw = await raw_exchange(
            port,
            b"GET /api/x?status=%d HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\n"
            b"Connection: close\r\n\r\n" % status,
        )
        assert raw.startswith(b"HTTP/1.1 %d" % status)
        assert raw.endswith(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in raw


async def test_pipelined_requests_answered_in_order(setup: Any) -> None:
    rp, _ = setup
    reqs = b"".join(
        b"GET /api/%d?sleep=%s HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\n\r\n"
        % (i, b"0.05" if i == 0 else b"0")
        for i in range(3)
    )
    reqs += b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(rp.port, reqs)
    paths = [p for p in (b"/api/0", b"/api/1", b"/api/2") if p in raw]
    assert paths == [b"/api/0", b"/api/1", b"/api/2"]
    assert raw.index(b"/api/0") < raw.index(b"/api/1") < raw.index(b"/api/2")
    assert raw.count(b"HTTP/1.1 200") == 3
    assert raw.rstrip().endswith(b'"no_route","detail":"no route matched GET /nowhere"}')


async def test_expect_100_continue(setup: Any) -> None:
    rp, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_http10_client_gets_close_delimited_stream(setup: Any) -> None:
    rp, _ = setup
    raw = await raw_exchange(
        rp.port, b"GET /api/x?stream_bytes=100000 HTTP/1.0\r\nX-User-Id: 42\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head.lower()
    assert len(body) == 100000


# -- errors ----------------------------------------------------------------------------------
async def test_no_route_is_404_json(setup: Any) -> None:
    rp, _ = setup
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/elsewhere")
    assert r.status_code == 404
    assert r.json()["error"] == "no_route"


async def test_all_endpoints_down_is_502(setup: Any) -> None:
    rp, _ = setup
    async with httpx.AsyncClient(base_url=rp.url, timeout=5) as client:
        r = await client.get("/down")
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unavailable"
    assert rp.metrics.errors[("dead", "connect")] == 1


async def test_slow_upstream_is_504_within_read_timeout(setup: Any) -> None:
    rp, _ = setup
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with httpx.AsyncClient(base_url=rp.url, timeout=5) as client:
        r = await client.get("/slow?sleep=3")
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"
    assert loop.time() - began < 2.0


async def test_malformed_request_gets_400_and_reaches_nobody(setup: Any) -> None:
    rp, backends_ = setup
    raw = await raw_exchange(
        rp.port,
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 400")
    assert all(not b.seen for b in backends_)


async def test_reload_swaps_rules_whole(setup: Any) -> None:
    rp, (v1, v11, v2) = setup
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/api/x", headers={"X-User-Id": "7"})
        assert r.json()["version"] in ("v1", "v1.1")
        rp.reload(rules_for(v1, v11, v2).replace('users: ["42", "10086"]', 'users: ["7"]'))
        r = await client.get("/api/x", headers={"X-User-Id": "7"})
        assert r.json()["version"] == "v2"


# -- big bodies, flat memory -----------------------------------------------------------------
def _rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
async def test_one_gib_each_way_with_flat_memory(setup: Any) -> None:
    """1 GiB up and 1 GiB down through the router; peak RSS must not grow with it."""
    rp, _ = setup
    size = 1 << 30
    piece = b"z" * (1 << 20)
    before = _rss_peak_mib()

    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(
        b"PUT /api/big HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\nContent-Length: %d\r\n\r\n" % size
    )
    expected = hashlib.sha256()
    for _ in range(size // len(piece)):
        writer.write(piece)
        expected.update(piece)
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    info = orjson.loads(await reader.readexactly(length))
    assert info["body_bytes"] == size
    assert info["body_sha256"] == expected.hexdigest()

    writer.write(
        b"GET /api/big?stream_bytes=%d HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\n\r\n" % size
    )
    await reader.readuntil(b"\r\n\r\n")
    received = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        n = int(line.strip(), 16)
        if n == 0:
            await reader.readuntil(b"\r\n")
            break
        await reader.readexactly(n)
        await reader.readexactly(2)
        received += n
    writer.close()
    assert received == size
    # Router, client and upstream share this process: all three together stay small.
    assert _rss_peak_mib() - before < 200


# -- malformed input and limits ----------------------------------------------------------
CATCH_ALL = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
user_id: [{{header: X-User-Id}}]
routes:
  - name: all
    to: v1
"""


@pytest.fixture
async def catch_all(backends: Any, proxy: Any) -> AsyncIterator[tuple[Any, Any]]:
    (v1,) = await backends("v1")
    rp = await proxy(
        CATCH_ALL.format(v1=v1.endpoint),
        max_header_bytes=4096,
        max_header_count=20,
        max_target_bytes=512,
        max_body_bytes=1000,
    )
    yield rp, v1


@pytest.mark.parametrize(("name", "raw", "status"), MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_request_is_refused_before_any_upstream(
    catch_all: Any, name: str, raw: bytes, status: int
) -> None:
    rp, v1 = catch_all
    answer = await raw_exchange(rp.port, raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert orjson.loads(body)["error"]
    await asyncio.sleep(0.05)
    assert v1.seen == []


def test_corpus_is_large_enough() -> None:
    assert len(MALFORMED) >= 40
    assert len({name for name, _, _ in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-N: 1\r\n" * 30 + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001, 413),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n0\r\n\r\n",
            413,
        ),
    ],
    ids=["target-414", "header-bytes-431", "header-count-431", "length-413", "chunked-413"],
)
async def test_limits(catch_all: Any, raw: bytes, status: int) -> None:
    rp, v1 = catch_all
    answer = await raw_exchange(rp.port, raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert v1.seen == []


async def test_head_sent_in_small_pieces_over_the_limit_is_431(catch_all: Any) -> None:
    rp, _ = catch_all
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    for _ in range(10):
        writer.write(b"y" * 500)
        await writer.drain()
        await asyncio.sleep(0.01)
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_h2c_upgrade_is_ignored_and_served_as_http11(catch_all: Any) -> None:
    rp, v1 = catch_all
    answer = await raw_exchange(
        rp.port,
        b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 ") == 2
    assert [s["path"] for s in v1.seen] == ["/u", "/after"]
    forwarded = {k.lower() for k, _ in v1.seen[0]["headers"]}
    assert "upgrade" not in forwarded
    assert "http2-settings" not in forwarded


async def test_max_connections_per_worker(backends: Any, proxy: Any) -> None:
    (v1,) = await backends("v1")
    rp = await proxy(CATCH_ALL.format(v1=v1.endpoint), max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", rp.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await asyncio.wait_for(reader.read(-1), 5) == b""
    writer.close()
    for _, w in held:
        w.close()


# -- fuzzing: no input crashes the router, every valid request is served ------------------
_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=12,
)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    str.strip
)
_PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/%=&", max_size=30)
_RESERVED = {"host", "content-length", "transfer-encoding", "expect", "connection", "upgrade",
             "keep-alive", "te", "trailer", "proxy-connection", "proxy-authorization",
             "proxy-authenticate", "x-forwarded-for", "x-forwarded-proto",
             "content-type"}  # fmt: skip


@st.composite
def valid_requests(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A well-formed request (random method, target, headers, framing) and its body."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    target = "/" + draw(_PATH)
    if draw(st.booleans()):
        target += "?userId=" + draw(_TOKEN)
    headers = [("Host", draw(_TOKEN))]
    for name, value in draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=8)):
        if name.lower() not in _RESERVED:
            headers.append((name, value))
    body = draw(st.binary(max_size=3000))
    if draw(st.booleans()):
        headers.append(("Content-Type", "application/json"))
        body = draw(st.sampled_from([b'{"user": {"id": 42}}', body, b"{" + body]))
    framing = draw(st.sampled_from(["length", "chunked"] if body else ["none", "length"]))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
        payload = body
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        cut = draw(st.integers(0, len(body)))
        payload = b"".join(
            b"%x\r\n%b\r\n" % (len(part), part) for part in (body[:cut], body[cut:]) if part
        )
        payload += b"0\r\n\r\n"
    else:
        payload = b""
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode() + b"Connection: close\r\n\r\n" + payload, body


def _blocking_exchange(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionError):
            pass  # an incomplete request waits for more; a refused one may be reset
        return b"".join(chunks) if "chunks" in locals() else b""


FUZZ_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
user_id: [{{header: X-User-Id}}, {{query: userId}}, {{json: user.id}}]
routes:
  - name: all
    to: v1
"""


@pytest.fixture(scope="module")
def fuzz_proxy() -> Iterator[ThreadedProxy]:
    # One router for all the examples of a test: what one input leaves behind (a stuck
    # parser, a leaked connection) must not hurt the next.
    with ThreadedProxy(FUZZ_RULES, header_timeout=1.0) as tp:
        yield tp


def _fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@_fuzz(200)
@given(request=valid_requests())
def test_fuzz_every_valid_request_is_forwarded_intact(
    fuzz_proxy: ThreadedProxy, request: tuple[bytes, bytes]
) -> None:
    raw, body = request
    answer = _blocking_exchange(fuzz_proxy.port, raw)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    info = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert fuzz_proxy.errors == []


@st.composite
def mangled_requests(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes inserted, deleted or replaced, or plain noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=300))
    raw = bytearray(draw(valid_requests())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw) - 1))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 58, 59, 127, 255, *b"aZ0-"]))
        if what == "insert":
            raw.insert(at, byte)
        elif what == "delete":
            del raw[at]
        else:
            raw[at] = byte
    return bytes(raw)


@_fuzz(300)
@given(raw=mangled_requests())
def test_fuzz_mangled_requests_never_crash_the_router(
    fuzz_proxy: ThreadedProxy, raw: bytes
) -> None:
    answer = _blocking_exchange(fuzz_proxy.port, raw, timeout=0.3)
    # Our own refusals are 4xx; a 5xx could only be a fault of ours here.
    assert not answer[9:12].startswith(b"5"), answer[:300]
    alive = _blocking_exchange(
        fuzz_proxy.port, b"GET /alive HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert alive.startswith(b"HTTP/1.1 200 ")
    assert fuzz_proxy.errors == []


# -- stickiness through real worker processes -------------------------------------------------
SPLIT_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"]}}
user_id: [{{header: X-User-Id}}]
routes:
  - name: api
    split: {{v1: {w1}, v1.1: {w11}}}
"""


class _VersionCollector:
    """httptools callbacks: the X-Version of each response, in order."""

    def __init__(self) -> None:
        self.versions: list[str] = []
        self._version = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-version":
            self._version = value.decode()

    def on_message_complete(self) -> None:
        self.versions.append(self._version)


async def _versions(port: int, users: range, fresh_connections: bool) -> dict[int, str]:
    """The version each user got. A raw client: httpx would be the bottleneck here."""
    got: dict[int, str] = {}

    async def ask(batch: list[int], close: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        collector = _VersionCollector()
        parser = httptools.HttpResponseParser(collector)
        writer.write(
            b"".join(
                b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: %d\r\n%b\r\n"
                % (user, b"Connection: close\r\n" if close else b"")
                for user in batch
            )
        )
        while len(collector.versions) < len(batch):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "connection closed early"
            parser.feed_data(data)
        writer.close()
        got.update(zip(batch, collector.versions, strict=True))

    ids = list(users)
    if fresh_connections:
        for start in range(0, len(ids), 50):
            await asyncio.gather(*(ask([u], True) for u in ids[start : start + 50]))
    else:
        for start in range(0, len(ids), 2000):
            chunk = ids[start : start + 2000]
            await asyncio.gather(*(ask(chunk[i::20], False) for i in range(20)))
    return got


def _listen_port(router: RouterProcess) -> int:
    return int(router.ready["listen"].rpartition(":")[2])


async def test_same_user_same_upstream_in_every_worker(
    backends: Any, serve_router: Serve, tmp_path: Path
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = tmp_path / "rules.yaml"
    rules.write_text(SPLIT_RULES.format(v1=v1.endpoint, v11=v11.endpoint, w1=50, w11=50))
    router = await serve_router(rules, workers=2)
    users = range(1000)
    # A new connection per request: the kernel spreads them over both workers.
    first = await _versions(_listen_port(router), users, fresh_connections=True)
    second = await _versions(_listen_port(router), users, fresh_connections=True)
    assert first == second
    assert 400 < sum(1 for v in first.values() if v == "v1") < 600


@pytest.mark.slow
async def test_split_proportions_and_minimal_movement_on_reweight(
    backends: Any, serve_router: Serve, tmp_path: Path
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    rules = tmp_path / "rules.yaml"
    rules.write_text(SPLIT_RULES.format(v1=v1.endpoint, v11=v11.endpoint, w1=90, w11=10))
    router = await serve_router(rules, workers=2)
    users = range(100_000, 120_000)
    before = await _versions(_listen_port(router), users, fresh_connections=False)
    share = sum(1 for v in before.values() if v == "v1.1") / len(users)
    assert abs(share - 0.10) <= 0.01

    rules.write_text(SPLIT_RULES.format(v1=v1.endpoint, v11=v11.endpoint, w1=80, w11=20))
    router.signal(signal.SIGHUP)
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:  # until every worker has the new rules
        await asyncio.sleep(0.2)
        seen = await _versions(
            _listen_port(router), range(100_000, 100_400), fresh_connections=True
        )
        if sum(1 for v in seen.values() if v == "v1.1") > 0.15 * len(seen):
            break
    after = await _versions(_listen_port(router), users, fresh_connections=False)
    moved = [u for u in users if before[u] != after[u]]
    assert all(before[u] == "v1" and after[u] == "v1.1" for u in moved)
    assert 0.09 <= len(moved) / len(users) <= 0.11


# -- client timeouts ----------------------------------------------------------------------------
async def test_slow_request_head_gets_408_after_the_header_timeout(
    backends: Any, proxy: Any
) -> None:
    (v1,) = await backends("v1")
    rp = await proxy(CATCH_ALL.format(v1=v1.endpoint), header_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")  # and never the end of the head
    began = asyncio.get_running_loop().time()
    answer = await asyncio.wait_for(reader.read(-1), 5)
    waited = asyncio.get_running_loop().time() - began
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.9 <= waited <= 2.5
    assert v1.seen == []


async def test_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    backends: Any, proxy: Any
) -> None:
    (v1,) = await backends("v1")
    rp = await proxy(CATCH_ALL.format(v1=v1.endpoint), keepalive_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    began = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(-1), 5) == b""  # closed by the router
    assert 0.5 <= asyncio.get_running_loop().time() - began <= 2.5
    writer.close()
    await writer.wait_closed()
    assert len(rp.router.connections) == 0


async def test_body_that_stops_coming_before_routing_gets_408(backends: Any, proxy: Any) -> None:
    (v1,) = await backends("v1")
    rp = await proxy(CATCH_ALL.format(v1=v1.endpoint), header_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    # Chunked bodies are held (16 KiB) before anything goes upstream: this one stalls.
    writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    answer = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert v1.seen == []


# -- Lua routes through the proxy ---------------------------------------------------------------
LUA_SCRIPT = """
local uid = ngx.var.http_x_user_id
if uid == "1" then return ngx.exec("@canary") end
if uid == "2" then return ngx.exit(403) end
if uid == "3" then return ngx.redirect("/login", 301) end
if uid == "6" then return ngx.exit(444) end
if uid == "7" then ngx.req.set_header("X-Gray", "yes") ngx.req.clear_header("X-Drop") end
if uid == "8" then
  local h = ngx.req.get_headers()["x-many"]
  ngx.var.backend = type(h) == "table" and "green" or "nope"
  return
end
"""

LUA_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
routes:
  - name: gray
    lua:
      file: {script}
      map: {{"@canary": v2, green: v2}}
      default: v1
"""


@pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")
async def test_lua_route_decides_answers_and_edits_headers(
    backends: Any, proxy: Any, tmp_path: Path
) -> None:
    v1, v2 = await backends("v1", "v2")
    script = tmp_path / "gray.lua"
    script.write_text(LUA_SCRIPT)
    rp = await proxy(LUA_RULES.format(v1=v1.endpoint, v2=v2.endpoint, script=script))
    async with httpx.AsyncClient(base_url=rp.url, follow_redirects=False) as client:
        r = await client.get("/", headers={"X-User-Id": "1"})
        assert r.json()["version"] == "v2"
        r = await client.get("/", headers={"X-User-Id": "2"})
        assert r.status_code == 403
        r = await client.get("/", headers={"X-User-Id": "3"})
        assert (r.status_code, r.headers["location"]) == (301, "/login")
        r = await client.get("/", headers={"X-User-Id": "7", "X-Drop": "x"})
        sent = {k.lower(): v for k, v in r.json()["headers"]}
        assert r.json()["version"] == "v1"
        assert sent["x-gray"] == "yes" and "x-drop" not in sent
        r = await client.get("/", headers=[("X-User-Id", "8"), ("X-Many", "a"), ("X-Many", "b")])
        assert r.json()["version"] == "v2"  # the script saw both headers, as in nginx
        assert (await client.get("/")).json()["version"] == "v1"
    answer = await raw_exchange(rp.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-User-Id: 6\r\n\r\n")
    assert answer == b""  # 444: closed without an answer


# -- every pin kind, through the router ----------------------------------------------------------
PIN_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id: [{{header: X-User-Id}}]
routes:
  - name: api
    pins:
      - to: v2
        {pin}
    to: v1
"""

PIN_CASES = [
    ("users", 'users: ["42"]', {"X-User-Id": "42"}, {"X-User-Id": "43"}),
    ("user_ranges", "user_ranges: [[100, 199]]", {"X-User-Id": "150"}, {"X-User-Id": "200"}),
    ("user_suffixes", 'user_suffixes: ["07"]', {"X-User-Id": "1007"}, {"X-User-Id": "1070"}),
    ("user_pattern", 'user_pattern: "9[0-9]+"', {"X-User-Id": "912"}, {"X-User-Id": "1912"}),
    ("user_percent", "user_percent: 100", {"X-User-Id": "5"}, {}),
    ("headers", 'headers: {X-App-Version: "^3\\\\."}', {"X-App-Version": "3.1"},
     {"X-App-Version": "2.9"}),
    # the test client is on 127.0.0.1, a trusted proxy here: X-Forwarded-For names another
    ("client_cidrs", "client_cidrs: [127.0.0.0/8]", {}, {"X-Forwarded-For": "203.0.113.5"}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "pin", "held", "not_held"), PIN_CASES, ids=[c[0] for c in PIN_CASES]
)
async def test_each_pin_kind_end_to_end(
    backends: Any,
    proxy: Any,
    kind: str,
    pin: str,
    held: dict[str, str],
    not_held: dict[str, str],
) -> None:
    v1, v2 = await backends("v1", "v2")
    rules = PIN_RULES.format(v1=v1.endpoint, v2=v2.endpoint, pin=pin)
    rp = await proxy(rules, trusted_proxies=["127.0.0.1/32"])
    async with httpx.AsyncClient(base_url=rp.url) as client:
        r = await client.get("/", headers=held)
        assert r.json()["version"] == "v2", kind
        r = await client.get("/", headers=not_held)
        assert r.json()["version"] == "v1", kind
