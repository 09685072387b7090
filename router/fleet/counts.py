"""The rollout counts of a fleet: every router publishes its own, the leader sums them all.

    FleetCounts(client, key, router_id, local_totals, ttl)
        await run(period)      publish this router's totals at KEY/counts/ROUTER (under a
                               lease: they vanish TTL after the router) and read every
                               router's, every `period` seconds (a number, or a function
                               asked each time: it may follow the rollouts' intervals)
        take(route)            a rollout CountSource (router.rollout.stats): each upstream's
                               counts over the whole fleet since the previous take

What is published is cumulative: this router's totals since it started, summed over its
workers (`local_totals`, as router.rollout.stats.LocalCounts takes them), as JSON:

    {"at": "2026-01-05T10:00:00.123Z", "counts": [[ROUTE, UPSTREAM, COUNTS], ...]}

COUNTS being `Counts.to_json()`. Cumulative totals make a lost or late publication cost
nothing (the next one carries everything), and `take` subtracts per router: a router
whose totals went back has restarted, and counts from zero; a router whose key vanished
(it died, its lease expired) stops adding. Totals that did not change since they were
last published are not written again (only the lease is kept alive): every write is a
new etcd revision, kept until etcd compacts its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from router.fleet.etcd import EtcdClient, EtcdError
from router.fleet.lease import LeasedValue, read_prefix
from router.rollout.stats import Counts

__all__ = ["FleetCounts", "decode_counts", "encode_counts"]

log = logging.getLogger("grayroute.fleet.counts")

Totals = Mapping[tuple[str, str], Counts]  # (route, upstream) -> cumulative counts


def encode_counts(totals: Totals, at: str) -> bytes:
    rows = [[route, upstream, c.to_json()] for (route, upstream), c in sorted(totals.items())]
    return orjson.dumps({"at": at, "counts": rows})


def decode_counts(data: bytes) -> dict[tuple[str, str], Counts]:
    """The inverse of encode_counts; ValueError on anything else."""
    try:
        doc = orjson.loads(data)
        rows = doc["counts"]
        return {(str(r), str(u)): Counts.from_json(c) for r, u, c in rows}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not fleet counts: {exc}") from exc


class FleetCounts:
    """A CountSource over every router of a fleet; see the module docstring."""

    def __init__(
        self,
        client: EtcdClient,
        key: str,
        router_id: str,
        local_totals: Callable[[], Totals],
        ttl: int = 10,
    ) -> None:
        self.client = client
        self.prefix = f"{key.rstrip('/')}/counts/"
        self.router_id = router_id
        self._local = local_totals
        self._mine = LeasedValue(client, self.prefix + router_id, ttl)
        self._published: Totals | None = None  # as last written
        self.routers: dict[str, dict[tuple[str, str], Counts]] = {}  # as last read
        self._last: dict[str, dict[str, dict[str, Counts]]] = {}  # route -> router -> taken

    async def publish(self) -> None:
        from router.history import now_iso

        totals = dict(self._local())
        if totals == self._published and self._mine.alive:
            return
        await self._mine.put(encode_counts(totals, now_iso()))
        self._published = totals

    async def refresh(self) -> None:
        """Read every router's totals (a malformed entry is skipped and logged)."""
        found: dict[str, dict[tuple[str, str], Counts]] = {}
        for router, data in (await read_prefix(self.client, self.prefix)).items():
            try:
                found[router] = decode_counts(data)
            except ValueError as exc:
                log.warning("counts of router %s skipped: %s", router, exc)
        self.routers = found

    async def run(self, period: float | Callable[[], float]) -> None:
        every = period if callable(period) else lambda: period
        keeper = asyncio.ensure_future(self._mine.run())
        failing = False
        try:
            while True:
                try:
                    await self.publish()
                    await self.refresh()
                except EtcdError as exc:
                    if not failing:  # once per outage, not every period
                        log.warning("fleet counts: %s; retrying", exc)
                    failing = True
                else:
                    if failing:
                        log.info("fleet counts: published again")
                    failing = False
                await asyncio.sleep(every())
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def close(self) -> None:
        """Remove this router's counts now (on shutdown)."""
        await self._mine.close()

    def take(self, route: str) -> dict[str, Counts]:
        total: dict[str, Counts] = {}
        taken = self._last.setdefault(route, {})
        for router, cumulative in self.routers.items():
            now = {u: c for (r, u), c in cumulative.items() if r == route}
            before = taken.get(router, {})
            for upstream, counts in now.items():
                earlier = before.get(upstream, Counts())
                # Totals that went back: that router restarted and counts from zero.
                delta = counts if counts.requests < earlier.requests else counts.since(earlier)
                total[upstream] = total.get(upstream, Counts()) + delta
            taken[router] = now
        for router in set(taken) - set(self.routers):
            del taken[router]  # gone: if it comes back, it counts from what it publishes
        return total

    def describe(self) -> dict[str, Any]:
        """For /rollouts: which routers' counts are in the sum."""
        return {"routers": sorted(self.routers)}
