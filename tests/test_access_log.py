"""The access log: the writer on its own, then `grayroute serve --access-log` end to end."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router.access_log import AccessLogWriter, trace_id
from router.demo import DemoUpstream, RouterProcess
from router.diff import diff_lines
from router.rules import Decision, load_snapshot

from conftest import RAW_OK

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_fields_of_a_routed_and_an_unrouted_request(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    w = AccessLogWriter(str(path))
    decision = Decision("orders", "v1.1", "42", "header:X-User-Id", "split by user ID -> v1.1")
    w.log("10.0.0.7", b"POST", b"/orders?x=\xe9", b"Api.Example.com:8080", 201, 0.0012345,
          "orders", decision)  # fmt: skip
    w.log("::1", b"GET", b"/nowhere", None, 404, 0.0001, "", None)
    assert path.read_bytes() == b""  # buffered: nothing written before a flush
    w.flush()
    first, second = lines(path)
    assert TIME.fullmatch(str(first.pop("time")))
    assert first == {
        "client": "10.0.0.7",
        "method": "POST",
        "path": "/orders?x=\u00e9",  # bytes as latin-1, as the rules see them
        "host": "Api.Example.com:8080",
        "status": 201,
        "duration_ms": 1.234,
        "route": "orders",
        "upstream": "v1.1",
        "user_id": "42",
        "user_id_source": "header:X-User-Id",
        "reason": "split by user ID -> v1.1",
        "trace_id": None,
    }
    assert second["route"] is None and second["upstream"] is None and second["host"] is None
    assert second["status"] == 404 and second["reason"] is None
    assert path.stat().st_mode & 0o777 == 0o640 & ~_umask()  # personal data: not public
    w.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_one_write_per_flush_and_a_cap_on_waiting_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "access.log"
    w = AccessLogWriter(str(path), max_lines=100)
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes | memoryview) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    for i in range(250):
        w.log("127.0.0.1", b"GET", f"/{i}".encode(), b"h", 200, 0.001, "r", None)
    assert len(writes) == 2  # at 100 and 200 lines, one write() each
    w.close()
    assert len(writes) == 3
    assert [line["path"] for line in lines(path)] == [f"/{i}" for i in range(250)]


def test_reopens_after_rotation_and_survives_write_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "access.log"
    w = AccessLogWriter(str(path))
    w.log("c", b"GET", b"/before", None, 200, 0.0, "", None)
    w.flush()
    os.rename(path, tmp_path / "access.log.1")  # logrotate's `create` mode
    w.reopen_if_moved()
    w.log("c", b"GET", b"/after", None, 200, 0.0, "", None)
    w.close()
    assert [x["path"] for x in lines(tmp_path / "access.log.1")] == ["/before"]
    assert [x["path"] for x in lines(path)] == ["/after"]
    # a full disk: lines are dropped and counted, one log line, no exception
    full = AccessLogWriter("/dev/full")
    with caplog.at_level(logging.ERROR, "grayroute.access_log"):
        for _ in range(3):
            full.log("c", b"GET", b"/", None, 200, 0.0, "", None)
            full.flush()
    assert full.dropped == 3
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    full.close()


def test_a_user_id_that_is_not_utf8_is_still_logged(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    w = AccessLogWriter(str(path))
    bad = Decision("r", "v1", "ab\udc80", "json:user.id", "to v1")  # a lone surrogate
    w.log("c", b"GET", b"/", None, 200, 0.0, "r", bad)
    w.close()
    assert lines(path)[0]["user_id"] == "ab\\udc80"


# W3C Trace Context's example, and a SkyWalking sw8 header whose trace ID is "a1b2c3.4.16000"
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SW8 = (
    b"1-YTFiMmMzLjQuMTYwMDA=-c2VnbWVudA==-3-c2VydmljZQ==-aW5zdGFuY2U="
    b"-L29yZGVycw==-MTAuMC4wLjE6ODA="
)


@pytest.mark.parametrize(
    ("traceparent", "sw8", "expected"),
    [
        (TRACEPARENT, None, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (None, SW8, "a1b2c3.4.16000"),
        (TRACEPARENT, SW8, "4bf92f3577b34da6a3ce929d0e0e4736"),  # W3C first
        (TRACEPARENT.upper(), SW8, "a1b2c3.4.16000"),  # hex must be lower-case: sw8's
        # a later version may carry more fields; version ff, zero IDs and a version 00
        # with more fields are invalid
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", None,
         "4bf92f3577b34da6a3ce929d0e0e4736"),
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None, None),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None, None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None, None),
        (TRACEPARENT + b"-x", None, None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None, None),  # 31 digits
        (None, b"1-YTFiMmMzLjQuMTYwMDA=-c2Vn", None),  # 3 fields, not 8
        (None, SW8.replace(b"YTFiMmMzLjQuMTYwMDA=", b"not*base64"), None),
        (None, SW8.replace(b"YTFiMmMzLjQuMTYwMDA=", b"//79"), None),  # not UTF-8
        (None, SW8.replace(b"1-", b"2-", 1), None),  # the sample flag is 0 or 1
        (None, None, None),
    ],
)  # fmt: skip
def test_trace_id_of_traceparent_and_sw8(
    traceparent: bytes | None, sw8: bytes | None, expected: str | None
) -> None:
    assert trace_id(traceparent, sw8) == expected


async def test_trace_context_is_forwarded_intact_and_logged(
    raw_upstream: Any, tmp_path: Path
) -> None:
    """traceparent, tracestate and sw8 reach the upstream byte for byte (names as the client spelt
    them, a malformed one too: the router does not judge other systems' headers), and
    the access log has the trace ID, so a search in the log leads to the trace."""
    upstream = await raw_upstream(lambda conn, n: RAW_OK)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f'format: 1\nupstreams:\n  v1: {{endpoints: ["{upstream.endpoint}"]}}\n'
        "routes:\n  - name: all\n    to: v1\n"
    )
    access = tmp_path / "access.log"
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(
            rules, workers=1, args=("--access-log", str(access)), stderr=log
        )
    heads = [
        b"TraceParent: " + TRACEPARENT + b"\r\n",
        b"sw8: " + SW8 + b"\r\n",
        b"traceparent: %b\r\ntracestate: congo=t61rcWkgMzE\r\nSW8: %b\r\n" % (TRACEPARENT, SW8),
        b"traceparent: 00-not-a-trace\r\n",
        b"",
    ]
    try:
        host, port = router.ready["listen"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        for i, head in enumerate(heads):
            writer.write(b"GET /t/%d HTTP/1.1\r\nHost: a\r\n%b\r\n" % (i, head))
            await writer.drain()
            status = await reader.readuntil(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 200 "), status
            await reader.readexactly(2)
        writer.close()
    finally:
        assert await router.stop() == 0
    received = upstream.all_bytes
    for i, head in enumerate(heads):
        start = received.index(b"GET /t/%d " % i)
        end = received.index(b"\r\n\r\n", start)
        assert head in received[start : end + 2]  # the lines as sent, in their order
    logged = {str(r["path"]): r["trace_id"] for r in lines(access)}
    assert logged == {
        "/t/0": "4bf92f3577b34da6a3ce929d0e0e4736",
        "/t/1": "a1b2c3.4.16000",
        "/t/2": "4bf92f3577b34da6a3ce929d0e0e4736",
        "/t/3": None,
        "/t/4": None,
    }


def test_cost_per_request(tmp_path: Path) -> None:
    w = AccessLogWriter(str(tmp_path / "access.log"), max_lines=1 << 30)
    decision = Decision("orders", "v1", "1234567", "header:X-User-Id",
                        "split by user ID -> v1 (weights v1=95, v1.1=5)")  # fmt: skip
    n = 50_000
    started = time.perf_counter()
    for _ in range(n):
        w.log("10.1.2.3", b"GET", b"/orders/17?x=1", b"api.example.com", 200, 0.00123,
              "orders", decision)  # fmt: skip
    per_call = (time.perf_counter() - started) / n
    started = time.perf_counter()
    w.flush()
    flush = time.perf_counter() - started
    w.close()
    print(f"access log: {per_call * 1e6:.2f} us per request, {flush * 1e3:.1f} ms to write {n}")
    assert per_call < 50e-6  # ~2 us on the development machine; generous for noisy CI


# -- end to end ------------------------------------------------------------------------------


RULES = """\
format: 1
upstreams:
  v1:
    endpoints: ["{v1}"]
  v2:
    endpoints: ["{v2}"]
user_id:
  - header: X-User-Id
  - json: user.id
routes:
  - name: api
    match: {{path_prefix: /api}}
    pins:
      - to: v2
        users: ["5"]
    split: {{v1: 50, v2: 50}}
"""


async def test_serve_writes_one_line_per_request_and_diff_reads_it(
    upstreams: dict[str, DemoUpstream], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=upstreams["v1"].endpoint, v2=upstreams["v2"].endpoint))
    access = tmp_path / "access.log"
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(
            rules, workers=2, args=("--access-log", str(access)), stderr=log
        )
    sent = 0
    try:
        limits = httpx.Limits(max_keepalive_connections=0)  # both workers get some
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:

            async def one(i: int) -> None:
                nonlocal sent
                if i % 4 == 0:  # the user ID in a JSON body
                    resp = await client.post(f"{router.url}/api/orders", json={"user": {"id": i}})
                elif i % 4 == 1:
                    resp = await client.get(f"{router.url}/api/x", headers={"X-User-Id": str(i)})
                elif i % 4 == 2:  # anonymous: split at random
                    resp = await client.get(f"{router.url}/api/anon?i={i}")
                else:  # no route
                    resp = await client.get(f"{router.url}/elsewhere")
                assert resp.status_code in (200, 404)
                sent += 1

            for start in range(0, 200, 20):
                await asyncio.gather(*(one(i) for i in range(start, start + 20)))
    finally:
        assert await router.stop() == 0  # the last lines are written while draining
    records = lines(access)
    assert len(records) == sent == 200
    statuses = sorted(r["status"] for r in records)
    assert statuses.count(404) == 50 and statuses.count(200) == 150
    body_users = [r for r in records if r["user_id_source"] == "json:user.id"]
    assert len(body_users) == 50 and all(r["reason"] for r in body_users)
    five = [r for r in records if r["user_id"] == "5"]
    assert [r["upstream"] for r in five] == ["v2"] and five[0]["reason"] == "pin[0] users"
    assert all(TIME.fullmatch(str(r["time"])) and r["duration_ms"] >= 0 for r in records)

    # diff --access-log: NEW pins user 8 instead of user 5; the split stays
    new = tmp_path / "new.yaml"
    new.write_text(rules.read_text().replace('users: ["5"]', 'users: ["8"]'))
    old_snap, new_snap = load_snapshot(str(rules)), load_snapshot(str(new))
    with open(access, "rb") as f:
        result = diff_lines(old_snap, new_snap, f, "access-log")
    api = result.routes["api"]
    assert api.users == 100  # 0, 1, 4, 5, 8, 9, ...: by JSON body or header
    assert api.anonymous_requests == 50 and api.anonymous_random == 50
    split = old_snap.routes[0].split
    assert split is not None
    expected = {}
    if split.names[split.pick("5")] == "v1":  # 5 leaves the pin for the split's choice
        expected[("v2", "v1", None)] = 1
    if split.names[split.pick("8")] == "v1":  # 8 leaves the split's choice for the pin
        expected[("v1", "v2", None)] = 1
    assert dict(api.moves) == expected
    assert api.broken_promise == 0
    assert result.routes["(no route)"].anonymous_requests == 50
