"""Leases in etcd, against a real etcd: one leader among several routers, a new one
within the lease TTL when it dies, values that go with their writer."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.fleet.etcd import EtcdClient
from router.fleet.lease import MAX_TTL, Leadership, LeasedValue, read_prefix

from conftest import EtcdServer, poll


async def leaders(candidates: list[Leadership]) -> list[str]:
    await asyncio.sleep(0)
    return [c.ident for c in candidates if c.is_leader]


async def test_one_leader_and_a_successor_within_the_ttl(etcd: EtcdServer, etcd_key: str) -> None:
    key = f"{etcd_key}/leader"
    clients = [EtcdClient([etcd.endpoint]) for _ in range(3)]
    candidates = [Leadership(c, key, f"10.0.0.{i}:8080", ttl=2) for i, c in enumerate(clients)]
    tasks = [asyncio.ensure_future(c.run()) for c in candidates]
    try:
        (first,) = await poll(lambda: leaders(candidates), timeout=5)
        # Everyone agrees on who it is; the key holds its id.
        await poll(lambda: asyncio.sleep(0, all(c.leader == first for c in candidates)))
        assert (await read_prefix(clients[0], f"{etcd_key}/"))["leader"] == first.encode()

        # A resigning leader is replaced at once.
        index = [c.ident for c in candidates].index(first)
        tasks[index].cancel()
        await candidates[index].resign()
        started = time.monotonic()
        (second,) = await poll(lambda: leaders(candidates), timeout=5)
        assert second != first and time.monotonic() - started < 1.0

        # A leader that dies (stops renewing, no goodbye) is replaced within TTL + a bit.
        index = [c.ident for c in candidates].index(second)
        tasks[index].cancel()
        await asyncio.gather(tasks[index], return_exceptions=True)
        died = time.monotonic()
        (third,) = await poll(lambda: leaders(candidates), timeout=10)
        assert third not in (first, second)
        assert time.monotonic() - died < 2 + 1.5
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()


async def test_leased_values_go_with_their_writer(etcd: EtcdServer, etcd_key: str) -> None:
    prefix = f"{etcd_key}/counts/"
    async with EtcdClient([etcd.endpoint]) as client:
        alive = LeasedValue(client, prefix + "a", ttl=1)
        dying = LeasedValue(client, prefix + "b", ttl=1)
        leaving = LeasedValue(client, prefix + "c", ttl=1)
        for value in (alive, dying, leaving):
            await value.put(b'{"requests": 1}')
        assert set(await read_prefix(client, prefix)) == {"a", "b", "c"}
        keeper = asyncio.ensure_future(alive.run())  # only `a` keeps its lease alive
        try:
            await leaving.close()
            assert set(await read_prefix(client, prefix)) == {"a", "b"}  # gone at once
            await poll(lambda: keys_are(client, prefix, {"a"}), timeout=5)  # b: after its TTL
            await asyncio.sleep(1.5)  # longer than the TTL: `a` stays while renewed
            await alive.put(b'{"requests": 2}')
            assert await read_prefix(client, prefix) == {"a": b'{"requests": 2}'}
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)


async def keys_are(client: EtcdClient, prefix: str, want: set[str]) -> bool:
    return set(await read_prefix(client, prefix)) == want


async def test_the_leader_lease_is_short() -> None:
    async with EtcdClient(["127.0.0.1:1"]) as client:
        with pytest.raises(ValueError, match="between 1 and 5"):
            Leadership(client, "/k/leader", "me", ttl=MAX_TTL + 1)
