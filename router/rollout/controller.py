"""The controller: steps, phases and actions. Pure code decides; a thin adapter applies.

Decisions (pure: a state in, a state out, no clock, no I/O):

    start(spec, at)                          a new rollout: step 0, Progressing
    on_interval(spec, state, canary, stable, at, applied)
                                             one interval's counts judged (gates.judge)
    act(spec, state, action, at, by)         pause | resume | promote | abort | retry by a
                                             person; a refusal says why
    route_weights(spec, state)               the route's split weights the state asks for

What one interval does (docs/rollout.md has it for release managers):

    - a finished rollout (Succeeded, Failed, Aborted) is not judged any more;
    - the first interval after a weight change is skipped (SKIP), and so is any interval
      in which a worker had not yet applied it;
    - the hard guard (max_error_rate) rolls back at once, in any phase but a finished one;
    - HOLD (both versions breach the guard) holds: Holding;
    - NODATA holds: Holding, and after `max_nodata` in a row, Paused (a guard holds on);
    - FAIL counts against the step; `failures` of them roll back: weight 0, Failed;
    - PASS moves to the next step (its weight, and SKIP once more); past the last step,
      or at 100, the rollout has Succeeded and the canary keeps 100. A guard (no steps)
      only guards: PASS keeps it Progressing.
    - While Paused, intervals are still judged for people to read; only the hard guard
      acts.

`RolloutController` is the adapter: it keeps one State per route with a rollout, takes
each interval's counts from a CountSource, puts the weights in force through a
`Plane` (the supervisor: every worker, the way a reload does, without the file), saves
state through a StateStore, writes the audit log and sends notifications. A fleet's
(router.fleet.rollouts) judges only while it leads, and writes each transition to etcd
before it acts on it: it overrides the seams marked below (judging, tick, perform,
_save, _forget, _started).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import orjson

from router.rollout.gates import FAIL, HOLD, NODATA, PASS, Judgement, judge
from router.rollout.stats import Counts

if TYPE_CHECKING:
    from router.rollout.notify import Notifier
    from router.rollout.state import StateStore
    from router.rollout.stats import CountSource
    from router.rules import Snapshot
    from router.rules.model import Rollout

__all__ = [
    "ABORTED",
    "ACTIONS",
    "CONTROLLER",
    "FAILED",
    "FINISHED",
    "HOLDING",
    "PAUSED",
    "PHASES",
    "PROGRESSING",
    "SUCCEEDED",
    "Decided",
    "Outcome",
    "Plane",
    "Refused",
    "RolloutController",
    "Spec",
    "State",
    "act",
    "identity",
    "on_interval",
    "route_weights",
    "specs_of",
    "start",
]

log = logging.getLogger("grayroute.rollout")

PROGRESSING: Final = "Progressing"
HOLDING: Final = "Holding"
PAUSED: Final = "Paused"
SUCCEEDED: Final = "Succeeded"
FAILED: Final = "Failed"
ABORTED: Final = "Aborted"
PHASES = (PROGRESSING, HOLDING, PAUSED, SUCCEEDED, FAILED, ABORTED)
FINISHED = frozenset({SUCCEEDED, FAILED, ABORTED})
ACTIONS = ("pause", "resume", "promote", "abort", "retry")
SKIP: Final = "SKIP"  # an interval's verdict: not judged (the first after a weight change)

ANALYSIS_KEPT = 20  # recent intervals kept in a rollout's state, newest first

Judge = Callable[[Counts, Counts, "Rollout"], Judgement]


# -- what the rules say ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """A rollout as the rules in force give it."""

    route: str
    rollout: Rollout
    key: str  # identity(): a new one starts the rollout again from step 0
    pair: float  # the split weight the canary and the stable version share (file's)

    @property
    def guard(self) -> bool:
        """No steps (`split: replicas`): weights follow the replicas; only guards."""
        return self.rollout.steps is None


def identity(route: str, rollout: Rollout, endpoints: tuple[tuple[str, int], ...]) -> str:
    """What identifies a rollout: the route, the canary upstream, the canary's endpoints
    and the rollout block. Any other edit of the file keeps the rollout where it is."""
    doc = {
        "route": route,
        "canary": rollout.canary,
        "endpoints": [list(e) for e in endpoints],
        "rollout": dataclasses.asdict(rollout),
    }
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def specs_of(snapshot: Snapshot) -> dict[str, Spec]:
    """Every route of the rules whose rollout has something to drive (its canary and
    stable version are in the split; `check` warns otherwise)."""
    specs: dict[str, Spec] = {}
    for route in snapshot.ruleset.routes:
        rollout, split = route.rollout, route.split
        if rollout is None or split is None:
            continue
        weights = dict(split.weights)
        if rollout.canary not in weights or rollout.stable not in weights:
            continue
        upstream = snapshot.upstreams.get(rollout.canary)
        endpoints = upstream.endpoints if upstream is not None else ()
        pair = weights[rollout.canary] + weights[rollout.stable]
        specs[route.name] = Spec(
            route.name, rollout, identity(route.name, rollout, endpoints), pair or 100.0
        )
    return specs


# -- the state ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    """Where one rollout is. `weight` is the canary's share of the two versions' traffic
    in percent as the rollout set it (None: a guard's weights follow the replicas)."""

    route: str
    key: str
    canary: str
    stable: str
    phase: str
    step: int | None
    weight: float | None
    since: str  # when the phase last changed
    reason: str = ""
    failures: int = 0  # FAIL verdicts in this step
    nodata: int = 0  # NODATA intervals in a row
    skip: bool = True  # the next interval is not judged
    analysis: tuple[Mapping[str, Any], ...] = ()  # newest first

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "key": self.key,
            "canary": self.canary,
            "stable": self.stable,
            "phase": self.phase,
            "step": self.step,
            "weight": self.weight,
            "since": self.since,
            "reason": self.reason,
            "failures": self.failures,
            "nodata": self.nodata,
            "skip": self.skip,
            "analysis": list(self.analysis),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        """The inverse of to_json; ValueError on anything else."""
        try:
            phase = str(data["phase"])
            if phase not in PHASES:
                raise ValueError(f"phase {phase!r}")
            step = data.get("step")
            weight = data.get("weight")
            return cls(
                route=str(data["route"]),
                key=str(data["key"]),
                canary=str(data["canary"]),
                stable=str(data["stable"]),
                phase=phase,
                step=None if step is None else int(step),
                weight=None if weight is None else float(weight),
                since=str(data.get("since", "")),
                reason=str(data.get("reason", "")),
                failures=int(data.get("failures", 0)),
                nodata=int(data.get("nodata", 0)),
                skip=bool(data.get("skip", True)),
                analysis=tuple(dict(a) for a in data.get("analysis", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a rollout state: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Outcome:
    state: State
    judgement: Judgement | None = None


class Decided(NamedTuple):
    """A person's action on a rollout, decided: the state before and after."""

    spec: Spec
    old: State
    new: State


@dataclass(frozen=True, slots=True)
class Refused:
    """A person's action that the rollout's phase does not allow (HTTP 409)."""

    reason: str


# -- decisions ------------------------------------------------------------------------------


def start(spec: Spec, at: str, reason: str = "started") -> State:
    rollout = spec.rollout
    steps = rollout.steps
    return State(
        route=spec.route,
        key=spec.key,
        canary=rollout.canary,
        stable=rollout.stable,
        phase=PROGRESSING,
        step=None if steps is None else 0,
        weight=None if steps is None else min(steps[0], 100.0),
        since=at,
        reason=reason if steps is None else f"{reason}: step 0 at {_pct(steps[0])}",
    )


def route_weights(spec: Spec, state: State) -> dict[str, float] | None:
    """The canary's and the stable version's split weights the state asks for; None
    when the file's (or the replica counts') are right."""
    if state.weight is None:
        return None
    canary = spec.pair * state.weight / 100.0
    if spec.guard:  # weight 0 after a rollback; the stable keeps its replica count
        return {state.canary: canary}
    return {state.canary: canary, state.stable: spec.pair - canary}


def on_interval(
    spec: Spec,
    state: State,
    canary: Counts,
    stable: Counts,
    at: str,
    applied: bool = True,
    judge: Judge = judge,
) -> Outcome:
    """One interval of `canary` and `stable` counts. `applied`: every worker routes with
    the weights of `state` (else the interval mixes two weights and is skipped). `judge`:
    the gates (another judge only in benchmarks/rollout_sim.py, to compare)."""
    if state.phase in FINISHED:
        return Outcome(state)
    if state.skip or not applied:
        why = "a worker was still applying the weight" if not applied else "warm-up"
        record = {"at": at, "verdict": SKIP, "reason": f"not judged: {why}", "gates": {}}
        return Outcome(_record(state, record, skip=not applied))
    judgement = judge(canary, stable, spec.rollout)
    record = {
        "at": at,
        "verdict": judgement.verdict,
        "gates": {g.gate: g.to_json() for g in judgement.gates},
    }
    state = _record(state, record)
    rollout = spec.rollout
    if judgement.hard:
        guard = judgement.gates[-1]
        why = (
            f"canary failure rate {_rate(guard.canary)} above max_error_rate "
            f"{_rate(guard.threshold)} over {guard.canary_requests} requests"
        )
        return Outcome(_fail(spec, state, at, why), judgement)
    if state.phase == PAUSED:
        return Outcome(state, judgement)
    verdict = judgement.verdict
    if verdict == HOLD:
        why = "both versions fail more than max_error_rate: the platform, not the canary"
        return Outcome(_move(state, HOLDING, at, why, nodata=0), judgement)
    if verdict == NODATA:
        nodata = state.nodata + 1
        gate = judgement.gates[0]
        why = (
            f"NODATA {nodata} in a row: canary {gate.canary_requests}, stable "
            f"{gate.stable_requests} requests (min_requests {rollout.min_requests})"
        )
        if nodata >= rollout.max_nodata and not spec.guard:
            return Outcome(_move(state, PAUSED, at, why, nodata=nodata), judgement)
        return Outcome(_move(state, HOLDING, at, why, nodata=nodata), judgement)
    if verdict == FAIL:
        failures = state.failures + 1
        failed = ", ".join(g.gate for g in judgement.gates if g.verdict == FAIL)
        why = f"FAIL {failures} of {rollout.failures} in this step ({failed})"
        if failures >= rollout.failures:
            return Outcome(_fail(spec, state, at, why), judgement)
        return Outcome(_move(state, PROGRESSING, at, why, failures=failures, nodata=0), judgement)
    assert verdict == PASS
    steps = rollout.steps
    if steps is None or state.step is None:
        return Outcome(_move(state, PROGRESSING, at, "guarding: PASS", nodata=0), judgement)
    following = state.step + 1
    if following >= len(steps) or steps[following] >= 100.0:
        why = f"every step passed: the canary has 100% (step {len(steps) - 1})"
        done = _move(state, SUCCEEDED, at, why, step=len(steps) - 1, weight=100.0, nodata=0)
        return Outcome(dataclasses.replace(done, failures=0), judgement)
    why = f"step {state.step} passed: step {following} at {_pct(steps[following])}"
    moved = _move(
        state, PROGRESSING, at, why, step=following, weight=steps[following], failures=0, nodata=0
    )
    return Outcome(dataclasses.replace(moved, skip=True), judgement)


def act(spec: Spec, state: State, action: str, at: str, by: str) -> State | Refused:
    """A person's action on a rollout, or why it is refused."""
    phase = state.phase
    if action == "pause":
        if phase == PAUSED:
            return Refused("the rollout is already Paused")
        if phase in FINISHED:
            return Refused(f"the rollout is {phase}: there is nothing to pause")
        return _move(state, PAUSED, at, f"paused by {by}")
    if action == "resume":
        if phase != PAUSED:
            return Refused(f"only a Paused rollout can be resumed; this one is {phase}")
        return _move(state, PROGRESSING, at, f"resumed by {by}", nodata=0)
    if action == "promote":
        steps = spec.rollout.steps
        if steps is None:
            return Refused("a guard has no steps to promote: its weights follow the replicas")
        if phase == SUCCEEDED:
            return Refused("the rollout has already Succeeded")
        why = f"promoted to 100% by {by}"
        done = _move(state, SUCCEEDED, at, why, step=len(steps) - 1, weight=100.0, nodata=0)
        return dataclasses.replace(done, failures=0, skip=False)
    if action == "abort":
        if phase in (FAILED, ABORTED):
            return Refused(f"the rollout is {phase}: the canary is already at weight 0")
        return _move(state, ABORTED, at, f"aborted by {by}: canary weight 0", weight=0.0)
    if action == "retry":
        if phase not in (FAILED, ABORTED):
            return Refused(f"only a Failed or Aborted rollout can be retried; this one is {phase}")
        return start(spec, at, f"retried by {by}")
    return Refused(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")


def _record(state: State, record: Mapping[str, Any], skip: bool = False) -> State:
    analysis = (record, *state.analysis[: ANALYSIS_KEPT - 1])
    return dataclasses.replace(state, analysis=analysis, skip=skip)


def _move(state: State, phase: str, at: str, reason: str, **changes: Any) -> State:
    since = at if phase != state.phase else state.since
    return dataclasses.replace(state, phase=phase, since=since, reason=reason, **changes)


def _fail(spec: Spec, state: State, at: str, why: str) -> State:
    return _move(state, FAILED, at, f"rolled back: {why}", weight=0.0, nodata=0)


def _pct(weight: float) -> str:
    return f"{weight:g}%"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.3g}%"


# -- the adapter ----------------------------------------------------------------------------


class Plane(Protocol):
    """What the controller acts through: the router's workers, the audit log, time."""

    def put_weights(
        self, route: str, weights: Mapping[str, float] | None, fallback: tuple[str, str | None]
    ) -> None:
        """Route `route` with these split weights (None: the file's) in every worker,
        and let fallback[0] fall back to fallback[1] by default (None: no default)."""
        ...

    def weights_applied(self) -> bool:
        """True when every worker routes with the weights last put."""
        ...

    def weights_in_force(self, route: str) -> Mapping[str, float]:
        """The route's split weights the workers route with now (replica counts...)."""
        ...

    def audit(self, entry: dict[str, Any]) -> None: ...

    def now_iso(self) -> str: ...

    def rules_digest(self) -> str: ...


CONTROLLER = {"user": "rollout-controller"}


class RolloutController:
    """One State per route with a rollout, advanced once per `interval` each."""

    def __init__(
        self,
        plane: Plane,
        store: StateStore,
        counts: CountSource,
        notifier: Notifier | None,
        router_id: str | None = None,
    ) -> None:
        self.plane = plane
        self.router_id = router_id  # who judges: this router (ROLLOUT's `leader`)
        self.store = store
        self.counts = counts
        self.notifier = notifier
        self.specs: dict[str, Spec] = {}
        self.states: dict[str, State] = {}
        self.verdicts: Counter[tuple[str, str, str]] = Counter()
        self._due: dict[str, float] = {}
        self._wake: asyncio.Event | None = None
        self._loaded = False

    # -- rules ---------------------------------------------------------------------------

    def sync(self, snapshot: Snapshot) -> None:
        """The rules in force changed (or the router starts): start, keep or drop each
        route's rollout and put its weights in force."""
        specs = specs_of(snapshot)
        stored: Mapping[str, Mapping[str, Any]] = {}
        if not self._loaded:
            stored = self.store.load()
            self._loaded = True
        at = self.plane.now_iso()
        for route in [r for r in self.states if r not in specs]:
            gone = self.states.pop(route)
            self.specs.pop(route, None)
            self._due.pop(route, None)
            self.plane.put_weights(route, None, (gone.canary, None))
            self._forget(gone)
            log.info("rollout %s: removed from the rules", route)
        for route, spec in specs.items():
            old = self.states.get(route)
            resumed = False
            if old is None and route in stored:
                try:
                    old = State.from_json(stored[route])
                    resumed = True
                except ValueError as exc:
                    log.warning("rollout %s: saved state unreadable (%s); starting it", route, exc)
            self.specs[route] = spec
            if old is not None and old.key == spec.key and not resumed:
                # An unrelated edit: the rollout goes on where it is, in its interval
                # (the split's weights may have changed: they are put again).
                self._put(route, old)
                continue
            if old is not None and old.key == spec.key:
                # A restart: fresh workers warm up as after a weight change.
                state = dataclasses.replace(old, skip=old.phase not in FINISHED)
                log.info(
                    "rollout %s: resumed %s at step %s, canary weight %s",
                    route, old.phase, old.step, old.weight,
                )  # fmt: skip
            else:
                why = "started" if old is None else "the rollout changed: started again"
                state = start(spec, at, why)
                log.info("rollout %s: %s (%s)", route, why, state.reason)
                self._started(spec, old, state)
            self._put(route, state)
            self._take_baseline(route, spec)
        for route in stored:
            if route not in specs:
                self.store.remove(route)  # the rules no longer have it
        self._poke()

    def _put(self, route: str, state: State) -> None:
        """Make `state` the route's: saved, and its weights in force (a no-op in the
        workers when they did not change)."""
        self.states[route] = state
        self._save(route, state)
        spec = self.specs[route]
        self.plane.put_weights(route, route_weights(spec, state), (state.canary, state.stable))

    def _save(self, route: str, state: State) -> None:
        """Seam: `state` is the route's now; keep it."""
        self.store.save(route, state.to_json())

    def _forget(self, gone: State) -> None:
        """Seam: the rules no longer have this rollout: its state goes, and the audit says so."""
        self.store.remove(gone.route)
        self._audit(gone, None, "the rollout was removed from the rules", "reload", CONTROLLER)

    def _started(self, spec: Spec, old: State | None, state: State) -> None:
        """Seam: the rules started a rollout (`old`: the one they replaced): say so."""
        self._audit(old, state, state.reason, "reload", CONTROLLER)
        self._notify(spec, old, state)

    def _take_baseline(self, route: str, spec: Spec) -> None:
        """Counts from now on belong to the next interval, which ends in `interval`."""
        self.counts.take(route)
        self._due[route] = time.monotonic() + spec.rollout.interval

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Judge every rollout once per its interval until cancelled."""
        self._wake = asyncio.Event()
        notifier = self.notifier
        task = asyncio.get_running_loop().create_task(notifier.run()) if notifier else None
        try:
            while True:
                now = time.monotonic()
                for route, due in list(self._due.items()):
                    if due <= now:
                        spec = self.specs[route]
                        # Late (a busy loop): the next interval starts now, not in the past.
                        self._due[route] = max(due + spec.rollout.interval, now)
                        if self.judging():
                            self.tick(route)
                wait = min(self._due.values(), default=now + 3600.0) - time.monotonic()
                self._wake.clear()
                # Not wait_for: on 3.11 it can swallow a cancellation that arrives as the
                # event is set, and the loop would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.0)):
                        await self._wake.wait()
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def judging(self) -> bool:
        """Seam: whether this router judges its rollouts now (a fleet's: while it leads)."""
        return True

    async def first_states(self, timeout: float) -> bool:
        """Seam: wait (at most `timeout` s) until the stored states are known; whether they
        are (a router's own state directory is read at once; a fleet's etcd may be away)."""
        return True

    def leader(self) -> str | None:
        """Seam: the id of the router that judges the rollouts (ROLLOUT's `leader`)."""
        return self.router_id

    def resume_intervals(self, grace: float) -> None:
        """A router that takes over judging: each rollout's interval goes on (it followed
        the judge's), unless it began more than two intervals plus `grace` seconds ago
        (the judge was gone or silent that long): then a new one starts now."""
        now = time.monotonic()
        for route, spec in self.specs.items():
            interval = spec.rollout.interval
            began = self._due.get(route, now) - interval
            if now - began > 2 * interval + grace:
                self._take_baseline(route, spec)
        self._poke()

    def tick(self, route: str) -> None:
        """Seam: one interval of `route`'s rollout."""
        spec, state = self.specs[route], self.states[route]
        outcome = self._judge(spec, state)
        self._count(route, outcome)
        self._advance(spec, state, outcome.state, "interval", CONTROLLER)

    def _judge(self, spec: Spec, state: State) -> Outcome:
        """The interval's counts, judged: what the rollout becomes (nothing done yet)."""
        counts = self.counts.take(spec.route)
        canary = counts.get(state.canary, Counts())
        stable = counts.get(state.stable, Counts())
        at = self.plane.now_iso()
        return on_interval(spec, state, canary, stable, at, self.plane.weights_applied())

    def _count(self, route: str, outcome: Outcome) -> None:
        if outcome.judgement is not None:
            for gate in outcome.judgement.gates:
                self.verdicts[(route, gate.gate, gate.verdict)] += 1

    def _advance(
        self, spec: Spec, old: State, new: State, trigger: str, who: Mapping[str, Any]
    ) -> None:
        self._put(spec.route, new)
        if new.phase != old.phase or new.step != old.step:
            log.info(
                "rollout %s: %s -> %s, step %s, canary weight %s: %s",
                spec.route, old.phase, new.phase, new.step, new.weight, new.reason,
            )  # fmt: skip
            self._audit(old, new, new.reason, trigger, who)
        if new.phase != old.phase:
            self._notify(spec, old, new)

    # -- people ----------------------------------------------------------------------------

    def act(self, route: str, action: str, who: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of a person's action on `route`'s rollout."""
        decided = self._decide(route, action, who)
        if not isinstance(decided, Decided):
            return decided
        self._acted(decided, who)
        return 200, self.describe(route) or {}

    async def perform(
        self, route: str, action: str, who: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Seam: act() for the admin API (a fleet's writes the new state to etcd first)."""
        return self.act(route, action, who)

    def _decide(
        self, route: str, action: str, who: Mapping[str, Any]
    ) -> Decided | tuple[int, dict[str, Any]]:
        """What the action makes of the rollout, or the answer refusing it (404, 409)."""
        spec, state = self.specs.get(route), self.states.get(route)
        if spec is None or state is None:
            return 404, _no_rollout(route)
        by = str(who.get("user") or "someone")
        result = act(spec, state, action, self.plane.now_iso(), by)
        if isinstance(result, Refused):
            return 409, {
                "error": "refused",
                "detail": result.reason,
                "rollout": self.describe(route),
            }
        return Decided(spec, state, result)

    def _acted(self, decided: Decided, who: Mapping[str, Any]) -> None:
        spec, old, new = decided
        self._advance(spec, old, new, "admin", who)
        if new.phase != old.phase or new.step != old.step:
            self._take_baseline(spec.route, spec)
            self._poke()

    # -- reading ---------------------------------------------------------------------------

    def describe(self, route: str) -> dict[str, Any] | None:
        spec, state = self.specs.get(route), self.states.get(route)
        if spec is None or state is None:
            return None
        rollout = spec.rollout
        weight = self._weight_now(state)
        return {
            "route": route,
            "canary": state.canary,
            "stable": state.stable,
            "phase": state.phase,
            "step": state.step,
            "steps": None if rollout.steps is None else list(rollout.steps),
            "weight": weight,
            "mode": "guard" if spec.guard else "steps",
            "failures": state.failures,
            "max_failures": rollout.failures,
            "nodata": state.nodata,
            "since": state.since,
            "reason": state.reason,
            "interval": rollout.interval,
            "leader": self.leader(),
            "analysis": list(state.analysis),
        }

    def _weight_now(self, state: State) -> float | None:
        """The canary's share in percent: as the rollout set it, or for a guard as the
        replica counts give it."""
        if state.weight is not None:
            return state.weight
        weights = self.plane.weights_in_force(state.route)
        pair = weights.get(state.canary, 0.0) + weights.get(state.stable, 0.0)
        return round(100.0 * weights.get(state.canary, 0.0) / pair, 2) if pair > 0 else None

    def describe_all(self) -> list[dict[str, Any]]:
        return [d for d in (self.describe(r) for r in self.specs) if d is not None]

    def metric_families(self) -> Iterator[Any]:
        """grayroute_rollout_weight, _phase and _verdicts_total, for the admin /metrics."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        weight = GaugeMetricFamily(
            "grayroute_rollout_weight",
            "Share of the two versions' split traffic (percent) a rollout gives each: the "
            "canary's effective weight and the stable version's remainder.",
            labels=("route", "upstream"),
        )
        phase = GaugeMetricFamily(
            "grayroute_rollout_phase",
            "1 for the rollout's current phase, 0 for the others.",
            labels=("route", "phase"),
        )
        for route, state in sorted(self.states.items()):
            now = self._weight_now(state)
            if now is not None:
                weight.add_metric((route, state.canary), now)
                weight.add_metric((route, state.stable), 100.0 - now)
            for name in PHASES:
                phase.add_metric((route, name), 1.0 if name == state.phase else 0.0)
        yield weight
        yield phase
        verdicts = CounterMetricFamily(
            "grayroute_rollout_verdicts",
            "Verdicts given by each gate of a rollout: PASS, FAIL or NODATA.",
            labels=("route", "gate", "verdict"),
        )
        for (route, gate, verdict), n in sorted(self.verdicts.items()):
            verdicts.add_metric((route, gate, verdict), n)
        yield verdicts

    # -- telling -------------------------------------------------------------------------

    def _audit(
        self,
        old: State | None,
        new: State | None,
        reason: str,
        trigger: str,
        who: Mapping[str, Any],
    ) -> None:
        current = new or old
        assert current is not None
        entry: dict[str, Any] = {
            "at": self.plane.now_iso(),
            "action": "rollout",
            "trigger": trigger,
            "result": new.phase if new is not None else "removed",
            "route": current.route,
            "canary": current.canary,
            "stable": current.stable,
            "from": old.phase if old is not None else None,
            "step": current.step,
            "weight": current.weight,
            "reason": reason,
            "digest": self.plane.rules_digest(),
            **who,
        }
        self.plane.audit(entry)

    def _notify(self, spec: Spec, old: State | None, new: State) -> None:
        if self.notifier is None or not spec.rollout.notify:
            return
        payload = {
            "event": "rollout.phase",
            "route": new.route,
            "canary": new.canary,
            "stable": new.stable,
            "phase": new.phase,
            "previous_phase": old.phase if old is not None else None,
            "step": new.step,
            "weight": new.weight,
            "reason": new.reason,
            "at": new.since,
            "analysis": new.analysis[0] if new.analysis else None,
        }
        for url in spec.rollout.notify:
            self.notifier.send(url, payload)


def _no_rollout(route: str) -> dict[str, Any]:
    return {
        "error": "no rollout",
        "detail": f"route {route!r} has no rollout in the rules in force",
    }
