"""Rollouts across a fleet: one router judges, every router routes as the judge says.

    FleetController(plane, cache, notifier, client=, key=, router_id=, totals=, leader_ttl=)
        the RolloutController (router.rollout.controller) of `grayroute serve etcd://.../KEY`

What lives in etcd, next to the rules' key KEY:

    KEY/leader           the id of the router that judges (router.fleet.lease.Leadership)
    KEY/counts/ROUTER    each router's cumulative rollout counts (router.fleet.counts)
    KEY/rollouts/ROUTE   each rollout's state: the JSON of controller.State

Who does what:

- Every router counts its own split traffic and publishes it under its lease.
- The router holding KEY/leader judges every rollout once per interval, on the fleet's
  counts summed, and writes the outcome in one transaction that holds only if the stored
  state is still the one it judged (its mod_revision) and the router still leads (KEY/
  leader is the key it created). Only a write that took is acted on: weights, audit
  entry, notification. A leader whose lease is gone stops judging at once; a judgement it
  sent meanwhile is refused by etcd. There are never two judges of one state.
- Every router watches KEY/rollouts/ and puts in force each state of a rollout its rules
  describe: the canary's weight and its fallback to the stable version. A state of
  another rollout (the rules changed in etcd but not yet here) waits for the rules.
- A person's action (pause, resume, promote, abort, retry) sent to any router is decided
  there on the state it has, and written with the same compare on the state's revision
  (not on leadership: an abort works while the leadership changes hands). When the state
  changed meanwhile it is read and the action decided again on it. The router that made
  a transition writes it in its own audit log (with its id as `router`) and sends its
  notifications; the others only apply it.
- A router that becomes leader continues every rollout from its stored state (the same
  step, the same FAIL count), and the interval under way too: every router's intervals
  follow the judge's (each judgement is a write they see), so the new judge judges the
  counts since the last judgement as soon as that interval is due, typically at once.
  A rollout its rules have and etcd does not (just started, or started while there was
  no leader) it writes, and it alone audits and announces that start.
- etcd away: every router keeps routing with the states it has; the leader's judgements
  cannot be written, so nothing moves. The states a router put in force are also kept in
  its state directory (rollouts.json, router.rollout.state.FileStore), so that a router
  that starts while etcd is away routes as the fleet did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from router.fleet.counts import FleetCounts
from router.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    delete_op,
    mod_revision_is,
    put_op,
    range_op,
)
from router.fleet.lease import MAX_TTL, Leadership
from router.fleet.source import PROBE_INTERVAL, backoff_delays
from router.rollout.controller import (
    CONTROLLER,
    Decided,
    RolloutController,
    Spec,
    State,
    route_weights,
)

if TYPE_CHECKING:
    from router.rollout.controller import Outcome, Plane
    from router.rollout.notify import Notifier
    from router.rollout.state import StateStore
    from router.rollout.stats import Counts
    from router.rules import Snapshot

__all__ = ["FleetController", "counts_period"]

log = logging.getLogger("grayroute.rollout")

# What a write of a state came to.
WRITTEN: Final = "written"
CONFLICT: Final = "conflict"  # the stored state is not the one it was decided on
DEPOSED: Final = "deposed"  # a judgement, and this router no longer leads
UNAVAILABLE: Final = "unavailable"  # etcd could not be asked

ACT_ATTEMPTS = 3  # a person's action decided again on a state that changed meanwhile


def counts_period(intervals: list[float]) -> float:
    """How often counts are published: a fifth of the shortest interval, within 0.2-2 s.
    A publication is late by up to this much; the interval skipped after each weight
    change absorbs it."""
    shortest = min(intervals, default=10.0)
    return min(max(shortest / 5, 0.2), 2.0)


@dataclass(frozen=True, slots=True)
class Stored:
    """A state as etcd holds it."""

    revision: int  # its mod_revision
    data: Mapping[str, Any]  # State.to_json()

    @property
    def key(self) -> Any:
        """The identity of its rollout (controller.identity)."""
        return self.data.get("key")


class FleetController(RolloutController):
    """See the module docstring. `cache` keeps the states in force in the state directory;
    `totals` gives this router's cumulative counts (router.metrics)."""

    def __init__(
        self,
        plane: Plane,
        cache: StateStore,
        notifier: Notifier | None,
        *,
        client: EtcdClient,
        key: str,
        router_id: str,
        totals: Callable[[], Mapping[tuple[str, str], Counts]],
        leader_ttl: int = MAX_TTL,
    ) -> None:
        base = key.rstrip("/")
        self.client = client
        self.prefix = f"{base}/rollouts/".encode()
        self.leadership = Leadership(
            client, f"{base}/leader", router_id, leader_ttl, on_change=self._leadership_changed
        )
        self.fleet_counts = FleetCounts(client, key, router_id, totals)
        super().__init__(plane, cache, self.fleet_counts, notifier, router_id)
        self.seen: dict[str, Stored] = {}  # the newest stored state known, per route
        # The revision of the stored state each route's state in force here comes from
        # (absent: started here, not stored yet). A write compares it.
        self.based: dict[str, int] = {}
        self._writing: Counter[str] = Counter()  # writes in flight per route
        # Rollouts the rules started here, not stored yet: (the one replaced, the start).
        self._starts: dict[str, tuple[State | None, State]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leading = False  # as last acted on
        self._deposed = -1  # the leadership (its key's revision) etcd refused a write of
        self._read = asyncio.Event()  # KEY/rollouts/ was read once
        self._watch_from = 0  # 0: read KEY/rollouts/ whole first
        self.watching = False

    # -- life ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._spawn(self.leadership.run())
        self._spawn(self.fleet_counts.run(self._counts_period))
        self._spawn(self._follow())
        try:
            await super().run()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            # Going away: another router leads now rather than a lease TTL later, and
            # these counts leave the fleet's sum at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.client.timeout):
                    await self.leadership.resign()
                    await self.fleet_counts.close()
            await self.client.aclose()

    async def first_states(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._read.wait()
        if not self._read.is_set():
            log.warning(
                "rollouts: no answer from etcd within %.0f s; routing with the states kept in "
                "the state directory until it answers",
                timeout,
            )
        return self._read.is_set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet rollouts: a task failed", exc_info=task.exception())

    def _counts_period(self) -> float:
        return counts_period([spec.rollout.interval for spec in self.specs.values()])

    def sync(self, snapshot: Snapshot) -> None:
        super().sync(snapshot)
        # States of a rollout these rules only now describe may be waiting in etcd.
        for route in list(self.specs):
            self._take_stored(route)

    # -- leading ---------------------------------------------------------------------------

    def judging(self) -> bool:
        lead = self.leadership
        return lead.is_leader and lead.revision != self._deposed

    def leader(self) -> str | None:
        return self.leadership.leader

    def _leadership_changed(self) -> None:
        leading = self.judging()
        if leading == self._leading:
            return
        self._leading = leading
        if not leading:
            log.info("rollouts: no longer judging; the leader is %s", self.leader())
            return
        log.info("rollouts: judging the fleet's rollouts from now on (%d)", len(self.states))
        for route in list(self.states):
            self._claim(route)
        # The interval the dead leader had begun goes on here, and is judged when due
        # (at once, typically): the same weights held all along.
        self.resume_intervals(self.leadership.ttl)

    def _depose(self) -> None:
        """etcd refused a judgement: KEY/leader is not this router's key any more."""
        log.warning("rollouts: another router leads now (etcd refused a judgement)")
        self._deposed = self.leadership.revision
        self._leadership_changed()

    # -- judging ---------------------------------------------------------------------------

    def tick(self, route: str) -> None:
        spec, state = self.specs[route], self.states[route]
        if self._writing[route]:
            self.counts.take(route)  # this interval is lost, not added to the next one
            return
        outcome = self._judge(spec, state)
        if outcome.state is state:
            return  # finished: nothing changes
        self._writing[route] += 1
        self._spawn(self._commit(spec, state, outcome, self.based.get(route, 0)))

    async def _commit(self, spec: Spec, old: State, outcome: Outcome, expected: int) -> None:
        route = spec.route
        try:
            written = await self._write(route, outcome.state, expected, leading=True)
        finally:
            self._writing[route] -= 1
        if written == WRITTEN and self.states.get(route) is old:
            self._count(route, outcome)
            self._advance(spec, old, outcome.state, "interval", CONTROLLER)
        self._take_stored(route)

    # -- people ----------------------------------------------------------------------------

    async def perform(
        self, route: str, action: str, who: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        for _ in range(ACT_ATTEMPTS):
            await self._quiet(route)
            decided = self._decide(route, action, who)
            if not isinstance(decided, Decided):
                return decided
            self._writing[route] += 1
            try:
                written = await self._write(
                    route, decided.new, self.based.get(route, 0), leading=False
                )
            finally:
                self._writing[route] -= 1
            if written == WRITTEN and self.states.get(route) is decided.old:
                self._acted(decided, who)
            self._take_stored(route)
            if written == WRITTEN:
                return 200, self.describe(route) or {}
            if written == UNAVAILABLE:
                return 503, {
                    "error": "unavailable",
                    "detail": "etcd cannot be reached: nothing was changed; try again",
                    "rollout": self.describe(route),
                }
            stored, spec = self.seen.get(route), self.specs.get(route)
            if stored is not None and spec is not None and stored.key != spec.key:
                return 409, {
                    "error": "refused",
                    "detail": "the routers of the fleet are between two versions of the rules "
                    "for this rollout; try again in a moment",
                    "rollout": self.describe(route),
                }
        return 409, {
            "error": "refused",
            "detail": "the rollout kept changing while the action was tried; try again",
            "rollout": self.describe(route),
        }

    async def _quiet(self, route: str) -> None:
        """Wait (a bounded time) for this router's writes of `route` in flight."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.client.timeout):
                while self._writing[route]:
                    await asyncio.sleep(0.01)

    # -- the shared store ------------------------------------------------------------------

    async def _write(self, route: str, state: State, expected: int, *, leading: bool) -> str:
        """Store `state` if the stored state is still at revision `expected` (0: none)
        and, for a judgement (`leading`), this router still leads."""
        key = self.prefix + route.encode()
        compare = [mod_revision_is(key, expected)]
        if leading:
            compare.append(self.leadership.held_by())
        data = state.to_json()
        try:
            result = await self.client.txn(
                compare,
                [put_op(key, orjson.dumps(data))],
                [range_op(key), range_op(self.leadership.key)],
            )
        except EtcdError as exc:
            log.warning("rollout %s: its state cannot be written (%s); nothing changed", route, exc)
            return UNAVAILABLE
        if result.succeeded:
            self.based[route] = result.revision
            self._observe(route, Stored(result.revision, data))
            return WRITTEN
        stored = result.range_kvs(0)
        if stored:
            self._observe_kv(route, stored[0])
        else:
            self._vanished(route, result.revision)
        if leading:
            holder = result.range_kvs(1)
            if not holder or holder[0].create_revision != self.leadership.revision:
                self._depose()
                return DEPOSED
        return CONFLICT

    def _claim(self, route: str) -> None:
        """(The leader.) Make the stored state of `route` this rollout's: the stored one
        when etcd has this rollout, else the one in force here, written."""
        state = self.states.get(route)
        if state is None or self._writing[route]:
            return
        stored = self.seen.get(route)
        if stored is not None and stored.key == state.key:
            self._take_stored(route)
            return
        self._writing[route] += 1
        self._spawn(self._write_claim(route, state, stored.revision if stored else 0))

    async def _write_claim(self, route: str, state: State, expected: int) -> None:
        try:
            written = await self._write(route, state, expected, leading=True)
        finally:
            self._writing[route] -= 1
        if written == WRITTEN:
            log.info("rollout %s: stored in etcd (%s, step %s)", route, state.phase, state.step)
            started = self._starts.get(route)
            spec = self.specs.get(route)
            if started is not None and started[1] is state and spec is not None:
                del self._starts[route]
                super()._started(spec, started[0], state)
        self._take_stored(route)

    async def _delete(self, route: str, expected: int) -> None:
        key = self.prefix + route.encode()
        try:
            await self.client.txn(
                [mod_revision_is(key, expected), self.leadership.held_by()], [delete_op(key)]
            )
        except EtcdError as exc:
            log.warning("rollout %s: its state cannot be removed from etcd (%s)", route, exc)

    def _save(self, route: str, state: State) -> None:
        super()._save(route, state)  # the state directory's copy
        if self.judging():
            self._claim(route)

    def _forget(self, gone: State) -> None:
        route = gone.route
        self.based.pop(route, None)
        self._starts.pop(route, None)
        stored = self.seen.get(route)
        if self.judging():  # the leader removes it from etcd and says so
            if stored is not None and stored.key == gone.key:
                self._spawn(self._delete(route, stored.revision))
            super()._forget(gone)
        else:
            self.store.remove(route)

    def _started(self, spec: Spec, old: State | None, state: State) -> None:
        # Every router starts it in force at once (the same start everywhere); the one
        # that stores it says so (_write_claim), once for the fleet.
        self._starts[spec.route] = (old, state)

    # -- following the store ---------------------------------------------------------------

    def _observe_kv(self, route: str, kv: KeyValue) -> None:
        try:
            data = orjson.loads(kv.value)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            State.from_json(data)
        except (orjson.JSONDecodeError, ValueError) as exc:
            log.warning("rollout %s: the state in etcd is unreadable (%s); ignored", route, exc)
            return
        self._observe(route, Stored(kv.mod_revision, data))

    def _observe(self, route: str, stored: Stored) -> None:
        known = self.seen.get(route)
        if known is not None and stored.revision <= known.revision:
            return
        self.seen[route] = stored
        self._take_stored(route)

    def _vanished(self, route: str, revision: int) -> None:
        """The route's state is not in etcd at `revision` (the leader's rules dropped the
        rollout): what is in force here stays until these rules drop it too."""
        known = self.seen.get(route)
        if known is not None and known.revision < revision:
            del self.seen[route]

    def _take_stored(self, route: str) -> None:
        """Put the newest stored state of `route` in force here, when it is newer than
        the one in force and of the rollout these rules describe."""
        stored, spec = self.seen.get(route), self.specs.get(route)
        if stored is None or spec is None or self._writing[route]:
            return
        if stored.revision <= self.based.get(route, 0) or stored.key != spec.key:
            return
        state = State.from_json(stored.data)
        old = self.states.get(route)
        self.based[route] = stored.revision
        self._starts.pop(route, None)  # stored by another router: told by it
        if state == old:
            return
        self.states[route] = state
        self.store.save(route, stored.data)
        self.plane.put_weights(route, route_weights(spec, state), (state.canary, state.stable))
        moved = old is None or (old.phase, old.step, old.weight) != (
            state.phase,
            state.step,
            state.weight,
        )
        if moved:
            log.info(
                "rollout %s: %s at step %s, canary weight %s, from etcd (%s)",
                route, state.phase, state.step, state.weight, state.reason,
            )  # fmt: skip
        if moved or not self.judging():
            # A follower's intervals follow the judge's (each judgement is a write), so
            # that one that takes over goes on with the interval under way.
            self._take_baseline(route, spec)
            self._poke()

    async def _follow(self) -> None:
        """Read KEY/rollouts/ whole, then watch it from the read's revision + 1; again
        after a compaction; reconnect with backoff while etcd is away."""
        delays = backoff_delays()
        while True:
            try:
                if self._watch_from == 0:
                    self._watch_from = await self._read_all()
                    delays = backoff_delays()
                await self._watch()
            except EtcdCompacted as exc:
                log.warning("rollouts: %s; reading them again", exc)
                self._watch_from = 0
            except EtcdError as exc:
                if self.watching:
                    log.warning("rollouts: %s; keeping the states in force, retrying", exc)
                self.watching = False
                await asyncio.sleep(next(delays))

    async def _read_all(self) -> int:
        listing = await self.client.range(self.prefix, prefix=True)
        found = set()
        for kv in listing.kvs:
            route = kv.key[len(self.prefix) :].decode()
            found.add(route)
            self._observe_kv(route, kv)
        for route in set(self.seen) - found:
            self._vanished(route, listing.revision)
        self._read.set()
        return listing.revision + 1

    async def _watch(self) -> None:
        """Follow the changes from revision _watch_from until the watch breaks (an
        EtcdError), or a probe finds etcd silent (a watch on a dead peer can wait forever)."""

        async def consume() -> None:
            start = self._watch_from
            async with self.client.watch(self.prefix, start, prefix=True) as batches:
                async for batch in batches:
                    if batch.created:
                        if not self.watching:
                            log.info("rollouts: following %s", self.prefix.decode())
                        self.watching = True
                        continue
                    for event in batch.events:
                        route = event.kv.key[len(self.prefix) :].decode()
                        if event.type == "delete":
                            self._vanished(route, event.kv.mod_revision)
                        else:
                            self._observe_kv(route, event.kv)
                        self._watch_from = max(self._watch_from, event.kv.mod_revision + 1)

        async def probe() -> None:
            while True:
                await asyncio.sleep(PROBE_INTERVAL)
                await self.client.range(self.prefix, keys_only=True, limit=1)

        tasks = [asyncio.ensure_future(consume()), asyncio.ensure_future(probe())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()

    # -- reading ---------------------------------------------------------------------------

    def metric_families(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield from super().metric_families()
        leader = GaugeMetricFamily(
            "grayroute_rollout_leader",
            "1 while this router judges the fleet's rollouts (it holds KEY/leader in etcd), "
            "0 otherwise.",
        )
        leader.add_metric((), 1.0 if self.judging() else 0.0)
        yield leader
