"""A fleet's rollouts: three real `grayroute serve` processes on one key of a real etcd,
real upstreams that fail as told, real traffic to every router, intervals of a second.
The leader's lease is 2 s (--leader-ttl) so that a dead leader is replaced quickly.

Each interval needs `min_requests` per version summed over the fleet; on a busy machine
an interval may be NODATA and hold (never fail), and the tests wait longer."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson

from router.demo import RouterProcess
from router.fleet import default_router_id
from router.fleet.etcd import EtcdClient
from router.fleet.rollouts import FleetController, counts_period
from router.rollout.state import FileStore
from router.rules import load_snapshot_text

from conftest import Backend, EtcdServer, Serve, Traffic, poll, rollout_rules, until

TTL = 2  # the leader's lease (s)
INTERVAL = 1.0  # the rollout's (s)


# -- pure parts -----------------------------------------------------------------------------


def test_a_routers_id_is_its_listen_address_or_its_host_name() -> None:
    assert default_router_id("10.0.0.7", 8080) == "10.0.0.7:8080"
    assert default_router_id("::1", 8080) == "[::1]:8080"
    pod = default_router_id("0.0.0.0", 8080)  # every pod listens there: its name tells
    assert pod.endswith(":8080") and not pod.startswith("0.0.0.0")


def test_counts_are_published_five_times_an_interval_within_bounds() -> None:
    assert counts_period([1.0, 30.0]) == 0.2
    assert counts_period([5.0]) == 1.0
    assert counts_period([300.0]) == 2.0  # a long interval: still fresh at takeover
    assert counts_period([0.1]) == 0.2  # not more often than 5 times a second
    assert counts_period([]) == 2.0  # no rollout: the lease is kept, nothing written


# -- controllers in this process, on a real etcd: the races --------------------------------

RULES_HERE = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v1.1: {endpoints: ["127.0.0.1:9002"]}
routes:
  - name: orders
    split: {v1: 100, v1.1: 0}
    rollout: {canary: v1.1, stable: v1, steps: [10, 50], interval: 60s}
"""
WHO = {"user": "alice", "host": "laptop", "peer": "127.0.0.1"}


class Plane:
    """What a controller acts through (router.rollout.controller.Plane), kept here."""

    def __init__(self) -> None:
        self.weights: dict[str, Mapping[str, float] | None] = {}
        self.audits: list[dict[str, Any]] = []

    def put_weights(
        self, route: str, weights: Mapping[str, float] | None, fallback: tuple[str, str | None]
    ) -> None:
        self.weights[route] = weights

    def weights_applied(self) -> bool:
        return True

    def weights_in_force(self, route: str) -> Mapping[str, float]:
        return {}

    def audit(self, entry: dict[str, Any]) -> None:
        self.audits.append(entry)

    def now_iso(self) -> str:
        return "2026-01-05T10:00:00.000Z"

    def rules_digest(self) -> str:
        return "d" * 64


def controller(endpoint: str, key: str, name: str, state_dir: Path) -> FleetController:
    state_dir.mkdir(exist_ok=True)
    ctl = FleetController(
        Plane(),
        FileStore(state_dir),
        None,
        client=EtcdClient([endpoint]),
        key=key,
        router_id=name,
        totals=dict,
        leader_ttl=1,
    )
    ctl.sync(load_snapshot_text(RULES_HERE, "rules.yaml"))
    return ctl


def plane(ctl: FleetController) -> Plane:
    assert isinstance(ctl.plane, Plane)
    return ctl.plane


@contextlib.asynccontextmanager
async def running(*controllers: FleetController) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(c.run()) for c in controllers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_deposed_leaders_judgement_is_refused_and_it_stops_judging(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path
) -> None:
    a = controller(etcd.endpoint, etcd_key, "a", tmp_path / "a")
    b = controller(etcd.endpoint, etcd_key, "b", tmp_path / "b")
    async with running(a):
        await until(a.judging)
        await until(lambda: "orders" in a.seen)  # it stored the rollout it started
        assert [e["result"] for e in plane(a).audits] == ["Progressing"]  # told once
        async with running(b):
            await until(lambda: b.leader() == "a" and "orders" in b.seen)
            assert plane(b).audits == []  # b started it in force too, and said nothing
            # The leader key goes (an operator, a lease lost unnoticed): b leads now,
            # while a still believes it does.
            async with EtcdClient([etcd.endpoint]) as client:
                await client.delete(f"{etcd_key}/leader".encode())
            await until(b.judging)
            before = a.states["orders"]
            a.tick("orders")  # a judgement of a's, sent as b leads
            await until(lambda: not a.judging())
            await until(lambda: not a._writing["orders"])
            assert a.states["orders"] is before and len(plane(a).audits) == 1
            assert a.seen["orders"].revision == b.seen["orders"].revision
            assert b.leader() == "b"


async def test_an_action_decided_on_a_stale_state_is_decided_again(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path
) -> None:
    a = controller(etcd.endpoint, etcd_key, "a", tmp_path / "a")
    b = controller(etcd.endpoint, etcd_key, "b", tmp_path / "b")
    async with running(a):
        await until(lambda: "orders" in a.seen)
        await b._read_all()  # b saw the state once, then hears nothing more
        assert b.states["orders"].phase == "Progressing"
        status, body = await a.perform("orders", "abort", WHO)
        assert (status, body["phase"], body["weight"]) == (200, "Aborted", 0.0)
        # b's pause, decided on what it saw, is refused by etcd; decided again on the
        # stored state, it is refused for what it is.
        status, body = await b.perform("orders", "pause", WHO)
        assert status == 409
        assert body["detail"] == "the rollout is Aborted: there is nothing to pause"
        assert b.states["orders"].phase == "Aborted" and plane(b).weights["orders"] == {
            "v1.1": 0.0,
            "v1": 100.0,
        }
        # An action on a router that does not lead is the fleet's: the leader applies it.
        status, body = await b.perform("orders", "retry", WHO)
        await b.client.aclose()
        assert (status, body["phase"]) == (200, "Progressing")
        await until(lambda: a.states["orders"].phase == "Progressing")
        assert plane(a).weights["orders"] == {"v1.1": 10.0, "v1": 90.0}
        # Each audit log has the transitions its router made, with who asked.
        assert [(e["result"], e["user"]) for e in plane(b).audits] == [("Progressing", "alice")]
        assert [e["result"] for e in plane(a).audits] == ["Progressing", "Aborted"]


async def test_without_etcd_an_action_changes_nothing(tmp_path: Path) -> None:
    ctl = controller("127.0.0.1:1", "/k", "a", tmp_path)
    weights = plane(ctl).weights["orders"]
    status, body = await ctl.perform("orders", "abort", WHO)
    assert status == 503 and "nothing was changed" in body["detail"]
    assert ctl.states["orders"].phase == "Progressing" and plane(ctl).weights["orders"] == weights
    assert plane(ctl).audits == []
    await ctl.client.aclose()


# -- three routers ----------------------------------------------------------------------------


async def put_rules(etcd: EtcdServer, key: str, v1: Backend, v11: Backend, **block: Any) -> None:
    text = rollout_rules(v1, v11, interval=f"{INTERVAL:g}s", **block)
    async with EtcdClient([etcd.endpoint]) as client:
        await client.put(key.encode(), text.encode())


async def start_fleet(serve_router: Serve, url: str, tmp_path: Path) -> list[RouterProcess]:
    return list(
        await asyncio.gather(
            *(
                serve_router(
                    url,
                    workers=1,
                    args=("--state-dir", str(tmp_path / f"s{i}"), "--leader-ttl", str(TTL)),
                )
                for i in range(3)
            )
        )
    )


@contextlib.asynccontextmanager
async def traffic(routers: list[RouterProcess]) -> AsyncIterator[dict[str, Traffic]]:
    """Traffic to every router (60 requests/s each), by its id (listen address); one taken
    out of the dict is the caller's to stop."""
    loads = {r.ready["listen"]: Traffic(r.url, rate=60.0) for r in routers}
    for load in loads.values():
        await load.__aenter__()
    try:
        yield loads
    finally:
        for load in loads.values():
            await load.__aexit__(None, None, None)


async def rollouts(routers: list[RouterProcess]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        answers = [await client.get(f"{r.admin_url}/rollouts/orders") for r in routers]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json() for a in answers]


def all_agree(routers: list[RouterProcess], check: Callable[[dict[str, Any]], bool]) -> Any:
    async def probe() -> list[dict[str, Any]] | None:
        found = await rollouts(routers)
        return found if all(check(r) for r in found) else None

    return probe


async def stored(etcd: EtcdServer, key: str) -> tuple[int, dict[str, Any]]:
    """The rollout's state in etcd, and the revision that wrote it."""
    async with EtcdClient([etcd.endpoint]) as client:
        kv, _ = await client.get(f"{key}/rollouts/orders".encode())
    assert kv is not None
    state: dict[str, Any] = orjson.loads(kv.value)
    return kv.mod_revision, state


def audit(tmp_path: Path, i: int) -> list[dict[str, Any]]:
    path = tmp_path / f"s{i}" / "audit.jsonl"
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return [e for e in entries if e.get("action") == "rollout"]


async def send(router: RouterProcess, n: int) -> list[str]:
    """`n` requests from distinct users; the versions that answered."""
    async with httpx.AsyncClient(base_url=router.url) as client:
        answers = [await client.get("/orders", headers={"X-User-Id": str(i)}) for i in range(n)]
    return [a.headers["X-Version"] for a in answers]


async def test_a_failing_canary_is_rolled_back_fleet_wide_and_all_three_agree(
    etcd: EtcdServer,
    etcd_key: str,
    tmp_path: Path,
    backends: Callable[..., Any],
    serve_router: Serve,
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    v11.fail_ratio = 0.3  # 503 to 30% of its requests
    # 40 requests per version per interval: enough to tell 30% failures from none (fewer
    # may leave the error rate unproven, and a busy machine's latency noise decide).
    await put_rules(etcd, etcd_key, v1, v11, steps="[50, 100]", min_requests=40)
    routers = await start_fleet(serve_router, etcd.url(etcd_key), tmp_path)
    ids = [r.ready["listen"] for r in routers]
    async with traffic(routers):
        failed = await poll(all_agree(routers, lambda r: r["phase"] == "Failed"), timeout=40)
    leader = failed[0]["leader"]
    assert leader in ids and [r["leader"] for r in failed] == [leader] * 3
    assert [r["weight"] for r in failed] == [0.0] * 3
    assert failed[0]["reason"].startswith("rolled back: FAIL 2 of 2 in this step (error_rate")
    # Judged on the fleet's traffic: all three sent some of what the leader counted.
    judged = failed[0]["analysis"][0]["gates"]["error_rate"]
    assert judged["canary"] > 0.2 and judged["stable"] == 0.0
    # None of the three sends a request to the canary any more.
    reached = len(v11.seen)
    for router in routers:
        assert set(await send(router, 50)) == {"v1"}
    assert len(v11.seen) == reached
    # The leader judged and wrote the rollback in its audit log; the others applied it.
    judge = ids.index(leader)
    assert audit(tmp_path, judge)[-1]["result"] == "Failed"
    assert audit(tmp_path, judge)[-1]["router"] == leader
    for i in set(range(3)) - {judge}:
        assert "Failed" not in [e["result"] for e in audit(tmp_path, i)]
    _, state = await stored(etcd, etcd_key)
    assert (state["phase"], state["weight"]) == ("Failed", 0.0)
    async with httpx.AsyncClient() as client:
        gauges = [(await client.get(f"{r.admin_url}/metrics")).text for r in routers]
    shown = [f"grayroute_rollout_leader {float(i == judge)}" in g for i, g in enumerate(gauges)]
    assert shown == [True] * 3


async def test_the_leader_killed_mid_rollout_another_continues_at_its_step_and_finishes(
    etcd: EtcdServer,
    etcd_key: str,
    tmp_path: Path,
    backends: Callable[..., Any],
    serve_router: Serve,
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    # A healthy canary: on a busy machine the p99 of a second's few requests is noise,
    # which must not fail it (this test is about who judges, not about latency).
    await put_rules(
        etcd,
        etcd_key,
        v1,
        v11,
        steps="[30, 60, 100]",
        min_requests=15,
        gates="{latency: {min_increase: 1s}}",
    )
    routers = await start_fleet(serve_router, etcd.url(etcd_key), tmp_path)
    ids = [r.ready["listen"] for r in routers]
    async with traffic(routers) as load:
        await poll(all_agree(routers, lambda r: r["step"] == 1), timeout=40)
        leader = (await rollouts(routers))[0]["leader"]
        dead = routers[ids.index(leader)]
        await load.pop(leader).__aexit__(None, None, None)  # its clients would see it die
        dead.signal(signal.SIGKILL)  # no goodbye: its lease has to expire
        killed = time.monotonic()
        survivors = [r for r in routers if r is not dead]
        await asyncio.sleep(0.3)  # a write it sent just before dying has landed by now
        before, was = await stored(etcd, etcd_key)
        assert was["step"] == 1 and was["phase"] in ("Progressing", "Holding")

        # Another one judges within the lease's TTL plus one interval, from the stored
        # state: the same step, its history and FAIL count carried on, never step 0.
        async def next_judgement() -> dict[str, Any] | None:
            revision, state = await stored(etcd, etcd_key)
            return state if revision > before else None

        first = await poll(next_judgement, timeout=TTL + INTERVAL + 10)
        took = time.monotonic() - killed
        assert took < TTL + INTERVAL, took
        assert first["analysis"][1:] == was["analysis"][: len(first["analysis"]) - 1]
        assert first["step"] in (1, 2)
        if first["step"] == 1:
            assert first["failures"] >= was["failures"]
        news = await poll(all_agree(survivors, lambda r: r["leader"] not in (leader, None)))
        assert news[0]["leader"] == news[1]["leader"] and news[0]["leader"] in ids

        done = await poll(
            all_agree(survivors, lambda r: r["phase"] in ("Succeeded", "Failed")), timeout=40
        )
        assert [(r["phase"], r["step"], r["weight"]) for r in done] == [("Succeeded", 2, 100.0)] * 2
    # Split traffic goes to the canary through both routers now.
    for router in survivors:
        assert set(await send(router, 20)) == {"v1.1"}
    # The new leader's audit log has the rest of the rollout, not a start at step 0.
    judge = ids.index(news[0]["leader"])
    steps = [(e["result"], e["step"]) for e in audit(tmp_path, judge)]
    assert steps[-1] == ("Succeeded", 2) and ("Progressing", 0) not in steps
