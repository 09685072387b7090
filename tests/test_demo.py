"""The demo upstream, the router-process helper, and `grayroute demo` itself."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from router.demo import (
    PROJECT_ROOT,
    DemoUpstream,
    RouterProcess,
    RouterStartError,
    json_body_for,
    start_upstream,
)


@pytest.fixture
async def upstream() -> AsyncIterator[DemoUpstream]:
    up = await start_upstream("v1.1")
    yield up
    await up.close()


async def test_upstream_says_who_answered_and_what_it_got(upstream: DemoUpstream) -> None:
    body = b'{"user": {"id": 42}}'
    async with httpx.AsyncClient() as client:
        resp = await client.post(
            f"http://{upstream.endpoint}/orders/17%2F3?x=1&y=%20",
            content=body,
            headers={"X-User-Id": "42", "Content-Type": "application/json"},
        )
    assert resp.status_code == 200
    got = resp.json()
    assert got["version"] == "v1.1"
    assert got["endpoint"] == upstream.endpoint == f"127.0.0.1:{upstream.port}"
    assert got["method"] == "POST"
    assert got["path"] == "/orders/17%2F3"  # as sent, not decoded
    assert got["query"] == "x=1&y=%20"
    assert got["headers"]["X-User-Id"] == "42"
    assert got["body_bytes"] == len(body)
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_upstream_streams_large_bodies_and_can_be_slow(upstream: DemoUpstream) -> None:
    body = os.urandom(3 * 1024 * 1024 + 7)  # beyond aiohttp's default 1 MiB limit
    async with httpx.AsyncClient(timeout=10.0) as client:
        resp = await client.put(f"http://{upstream.endpoint}/big", content=body)
        assert resp.json()["body_bytes"] == len(body)
        assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        started = time.monotonic()
        slow = await client.get(f"http://{upstream.endpoint}/", headers={"X-Demo-Delay": "0.2"})
        assert slow.status_code == 200
        assert time.monotonic() - started >= 0.2
        resp = await client.get(f"http://{upstream.endpoint}/", headers={"X-Demo-Delay": "x"})
        assert resp.status_code == 200


@pytest.mark.parametrize(
    ("path", "doc"),
    [
        ("uid", {"uid": "7"}),
        ("user.id", {"user": {"id": "7"}}),
        ("items[1].id", {"items": [{}, {"id": "7"}]}),
        ("a.b[0]", {"a": {"b": ["7"]}}),
    ],
)
def test_json_body_for(path: str, doc: object) -> None:
    assert json_body_for(path, "7") == doc


async def test_router_process_reports_a_failed_start(tmp_path: Path) -> None:
    with open(tmp_path / "err.log", "wb") as err, pytest.raises(RouterStartError) as info:
        await RouterProcess.start(tmp_path / "missing.yaml", workers=1, stderr=err)
    assert info.value.returncode == 1
    assert "missing.yaml" in (tmp_path / "err.log").read_text()


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


async def test_grayroute_demo_runs_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """`grayroute demo` end to end, with the router on ephemeral ports and less traffic."""
    if not (PROJECT_ROOT / "rules" / "demo.yaml").is_file():
        pytest.skip("rules/demo.yaml is not there")
    if not _ports_free(18081, 18082, 18083):
        pytest.skip("the demo upstream ports 18081-18083 are in use")
    env = dict(os.environ)
    env.update(
        GRAYROUTE_DEMO_LISTEN="127.0.0.1:0",
        GRAYROUTE_DEMO_ADMIN="127.0.0.1:0",
        GRAYROUTE_DEMO_REQUESTS="300",
    )
    with open(tmp_path / "demo.err", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "demo",
            stdout=asyncio.subprocess.PIPE, stderr=err, env=env, cwd=PROJECT_ROOT,
        )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any("press Ctrl-C" in line for line in lines):
            raw = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert raw, "demo exited early:\n" + "".join(lines)
            lines.append(raw.decode())
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = "".join(lines) + rest.decode()
    errors = (tmp_path / "demo.err").read_text()
    assert proc.returncode == 0, out + errors
    assert "Traceback" not in errors and "Traceback" not in out
    assert "curl -s http://127.0.0.1:" in out and "/metrics" in out
    table = dict(re.findall(r"^  (v[\w.]+)\s+(\d+)\s+[\d.]+%$", out, re.M))
    assert set(table) <= {"v1", "v1.1", "v2"} and table, out
    assert sum(int(n) for n in table.values()) == 300, out
