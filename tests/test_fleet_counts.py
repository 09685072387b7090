"""The fleet's rollout counts: the sum over routers (pure), and publishing through a real
etcd where a router's counts go with it."""

from __future__ import annotations

import asyncio

import pytest

from router.fleet.counts import FleetCounts, decode_counts, encode_counts
from router.fleet.etcd import EtcdClient
from router.rollout.stats import NBUCKETS, Counts

from conftest import EtcdServer, poll


def counts(requests: int, failures: int = 0, bucket: int | None = None) -> Counts:
    if bucket is None:
        return Counts(requests, failures)
    buckets = [0] * NBUCKETS
    buckets[bucket] = requests
    return Counts(requests, failures, tuple(buckets))


def test_encoding_round_trips_and_refuses_garbage() -> None:
    totals = {("orders", "v1"): counts(10, 1, bucket=40), ("orders", "v1.1"): counts(3)}
    assert decode_counts(encode_counts(totals, "2026-01-05T10:00:00.000Z")) == totals
    for bad in (b"{", b"[]", b'{"counts": [["r", "u", {"requests": "x"}]]}'):
        with pytest.raises(ValueError, match="not fleet counts"):
            decode_counts(bad)


async def test_take_sums_routers_per_interval_through_restarts_and_departures() -> None:
    async with EtcdClient(["127.0.0.1:1"]) as unused:
        fleet = FleetCounts(unused, "/k", "a", dict)
    fleet.routers = {
        "a": {("orders", "v1"): counts(100, 1), ("orders", "v1.1"): counts(10)},
        "b": {("orders", "v1"): counts(50), ("search", "v1"): counts(7)},
    }
    assert fleet.take("orders") == {"v1": counts(150, 1), "v1.1": counts(10)}
    fleet.routers = {
        "a": {("orders", "v1"): counts(130, 2), ("orders", "v1.1"): counts(15, 1)},
        "b": {("orders", "v1"): counts(20)},  # b restarted: 20 since then
    }
    assert fleet.take("orders") == {"v1": counts(50, 1), "v1.1": counts(5, 1)}
    fleet.routers = {"a": {("orders", "v1"): counts(140, 2), ("orders", "v1.1"): counts(15, 1)}}
    assert fleet.take("orders") == {"v1": counts(10), "v1.1": counts(0)}  # b is gone
    assert fleet.take("search") == {}


async def test_routers_publish_and_the_sum_follows_them(etcd: EtcdServer, etcd_key: str) -> None:
    totals = {
        "a": {("orders", "v1"): counts(100, 1), ("orders", "v1.1"): counts(10)},
        "b": {("orders", "v1"): counts(50), ("orders", "v1.1"): counts(5, 5)},
    }
    clients = {name: EtcdClient([etcd.endpoint]) for name in totals}
    fleets = {
        name: FleetCounts(clients[name], etcd_key, name, lambda n=name: totals[n], ttl=1)
        for name in totals
    }
    tasks = {name: asyncio.ensure_future(f.run(0.1)) for name, f in fleets.items()}
    leader = fleets["a"]
    try:
        await poll(lambda: asyncio.sleep(0, set(leader.routers) == {"a", "b"}), timeout=5)
        assert leader.take("orders") == {"v1": counts(150, 1), "v1.1": counts(15, 5)}
        totals["b"] = {("orders", "v1"): counts(80), ("orders", "v1.1"): counts(5, 5)}
        await poll(lambda: asyncio.sleep(0, leader.routers["b"] == totals["b"]), timeout=5)
        assert leader.take("orders") == {"v1": counts(30), "v1.1": counts(0)}

        # b dies (no goodbye): its key expires with its lease, and it drops out of the sum.
        tasks["b"].cancel()
        await asyncio.gather(tasks["b"], return_exceptions=True)
        await poll(lambda: asyncio.sleep(0, set(leader.routers) == {"a"}), timeout=5)
        tasks["a"].cancel()
        await asyncio.gather(tasks["a"], return_exceptions=True)
        await fleets["a"].close()  # a leaves politely: gone at once
        async with EtcdClient([etcd.endpoint]) as reader:
            listing = await reader.range(f"{etcd_key}/counts/".encode(), prefix=True)
            assert listing.kvs == ()
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        for client in clients.values():
            await client.aclose()
