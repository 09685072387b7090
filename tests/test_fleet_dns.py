"""Endpoints from DNS (router/fleet/dns.py): lookups against a real DNS server (dnsmasq),
the discovery loop, and a fleet of real routers whose `replicas` split follows pods
(upstreams on 127.0.0.N) as they come and go."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.resolver
import httpx
import pytest

from router.demo import RouterProcess
from router.fleet.dns import (
    LOOKUP_RESULTS,
    LOOKUP_TIMEOUT,
    EndpointDiscovery,
    Lookup,
    Resolver,
    classify,
    sort_addresses,
)
from router.rules import RequestView, decide, load_snapshot_text
from router.rules.effective import Effective, apply_effective

from conftest import Backend, Dnsmasq, poll, scrape

# -- what a lookup means -----------------------------------------------------------------


def _no_nameservers(*answers: object) -> dns.resolver.NoNameservers:
    errors = [("127.0.0.1", False, 53, answer, None) for answer in answers]
    return dns.resolver.NoNameservers(request=dns.message.make_query("a.test", "A"), errors=errors)


@pytest.mark.parametrize(
    ("exc", "result"),
    [
        (dns.resolver.NXDOMAIN(), "nxdomain"),
        (dns.resolver.LifetimeTimeout(timeout=2.0, errors=[]), "timeout"),
        (_no_nameservers("SERVFAIL"), "servfail"),
        (_no_nameservers("REFUSED", "SERVFAIL"), "servfail"),
        (_no_nameservers(dns.exception.Timeout()), "timeout"),
        (_no_nameservers("REFUSED"), "error"),
        (_no_nameservers(ConnectionRefusedError()), "error"),
        (dns.resolver.YXDOMAIN(), "error"),
        (ValueError("bad"), "error"),
    ],
)
def test_classify(exc: BaseException, result: str) -> None:
    assert classify(exc) == result
    assert result in LOOKUP_RESULTS


def test_addresses_are_sorted_and_unique() -> None:
    assert sort_addresses(["10.0.0.10", "::1", "10.0.0.9", "10.0.0.10", "2001:db8::1"]) == (
        "10.0.0.9",
        "10.0.0.10",
        "::1",
        "2001:db8::1",
    )


# -- lookups against real servers ---------------------------------------------------------


async def test_lookups_against_a_real_dns_server(dnsmasq: Dnsmasq) -> None:
    resolver = Resolver([("127.0.0.1", dnsmasq.port)])
    await dnsmasq.set("canary", "127.0.0.21", "127.0.0.20", "::1")
    # A and AAAA both, sorted.
    assert await resolver.lookup(dnsmasq.name("canary")) == Lookup(
        "ok", ("127.0.0.20", "127.0.0.21", "::1")
    )
    await dnsmasq.set("canary", "127.0.0.20")  # no AAAA now: that is no error
    assert await resolver.lookup(dnsmasq.name("canary")) == Lookup("ok", ("127.0.0.20",))
    await dnsmasq.set("canary")
    gone = await resolver.lookup(dnsmasq.name("canary"))
    assert (gone.result, gone.addresses) == ("nxdomain", ())
    # A name the server will not answer for (REFUSED): nothing learnt.
    refused = await resolver.lookup("orders.example")
    assert (refused.result, refused.addresses) == ("error", None)
    assert "REFUSED" in refused.detail


@pytest.fixture
def silent_dns_port() -> Iterator[int]:
    """A UDP port where something listens and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


async def test_a_server_that_never_answers_is_a_timeout(silent_dns_port: int) -> None:
    resolver = Resolver([("127.0.0.1", silent_dns_port)])
    started = time.monotonic()
    lookup = await resolver.lookup("canary.pods.test")
    assert (lookup.result, lookup.addresses) == ("timeout", None)
    assert time.monotonic() - started < LOOKUP_TIMEOUT + 2


class _ServfailServer(asyncio.DatagramProtocol):
    """A DNS server that answers every query with SERVFAIL (as a broken upstream does)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = dns.message.make_response(dns.message.from_wire(data))
        reply.set_rcode(dns.rcode.SERVFAIL)
        self.transport.sendto(reply.to_wire(), addr)


async def test_servfail_is_told_apart() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        _ServfailServer, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        lookup = await Resolver([("127.0.0.1", port)]).lookup("canary.pods.test")
        assert (lookup.result, lookup.addresses) == ("servfail", None)
    finally:
        transport.close()


def test_the_system_resolver_comes_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n")
    assert Resolver(resolv_conf=str(conf)).servers == ["10.96.0.10:53"]


async def test_without_any_dns_server_lookups_fail_and_say_why(tmp_path: Path) -> None:
    counts: dict[tuple[str, str], int] = {}
    discovery = EndpointDiscovery(
        lambda name, endpoints: None, counts, resolv_conf=str(tmp_path / "missing")
    )
    discovery.follow(_upstreams(DISCOVERY_RULES, 8080))
    try:
        assert await discovery.settle(5) == []
        assert counts[("canary", "error")] == 1
        last = discovery.describe()["canary"]["last_lookup"]
        assert last["result"] == "error" and "--resolver" in last["detail"]
    finally:
        await discovery.close()


# -- the discovery loop --------------------------------------------------------------------

DISCOVERY_RULES = """\
format: 1
upstreams:
  canary: {{endpoints: {{dns: canary.pods.test, port: {port}, interval: 200ms}}}}
  static: {{endpoints: ["127.0.0.1:{port}"]}}
routes:
  - {{name: all, split: {{canary: replicas, static: replicas}}}}
"""


def _upstreams(template: str, port: int) -> Any:
    return load_snapshot_text(template.format(port=port), "rules.yaml").upstreams


async def test_discovery_publishes_changes_and_keeps_endpoints_when_dns_fails(
    dnsmasq: Dnsmasq,
) -> None:
    published: list[tuple[str, Any]] = []
    counts: dict[tuple[str, str], int] = {}
    discovery = EndpointDiscovery(
        lambda name, endpoints: published.append((name, endpoints)),
        counts,
        [("127.0.0.1", dnsmasq.port)],
    )
    await dnsmasq.set("canary", "127.0.0.20")
    discovery.follow(_upstreams(DISCOVERY_RULES, 8080))
    try:
        assert await discovery.settle(5) == []
        assert published == [("canary", (("127.0.0.20", 8080),))]
        assert {r: counts[("canary", r)] for r in LOOKUP_RESULTS}["ok"] >= 1
        assert set(counts) == {("canary", r) for r in LOOKUP_RESULTS}  # all exported, at 0

        two = (("127.0.0.20", 8080), ("127.0.0.21", 8080))
        await dnsmasq.set("canary", "127.0.0.21", "127.0.0.20")
        await poll(lambda: _true(published[-1] == ("canary", two)))
        assert len(published) == 2  # unchanged answers publish nothing

        # Nobody answers: lookups time out, the endpoints found last stay.
        dnsmasq.pause()
        try:
            await poll(lambda: _true(counts[("canary", "timeout")] >= 1), LOOKUP_TIMEOUT + 3)
        finally:
            dnsmasq.resume()
        assert published[-1] == ("canary", two) and len(published) == 2
        assert discovery.describe()["canary"]["last_lookup"]["result"] in ("timeout", "ok")

        # The name is gone: zero endpoints.
        await dnsmasq.set("canary")
        await poll(lambda: _true(published[-1] == ("canary", ())))
        assert counts[("canary", "nxdomain")] >= 1
        info = discovery.describe()["canary"]
        assert (info["name"], info["port"], info["interval"]) == ("canary.pods.test", 8080, 0.2)
        assert info["servers"] == [dnsmasq.resolver]

        # Rules without it any more: it goes back to the file's endpoints (None).
        static_only = "format: 1\nupstreams: {{canary: {{endpoints: ['127.0.0.1:{port}']}}}}\n"
        static_only += "routes: [{{name: all, to: canary}}]\n"
        discovery.follow(_upstreams(static_only, 8080))
        assert published[-1] == ("canary", None)
        assert discovery.describe() == {}
    finally:
        await discovery.close()


async def test_a_changed_port_starts_over_with_a_lookup(dnsmasq: Dnsmasq) -> None:
    published: list[tuple[str, Any]] = []
    discovery = EndpointDiscovery(
        lambda name, endpoints: published.append((name, endpoints)),
        {},
        [("127.0.0.1", dnsmasq.port)],
    )
    await dnsmasq.set("canary", "127.0.0.20")
    discovery.follow(_upstreams(DISCOVERY_RULES, 8080))
    try:
        await discovery.settle(5)
        discovery.follow(_upstreams(DISCOVERY_RULES, 8081))
        await poll(lambda: _true(published[-1] == ("canary", (("127.0.0.20", 8081),))))
        assert ("canary", None) not in published  # never dropped to the file's list
    finally:
        await discovery.close()


async def _true(value: bool) -> bool:
    return value


# -- a fleet of routers following the pods ----------------------------------------------------

INTERVAL = 1.0
FLEET_RULES = """\
format: 1
upstreams:
  stable: {{endpoints: {{dns: stable.pods.test, port: {port}, interval: 1s}}}}
  canary: {{endpoints: {{dns: canary.pods.test, port: {port}, interval: 1s}}}}
user_id:
  - header: X-User-Id
routes:
  - name: canary-only
    match: {{path_prefix: /canary}}
    to: canary
  - name: orders
    split: replicas
"""
STABLE_HOSTS = [f"127.0.0.{i}" for i in range(10, 18)]  # 8 pods
CANARY_HOSTS = ["127.0.0.20", "127.0.0.21"]
USERS = [f"user-{i}" for i in range(120)]


class Fleet:
    """Three routers on the same rules, and what each answers for each user."""

    def __init__(self, rules: str, routers: list[RouterProcess]) -> None:
        self.snapshot = load_snapshot_text(rules, "rules.yaml")
        self.routers = routers
        self.clients = [httpx.AsyncClient(base_url=r.url, timeout=10) for r in routers]

    def expected(self, stable: int, canary: int, users: list[str] = USERS) -> dict[str, str]:
        """Who gets which version with these pod counts, by the rules themselves."""
        state = Effective().with_endpoints("stable", _pods(stable)).with_endpoints(
            "canary", _pods(canary)
        )
        snap = apply_effective(self.snapshot, state)
        return {u: str(decide(snap, _view("/orders", u)).upstream) for u in users}

    async def version(self, router: int, user: str) -> str:
        """The version router `router` answers /orders with for `user`; always a 200."""
        response = await self.clients[router].get("/orders", headers={"X-User-Id": user})
        assert response.status_code == 200, response.text
        return str(response.json()["version"])

    async def answers(self, router: int) -> dict[str, str]:
        """Each user's version as router `router` answers (a few requests at a time, on
        several connections: every worker answers some)."""
        got: dict[str, str] = {}
        for i in range(0, len(USERS), 16):
            users = USERS[i : i + 16]
            versions = await asyncio.gather(*(self.version(router, u) for u in users))
            got.update(zip(users, versions, strict=True))
        return got

    async def all_answer(self, expected: dict[str, str]) -> bool:
        results = await asyncio.gather(*(self.answers(r) for r in range(len(self.routers))))
        return all(got == expected for got in results)

    async def all_route(self, user: str, version: str) -> bool:
        got = await asyncio.gather(*(self.version(r, user) for r in range(len(self.routers))))
        return all(v == version for v in got)

    async def metric(self, router: int, name: str, **labels: str) -> float:
        """The sample of `name` with exactly these labels on router `router`; -1 if none."""
        samples = await scrape(self.clients[router], self.routers[router])
        return samples.get((name, *(f"{k}={v}" for k, v in sorted(labels.items()))), -1.0)

    async def all_count(self, upstream: str, endpoints: int) -> bool:
        for router in range(len(self.routers)):
            value = await self.metric(router, "grayroute_upstream_endpoints", upstream=upstream)
            if value != endpoints:
                return False
        return True

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


def _pods(count: int) -> tuple[tuple[str, int], ...]:
    return tuple((f"10.0.0.{i}", 80) for i in range(count))  # only the count matters here


def _view(path: str, user: str) -> RequestView:
    return RequestView("GET", path, "", "", {"x-user-id": user}, "127.0.0.1")


def _share(assignment: dict[str, str], version: str) -> float:
    return sum(v == version for v in assignment.values()) / len(assignment)


def _moved(before: dict[str, str], after: dict[str, str]) -> Counter[tuple[str, str]]:
    return Counter((before[u], after[u]) for u in before if before[u] != after[u])


async def test_a_fleet_follows_the_pods_in_dns(
    tmp_path: Path,
    dnsmasq: Dnsmasq,
    pods: Callable[..., Any],
    serve_router: Callable[..., Any],
) -> None:
    """Three routers, 8 stable pods and a canary scaled 1 -> 2: the canary's share goes
    1/9 -> 2/10 within one interval on every router, and only the users it gains move.
    Stable pods removed: no request reaches them. DNS silent: nothing changes. The canary's
    name gone (NXDOMAIN): its users go back to stable with no 5xx, and a route sending to
    it answers 503 naming it."""
    stable_pods: list[Backend] = await pods("stable", STABLE_HOSTS)
    port = stable_pods[0].port
    canary_pods: list[Backend] = await pods("canary", CANARY_HOSTS, port)
    await dnsmasq.set("stable", *STABLE_HOSTS)
    await dnsmasq.set("canary", CANARY_HOSTS[0])
    rules_text = FLEET_RULES.format(port=port)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text)
    args = ("--resolver", dnsmasq.resolver, "--watch-interval", "0")
    routers = await asyncio.gather(
        *(serve_router(rules, workers=2 if i == 0 else 1, args=args) for i in range(3))
    )
    fleet = Fleet(rules_text, routers)
    try:
        # Resolved before taking traffic: the very first requests find the canary's pod.
        for client in fleet.clients:
            assert (await client.get("/canary")).json()["host"] == CANARY_HOSTS[0]
        one = fleet.expected(8, 1)
        assert await fleet.all_answer(one)
        many = [f"u{i}" for i in range(20_000)]
        assert abs(_share(fleet.expected(8, 1, many), "canary") - 1 / 9) < 0.01
        # Addresses in use, once per router (router 0 has two workers: not 2 x 8).
        assert await fleet.metric(0, "grayroute_upstream_endpoints", upstream="stable") == 8

        # Scale the canary to 2 pods.
        two = fleet.expected(8, 2)
        mover = next(u for u in USERS if one[u] != two[u])
        await dnsmasq.set("canary", *CANARY_HOSTS)
        started = time.monotonic()
        await poll(lambda: fleet.all_count("canary", 2), timeout=INTERVAL + 2)
        await poll(lambda: fleet.all_route(mover, "canary"), timeout=INTERVAL + 2)
        # Within one interval (and the time to ask): DNS is asked on schedule, not by TTL.
        assert time.monotonic() - started < INTERVAL + 2
        await poll(lambda: fleet.all_answer(two), timeout=10)
        assert abs(_share(fleet.expected(8, 2, many), "canary") - 2 / 10) < 0.01
        assert set(_moved(one, two)) == {("stable", "canary")}  # only the canary's new users
        assert sum(_moved(one, two).values()) < len(USERS) * 0.2  # ~ (2/10 - 1/9) of them
        assert canary_pods[1].seen  # the new pod takes requests

        # Two stable pods go away.
        await dnsmasq.set("stable", *STABLE_HOSTS[:6])
        await poll(lambda: fleet.all_count("stable", 6), timeout=INTERVAL + 2)
        six = fleet.expected(6, 2)
        await poll(lambda: fleet.all_answer(six), timeout=10)
        assert set(_moved(two, six)) <= {("stable", "canary")}
        gone_seen = [len(p.seen) for p in stable_pods[6:]]
        assert await fleet.all_answer(six)
        assert [len(p.seen) for p in stable_pods[6:]] == gone_seen

        # DNS stops answering: every router keeps what it has, and serves on.
        dnsmasq.pause()
        try:
            for router in range(3):

                async def timed_out(router: int = router) -> bool:
                    labels = {"upstream": "canary", "result": "timeout"}
                    return await fleet.metric(router, "grayroute_dns_lookups_total", **labels) > 0

                await poll(timed_out, timeout=INTERVAL + LOOKUP_TIMEOUT + 3)
            assert await fleet.all_count("canary", 2) and await fleet.all_count("stable", 6)
            assert await fleet.all_answer(six)
        finally:
            dnsmasq.resume()

        # The canary's name is gone: zero replicas.
        await dnsmasq.set("canary")
        await poll(lambda: fleet.all_count("canary", 0), timeout=INTERVAL + 2)
        nothing = fleet.expected(6, 0)
        assert set(nothing.values()) == {"stable"}
        await poll(lambda: fleet.all_answer(nothing), timeout=10)
        assert set(_moved(six, nothing)) == {("canary", "stable")}
        for router, client in enumerate(fleet.clients):
            response = await client.get("/canary")
            assert response.status_code == 503
            assert response.json() == {
                "error": "no_endpoints",
                "detail": "upstream 'canary' has no endpoints",
            }
            labels = {"upstream": "canary", "result": "nxdomain"}
            assert await fleet.metric(router, "grayroute_dns_lookups_total", **labels) >= 1

        # /rules shows what is in use and the last lookup.
        info = (await fleet.clients[0].get(routers[0].admin_url + "/rules")).json()
        assert info["upstreams"]["canary"]["endpoints"] == []
        assert len(info["upstreams"]["stable"]["endpoints"]) == 6
        assert info["upstreams"]["canary"]["dns"]["name"] == "canary.pods.test"
        assert info["upstreams"]["canary"]["dns"]["last_lookup"]["result"] == "nxdomain"
    finally:
        await fleet.close()


async def test_a_version_without_records_goes_to_its_fallback(
    backends: Callable[..., Any], proxy: Callable[..., Any]
) -> None:
    """NXDOMAIN with `fallback:`: the requests a `to` or pin sends there go to the fallback
    instead of a 503, until the name has records again."""
    stable, canary = await backends("stable", "canary")
    rp = await proxy(
        f"""\
        format: 1
        upstreams:
          stable: {{endpoints: ["{stable.endpoint}"]}}
          canary:
            endpoints: {{dns: canary.pods.test, port: {canary.port}}}
            fallback: stable
        routes:
          - {{name: canary, to: canary}}
        """
    )
    base = rp.router.snapshot
    async with httpx.AsyncClient(base_url=rp.url) as client:
        assert (await client.get("/")).headers["X-Version"] == "stable"
        found = Effective().with_endpoints("canary", (("127.0.0.1", canary.port),))
        rp.router.install(apply_effective(base, found))
        assert (await client.get("/")).headers["X-Version"] == "canary"
        rp.router.install(apply_effective(base, found.with_endpoints("canary", ())))
        assert (await client.get("/")).headers["X-Version"] == "stable"
