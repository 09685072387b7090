"""The effective state: run-time weights and endpoints on top of the rule file.

Pure tests of apply_effective, then the same state put in force by a real supervisor in
two real worker processes, observed through HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from router.config import Settings
from router.demo import DemoUpstream
from router.rules import RequestView, decide, load_snapshot_text
from router.rules.effective import Effective, apply_effective
from router.server import reuseport_socket
from router.supervisor import Supervisor

from conftest import poll

RULES = """\
format: 1
upstreams:
  v1:   {endpoints: ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]}
  v1.1: {endpoints: ["127.0.0.1:9004"]}
  v2:   {endpoints: ["127.0.0.1:9005"]}
user_id:
  - header: X-User-Id
routes:
  - name: weighted
    match: {path_prefix: /w}
    pins:
      - {to: v2, users: ["42"]}
    split: {v1: 100, v1.1: 0}
  - name: replicas
    match: {path_prefix: /r}
    split: replicas
  - name: rest
    to: v1
"""


def _view(path: str, user: str | None) -> RequestView:
    headers = {"x-user-id": user} if user is not None else {}
    return RequestView("GET", path, "", "", headers, "127.0.0.1")


def _shares(snapshot_path: str, snap: object, users: int = 4000) -> Counter[str]:
    got: Counter[str] = Counter()
    for i in range(users):
        decision = decide(snap, _view(snapshot_path, f"user-{i}"))  # type: ignore[arg-type]
        got[decision.upstream or ""] += 1
    return got


def test_empty_state_is_the_file_itself() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    assert apply_effective(snap, Effective()) is snap
    assert not Effective()


def test_weights_replace_the_split_and_leave_the_rest_alone() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    eff = Effective().with_weights("weighted", {"v1": 80, "v1.1": 20})
    new = apply_effective(snap, eff)
    assert new is not snap and new.digest == snap.digest
    shares = _shares("/w", new)
    assert 0.17 < shares["v1.1"] / 4000 < 0.23
    assert decide(new, _view("/w", "42")).upstream == "v2"  # pins come first, untouched
    # Routes without a change are the same compiled objects (Lua states are not rebuilt).
    assert new.routes[1] is snap.routes[1] and new.routes[2] is snap.routes[2]
    assert decide(new, _view("/anything", "7")).upstream == "v1"
    # The file's weights are still what the model says.
    assert new.routes[0].model.split is not None
    assert dict(new.routes[0].model.split.weights) == {"v1": 100.0, "v1.1": 0.0}


def test_raising_a_weight_moves_users_only_to_it() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    steps = [1, 5, 20, 50, 100]
    previous: dict[str, str] = {}
    for step in steps:
        eff = Effective().with_weights("weighted", {"v1": 100 - step, "v1.1": step})
        new = apply_effective(snap, eff)
        now = {f"u{i}": decide(new, _view("/w", f"u{i}")).upstream or "" for i in range(2000)}
        moved = [u for u in now if u in previous and previous[u] != now[u]]
        assert all(previous[u] == "v1" and now[u] == "v1.1" for u in moved)
        previous = now
    assert set(previous.values()) == {"v1.1"}


def test_endpoints_change_the_pool_and_replica_counts() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    before = _shares("/r", snap)
    assert 0.2 < before["v1.1"] / 4000 < 0.3  # 1 of 4 replicas (v2 has 1 too: 1/5)
    eff = Effective().with_endpoints("v1.1", (("127.0.0.1", 9100), ("127.0.0.1", 9101)))
    new = apply_effective(snap, eff)
    assert new.upstreams["v1.1"].endpoints == (("127.0.0.1", 9100), ("127.0.0.1", 9101))
    after = _shares("/r", new)
    # v1: 3, v1.1: 2, v2: 1 replicas.
    assert 0.29 < after["v1.1"] / 4000 < 0.38
    # Scaling v1.1 up takes users only from the others, never moves them between them.
    for i in range(2000):
        a = decide(snap, _view("/r", f"user-{i}")).upstream
        b = decide(new, _view("/r", f"user-{i}")).upstream
        assert a == b or b == "v1.1"


def test_zero_replicas_everywhere_keeps_the_file_split() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    eff = Effective()
    for name in ("v1", "v1.1", "v2"):
        eff = eff.with_endpoints(name, ())
    new = apply_effective(snap, eff)
    assert new.routes[1].split is snap.routes[1].split


def test_names_the_file_no_longer_has_are_ignored() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    eff = Effective().with_weights("gone", {"v1": 1}).with_endpoints("gone", (("h", 1),))
    assert apply_effective(snap, eff) is snap


def test_a_default_fallback_applies_where_the_file_gives_none() -> None:
    snap = load_snapshot_text(RULES, "rules.yaml")
    eff = Effective().with_fallback("v1.1", "v1")
    applied = apply_effective(snap, eff)
    assert dict(applied.fallbacks) == {"v1.1": ("v1",)}
    assert applied.routes is snap.routes
    # With weights too, and one that would close a circle is left out.
    both = apply_effective(snap, eff.with_fallback("v1", "v1.1").with_weights("weighted", {}))
    assert dict(both.fallbacks) == {"v1.1": ("v1",)}
    assert apply_effective(snap, eff.with_fallback("v1.1", None)) is snap


def test_json_round_trip_and_bad_input() -> None:
    eff = (
        Effective()
        .with_weights("weighted", {"v1": 95, "v1.1": 5})
        .with_endpoints("v1.1", (("10.0.0.1", 8080),))
        .with_fallback("v1.1", "v1")
    )
    assert Effective.from_json(eff.to_json()) == eff
    assert Effective.from_json(None) == Effective()
    assert (
        eff.with_weights("weighted", None).with_endpoints("v1.1", None).with_fallback("v1.1", None)
        == Effective()
    )
    for bad in ({"weights": {"r": {"v1": -1}}}, {"weights": [1]}, {"endpoints": {"a": [[1]]}}):
        with pytest.raises(ValueError):
            Effective.from_json(bad)


DNS_RULES = """\
format: 1
upstreams:
  stable: {endpoints: {dns: stable.test, port: 8080}}
  canary: {endpoints: {dns: canary.test, port: 8080}}
user_id:
  - header: X-User-Id
routes:
  - name: replicas
    match: {path_prefix: /r}
    split: replicas
  - name: mapping
    match: {path_prefix: /m}
    split: {stable: replicas, canary: replicas}
  - name: pinned
    to: canary
"""


def _pods(count: int, first: int) -> tuple[tuple[str, int], ...]:
    return tuple((f"10.0.0.{first + i}", 8080) for i in range(count))


@pytest.mark.parametrize("path", ["/r", "/m"])
def test_dns_replicas_follow_the_pods_and_move_only_who_must(path: str) -> None:
    """8 stable pods and a canary scaled from 1 to 2: its share goes 1/9 -> 2/10, and the
    users who move are the canary's new ones, all from stable; nobody else moves."""
    snap = load_snapshot_text(DNS_RULES, "rules.yaml")
    eight = Effective().with_endpoints("stable", _pods(8, 10))
    one = apply_effective(snap, eight.with_endpoints("canary", _pods(1, 50)))
    two = apply_effective(snap, eight.with_endpoints("canary", _pods(2, 50)))
    users = 20_000
    before = {i: decide(one, _view(path, f"user-{i}")).upstream for i in range(users)}
    after = {i: decide(two, _view(path, f"user-{i}")).upstream for i in range(users)}
    share_before = sum(u == "canary" for u in before.values()) / users
    share_after = sum(u == "canary" for u in after.values()) / users
    assert abs(share_before - 1 / 9) < 0.01, share_before
    assert abs(share_after - 2 / 10) < 0.01, share_after
    moved = [i for i in before if before[i] != after[i]]
    assert all(before[i] == "stable" and after[i] == "canary" for i in moved)
    # As few as the new shares allow: 2/10 - 1/9 of the users.
    assert abs(len(moved) / users - (2 / 10 - 1 / 9)) < 0.01, len(moved)
    # Scaling back down moves exactly those users back.
    back = {i: decide(one, _view(path, f"user-{i}")).upstream for i in range(users)}
    assert back == before


def test_a_dns_upstream_without_records_gets_nothing_from_replicas() -> None:
    snap = load_snapshot_text(DNS_RULES, "rules.yaml")
    gone = apply_effective(
        snap, Effective().with_endpoints("stable", _pods(3, 10)).with_endpoints("canary", ())
    )
    assert _shares("/r", gone, users=500) == Counter({"stable": 500})
    # A `to` still names it: the proxy answers 503 for an upstream without endpoints.
    assert decide(gone, _view("/p", "7")).upstream == "canary"
    assert gone.upstreams["canary"].endpoints == ()


def test_a_dns_split_with_no_records_anywhere_still_decides() -> None:
    # At load nothing is known yet, and later every name may be gone: each request is
    # still decided (sticky), and its upstream answers for itself (503 or its fallback).
    snap = load_snapshot_text(DNS_RULES, "rules.yaml")
    for current in (snap, apply_effective(snap, Effective().with_endpoints("canary", ()))):
        split = current.routes[0].split
        assert split is not None and split.names == ("stable", "canary")
        shares = _shares("/r", current, users=1000)
        assert set(shares) == {"stable", "canary"} and min(shares.values()) > 400


async def test_every_worker_routes_with_the_state_the_supervisor_sets(
    tmp_path: Path, upstreams: dict[str, DemoUpstream]
) -> None:
    """set_effective reaches both worker processes, and a restarted worker starts with it."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "format: 1\n"
        "upstreams:\n"
        f"  v1: {{endpoints: ['{upstreams['v1'].endpoint}']}}\n"
        f"  v2: {{endpoints: ['{upstreams['v2'].endpoint}']}}\n"
        "user_id: [{header: X-User-Id}]\n"
        "routes:\n"
        "  - {name: all, split: {v1: 100, v2: 0}}\n"
    )
    from router.fleet.source import FileSource

    settings = Settings(
        rules_path=str(rules),
        listen="127.0.0.1:0",
        admin="127.0.0.1:0",
        workers=2,
        state_dir=str(tmp_path / "state"),
        watch_interval=0,
    )
    settings.validate()
    source = FileSource(str(rules), settings.watch_interval)
    loaded = await source.initial()
    with reuseport_socket("127.0.0.1", 0) as reserved:
        port = reserved.getsockname()[1]
        supervisor = Supervisor(settings, loaded, port, str(tmp_path / "state"), source)
        running = asyncio.get_running_loop().create_task(supervisor.run())
        try:
            await poll(lambda: _true(supervisor._all_ready.is_set()), timeout=30)

            async def versions() -> Counter[str]:
                got: Counter[str] = Counter()
                # New connections each time, so both workers' sockets are used.
                for i in range(200):
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(
                            f"http://127.0.0.1:{port}/x", headers={"X-User-Id": f"u{i}"}
                        ) as resp,
                    ):
                        got[(await resp.json())["version"]] += 1
                return got

            assert await versions() == Counter({"v1": 200})
            supervisor.set_effective(Effective().with_weights("all", {"v1": 0, "v2": 100}))
            await poll(lambda: _true(supervisor.effective_applied()), timeout=10)
            assert await versions() == Counter({"v2": 200})
            # A worker that dies is restarted with the state in force, not the file's.
            victim = next(iter(supervisor.workers.values()))
            victim.proc.kill()
            await poll(
                lambda: _true(
                    len(supervisor.workers) == 2
                    and all(w.ready for w in supervisor.workers.values())
                    and all(w.proc is not victim.proc for w in supervisor.workers.values())
                ),
                timeout=30,
            )
            assert await versions() == Counter({"v2": 200})
            assert supervisor.effective_snapshot.routes[0].split is not None
            assert supervisor.effective_snapshot.routes[0].split.names == ("v2",)
        finally:
            supervisor._request_stop(15)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, 30)


async def _true(value: bool) -> bool:
    return value
