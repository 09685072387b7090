"""Fallback upstreams: the chains, the control plane's defaults, and requests through the
real router when an upstream has no endpoint up (none listed, all down by health check,
refused connections) and after it recovers."""

from __future__ import annotations

import textwrap
from typing import Any

import httpx

from router.rules import check_text, load_snapshot_text
from router.rules.fallback import fallback_chains, find_cycle, with_default_fallbacks

from conftest import Backend, RunningProxy, Switchable, poll

# -- the chains --------------------------------------------------------------------------


def test_find_cycle() -> None:
    assert find_cycle({"a": "b", "b": "c"}, "a") is None
    assert find_cycle({"a": "b", "b": "a"}, "a") == ("a", "b", "a")
    # A chain that runs into a circle further on: the circle, from its first member.
    assert find_cycle({"x": "a", "a": "b", "b": "a"}, "x") == ("a", "b", "a")
    assert find_cycle({"a": "a"}, "a") == ("a", "a")


def test_chains_follow_fallbacks_in_order_and_stop_before_a_repeat() -> None:
    assert dict(fallback_chains({"a": "b", "b": "c", "d": "c"})) == {
        "a": ("b", "c"),
        "b": ("c",),
        "d": ("c",),
    }
    assert dict(fallback_chains({"a": "b", "b": "a"})) == {"a": ("b",), "b": ("a",)}


BASE = """\
format: 1
upstreams:
  v1:
    endpoints: ["127.0.0.1:9001"]
  v1.1:
    endpoints: ["127.0.0.1:9002"]
  v2:
    endpoints: ["127.0.0.1:9003"]
    fallback: v1
routes:
  - name: main
    pins: [{to: v2, client_cidrs: [10.0.0.0/8]}]
    split: {v1: 90, v1.1: 10}
"""


def test_the_snapshot_carries_the_file_chains() -> None:
    snapshot = load_snapshot_text(BASE, "rules.yaml")
    assert dict(snapshot.fallbacks) == {"v2": ("v1",)}
    assert snapshot.ruleset.upstreams[2].fallback == "v1"


def test_default_fallbacks_apply_where_the_file_gives_none() -> None:
    snapshot = load_snapshot_text(BASE, "rules.yaml")
    # A rollout: the canary v1.1 falls back to its stable version v1 by default.
    with_canary = with_default_fallbacks(snapshot, {"v1.1": "v1"})
    assert dict(with_canary.fallbacks) == {"v2": ("v1",), "v1.1": ("v1",)}
    assert with_canary.routes is snapshot.routes  # nothing else is rebuilt
    # The file's own fallback wins over a default.
    assert dict(with_default_fallbacks(snapshot, {"v2": "v1.1"}).fallbacks) == {"v2": ("v1",)}
    # Unknown names, itself, and a default that would close a circle are left out.
    assert with_default_fallbacks(snapshot, {"gone": "v1", "v1.1": "gone"}) is snapshot
    assert with_default_fallbacks(snapshot, {"v1.1": "v1.1"}) is snapshot
    assert dict(with_default_fallbacks(snapshot, {"v1": "v2"}).fallbacks) == {"v2": ("v1",)}
    # Defaults are given whole each time: applied again, the earlier ones are gone.
    again = with_default_fallbacks(with_canary, {})
    assert dict(again.fallbacks) == {"v2": ("v1",)}


# -- checking the file -------------------------------------------------------------------


def problems(text: str) -> list[str]:
    return [str(p) for p in check_text(text, "rules.yaml")]


def test_unknown_fallback_with_a_suggestion() -> None:
    assert problems(BASE.replace("fallback: v1", "fallback: v1.2")) == [
        "rules.yaml:9:15: upstreams.v2.fallback: unknown upstream "
        "(known: v1, v1.1, v2; did you mean v1.1?)"
    ]


def test_fallback_to_itself() -> None:
    assert problems(BASE.replace("fallback: v1", "fallback: v2")) == [
        "rules.yaml:9:15: upstreams.v2.fallback: `v2` falls back to itself "
        "(name another upstream, such as the stable version, or remove `fallback:`)"
    ]


def test_fallback_cycle_is_reported_once() -> None:
    text = BASE.replace(
        '    endpoints: ["127.0.0.1:9001"]\n',
        '    endpoints: ["127.0.0.1:9001"]\n    fallback: v1.1\n',
    ).replace(
        '    endpoints: ["127.0.0.1:9002"]\n',
        '    endpoints: ["127.0.0.1:9002"]\n    fallback: v2\n',
    )
    assert problems(text) == [
        "rules.yaml:5:15: upstreams.v1.fallback: fallbacks go round in a circle: "
        "v1 -> v1.1 -> v2 -> v1 (a chain of fallbacks must end somewhere; remove `fallback:` "
        "from one of them, e.g. from upstreams.v2)"
    ]


def test_fallback_must_be_a_name() -> None:
    assert problems(BASE.replace("fallback: v1", "fallback: [v1]")) == [
        "rules.yaml:9:15: upstreams.v2.fallback: expected upstream name (text), found a list "
        "(write the upstream name)"
    ]


def test_an_upstream_without_endpoints_may_take_requests_when_its_fallback_has_some() -> None:
    scaled = BASE.replace('endpoints: ["127.0.0.1:9003"]', "endpoints: []")
    assert problems(scaled) == []
    without = scaled.replace("    fallback: v1\n", "")
    assert problems(without)[0].startswith(
        "rules.yaml:11:17: routes[0].pins[0].to: upstream `v2` has no endpoints"
    )


def test_a_fallback_without_endpoints_is_a_warning() -> None:
    text = BASE.replace('endpoints: ["127.0.0.1:9001"]', "endpoints: []").replace(
        "split: {v1: 90, v1.1: 10}", "split: {v1: 0, v1.1: 10}"
    )
    assert problems(text) == [
        "rules.yaml:9:15: warning: upstreams.v2.fallback: `v1` has no endpoints, so requests "
        "that fall back to it fail (list endpoints under upstreams.v1, or fall back to another "
        "upstream)",
        "rules.yaml:13:17: warning: routes[0].split.v1: weight 0: this upstream gets no requests "
        "from this split (raise the weight or remove the line)",
    ]


def test_an_upstream_used_only_as_a_fallback_is_used() -> None:
    text = BASE.replace(
        "routes:\n", '  v0:\n    endpoints: ["127.0.0.1:9000"]\nroutes:\n'
    ).replace("fallback: v1", "fallback: v0")
    assert problems(text) == []


# -- through the real router -------------------------------------------------------------

RULES = """
format: 1
upstreams:
  canary:
    endpoints: [{canary}]
    {extra}
    fallback: stable
  stable:
    endpoints: ["{stable}"]
routes:
  - name: all
    to: canary
"""


def rules(canary: str, stable: Backend | Switchable, extra: str = "") -> str:
    endpoint = stable.endpoint if isinstance(stable, Backend) else f"127.0.0.1:{stable.port}"
    return textwrap.dedent(RULES).format(canary=canary, stable=endpoint, extra=extra)


async def versions(rp: RunningProxy, n: int) -> list[str]:
    async with httpx.AsyncClient(base_url=rp.url) as client:
        answers = [await client.get("/x") for _ in range(n)]
    assert {r.status_code for r in answers} == {200}, [r.text for r in answers]
    return [r.headers["X-Version"] for r in answers]


async def test_an_upstream_without_endpoints_falls_back(backends: Any, proxy: Any) -> None:
    (stable,) = await backends("stable")
    rp = await proxy(rules("", stable))
    assert await versions(rp, 5) == ["stable"] * 5
    assert rp.metrics.fallbacks == {("canary", "stable"): 5}
    # Counted under the upstream that answered.
    assert rp.metrics.requests == {("all", "stable", 200): 5}


async def test_all_endpoints_down_by_health_check_fall_back_and_come_back(
    switchable: Any, backends: Any, proxy: Any
) -> None:
    (stable,) = await backends("stable")
    a, b = await switchable("canary"), await switchable("canary")
    a.healthy = b.healthy = False
    extra = "health_check: {path: /healthz, interval: 50ms}"
    rp = await proxy(rules(f'"127.0.0.1:{a.port}", "127.0.0.1:{b.port}"', stable, extra))

    async def all_to_stable() -> bool:
        return await versions(rp, 4) == ["stable"] * 4

    await poll(all_to_stable)
    assert a.requests == b.requests == 0
    assert rp.metrics.fallbacks[("canary", "stable")] >= 4
    assert rp.metrics.errors == {}  # nothing was tried and refused
    b.healthy = True

    async def back_on_b() -> bool:
        return await versions(rp, 4) == ["canary"] * 4

    await poll(back_on_b)
    assert a.requests == 0 and b.requests >= 4


async def test_refused_connections_fall_back_at_once_and_recover_after_fail_timeout(
    switchable: Any, proxy: Any
) -> None:
    stable = await switchable("stable")
    canary = await switchable("canary")
    await canary.stop()  # its port now refuses connections
    # fail_timeout: long enough that the requests below all fall within it on a busy machine
    rp = await proxy(rules(f'"127.0.0.1:{canary.port}"', stable), fail_timeout=2.0)
    # The first request finds the endpoint refusing and is sent to the fallback in the
    # same exchange: the client never sees a 502.
    assert await versions(rp, 1) == ["stable"]
    assert rp.metrics.errors == {("canary", "connect"): 1}
    assert rp.metrics.fallbacks == {("canary", "stable"): 1}
    # Passive down: the next requests go straight to the fallback, nothing is retried.
    assert await versions(rp, 5) == ["stable"] * 5
    assert rp.metrics.errors == {("canary", "connect"): 1}
    assert rp.metrics.fallbacks == {("canary", "stable"): 6}
    await canary.start()  # the same port, accepting again

    async def recovered() -> bool:
        return (await versions(rp, 1)) == ["canary"]

    await poll(recovered)
    assert await versions(rp, 3) == ["canary"] * 3
    assert canary.requests == 4


async def test_a_chain_is_followed_and_without_a_fallback_nothing_changes(
    backends: Any, proxy: Any
) -> None:
    (last,) = await backends("last")
    text = f"""
    format: 1
    upstreams:
      a: {{endpoints: [], fallback: b}}
      b: {{endpoints: ["127.0.0.1:1"], fallback: c}}
      c: {{endpoints: ["{last.endpoint}"]}}
      lone: {{endpoints: ["127.0.0.1:1"]}}
    routes:
      - {{name: lone, match: {{path_prefix: /lone}}, to: lone}}
      - {{name: all, to: a}}
    """
    rp = await proxy(text, fail_timeout=30)
    assert await versions(rp, 2) == ["last", "last"]
    # a has none: to b; b refuses: to c. Then b is down and a goes straight to c.
    assert rp.metrics.fallbacks == {("a", "b"): 1, ("b", "c"): 1, ("a", "c"): 1}
    async with httpx.AsyncClient(base_url=rp.url) as client:
        answer = await client.get("/lone")
    assert answer.status_code == 502
    assert answer.json()["error"] == "upstream_unavailable"
