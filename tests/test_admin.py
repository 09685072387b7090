"""The admin app: endpoints and the bearer token, on a fake source and on the real serve."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.admin import AdminServer
from router.demo import DemoUpstream, RouterProcess, start_upstream
from router.errors import ConfigError


class FakeSource:
    def __init__(self) -> None:
        self.ready = True

    def render_metrics(self) -> bytes:
        return b"# TYPE grayroute_workers gauge\ngrayroute_workers 2.0\n"

    def readiness(self) -> tuple[bool, str]:
        return self.ready, "2/2 workers up" if self.ready else "1/2 workers up"

    def rules_info(self) -> dict[str, Any]:
        return {"digest": "d" * 64, "source": "rules.yaml", "last_reload": None}

    def console(self) -> None:
        return None

    def rules_history(self, limit: int) -> dict[str, Any]:
        events = [{"action": "reload", "n": i} for i in range(5)]
        return {"state_dir": "/state", "events": events[-limit:]}

    def rollout_control(self) -> None:
        return None


Start = Callable[..., Awaitable[tuple[FakeSource, str]]]


@pytest.fixture
async def admin() -> AsyncIterator[Start]:
    servers: list[AdminServer] = []

    async def start(token: str = "") -> tuple[FakeSource, str]:
        source = FakeSource()
        server = AdminServer(source, "127.0.0.1", 0, token)
        port = await server.start()
        servers.append(server)
        return source, f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.close()


async def test_endpoints_without_token(admin: Start) -> None:
    source, url = await admin()
    async with httpx.AsyncClient() as client:
        metrics = await client.get(f"{url}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "grayroute_workers 2.0" in metrics.text
        health = await client.get(f"{url}/healthz")
        assert (health.status_code, health.text) == (200, "ok\n")
        assert (await client.get(f"{url}/readyz")).status_code == 200
        source.ready = False
        not_ready = await client.get(f"{url}/readyz")
        assert (not_ready.status_code, not_ready.text) == (503, "1/2 workers up\n")
        assert (await client.get(f"{url}/healthz")).status_code == 200
        rules = await client.get(f"{url}/rules")
        assert rules.headers["content-type"].startswith("application/json")
        assert rules.json()["digest"] == "d" * 64
        history = await client.get(f"{url}/rules/history", params={"limit": "2"})
        assert [e["n"] for e in history.json()["events"]] == [3, 4]
        assert len((await client.get(f"{url}/rules/history")).json()["events"]) == 5
        for bad in ("0", "x"):
            resp = await client.get(f"{url}/rules/history", params={"limit": bad})
            assert resp.status_code == 400 and "limit" in resp.json()["detail"]
        assert (await client.get(f"{url}/nope")).status_code == 404


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Bearer s3cret-but-longer", 401),
        ("Basic czNjcmV0", 401),
        ("s3cret", 401),
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),
    ],
)
async def test_token_guards_all_but_probes(
    admin: Start, authorization: str | None, status: int
) -> None:
    _, url = await admin(token="s3cret")
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(headers=headers) as client:
        for path in ("/metrics", "/rules", "/rules/history"):
            resp = await client.get(f"{url}{path}")
            assert resp.status_code == status, path
            if status == 401:
                assert resp.headers["www-authenticate"].startswith("Bearer")
                assert resp.json()["error"] == "unauthorized"
        # Probes never need the token: orchestrators have no secret.
        assert (await client.get(f"{url}/healthz")).status_code == 200
        assert (await client.get(f"{url}/readyz")).status_code == 200


def test_refuses_non_loopback_without_token() -> None:
    with pytest.raises(ConfigError, match="admin-token"):
        AdminServer(FakeSource(), "0.0.0.0", 0)
    with pytest.raises(ConfigError):
        AdminServer(FakeSource(), "192.168.1.10", 9090)
    AdminServer(FakeSource(), "0.0.0.0", 0, token="t")  # allowed with a token
    AdminServer(FakeSource(), "::1", 0)  # loopback needs none
    AdminServer(FakeSource(), "localhost", 0)


# -- on the real `grayroute serve` ---------------------------------------------------------


@pytest.fixture
async def rules(tmp_path: Path) -> AsyncIterator[Path]:
    up: DemoUpstream = await start_upstream("v1")
    path = tmp_path / "rules.yaml"
    path.write_text(
        f'format: 1\nupstreams:\n  v1:\n    endpoints: ["{up.endpoint}"]\n'
        "routes:\n  - name: all\n    to: v1\n"
    )
    yield path
    await up.close()


async def test_serve_with_token(rules: Path, tmp_path: Path) -> None:
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(
            rules, workers=1, args=("--admin-token", "tok-123"), stderr=log
        )
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            assert (await client.get(f"{router.admin_url}/metrics")).status_code == 401
            assert (await client.get(f"{router.admin_url}/rules")).status_code == 401
            assert (await client.get(f"{router.admin_url}/healthz")).status_code == 200
            assert (await client.get(f"{router.admin_url}/readyz")).status_code == 200
            auth = {"Authorization": "Bearer tok-123"}
            metrics = await client.get(f"{router.admin_url}/metrics", headers=auth)
            assert metrics.status_code == 200 and "grayroute_workers 1.0" in metrics.text
            rules_info = await client.get(f"{router.admin_url}/rules", headers=auth)
            assert rules_info.json()["digest"] == router.ready["rules"]
    finally:
        assert await router.stop() == 0


async def test_serve_refuses_public_admin_without_token(rules: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "serve", str(rules),
        "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert out == b""
    assert b"--admin-token" in err and b"Traceback" not in err


async def test_token_from_the_environment(rules: Path, tmp_path: Path) -> None:
    env = {**os.environ, "GRAYROUTE_ADMIN_TOKEN": "from-env"}
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(rules, workers=1, stderr=log, env=env)
    try:
        async with httpx.AsyncClient() as client:
            url = f"{router.admin_url}/rules"
            assert (await client.get(url)).status_code == 401
            ok = await client.get(url, headers={"Authorization": "Bearer from-env"})
            assert ok.status_code == 200
    finally:
        await router.stop()
