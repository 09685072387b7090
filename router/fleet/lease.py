"""Leases in etcd for a fleet of routers: one leader among them, and keys that live only
as long as the router that writes them.

    Leadership(client, key, ident, ttl, on_change)   KEY/leader holds the id of the router
                         that leads; on_change() is called whenever is_leader or leader changes
        await run()      campaign, hold the key while alive, campaign again when it is lost
        is_leader        True while this router holds the key
        leader           the id in the key now (whoever holds it), None when nobody does
        revision         the key's create_revision while this router holds it: a write
                         that must only happen while it leads compares it (held_by())
        await resign()   let go at once (revoke the lease: another takes over now)
    LeasedValue(client, key, ttl)         e.g. KEY/counts/ROUTER: gone TTL after its writer
        await put(value) write it under the lease (granted on first use, again if expired)
        alive            a lease is held (False: the next put grants one)
        await run()      keep the lease alive
        await close()    delete it now (revoke)
    await read_prefix(client, prefix) -> {key suffix: value}

Leadership is etcd's own recipe, as its concurrency package and Kubernetes' leases do
it: a key created in a transaction only if it does not exist (create_revision 0), attached
to a lease the holder keeps alive every TTL/3. When the holder dies its lease expires
within TTL and etcd deletes the key; every other router watches the key and campaigns
when it is deleted, and the transaction lets exactly one of them win. A holder that
cannot renew its lease for a whole TTL stops calling itself leader (it may already have
been replaced), before anyone else can have taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from router.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    create_revision_is,
    prefix_end,
    put_op,
    range_op,
)

__all__ = ["MAX_TTL", "Leadership", "LeasedValue", "read_prefix"]

log = logging.getLogger("grayroute.lease")

MAX_TTL = 5  # seconds: a dead leader is replaced within this (plus one campaign)
RETRY = 0.5  # seconds between attempts while etcd cannot be reached


class Leadership:
    """Campaign for `key` as `ident`; see the module docstring."""

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        ident: str,
        ttl: int = MAX_TTL,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if not 1 <= ttl <= MAX_TTL:
            raise ValueError(f"leader lease TTL {ttl}: between 1 and {MAX_TTL} seconds")
        self.client = client
        self.key = key.encode()
        self.ident = ident
        self.ttl = ttl
        self.is_leader = False
        self.leader: str | None = None
        self.revision = 0
        self._lease = 0
        self._on_change = on_change

    def _set(self, leader: str | None, mine: bool) -> None:
        if (leader, mine) != (self.leader, self.is_leader):
            self.leader, self.is_leader = leader, mine
            if not mine:
                self.revision = 0
            log.info("leader of %s: %s%s", self.key.decode(), leader, " (this router)" * mine)
            if self._on_change is not None:
                self._on_change()

    def held_by(self) -> dict[str, Any]:
        """A transaction's compare that holds only while this router leads: the key is the
        one it created. When it does not lead, -1: no key has it (a missing key counts as
        created at 0), so the compare fails."""
        return create_revision_is(self.key, self.revision if self.is_leader else -1)

    async def run(self) -> None:
        """Campaign and lead, or follow, until cancelled."""
        failing = False
        try:
            while True:
                try:
                    won, revision = await self._campaign()
                    failing = False
                    if won:
                        await self._lead()
                    else:
                        await self._follow(revision)
                except EtcdError as exc:
                    if not failing:  # once per outage, not every attempt
                        log.warning("leader election on %s: %s", self.key.decode(), exc)
                    failing = True
                    self._set(None if self.is_leader else self.leader, False)
                    await asyncio.sleep(RETRY)
        finally:
            self._set(None, False)

    async def _campaign(self) -> tuple[bool, int]:
        lease = await self.client.lease_grant(self.ttl)
        result = await self.client.txn(
            [create_revision_is(self.key, 0)],
            [put_op(self.key, self.ident.encode(), lease.id)],
            [range_op(self.key)],
        )
        if result.succeeded:
            self._lease = lease.id
            self.revision = result.revision  # the transaction's own: the key's creation
            self._set(self.ident, True)
            return True, result.revision
        await self.client.lease_revoke(lease.id)  # not needed: someone holds the key
        holders = result.range_kvs(0)
        self._set(holders[0].value.decode() if holders else None, False)
        return False, result.revision

    async def _lead(self) -> None:
        """Keep the lease alive; return when it is lost (then campaign again)."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                ttl = await self.client.lease_keepalive(self._lease)
            except EtcdError as exc:
                if loop.time() - renewed >= self.ttl:
                    log.warning("leadership of %s lost: %s", self.key.decode(), exc)
                    self._set(None, False)
                    return
                continue
            if ttl <= 0:  # expired (etcd was away longer than the TTL): the key is gone
                self._set(None, False)
                return
            renewed = loop.time()

    async def _follow(self, revision: int) -> None:
        """Watch the key until it is deleted (its holder's lease ended)."""
        try:
            async with self.client.watch(self.key, revision + 1) as batches:
                async for batch in batches:
                    for event in batch.events:
                        if event.type == "delete":
                            self._set(None, False)
                            return
                        self._set(event.kv.value.decode(), False)
        except EtcdCompacted:
            return  # campaign again: it reads the holder afresh

    async def resign(self) -> None:
        """Give the leadership up now (on shutdown), so another router takes over at once."""
        if self._lease:
            lease, self._lease = self._lease, 0
            with contextlib.suppress(EtcdError):
                await self.client.lease_revoke(lease)
        self._set(None, False)


class LeasedValue:
    """A key whose value lives as long as its writer keeps the lease alive."""

    def __init__(self, client: EtcdClient, key: str, ttl: int) -> None:
        self.client = client
        self.key = key.encode()
        self.ttl = ttl
        self._lease = 0

    @property
    def alive(self) -> bool:
        """A lease is held (as far as this router knows: the last renewal worked)."""
        return bool(self._lease)

    async def put(self, value: bytes) -> None:
        """Write under the lease; EtcdError when etcd cannot be reached."""
        if not self._lease:
            self._lease = (await self.client.lease_grant(self.ttl)).id
        try:
            await self.client.put(self.key, value, self._lease)
        except EtcdError:
            self._lease = 0  # it may have expired: a new one next time
            raise

    async def run(self) -> None:
        """Keep the lease alive until cancelled."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self._lease:
                continue
            try:
                if await self.client.lease_keepalive(self._lease) <= 0:
                    self._lease = 0  # expired: the next put grants a new one
            except EtcdError as exc:
                log.debug("keeping %s alive: %s", self.key.decode(), exc)

    async def close(self) -> None:
        if self._lease:
            lease, self._lease = self._lease, 0
            with contextlib.suppress(EtcdError):
                await self.client.lease_revoke(lease)


async def read_prefix(client: EtcdClient, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix` (the suffix after it) and its value."""
    start = prefix.encode()
    result = await client.range(start, range_end=prefix_end(start))
    return {kv.key[len(start) :].decode(): kv.value for kv in result.kvs}
