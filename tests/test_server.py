"""End to end: `grayroute serve` as a real process, real demo upstreams, real sockets.

Each test starts the router with `--listen 127.0.0.1:0 --admin 127.0.0.1:0` and reads
its ready line; upstreams are demo upstreams on ephemeral ports; the rule file is
written to tmp_path. Waits are polls with a bound, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router.demo import DemoUpstream, RouterProcess, RouterStartError
from router.watch import RulesWatcher

from conftest import Serve, poll, scrape

RULES = """\
format: 1

upstreams:
  v1:
    endpoints: ["{v1}"]
  v2:
    endpoints: ["{v2}"]

user_id:
  - header: X-User-Id

routes:
  - name: all
    pins:
      - to: v2
        users: ["42"]
    to: {to}
"""


def write_rules(path: Path, ups: dict[str, DemoUpstream], to: str = "v1") -> Path:
    path.write_text(RULES.format(v1=ups["v1"].endpoint, v2=ups["v2"].endpoint, to=to))
    return path


@pytest.fixture
def rules(tmp_path: Path, upstreams: dict[str, DemoUpstream]) -> Path:
    return write_rules(tmp_path / "rules.yaml", upstreams)


def fresh_client(**kwargs: Any) -> httpx.AsyncClient:
    """A client that opens a new connection per request, so SO_REUSEPORT spreads them."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_keepalive_connections=0), timeout=10.0, **kwargs
    )


def requests_v(upstream: str, route: str = "all", cls: str = "2xx") -> tuple[str, ...]:
    return (
        "grayroute_requests_total",
        f"route={route}",
        f"status_class={cls}",
        f"upstream={upstream}",
    )


async def versions(router: RouterProcess, n: int, user: str = "1") -> list[str]:
    async with fresh_client() as client:
        out = []
        for _ in range(n):
            resp = await client.get(f"{router.url}/x", headers={"X-User-Id": user})
            assert resp.status_code == 200, resp.text
            out.append(resp.json()["version"])
        return out


async def test_ready_line_and_probes(rules: Path, serve_router: Serve) -> None:
    router = await serve_router(rules, workers=2)
    ready = router.ready
    assert ready["event"] == "ready"
    assert ready["workers"] == 2
    assert ready["pid"] == router.proc.pid
    assert re.fullmatch(r"[0-9a-f]{64}", ready["rules"])
    assert re.fullmatch(r"127\.0\.0\.1:\d+", ready["listen"]) and not ready["listen"].endswith(":0")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", ready["admin"]) and not ready["admin"].endswith(":0")
    async with httpx.AsyncClient(timeout=10.0) as client:
        health = await client.get(f"{router.admin_url}/healthz")
        assert (health.status_code, health.text.strip()) == (200, "ok")
        assert (await client.get(f"{router.admin_url}/readyz")).status_code == 200
        info = (await client.get(f"{router.admin_url}/rules")).json()
    assert info["digest"] == ready["rules"]
    assert set(info["upstreams"]) == {"v1", "v2"}
    assert [r["name"] for r in info["routes"]] == ["all"]
    assert info["last_reload"] is None
    assert await versions(router, 2) == ["v1", "v1"]
    assert await versions(router, 2, user="42") == ["v2", "v2"]


async def test_metrics_are_summed_over_workers(rules: Path, serve_router: Serve) -> None:
    router = await serve_router(rules, workers=2)
    # 40 connections over 2 SO_REUSEPORT workers: the chance one worker got them all is
    # 2**-39, so a total of 40 means both workers' counts were added up.
    assert await versions(router, 30) == ["v1"] * 30
    assert await versions(router, 10, user="42") == ["v2"] * 10
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def flushed() -> dict[tuple[str, ...], float] | None:
            m = await scrape(client, router)
            done = m.get(requests_v("v1")) == 30 and m.get(requests_v("v2")) == 10
            return m if done else None

        m = await poll(flushed)
    assert m[("grayroute_request_duration_seconds_count", "upstream=v1")] == 30
    assert m[("grayroute_request_duration_seconds_bucket", "le=+Inf", "upstream=v2")] == 10
    assert m[("grayroute_request_duration_seconds_sum", "upstream=v1")] > 0
    assert m[("grayroute_workers",)] == 2
    assert m[("grayroute_rules_info", f"digest={router.ready['rules']}", f"source={rules}")] == 1
    assert m[("grayroute_rules_reloads_total", "result=success")] == 0
    assert m[("grayroute_worker_restarts_total",)] == 0


async def test_killed_worker_is_replaced(rules: Path, serve_router: Serve) -> None:
    router = await serve_router(rules, workers=2)
    assert await versions(router, 20) == ["v1"] * 20
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def counted() -> bool:
            return (await scrape(client, router)).get(requests_v("v1")) == 20

        await poll(counted)
        workers = (await client.get(f"{router.admin_url}/rules")).json()["workers"]
        victim = workers["0"]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            info = (await client.get(f"{router.admin_url}/rules")).json()["workers"]
            ready = await client.get(f"{router.admin_url}/readyz")
            return (
                "0" in info
                and info["0"]["pid"] != victim
                and info["0"]["ready"]
                and ready.status_code == 200
            )

        await poll(replaced)
        m = await scrape(client, router)
        assert m[("grayroute_worker_restarts_total",)] == 1
        assert m[("grayroute_workers",)] == 2
        # The dead worker's last totals are kept: the counter did not go down.
        assert m[requests_v("v1")] == 20
    assert await versions(router, 20) == ["v1"] * 20
    assert router.proc.returncode is None


async def test_sighup_reload(
    rules: Path, upstreams: dict[str, DemoUpstream], serve_router: Serve, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    # Watching is off: this is about SIGHUP alone (the watcher is tested below).
    args = ("--state-dir", str(state), "--watch-interval", "0")
    router = await serve_router(rules, workers=2, args=args)
    old = router.ready["rules"]
    assert await versions(router, 4) == ["v1"] * 4
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def rules_info() -> dict[str, Any]:
            resp = await client.get(f"{router.admin_url}/rules")
            result: dict[str, Any] = resp.json()
            return result

        # A valid file: every worker switches, /rules and the metrics follow.
        write_rules(rules, upstreams, to="v2")
        router.signal(signal.SIGHUP)

        async def switched() -> dict[str, Any] | None:
            info = await rules_info()
            digests = {w["digest"] for w in info["workers"].values()}
            return info if info["digest"] != old and digests == {info["digest"]} else None

        info = await poll(switched)
        new = info["digest"]
        assert info["last_reload"]["result"] == "success"
        assert info["last_reload"]["trigger"] == "sighup"
        assert await versions(router, 10) == ["v2"] * 10

        # An invalid file: the old rules stay, /rules names the problem with FILE:LINE:COL.
        text = rules.read_text().replace("to: v2\n", "to: v9\n")
        rules.write_text(text)
        bad_line = text.splitlines().index("    to: v9") + 1
        router.signal(signal.SIGHUP)

        async def failed() -> dict[str, Any] | None:
            info = await rules_info()
            last = info["last_reload"]
            return info if last and last["result"] == "failure" else None

        info = await poll(failed)
        assert info["digest"] == new
        problems = "\n".join(info["last_reload"]["problems"])
        assert re.search(rf"{re.escape(str(rules))}:{bad_line}:\d+: ", problems), problems
        assert await versions(router, 10) == ["v2"] * 10
        m = await scrape(client, router)
        assert m[("grayroute_rules_reloads_total", "result=success")] == 1
        assert m[("grayroute_rules_reloads_total", "result=failure")] == 1
        assert m[("grayroute_rules_info", f"digest={new}", f"source={rules}")] == 1
        assert router.proc.returncode is None
    # The state directory keeps the history and the exact bytes of every accepted file.
    history = [orjson.loads(line) for line in (state / "audit.jsonl").read_bytes().splitlines()]
    assert [(h["action"], h["result"], h["digest"]) for h in history] == [
        ("start", "success", old),
        ("reload", "success", new),
        ("reload", "failure", new),
    ]
    assert history[2]["attempted"] == hashlib.sha256(rules.read_bytes()).hexdigest()
    assert history[2]["problems"] == info["last_reload"]["problems"]
    assert {h["trigger"] for h in history[1:]} == {"sighup"}
    assert all(h["user"] and h["host"] and h["router_pid"] == router.pid for h in history)
    assert (state / "rules" / f"{old}.yaml").is_file()
    assert hashlib.sha256((state / "rules" / f"{new}.yaml").read_bytes()).hexdigest() == new


SHADOWED = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
routes:
  - name: {first}
    {first_match}to: {first_to}
  - name: {second}
    {second_match}to: {second_to}
"""


async def test_a_route_that_never_gets_a_request_is_shown(
    upstreams: dict[str, DemoUpstream], serve_router: Serve, tmp_path: Path
) -> None:
    """A catch-all above the canary's route: /rules and a metric say so, not only the log."""
    rules = tmp_path / "rules.yaml"
    ends = {"v1": upstreams["v1"].endpoint, "v2": upstreams["v2"].endpoint}
    rules.write_text(SHADOWED.format(**ends, first="all", first_match="", first_to="v1",
                                     second="canary", second_match="match: {path_prefix: /x}\n    ",
                                     second_to="v2"))
    router = await serve_router(rules, workers=1, args=("--watch-interval", "0"))
    async with httpx.AsyncClient(timeout=10.0) as client:
        info = (await client.get(f"{router.admin_url}/rules")).json()
        assert [(r["name"], r["shadowed_by"]) for r in info["routes"]] == [
            ("all", None), ("canary", "all")
        ]
        m = await scrape(client, router)
        assert m[("grayroute_route_shadowed", "route=canary", "shadowed_by=all")] == 1
        # The fix, reloaded: nothing is shadowed any more.
        rules.write_text(SHADOWED.format(**ends, first="canary",
                                         first_match="match: {path_prefix: /x}\n    ",
                                         first_to="v2", second="all", second_match="",
                                         second_to="v1"))
        router.signal(signal.SIGHUP)

        async def fixed() -> dict[str, Any] | None:
            info = (await client.get(f"{router.admin_url}/rules")).json()
            return info if [r["name"] for r in info["routes"]] == ["canary", "all"] else None

        info = await poll(fixed)
        assert [r["shadowed_by"] for r in info["routes"]] == [None, None]
        m = await scrape(client, router)
        assert not any(key[0] == "grayroute_route_shadowed" for key in m)


async def test_restarted_worker_keeps_the_rules_in_force(
    rules: Path, upstreams: dict[str, DemoUpstream], serve_router: Serve
) -> None:
    """A file edited without SIGHUP (here: made invalid) does not reach a new worker."""
    router = await serve_router(rules, workers=1)
    rules.write_text(rules.read_text().replace("to: v1\n", "to: v9\n"))
    async with httpx.AsyncClient(timeout=10.0) as client:
        victim = (await client.get(f"{router.admin_url}/rules")).json()["workers"]["0"]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            workers = (await client.get(f"{router.admin_url}/rules")).json()["workers"]
            return "0" in workers and workers["0"]["pid"] != victim and workers["0"]["ready"]

        await poll(replaced)
    assert await versions(router, 3) == ["v1"] * 3


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda text: text.replace("to: v1\n", "to: v2\n"), id="valid"),
        # a load-level error; taken anyway, its first `to` would route to v2
        pytest.param(lambda text: text.replace("to: v1\n", "to: v2\n    to: v1\n"), id="dup-key"),
    ],
)
async def test_restarted_worker_loads_the_version_in_force_not_the_file_on_disk(
    rules: Path, serve_router: Serve, edit: Any
) -> None:
    """A worker started after the file was edited (no reload: watching is off) loads the
    version the supervisor accepted, from the state directory, whatever is on disk."""
    router = await serve_router(rules, workers=1, args=("--watch-interval", "0"))
    rules.write_text(edit(rules.read_text()))
    async with httpx.AsyncClient(timeout=10.0) as client:
        victim = (await client.get(f"{router.admin_url}/rules")).json()["workers"]["0"]["pid"]
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            workers = (await client.get(f"{router.admin_url}/rules")).json()["workers"]
            return "0" in workers and workers["0"]["pid"] != victim and workers["0"]["ready"]

        await poll(replaced)
        info = (await client.get(f"{router.admin_url}/rules")).json()
    assert info["workers"]["0"]["digest"] == router.ready["rules"]
    assert await versions(router, 3) == ["v1"] * 3


async def test_a_file_with_a_duplicate_key_is_never_swapped_in(
    rules: Path, serve_router: Serve, tmp_path: Path
) -> None:
    """A duplicate key is an error of the YAML layer (router.rules.load), before any
    validation: the reload fails, says where, and every worker keeps the rules in force."""
    router = await serve_router(rules, workers=2, args=("--watch-interval", "0"))
    old = router.ready["rules"]
    text = rules.read_text().replace("to: v1\n", "to: v2\n    to: v1\n")
    rules.write_text(text)
    line = text.splitlines().index("    to: v2") + 2  # the second `to` is the duplicate
    router.signal(signal.SIGHUP)
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def failed() -> dict[str, Any] | None:
            info: dict[str, Any] = (await client.get(f"{router.admin_url}/rules")).json()
            last = info["last_reload"]
            return info if last and last["result"] == "failure" else None

        info = await poll(failed)
    problems = "\n".join(info["last_reload"]["problems"])
    assert f"{rules}:{line}:" in problems and "duplicate key" in problems, problems
    assert info["digest"] == old
    assert {w["digest"] for w in info["workers"].values()} == {old}
    assert await versions(router, 6) == ["v1"] * 6
    # a worker told to reload directly (SIGHUP to it) refuses the file too
    os.kill(next(iter(info["workers"].values()))["pid"], signal.SIGHUP)
    log = tmp_path / "router.log"
    await poll(lambda: asyncio.sleep(0, "kept its rules: reload failed" in log.read_text()))
    assert await versions(router, 6) == ["v1"] * 6


async def test_sigterm_drains_and_exits_zero(rules: Path, serve_router: Serve) -> None:
    router = await serve_router(rules, workers=2)
    async with httpx.AsyncClient(timeout=10.0) as client:
        workers = (await client.get(f"{router.admin_url}/rules")).json()["workers"]
        # A request still in flight when SIGTERM arrives is finished, not cut.
        slow = asyncio.ensure_future(
            client.get(f"{router.url}/slow", headers={"X-Demo-Delay": "0.6"})
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        router.signal(signal.SIGTERM)
        resp = await slow
        assert resp.status_code == 200 and resp.json()["version"] == "v1"
    rc = await asyncio.wait_for(router.proc.wait(), 8.0)
    assert rc == 0
    assert time.monotonic() - started < 5.0
    for worker in workers.values():
        with pytest.raises(ProcessLookupError):
            os.kill(worker["pid"], 0)


async def test_invalid_rules_at_start_exit_1(tmp_path: Path, serve_router: Serve) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'format: 1\nupstreams:\n  v1:\n    endpoints: ["127.0.0.1:9"]\n'
        "routes:\n  - name: all\n    to: nowhere\n"
    )
    with pytest.raises(RouterStartError) as info:
        await serve_router(bad)
    assert info.value.returncode == 1
    log = (tmp_path / "router.log").read_text()
    assert re.search(rf"^{re.escape(str(bad))}:7:\d+: ", log, re.M), log
    assert "Traceback" not in log


async def test_listen_port_in_use_exit_1(rules: Path, tmp_path: Path, serve_router: Serve) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(RouterStartError) as info:
            await serve_router(rules, args=("--listen", f"127.0.0.1:{port}"))
    assert info.value.returncode == 1
    log = (tmp_path / "router.log").read_text()
    assert f"--listen 127.0.0.1:{port}" in log and "Traceback" not in log


# -- the rule-file watcher, tick by tick (no processes) ------------------------------------


class Recorder:
    def __init__(self, watcher_path: Path, in_force: str) -> None:
        self.in_force = in_force
        self.calls = 0
        self.watcher = RulesWatcher(
            str(watcher_path), lambda: self.in_force, self.on_change, interval=0.25
        )

    def on_change(self) -> None:
        self.calls += 1


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_watcher_waits_until_the_file_is_still(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"one")
    rec = Recorder(path, sha(b"one"))
    w = rec.watcher
    assert not w.tick(0.0)  # first sight: the signature is new
    assert not w.tick(0.25)  # still, and the content is the rules in force
    path.write_bytes(b"two, half")
    assert not w.tick(0.5)  # changed: wait
    path.write_bytes(b"two, whole")
    os.utime(path, ns=(1, 1))  # make sure the signature moves even on a coarse clock
    assert not w.tick(0.6)  # changed again: the wait starts over
    assert not w.tick(0.7)  # still for 0.1 s only
    assert w.tick(0.85)  # still for 0.25 s: one reload
    assert rec.calls == 1
    assert not w.tick(1.1) and not w.tick(3.0)  # nothing new
    assert rec.calls == 1


def test_watcher_ignores_touch_and_tries_a_bad_file_once(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"good")
    rec = Recorder(path, sha(b"good"))
    w = rec.watcher
    w.tick(0.0)
    w.tick(0.3)
    os.utime(path, ns=(5, 5))  # touched, same content
    assert not w.tick(1.0) and not w.tick(1.3)
    path.write_bytes(b"bad")  # the reload will fail: rules in force stay "good"
    w.tick(2.0)
    assert w.tick(2.3) and rec.calls == 1
    assert not w.tick(2.6) and not w.tick(9.0)  # not retried until it changes again
    rec.in_force = sha(b"fixed")  # e.g. SIGHUP got there first
    path.write_bytes(b"fixed")
    w.tick(10.0)
    assert not w.tick(10.3) and rec.calls == 1


def test_watcher_survives_a_missing_file_and_follows_symlink_swaps(tmp_path: Path) -> None:
    data = tmp_path / "..2026_01_01"
    data.mkdir()
    (data / "rules.yaml").write_bytes(b"v1")
    (tmp_path / "..data").symlink_to(data.name)
    path = tmp_path / "rules.yaml"
    path.symlink_to("..data/rules.yaml")
    rec = Recorder(path, sha(b"v1"))
    w = rec.watcher
    w.tick(0.0)
    w.tick(0.3)
    # kubelet: a new directory, a new ..data link renamed over the old one
    new = tmp_path / "..2026_01_02"
    new.mkdir()
    (new / "rules.yaml").write_bytes(b"v1")  # the same bytes: nothing to do
    (tmp_path / "..data_tmp").symlink_to(new.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert not w.tick(1.0) and not w.tick(1.3)
    newer = tmp_path / "..2026_01_03"
    newer.mkdir()
    (newer / "rules.yaml").write_bytes(b"v2")
    (tmp_path / "..data_tmp").symlink_to(newer.name)
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    w.tick(2.0)
    assert w.tick(2.3) and rec.calls == 1
    (tmp_path / "..data").unlink()  # gone (mid-swap, or deleted)
    assert not w.tick(3.0) and not w.tick(3.3) and not w.tick(3.6)
    (tmp_path / "..data").symlink_to(newer.name)  # back, the same content
    w.tick(4.0)
    assert not w.tick(4.3) and rec.calls == 1


# -- reloads under load (real processes) ------------------------------------------------------


class Load:
    """Clients sending requests until stopped: half keep-alive, half a new connection each.

    Every answer is recorded as (monotonic time, version); anything but a 200 from an
    upstream is a failure.
    """

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.answers: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if i % 2 else 0)
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                try:
                    resp = await client.get(f"{self.url}/load", headers={"X-User-Id": f"{i}-{n}"})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if resp.status_code != 200:
                    self.failures.append(f"{resp.status_code} {resp.text[:200]}")
                else:
                    self.answers.append((time.monotonic(), resp.json()["version"]))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def last_answer(self, version: str) -> float:
        return max((t for t, v in self.answers if v == version), default=-1.0)


def _write_in_place(path: Path, data: bytes) -> None:
    """As an editor that rewrites the file itself: truncate, then two writes 50 ms apart."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.05)  # a reader now would see half a file: the watcher must not
        f.write(data[len(data) // 2 :])


def _write_renamed(path: Path, data: bytes) -> None:
    tmp = path.with_name(".rules.yaml.swp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _configmap(root: Path, data: bytes, generation: int) -> Path:
    """The layout kubelet gives a ConfigMap volume; a new generation swaps `..data`."""
    gen = root / f"..2026_01_01_00_00_0{generation}.000000001"
    gen.mkdir()
    (gen / "rules.yaml").write_bytes(data)
    link = root / "..data"
    if not link.exists():
        link.symlink_to(gen.name)
        (root / "rules.yaml").symlink_to("..data/rules.yaml")
    else:
        old = os.readlink(link)
        (root / "..data_tmp").symlink_to(gen.name)
        os.replace(root / "..data_tmp", link)
        for stale in (root / old).iterdir():
            stale.unlink()
        (root / old).rmdir()
    return root / "rules.yaml"


@pytest.mark.parametrize("how", ["sighup", "in-place", "rename", "configmap"])
async def test_reload_under_load(
    how: str, upstreams: dict[str, DemoUpstream], serve_router: Serve, tmp_path: Path
) -> None:
    """Routing switches in every worker within 2 s, and not one request fails."""
    v1 = RULES.format(v1=upstreams["v1"].endpoint, v2=upstreams["v2"].endpoint, to="v1")
    v2 = v1.replace("    to: v1\n", "    to: v2\n").encode()
    if how == "configmap":
        (tmp_path / "cm").mkdir()
        rules = _configmap(tmp_path / "cm", v1.encode(), 1)
    else:
        rules = tmp_path / "rules.yaml"
        rules.write_text(v1)
    args = ("--watch-interval", "0") if how == "sighup" else ()
    router = await serve_router(rules, workers=2, args=args)
    load = Load(router.url)
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await poll(lambda: asyncio.sleep(0.3, len(load.answers) > 20))
            changed = time.monotonic()
            wall = time.time()
            if how == "sighup":
                rules.write_bytes(v2)
                router.signal(signal.SIGHUP)
            elif how == "in-place":
                await asyncio.to_thread(_write_in_place, rules, v2)
            elif how == "rename":
                _write_renamed(rules, v2)
            else:
                _configmap(tmp_path / "cm", v2, 2)
            new = hashlib.sha256(v2).hexdigest()

            async def everywhere() -> bool:
                info = (await client.get(f"{router.admin_url}/rules")).json()
                return {w["digest"] for w in info["workers"].values()} == {new}

            await poll(everywhere, timeout=5.0)
            in_force = time.monotonic() - changed
            # and traffic shows it: v2 only, from then on
            await poll(lambda: asyncio.sleep(0.1, load.last_answer("v2") > changed + in_force))
            await asyncio.sleep(0.3)
            await load.stop()
            switched = load.last_answer("v1") - changed
            print(f"{how}: all workers on the new rules after {in_force:.3f} s; last v1 answer "
                  f"{switched:.3f} s after the change; {len(load.answers)} requests")  # fmt: skip
            assert load.failures == []
            assert in_force < 2.0 and switched < 2.0
            m = await scrape(client, router)
            info = (await client.get(f"{router.admin_url}/rules")).json()
    finally:
        await load.stop()
    assert m[("grayroute_rules_reloads_total", "result=success")] == 1
    assert m[("grayroute_rules_reloads_total", "result=failure")] == 0  # no half file read
    assert m[("grayroute_rules_info", f"digest={new}", f"source={rules}")] == 1
    assert m[("grayroute_rules_loaded_timestamp_seconds",)] >= wall - 0.01
    assert m[("grayroute_rules_last_reload_successful",)] == 1
    assert info["last_reload"]["trigger"] == ("sighup" if how == "sighup" else "watch")


async def test_invalid_edit_changes_nothing_and_is_reported(
    upstreams: dict[str, DemoUpstream], serve_router: Serve, tmp_path: Path
) -> None:
    rules = write_rules(tmp_path / "rules.yaml", upstreams)
    good = rules.read_bytes()
    router = await serve_router(rules, workers=2)
    old = router.ready["rules"]
    load = Load(router.url)
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            await poll(lambda: asyncio.sleep(0.3, len(load.answers) > 20))
            bad = good.replace(b"    to: v1\n", b"    to: v7\n")
            _write_renamed(rules, bad)
            bad_line = bad.decode().splitlines().index("    to: v7") + 1

            async def failed() -> dict[str, Any] | None:
                info: dict[str, Any] = (await client.get(f"{router.admin_url}/rules")).json()
                last = info["last_reload"]
                return info if last and last["result"] == "failure" else None

            info = await poll(failed, timeout=5.0)
            await asyncio.sleep(0.5)  # traffic goes on, on the old rules
            await load.stop()
            assert load.failures == []
            assert {v for _, v in load.answers} == {"v1"}
            # /rules: the rules in force are the old ones; the problem with FILE:LINE:COL
            assert info["digest"] == old
            assert {w["digest"] for w in info["workers"].values()} == {old}
            assert info["last_reload"]["trigger"] == "watch"
            assert info["last_reload"]["attempted_digest"] == hashlib.sha256(bad).hexdigest()
            problems = "\n".join(info["last_reload"]["problems"])
            assert f"{rules}:{bad_line}:" in problems and "unknown upstream" in problems
            # metrics
            m = await scrape(client, router)
            assert m[("grayroute_rules_reloads_total", "result=failure")] == 1
            assert m[("grayroute_rules_reloads_total", "result=success")] == 0
            assert m[("grayroute_rules_last_reload_successful",)] == 0
            assert m[("grayroute_rules_info", f"digest={old}", f"source={rules}")] == 1
            # the log
            log = (tmp_path / "router.log").read_text()
            assert "reload failed; keeping rules" in log
            assert re.search(rf"ERROR .*{re.escape(str(rules))}:{bad_line}:\d+: ", log), log

            # fixed: in force, and the failure gauge clears
            _write_renamed(rules, good.replace(b"    to: v1\n", b"    to: v2\n"))

            async def fixed() -> bool:
                m = await scrape(client, router)
                return m.get(("grayroute_rules_reloads_total", "result=success")) == 1

            await poll(fixed, timeout=5.0)
            m = await scrape(client, router)
            assert m[("grayroute_rules_last_reload_successful",)] == 1
        assert await versions(router, 4) == ["v2"] * 4
    finally:
        await load.stop()


async def test_sigterm_under_load_fails_no_accepted_request(
    rules: Path, serve_router: Serve
) -> None:
    """Clients keep sending through SIGTERM: every request the router accepted is answered
    in full; after the drain, new connections are refused (a balancer's cue to go
    elsewhere), which is not a failure."""
    router = await serve_router(rules, workers=2, args=("--drain-timeout", "5"))
    port = int(router.ready["listen"].rpartition(":")[2])
    answered = 0
    failures: list[str] = []
    stop = asyncio.Event()

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        """One request on an open connection; True when the connection may be reused."""
        writer.write(
            b"GET /load HTTP/1.1\r\nHost: a\r\nX-User-Id: %d\r\nX-Demo-Delay: 0.02\r\n\r\n" % n
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        return b"connection: close" not in head.lower()

    async def client(i: int, keep_alive: bool) -> None:
        nonlocal answered
        n = i * 100_000
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if stop.is_set():
                    return  # refused after the drain: not accepted, not failed
                await asyncio.sleep(0.01)
                continue
            try:
                while True:
                    n += 1
                    reusable = await exchange(reader, writer, n)
                    answered += 1
                    if not (keep_alive and reusable):
                        break
            except Exception as exc:
                failures.append(f"client {i}: {exc!r}")
            finally:
                writer.close()

    clients = [asyncio.ensure_future(client(i, keep_alive=i % 2 == 0)) for i in range(8)]
    await asyncio.sleep(1.0)
    before = answered
    stop.set()
    router.signal(signal.SIGTERM)
    assert await asyncio.wait_for(router.proc.wait(), 10) == 0
    await asyncio.wait_for(asyncio.gather(*clients), 10)
    assert before > 50
    assert failures == []
