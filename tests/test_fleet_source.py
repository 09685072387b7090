"""Rules from etcd: the source on its own (watch, compaction, cache, backoff) and a fleet
of three real `grayroute serve` processes on one key of a real etcd.

Waits are polls with a bound; the bounds that are promises (a push in force in every
router within 1 s; within 3 s once etcd is back) are measured from the moment the write
returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from lua_compat.nginx_check import free_ports
from router.demo import DemoUpstream, RouterProcess, RouterStartError
from router.errors import ConfigError, RulesError
from router.fleet import EtcdLocation
from router.fleet.etcd import EtcdClient
from router.fleet.revisions import EXIT_LOST_RACE, push_value
from router.fleet.source import (
    BACKOFF_MAX,
    CACHE_FILE,
    EtcdSource,
    Loaded,
    backoff_delays,
)
from router.history import kept_path

from conftest import EtcdServer, Serve, poll

RULES = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v2: {{endpoints: ["{v2}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: all
    to: {to}
"""
INVALID = b"format: 1\nupstreams:\n  v1: {endpoints: []}\nroutes:\n  - {name: all, to: v7}\n"


def rules(ups: dict[str, DemoUpstream], to: str) -> bytes:
    return RULES.format(v1=ups["v1"].endpoint, v2=ups["v2"].endpoint, to=to).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(etcd: EtcdServer, key: str, value: bytes) -> int:
    async with EtcdClient([etcd.endpoint]) as client:
        return await client.put(key.encode(), value)


async def push(etcd: EtcdServer, key: str, value: bytes) -> int:
    async with EtcdClient([etcd.endpoint]) as client:
        pushed = await push_value(client, key, value, expect_revision=None, audit={"user": "t"})
        return pushed.revision


async def rules_info(client: httpx.AsyncClient, router: RouterProcess) -> dict[str, Any]:
    resp = await client.get(f"{router.admin_url}/rules")
    assert resp.status_code == 200
    info: dict[str, Any] = resp.json()
    return info


async def in_force(client: httpx.AsyncClient, routers: list[RouterProcess], digest: str) -> bool:
    """Every router and every one of its workers runs `digest`."""
    for router in routers:
        info = await rules_info(client, router)
        if info["digest"] != digest or any(
            w["digest"] != digest or not w["ready"] for w in info["workers"].values()
        ):
            return False
    return True


async def answer(client: httpx.AsyncClient, router: RouterProcess, user: str = "7") -> str:
    resp = await client.get(f"{router.url}/x", headers={"X-User-Id": user})
    assert resp.status_code == 200, resp.text
    version: str = resp.json()["version"]
    return version


async def metric(client: httpx.AsyncClient, router: RouterProcess, line: str) -> float | None:
    text = (await client.get(f"{router.admin_url}/metrics")).text
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


async def start_fleet(
    serve_router: Serve, url: str, tmp_path: Path, n: int = 3, workers: int = 1
) -> list[RouterProcess]:
    return list(
        await asyncio.gather(
            *(
                serve_router(url, workers=workers, args=("--state-dir", str(tmp_path / f"s{i}")))
                for i in range(n)
            )
        )
    )


# -- the source on its own ------------------------------------------------------------------


def test_backoff_doubles_to_two_seconds_with_jitter() -> None:
    delays = backoff_delays(random.Random(7))
    got = [next(delays) for _ in range(8)]
    nominal = [0.1, 0.2, 0.4, 0.8, 1.6, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
    for value, want in zip(got, nominal, strict=True):
        assert want * 0.8 <= value <= want * 1.2
    assert len({round(v / n, 6) for v, n in zip(got, nominal, strict=True)}) > 1  # jittered


def test_etcd_urls() -> None:
    loc = EtcdLocation.parse("etcd://10.0.0.1:2379,etcd-1.shop:2379/grayroute/rules")
    assert loc.endpoints == ("10.0.0.1:2379", "etcd-1.shop:2379")
    assert loc.key == "/grayroute/rules"
    assert loc.url == "etcd://10.0.0.1:2379,etcd-1.shop:2379/grayroute/rules"
    assert loc.state_dir_name() == EtcdLocation.parse("etcd://h:1/grayroute/rules").state_dir_name()
    for bad in ("etcd://h:2379", "etcd:///k", "etcd://h/k", "etcd://h:x/k", "etcd://h:1/"):
        with pytest.raises(ConfigError, match=re.escape("etcd://127.0.0.1:2379/grayroute/rules")):
            EtcdLocation.parse(bad)


def source(etcd_endpoint: str, key: str, state: Path, **kw: Any) -> EtcdSource:
    location = EtcdLocation((etcd_endpoint,), key)
    return EtcdSource(location, EtcdClient([etcd_endpoint], timeout=1.0), str(state), **kw)


def cache(src: EtcdSource, loaded: Loaded) -> None:
    """What the supervisor does with rules it accepts: a copy, then the source's pointer."""
    kept = kept_path(src.state_dir, loaded.snapshot.digest)
    kept.parent.mkdir(parents=True, exist_ok=True)
    assert loaded.raw is not None
    kept.write_bytes(loaded.raw)
    src.accepted(loaded)


async def test_a_compacted_watch_reads_the_key_whole_again(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, upstreams: dict[str, DemoUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    await put(etcd, etcd_key, rules(upstreams, "v1"))
    src = source(etcd.endpoint, etcd_key, tmp_path)
    loaded = await src.initial()
    cache(src, loaded)
    # What the router would miss while away, then a compaction past where it watches from.
    await put(etcd, etcd_key, rules(upstreams, "v2"))
    latest = await put(etcd, etcd_key, INVALID)
    async with EtcdClient([etcd.endpoint]) as client:
        await client.compact(latest)
    reloads: list[str] = []
    with caplog.at_level(logging.WARNING, "grayroute.source"):
        task = asyncio.ensure_future(src.watch(lambda: loaded.snapshot.digest, reloads.append))
        try:
            await poll(lambda: asyncio.sleep(0, reloads), timeout=5)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await src.aclose()
    assert reloads == ["etcd"]
    assert "compacted" in caplog.text and "reading" in caplog.text
    assert src.status()["watching_from"] == latest + 1
    with pytest.raises(RulesError) as info:
        await src.load("etcd")  # what the router then validates: the newest value
    assert str(info.value.problems[0]).startswith(f"{etcd_key}:5:")
    assert src.attempted_digest() == sha(INVALID)


async def test_the_cache_when_etcd_is_away_or_its_value_invalid(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, upstreams: dict[str, DemoUpstream]
) -> None:
    (dead,) = free_ports(1)
    away = source(f"127.0.0.1:{dead}", etcd_key, tmp_path, start_wait=0.3, start_wait_no_cache=0.3)
    with pytest.raises(RulesError) as info:
        await away.initial()  # nothing cached yet: never start with no rules
    assert "etcd is unreachable" in str(info.value) and "no usable cached rules" in str(info.value)

    good = rules(upstreams, "v1")
    revision = await put(etcd, etcd_key, good)
    src = source(etcd.endpoint, etcd_key, tmp_path)
    cache(src, await src.initial())
    pointer = orjson.loads((tmp_path / CACHE_FILE).read_bytes())
    assert pointer["revision"] == revision and pointer["digest"] == sha(good)
    await src.aclose()

    loaded = await away.initial()
    assert (loaded.origin, loaded.revision, loaded.raw) == ("cache", revision, good)
    assert away.kinds() == {"etcd": 0, "cache": 1}
    await away.aclose()

    await put(etcd, etcd_key, INVALID)
    invalid = source(etcd.endpoint, etcd_key, tmp_path)
    loaded = await invalid.initial()
    assert loaded.origin == "cache" and loaded.snapshot.digest == sha(good)
    assert invalid.start_problems()[0].startswith(f"{etcd_key}:5:")
    await invalid.aclose()

    # A cached copy that was altered is never served.
    kept_path(tmp_path, sha(good)).write_bytes(good + b"# edited\n")
    away = source(f"127.0.0.1:{dead}", etcd_key, tmp_path, start_wait=0.3)
    with pytest.raises(RulesError, match="does not match its hash"):
        await away.initial()
    await away.aclose()


# -- a fleet of three routers -----------------------------------------------------------


async def grayroute_push(path: Path, url: str, user: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "push", str(path), url, *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "LOGNAME": user},
    )  # fmt: skip
    out, _ = await proc.communicate()
    return await proc.wait(), out.decode()


async def test_a_fleet_follows_one_key(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, upstreams: dict[str, DemoUpstream],
    serve_router: Serve,
) -> None:  # fmt: skip
    url = etcd.url(etcd_key)
    first = rules(upstreams, "v1")
    await push(etcd, etcd_key, first)
    routers = await start_fleet(serve_router, url, tmp_path)
    async with httpx.AsyncClient(timeout=10.0) as client:
        assert [await answer(client, r) for r in routers] == ["v1"] * 3

        # A push is in force in every router (every worker) within a second.
        second = rules(upstreams, "v2")
        await push(etcd, etcd_key, second)
        pushed_at = time.monotonic()
        await poll(lambda: in_force(client, routers, sha(second)), timeout=5)
        assert time.monotonic() - pushed_at < 1.0
        assert [await answer(client, r) for r in routers] == ["v2"] * 3

        # An invalid value changes nothing anywhere, and every router reports it.
        await put(etcd, etcd_key, INVALID)

        async def all_report_failure() -> bool:
            infos = [await rules_info(client, r) for r in routers]
            return all((i["last_reload"] or {}).get("result") == "failure" for i in infos)

        await poll(all_report_failure, timeout=5)
        for router in routers:
            info = await rules_info(client, router)
            assert info["digest"] == sha(second)
            assert info["last_reload"]["attempted_digest"] == sha(INVALID)
            assert info["last_reload"]["problems"][0].startswith(f"{etcd_key}:5:")
            failures = 'grayroute_rules_reloads_total{result="failure"}'
            assert await metric(client, router, failures) == 1.0
            assert await answer(client, router) == "v2"

        # Two pushes race from the same revision: one wins, the other is refused and
        # names the winner; every router ends with the winner's rules.
        base = await push(etcd, etcd_key, first)
        await poll(lambda: in_force(client, routers, sha(first)), timeout=5)
        alice, bob = tmp_path / "alice.yaml", tmp_path / "bob.yaml"
        alice.write_bytes(second)
        bob.write_bytes(second.replace(b"to: v2", b"to: v1\n    pins: [{to: v2, users: ['7']}]"))
        results = await asyncio.gather(
            grayroute_push(alice, url, "alice", "--expect-revision", str(base)),
            grayroute_push(bob, url, "bob", "--expect-revision", str(base)),
        )
        codes = sorted(code for code, _ in results)
        assert codes == [0, EXIT_LOST_RACE], results
        winner, loser = ("alice", "bob") if results[0][0] == 0 else ("bob", "alice")
        refusal = dict(zip(("alice", "bob"), (out for _, out in results), strict=True))[loser]
        assert re.search(rf"made by {winner} \(on [^)]+\) at \d{{4}}-\d\d-\d\dT[\d:.]+Z", refusal)
        won = (alice if winner == "alice" else bob).read_bytes()
        await poll(lambda: in_force(client, routers, sha(won)), timeout=5)
        assert [await answer(client, r) for r in routers] == ["v2"] * 3


async def test_etcd_down_then_back(
    own_etcd: EtcdServer, tmp_path: Path, upstreams: dict[str, DemoUpstream], serve_router: Serve
) -> None:
    key = "/grayroute/rules"
    url = own_etcd.url(key)
    first = rules(upstreams, "v1")
    await push(own_etcd, key, first)
    routers = await start_fleet(serve_router, url, tmp_path)
    targets = list(routers)  # where the traffic goes; a restarting router is taken out
    statuses: dict[int | str, int] = {}
    stop = asyncio.Event()
    rounds = [0]  # rounds of traffic over `targets` completed

    async def traffic() -> None:
        async with httpx.AsyncClient(timeout=10.0) as client:
            while not stop.is_set():
                for router in list(targets):
                    try:
                        resp = await client.get(f"{router.url}/x", headers={"X-User-Id": "7"})
                        code: int | str = resp.status_code
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    statuses[code] = statuses.get(code, 0) + 1
                rounds[0] += 1
                await asyncio.sleep(0.01)

    load = asyncio.ensure_future(traffic())
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            own_etcd.kill()

            async def disconnected() -> bool:
                infos = [await rules_info(client, r) for r in routers]
                return not any(i["source_status"]["connected"] for i in infos)

            await poll(disconnected, timeout=10)

            # A router restarted while etcd is down serves the rules it cached.
            targets.remove(routers[2])
            after = rounds[0] + 1
            await poll(lambda: asyncio.sleep(0, rounds[0] > after))  # none in flight to it
            await routers[2].stop()
            restarted = await serve_router(
                url, workers=1, args=("--state-dir", str(tmp_path / "s2"))
            )
            routers[2] = restarted
            assert restarted.ready["rules"] == sha(first)
            assert await metric(client, restarted, 'grayroute_rules_source{source="cache"}') == 1
            assert await metric(client, restarted, 'grayroute_rules_source{source="etcd"}') == 0
            assert await answer(client, restarted) == "v1"
            targets.append(restarted)
            await asyncio.sleep(0.5)  # traffic to all three while etcd is still away

            # etcd back: a push is in force everywhere (a router may be waiting out its
            # backoff, at most 2 s + 20 %).
            own_etcd.start()
            second = rules(upstreams, "v2")
            await push(own_etcd, key, second)
            pushed_at = time.monotonic()
            await poll(lambda: in_force(client, routers, sha(second)), timeout=10)
            assert time.monotonic() - pushed_at < 3.0
            assert await metric(client, restarted, 'grayroute_rules_source{source="etcd"}') == 1
            assert [await answer(client, r) for r in routers] == ["v2"] * 3
    finally:
        stop.set()
        await load
    assert set(statuses) == {200}, statuses  # not one failed request throughout
    assert statuses[200] > 50


async def test_a_router_never_starts_without_valid_rules(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path
) -> None:
    url = etcd.url(etcd_key)
    args = ("--state-dir", str(tmp_path / "state"))
    log = tmp_path / "router.log"
    with open(log, "wb") as stderr, pytest.raises(RouterStartError) as info:
        await RouterProcess.start(url, workers=1, args=args, stderr=stderr)
    assert info.value.returncode == 1
    text = log.read_text()
    assert f"{etcd_key}:1:1: etcd: the key does not exist in etcd" in text
    assert f"grayroute push RULES {url}" in text

    await put(etcd, etcd_key, INVALID)
    with open(log, "wb") as stderr, pytest.raises(RouterStartError) as info:
        await RouterProcess.start(url, workers=1, args=args, stderr=stderr)
    assert info.value.returncode == 1
    text = log.read_text()
    assert f"{etcd_key}:5:21: routes[0].to: unknown upstream" in text
    assert "no usable cached rules" in text


async def test_a_silent_etcd_is_noticed_by_the_probe(
    own_etcd: EtcdServer, tmp_path: Path, upstreams: dict[str, DemoUpstream]
) -> None:
    """A peer that stops answering without closing the connection (a partition, a frozen
    process) leaves a watch silent forever; the liveness read notices it."""
    key = "/grayroute/rules"
    await put(own_etcd, key, rules(upstreams, "v1"))
    src = source(own_etcd.endpoint, key, tmp_path, probe_interval=0.2)
    loaded = await src.initial()
    reloads: list[str] = []
    task = asyncio.ensure_future(src.watch(lambda: loaded.snapshot.digest, reloads.append))
    assert own_etcd.proc is not None
    try:
        await put(own_etcd, key, rules(upstreams, "v2"))
        await poll(lambda: asyncio.sleep(0, reloads == ["etcd"]), timeout=5)  # watching
        os.kill(own_etcd.proc.pid, signal.SIGSTOP)  # frozen: connections stay open, silent
        try:
            await poll(lambda: asyncio.sleep(0, not src.connected), timeout=10)
            assert "ReadTimeout" in (src.last_error or "")
        finally:
            os.kill(own_etcd.proc.pid, signal.SIGCONT)
        await poll(lambda: asyncio.sleep(0, src.connected), timeout=10)
        await put(own_etcd, key, rules(upstreams, "v2") + b"# 3\n")  # the watch works again
        await poll(lambda: asyncio.sleep(0, reloads == ["etcd", "etcd"]), timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.aclose()
