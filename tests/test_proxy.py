"""End to end over real sockets: the hot path in router/proxy.py with real upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import resource
import shutil
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
from router.rules import normalize_path

from conftest import RAW_OK, Serve, ThreadedProxy, poll
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


async def test_a_body_of_exactly_body_limit_bytes_is_read_whole(setup: Any) -> None:
    rp, _ = setup
    body = b'{"user": {"id": 42}, "x": "' + b"y" * (1024 - 29) + b'"}'
    assert len(body) == 1024  # body_limit: 1KiB
    head = b"POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    for framing in (b"Content-Length: 1024\r\n", b"Transfer-Encoding: chunked\r\n"):
        chunked = framing.startswith(b"Transfer")
        data = b"400\r\n" + body + b"\r\n0\r\n\r\n" if chunked else body
        answer = await raw_exchange(rp.port, head + framing + b"Connection: close\r\n\r\n" + data)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        # the whole body held: its user ID 42 is pinned to v2
        assert b'"version":"v2"' in answer.replace(b" ", b""), answer[-300:]


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
# Paths a server may serve (RFC 3986 3.3): `%` only in `%XX`, never `..` above the root
# (a 400, as in nginx: test_invalid_paths_are_refused).
_PATH = (
    st.lists(
        st.one_of(
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/=&", min_size=1, max_size=6),
            st.sampled_from(["%41", "%2F", "%2e", "%7E", "%25", "%C3%A9"]),
        ),
        max_size=6,
    )
    .map("".join)
    .filter(lambda p: normalize_path("/" + p) is not None)
)
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


# -- HTTP at the edge: each defect with its exact bytes, through the real router ------------
# The upstream is `raw_upstream`: what it received is compared byte for byte.
EDGE_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id: [{{header: X-User-Id}}]
routes:
  - name: admin
    match: {{path_prefix: /admin}}
    to: v2
  - name: all
    pins:
      - to: v2
        users: ["42"]
    to: v1
"""
FWD = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"


class _Responses:
    """httptools callbacks: (status, headers, body) of each response, in order."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.done.append((status, self._headers, b"".join(self._body)))
        self._headers, self._body = {}, []


async def read_answers(
    reader: asyncio.StreamReader, count: int = 1
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The next `count` responses on a connection: (status, headers, body) each."""
    got = _Responses()
    while len(got.done) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "connection closed before the answer"
        got.parser.feed_data(chunk)
    return got.done


async def exchange(
    port: int, data: bytes, answers: int = 0, timeout: float = 5.0
) -> tuple[list[tuple[int, dict[bytes, bytes], bytes]], bytes, bool]:
    """Send `data`; read until the router closes (or `answers` responses, when given).
    The responses, every byte read, and whether the router closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = _Responses()
    raw = b""
    closed = False
    try:
        async with asyncio.timeout(timeout):
            while not answers or len(got.done) < answers:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                got.parser.feed_data(chunk)
    finally:
        writer.close()
    return got.done, raw, closed


@pytest.fixture
async def edge(proxy: Any, raw_upstream: Any) -> Any:
    """`await edge(**settings)`: the router on EDGE_RULES over two raw upstreams."""

    async def start(answer: Any = None, **settings: Any) -> tuple[Any, Any, Any]:
        v1 = await (raw_upstream(answer) if answer else raw_upstream())
        v2 = await raw_upstream()
        rp = await proxy(EDGE_RULES.format(v1=v1.endpoint, v2=v2.endpoint), **settings)
        return rp, v1, v2

    return start


@pytest.mark.parametrize("buffering", [65536, 0], ids=["buffered", "streamed"])
async def test_upgrade_offer_body_is_the_requests_body_not_a_smuggled_request(
    edge: Any, buffering: int
) -> None:
    """RFC 9112 6.3: the Content-Length bytes belong to the POST; an Upgrade offer that is
    declined (RFC 9110 7.8) changes nothing about that. The 35 bytes that look like a
    request are the first 35 of its 36-byte body: the POST waits for the 36th."""
    rp, v1, v2 = await edge(request_buffer_bytes=buffering)
    head = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 36\r\n" + FWD
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 36\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: b\r\n\r\n"
    )
    body = b"GET /SMUGGLED HTTP/1.1\r\nHost: b\r\n\r\n"
    if buffering:
        await asyncio.sleep(0.2)  # held until complete: nothing upstream yet
        assert v1.received == []
    else:
        await poll(lambda: asyncio.sleep(0, v1.all_bytes == head + body))
    writer.write(b"!")
    answers = await read_answers(reader)
    writer.close()
    assert answers[0][0] == 200
    assert v1.all_bytes == head + body + b"!"
    assert v2.received == []


async def test_chunked_upgrade_offer_body_then_next_request(edge: Any) -> None:
    rp, v1, _ = await edge()
    sent = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    answers, _, closed = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200, 200] and closed
    assert v1.all_bytes == (
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FWD
        + b"3\r\nabc\r\n0\r\n\r\n"
        + b"GET /next HTTP/1.1\r\nHost: a\r\n"
        + FWD
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_h2c_upgrade_offer_with_a_body_gets_200_like_nginx(edge: Any) -> None:
    """`curl --http2 -d a=1 http://...` offers h2c (Upgrade, HTTP2-Settings): nginx
    declines and answers 200; so does the router, and the upstream gets the body."""
    rp, v1, _ = await edge()
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2", "-d", "a=1", "-o", "/dev/null", "-w", "%{http_code}",
        f"{rp.url}/form",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert out == b"200"
    (request,) = v1.received
    head, _, body = bytes(request).partition(b"\r\n\r\n")
    assert body == b"a=1"
    names = {line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:]}
    assert not names & {b"upgrade", b"http2-settings", b"connection"}
    assert b"content-length" in names


async def test_trailer_fields_are_neither_headers_nor_routing_input(edge: Any) -> None:
    """RFC 9110 6.5.1: a trailer field is not merged into the header section; a trailer
    `X-User-Id: 42` does not pin the request, a trailer Host is not the Host."""
    rp, v1, v2 = await edge()
    sent = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nZ\r\n0\r\nX-User-Id: 42\r\nHost: evil\r\n\r\n"
        b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    answers, _, _ = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200, 200]
    assert v2.received == []  # user 42 would have been pinned to v2
    assert v1.all_bytes == (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        + FWD
        + b"1\r\nZ\r\n0\r\n\r\n"
        + b"GET /y HTTP/1.1\r\nHost: a\r\n"
        + FWD
    )


@pytest.mark.parametrize(
    ("after", "then"),
    [
        (b"GARBAGE\r\n\r\n", 400),  # a malformed request after a valid one
        (b"POST /q HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /q HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 5000 + b"\r\n\r\n", 431),
    ],
    ids=["garbage", "two-lengths", "head-too-large"],
)
async def test_a_malformed_pipelined_request_does_not_erase_the_answer_before_it(
    edge: Any, after: bytes, then: int
) -> None:
    """RFC 9112 9.3.2: answers go in the order of the requests. The POST was applied
    upstream, so its client must get its answer, then the 400 (and the close)."""
    rp, v1, _ = await edge(max_header_bytes=4096)
    sent = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc" + after
    answers, raw, closed = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200, then], raw
    assert answers[0][2] == b"ok" and closed
    assert v1.all_bytes == b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n" + FWD + b"abc"


@pytest.mark.parametrize(
    "after",
    [b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n", b"GARBAGE\r\n\r\n", b"\x16\x03\x01"],
    ids=["request", "garbage", "tls"],
)
async def test_nothing_after_connection_close_is_read(edge: Any, after: bytes) -> None:
    """RFC 9112 9.6: a server does not process requests after one with `close`."""
    rp, v1, _ = await edge()
    sent = b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + after
    answers, _, closed = await exchange(rp.port, sent)
    assert [(a[0], a[1].get(b"connection")) for a in answers] == [(200, b"close")]
    assert closed
    assert v1.all_bytes == b"GET /a HTTP/1.1\r\nHost: a\r\n" + FWD


async def test_a_second_answer_from_the_upstream_never_reaches_the_next_request(
    edge: Any,
) -> None:
    """The bytes after a complete response belong to no request: that connection is
    dropped (never reused) and they never reach a client."""
    injected = RAW_OK + b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nINJECTD"
    rp, v1, _ = await edge(answer=lambda c, n: injected if c == 1 else RAW_OK)
    sent = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    answers, raw, _ = await exchange(rp.port, sent)
    assert [(a[0], a[2]) for a in answers] == [(200, b"ok"), (200, b"ok")]
    assert b"INJECTD" not in raw
    assert [bytes(r) for r in v1.received] == [
        b"GET /1 HTTP/1.1\r\nHost: a\r\n" + FWD,
        b"GET /2 HTTP/1.1\r\nHost: a\r\n" + FWD,
    ]


HOST_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
routes:
  - name: a
    match: {{hosts: [a]}}
    to: v1
  - name: b
    match: {{hosts: [b]}}
    to: v2
"""


async def test_absolute_form_target_gives_the_host_for_routing_and_upstream(
    proxy: Any, raw_upstream: Any
) -> None:
    """RFC 9112 3.2.2: with an absolute-form target, its authority is the Host (a Host
    header is ignored), so routing and the upstream agree; origin-form goes upstream."""
    v1, v2 = await raw_upstream(), await raw_upstream()
    rp = await proxy(HOST_RULES.format(v1=v1.endpoint, v2=v2.endpoint))
    sent = b"GET http://a:8080/x?q=1 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    answers, _, _ = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200]
    assert v2.received == []
    assert v1.all_bytes == b"GET /x?q=1 HTTP/1.1\r\nHost: a:8080\r\n" + FWD


async def test_http10_without_host_is_still_served(edge: Any) -> None:
    """RFC 9112 3.2 requires Host of HTTP/1.1 requests only."""
    rp, v1, _ = await edge()
    answers, _, _ = await exchange(rp.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert [a[0] for a in answers] == [200]
    assert bytes(v1.received[0]).startswith(b"GET /old HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_every_connection_line_names_hop_by_hop_fields(edge: Any) -> None:
    """RFC 9110 7.6.1: the fields named by every Connection line are removed."""
    rp, v1, _ = await edge()
    sent = (
        b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: X-A\r\nConnection: X-B, Host\r\n"
        b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\nConnection: close\r\n\r\n"
    )
    answers, _, _ = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200]
    assert v1.all_bytes == b"GET /c HTTP/1.1\r\nHost: a\r\nX-C: 3\r\n" + FWD


# -- nginx's defaults, each with its switch ----------------------------------------------------
@pytest.mark.parametrize(
    ("target", "normalize", "to"),
    [
        (b"/static/../admin/x", True, "v2"),
        (b"/static/%2e%2E/admin/x", True, "v2"),
        (b"//admin/x", True, "v2"),
        (b"/./admin/x", True, "v2"),
        (b"/%61dmin/x", True, "v2"),  # %61 is "a": unreserved, decoded
        (b"/static/../admin/x", False, "v1"),
        (b"/admin%2Fx", True, "v2"),  # %2F is not "/": one segment, still under /admin
    ],
)
async def test_routes_match_the_normalised_path_and_the_target_goes_as_sent(
    edge: Any, target: bytes, normalize: bool, to: str
) -> None:
    """nginx matches locations on the normalised URI (ngx_http_parse_complex_uri), so
    `/static/../admin` cannot pass by a `path_prefix: /admin` route; the upstream still
    gets the target as the client sent it (nginx's proxy_pass without a URI part)."""
    rp, v1, v2 = await edge(normalize_paths=normalize)
    sent = b"GET %b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" % target
    answers, _, _ = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200]
    got = v2 if to == "v2" else v1
    assert got.all_bytes == b"GET %b HTTP/1.1\r\nHost: a\r\n" % target + FWD


@pytest.mark.parametrize("keep", [False, True])
async def test_header_names_with_underscores_are_dropped_by_default(edge: Any, keep: bool) -> None:
    """nginx's underscores_in_headers off: `X_User_Id` is ignored, so that no upstream
    that maps `-` and `_` to one name (CGI, WSGI) can take it for `X-User-Id`."""
    rp, v1, _ = await edge(underscores_in_headers=keep)
    sent = b"GET /u HTTP/1.1\r\nHost: a\r\nX_User_Id: 42\r\nConnection: close\r\n\r\n"
    answers, _, _ = await exchange(rp.port, sent)
    assert [a[0] for a in answers] == [200]
    kept = b"X_User_Id: 42\r\n" if keep else b""
    assert v1.all_bytes == b"GET /u HTTP/1.1\r\nHost: a\r\n" + kept + FWD


async def test_trace_is_405_unless_allowed(edge: Any) -> None:
    rp, v1, _ = await edge()
    answers, _, _ = await exchange(rp.port, b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [a[0] for a in answers] == [405]
    assert v1.received == []
    rp, v1, _ = await edge(allow_trace=True)
    answers, _, _ = await exchange(
        rp.port, b"TRACE / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert [a[0] for a in answers] == [200]
    assert v1.all_bytes == b"TRACE / HTTP/1.1\r\nHost: a\r\n" + FWD


async def test_content_length_is_forwarded_in_canonical_form(edge: Any) -> None:
    """As nginx, which sends the length it parsed: no leading zeros reach the upstream,
    where a parser that reads them as octal would frame the body differently."""
    rp, v1, _ = await edge(answer=lambda c, n: b"HTTP/1.1 200 OK\r\nContent-Length: 002\r\n\r\nok")
    sent = b"POST /n HTTP/1.1\r\nHost: a\r\nContent-Length: 0010\r\nConnection: close\r\n\r\n"
    answers, raw, _ = await exchange(rp.port, sent + b"0123456789")
    assert [(a[0], a[2]) for a in answers] == [(200, b"ok")]
    assert b"\r\nContent-Length: 2\r\n" in raw
    assert (
        v1.all_bytes
        == b"POST /n HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n" + FWD + b"0123456789"
    )


@pytest.mark.parametrize("buffering", [65536, 0], ids=["buffered", "streamed"])
async def test_request_body_is_held_before_the_upstream_is_chosen(
    edge: Any, buffering: int
) -> None:
    """nginx's proxy_request_buffering: a slow uploader holds no upstream connection
    while its (small) body comes; with the buffer off the head goes at once."""
    rp, v1, _ = await edge(request_buffer_bytes=buffering)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    head = b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"
    writer.write(head + b"\r\nabc")
    if buffering:
        await asyncio.sleep(0.2)
        assert v1.received == []  # no upstream connection yet
    else:
        await poll(lambda: asyncio.sleep(0, v1.all_bytes == head + FWD + b"abc"))
    writer.write(b"def")
    answers = await read_answers(reader)
    writer.close()
    assert answers[0][0] == 200
    assert v1.all_bytes == head + FWD + b"abcdef"


async def test_keepalive_requests_closes_after_that_many(edge: Any) -> None:
    """nginx's keepalive_requests: the n-th answer says `Connection: close`, and what
    the client sent after it is not read (RFC 9112 9.6)."""
    rp, v1, _ = await edge(keepalive_requests=3)
    sent = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(5))
    answers, _, closed = await exchange(rp.port, sent)
    assert [(a[0], a[1].get(b"connection")) for a in answers] == [
        (200, None),
        (200, None),
        (200, b"close"),
    ]
    assert closed
    assert v1.requests == 3


async def test_keepalive_time_makes_the_next_request_the_last(edge: Any) -> None:
    """nginx's keepalive_time: an old connection closes after its next answer, so that
    long-lived clients spread again over workers (one restarted gets its share back)."""
    rp, _, _ = await edge(keepalive_time=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    got = _Responses()

    async def ask() -> dict[bytes, bytes]:
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        want = len(got.done) + 1
        while len(got.done) < want:
            got.parser.feed_data(await asyncio.wait_for(reader.read(65536), 5))
        return got.done[-1][1]

    assert b"connection" not in await ask()
    await asyncio.sleep(1.6)  # past keepalive_time, and one tick of the router's clock
    assert (await ask()).get(b"connection") == b"close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


# -- what the hot path must keep doing (each of these once went unnoticed) -------------------
BODY_RULES = """
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
  slow: {{endpoints: ["{slow}"]}}
user_id: [{{json: user.id}}]
body_limit: 1KiB
routes:
  - name: slow
    match: {{path_prefix: /slow}}
    to: slow
  - name: api
    pins:
      - to: v2
        users: ["42"]
    to: v1
"""


@pytest.mark.parametrize("held", [1024, 1500], ids=["body_limit", "more"])
async def test_queued_request_is_routed_from_a_partial_body_of_body_limit_bytes(
    proxy: Any, raw_upstream: Any, held: int
) -> None:
    """A pipelined request whose body is not all there when its turn comes, but holds
    body_limit bytes or more, is routed at once, from those bytes: not complete, so no
    user ID in them counts (the rest could make the JSON another document)."""
    v1, v2 = await raw_upstream(), await raw_upstream()
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(RAW_OK)
        await writer.drain()
        writer.close()

    slow_server = await asyncio.start_server(slow, "127.0.0.1", 0)
    slow_ep = f"127.0.0.1:{slow_server.sockets[0].getsockname()[1]}"
    rp = await proxy(
        BODY_RULES.format(v1=v1.endpoint, v2=v2.endpoint, slow=slow_ep), request_buffer_bytes=0
    )
    document = b'{"user": {"id": 42}}'
    body = document + b" " * (3000 - len(document))  # JSON may end in white space
    head = b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    expected = head + b"Content-Length: 3000\r\n" + FWD
    try:
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
            + head
            + b"Content-Length: 3000\r\n\r\n"
            + body[:held]
        )
        await asyncio.sleep(0.2)  # the router has read it all; /slow is not answered yet
        release.set()
        # Routed (to v1: no user ID in an incomplete body) before the rest is sent.
        await poll(lambda: asyncio.sleep(0, v1.all_bytes == expected + body[:held]), 5)
        writer.write(body[held:])
        answers = await read_answers(reader, 2)
    finally:
        release.set()
        writer.close()
        slow_server.close()
    assert [a[0] for a in answers] == [200, 200]
    assert v1.all_bytes == expected + body
    assert v2.received == []


@pytest.mark.parametrize("buffering", [0, 65536], ids=["unbuffered", "buffered"])
async def test_100_continue_while_the_body_is_held_for_a_user_id(
    proxy: Any, raw_upstream: Any, buffering: int
) -> None:
    """RFC 9110 10.1.1: a client that sent `Expect: 100-continue` waits for it before the
    body; the router, which must read the body to route, has to ask for it."""
    v1, v2 = await raw_upstream(), await raw_upstream()
    rp = await proxy(
        BODY_RULES.format(v1=v1.endpoint, v2=v2.endpoint, slow=v1.endpoint),
        request_buffer_bytes=buffering,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(
        b"POST /api HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert v1.received == v2.received == []  # the body decides: nothing went anywhere yet
    writer.write(b'{"user": {"id": 42}}')
    answers = await read_answers(reader)
    writer.close()
    assert answers[0][0] == 200
    assert bytes(v2.received[0]).endswith(b'\r\n\r\n{"user": {"id": 42}}')  # pinned


async def test_the_routers_own_answer_to_head_has_no_body(setup: Any) -> None:
    """RFC 9110 9.3.2: no content in a response to HEAD, the router's own 404/502 too;
    a body there would be read as the start of the next answer."""
    rp, _ = setup
    raw = await raw_exchange(
        rp.port,
        b"HEAD /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"
        b"HEAD /down HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    first, rest = raw.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 404 ") and b"Content-Length: " in first
    second, rest = rest.split(b"\r\n\r\n", 1)
    assert second.startswith(b"HTTP/1.1 502 ")
    assert rest.startswith(b"HTTP/1.1 404 ")
    assert rest.endswith(b'"no route matched GET /nowhere"}')


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 431)])
async def test_header_section_limit_is_exact(catch_all: Any, extra: int, status: int) -> None:
    """--max-header-bytes (4096 here) counts each field as `name: value` + CRLF: a header
    section of exactly the limit passes, one byte more is a 431."""
    rp, v1 = catch_all
    fixed = len(b"Host: a\r\n") + len(b"Connection: close\r\n") + len(b"X-Pad: \r\n")
    pad = b"p" * (4096 - fixed + extra)
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Pad: %b\r\n\r\n" % pad
    answer = await raw_exchange(rp.port, raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert len(v1.seen) == (1 if status == 200 else 0)


# -- drain ----------------------------------------------------------------------------------
async def test_drain_closes_idle_keepalive_connections_after_the_grace(setup: Any) -> None:
    """An idle keep-alive connection is closed after a short grace (1 s), not left open
    until the drain timeout: a drain with nothing in flight ends in about a second."""
    rp, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-User-Id: 42\r\n\r\n")
    assert (await read_answers(reader))[0][0] == 200
    loop = asyncio.get_running_loop()
    began = loop.time()
    await rp.router.drain(20.0)
    assert loop.time() - began < 5.0
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not reset mid-answer
    writer.close()


async def test_drain_cuts_what_is_still_in_flight_at_its_timeout(setup: Any) -> None:
    rp, _ = setup
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    # user 7: v1 or v1.1, whose read timeout (5 s) is longer than this test
    writer.write(b"GET /api/x?sleep=3 HTTP/1.1\r\nHost: a\r\nX-User-Id: 7\r\n\r\n")
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await rp.router.drain(0.5)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 2) == b""
    assert loop.time() - began < 2.5
    writer.close()


async def test_a_streamed_chunked_body_ends_with_its_last_chunk_upstream(edge: Any) -> None:
    """A chunked body longer than what is held goes upstream as it comes; its end (the
    last chunk, sent later by the client) must follow it, or the upstream waits forever."""
    rp, v1, _ = await edge(request_buffer_bytes=0)
    # a first request leaves an idle keep-alive connection: the next one streams at once
    answers, _, _ = await exchange(rp.port, b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n", answers=1)
    assert [a[0] for a in answers] == [200]
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port)
    piece = b"x" * 20000
    writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
    await poll(lambda: asyncio.sleep(0, piece in v1.all_bytes))  # streaming upstream
    writer.write(b"0\r\n\r\n")
    answers = await read_answers(reader)
    writer.close()
    assert answers[0][0] == 200
    assert v1.all_bytes.endswith(b"\r\n0\r\n\r\n")


@pytest.mark.skipif(lua_available() is not None, reason=lua_available() or "")
async def test_a_script_answer_frames_itself(backends: Any, proxy: Any, tmp_path: Path) -> None:
    """A Lua route that answers itself sets headers with ngx.header; the router frames
    the answer: its own Content-Length (never a second one from the script), no
    Connection of the script's, and a header the script cleared is not sent."""
    v1, v2 = await backends("v1", "v2")
    script = tmp_path / "answer.lua"
    script.write_text(
        'ngx.header["Content-Length"] = "999"\n'
        'ngx.header["Connection"] = "keep-alive, X-A"\n'
        'ngx.header["X-A"] = "1"\n'
        'ngx.header["X-Gone"] = "x"\n'
        'ngx.header["X-Gone"] = nil\n'
        'ngx.say("hi")\n'
        "return ngx.exit(200)\n"
    )
    rp = await proxy(LUA_RULES.format(v1=v1.endpoint, v2=v2.endpoint, script=script))
    raw = await raw_exchange(rp.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 200 ") and body == b"hi\n"
    assert [x for x in lines if x.startswith(b"content-length:")] == [b"content-length: 3"]
    assert [x for x in lines if x.startswith(b"connection:")] == [b"connection: close"]
    assert b"x-a: 1" in lines and not any(x.startswith(b"x-gone") for x in lines)
