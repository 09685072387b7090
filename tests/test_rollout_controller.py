"""The controller's decisions with numbers alone, and the adapter on in-memory parts."""

from __future__ import annotations

import dataclasses
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

import pytest

from router.rollout.controller import (
    ABORTED,
    FAILED,
    HOLDING,
    PAUSED,
    PROGRESSING,
    SUCCEEDED,
    Refused,
    RolloutController,
    Spec,
    State,
    act,
    identity,
    on_interval,
    route_weights,
    specs_of,
    start,
)
from router.rollout.stats import LATENCY_BOUNDS, NBUCKETS, Counts
from router.rules import load_snapshot_text
from router.rules.model import Rollout

AT = "2026-01-05T10:00:00.000Z"
ROLLOUT = Rollout("v1.1", "v1", (1.0, 5.0, 20.0, 50.0, 100.0), min_requests=100, failures=2)
SPEC = Spec("orders", ROLLOUT, "k" * 64, 100.0)
GUARD = Spec("orders", dataclasses.replace(ROLLOUT, steps=None), "g" * 64, 4.0)


def counts(requests: int, failures: int = 0, seconds: float = 0.005) -> Counts:
    buckets = [0] * NBUCKETS
    buckets[bisect_left(LATENCY_BOUNDS, seconds)] = requests
    return Counts(requests, failures, tuple(buckets))


GOOD = counts(1000, 10)
BAD = counts(1000, 100)
FEW = counts(50)


def judged(spec: Spec, state: State, canary: Counts, stable: Counts = GOOD) -> State:
    return on_interval(spec, state, canary, stable, AT).state


def warm(spec: Spec = SPEC) -> State:
    """A started rollout past its warm-up interval."""
    state = on_interval(spec, start(spec, AT), GOOD, GOOD, AT).state
    assert not state.skip
    return state


def test_start_at_step_zero_and_skip_the_first_interval() -> None:
    state = start(SPEC, AT)
    assert (state.phase, state.step, state.weight, state.skip) == (PROGRESSING, 0, 1.0, True)
    assert route_weights(SPEC, state) == {"v1.1": 1.0, "v1": 99.0}
    skipped = on_interval(SPEC, state, BAD, GOOD, AT)
    assert skipped.judgement is None and skipped.state.analysis[0]["verdict"] == "SKIP"
    assert skipped.state.phase == PROGRESSING and skipped.state.failures == 0


def test_an_interval_a_worker_had_not_applied_is_skipped_too() -> None:
    state = on_interval(SPEC, warm(), BAD, GOOD, AT, applied=False).state
    assert state.failures == 0 and state.skip
    assert "still applying" in state.analysis[0]["reason"]


def test_pass_moves_step_by_step_to_succeeded() -> None:
    state = warm()
    weights = []
    while state.phase == PROGRESSING:
        state = judged(SPEC, state, GOOD)
        weights.append(state.weight)
        state = judged(SPEC, state, GOOD) if state.phase == PROGRESSING else state  # warm-up
    assert weights == [5.0, 20.0, 50.0, 100.0]
    assert (state.phase, state.step, state.weight) == (SUCCEEDED, 4, 100.0)
    assert route_weights(SPEC, state) == {"v1.1": 100.0, "v1": 0.0}
    assert judged(SPEC, state, BAD) == state  # finished: nothing is judged


def test_steps_below_100_end_at_100() -> None:
    spec = dataclasses.replace(SPEC, rollout=dataclasses.replace(ROLLOUT, steps=(10.0,)))
    state = judged(spec, warm(spec), GOOD)
    assert (state.phase, state.step, state.weight) == (SUCCEEDED, 0, 100.0)


def test_failures_within_a_step_roll_back() -> None:
    state = judged(SPEC, warm(), BAD)
    assert (state.phase, state.failures, state.weight) == (PROGRESSING, 1, 1.0)
    state = judged(SPEC, state, BAD)
    assert (state.phase, state.weight) == (FAILED, 0.0)
    assert state.reason.startswith("rolled back: FAIL 2 of 2 in this step (error_rate")
    assert route_weights(SPEC, state) == {"v1.1": 0.0, "v1": 100.0}


def test_failures_reset_with_each_step() -> None:
    state = judged(SPEC, warm(), BAD)
    state = judged(SPEC, state, GOOD)  # step 1
    assert (state.step, state.failures) == (1, 0)
    state = judged(SPEC, judged(SPEC, state, GOOD), BAD)  # warm-up, then one FAIL
    assert (state.phase, state.failures) == (PROGRESSING, 1)


def test_hard_breach_rolls_back_at_once_even_without_enough_data() -> None:
    outcome = on_interval(SPEC, warm(), counts(25, 20), GOOD, AT)
    assert outcome.judgement is not None and outcome.judgement.hard
    assert outcome.state.phase == FAILED and outcome.state.weight == 0.0
    assert "above max_error_rate 50%" in outcome.state.reason


def test_nodata_holds_then_pauses_and_never_fails() -> None:
    spec = dataclasses.replace(SPEC, rollout=dataclasses.replace(ROLLOUT, max_nodata=3))
    state = warm(spec)
    for n in (1, 2):
        state = judged(spec, state, FEW)
        assert (state.phase, state.nodata, state.failures, state.weight) == (HOLDING, n, 0, 1.0)
    state = judged(spec, state, FEW)
    assert (state.phase, state.nodata, state.weight) == (PAUSED, 3, 1.0)
    for _ in range(20):
        state = judged(spec, state, Counts())
    assert state.phase == PAUSED and state.weight == 1.0


def test_data_again_after_nodata_goes_on() -> None:
    state = judged(SPEC, warm(), FEW)
    assert state.phase == HOLDING
    state = judged(SPEC, state, GOOD)
    assert (state.phase, state.step, state.nodata) == (PROGRESSING, 1, 0)


def test_both_versions_breaching_holds() -> None:
    state = judged(SPEC, warm(), counts(1000, 700), counts(1000, 650))
    assert (state.phase, state.failures, state.weight) == (HOLDING, 0, 1.0)
    assert "the platform, not the canary" in state.reason


def test_paused_is_judged_but_only_the_hard_guard_acts() -> None:
    paused = act(SPEC, warm(), "pause", AT, "alice")
    assert isinstance(paused, State) and paused.phase == PAUSED
    state = judged(SPEC, paused, BAD)
    assert (state.phase, state.failures) == (PAUSED, 0) and state.analysis[0]["verdict"] == "FAIL"
    assert judged(SPEC, paused, counts(100, 90)).phase == FAILED


def test_a_guard_only_guards() -> None:
    state = start(GUARD, AT)
    assert (state.step, state.weight) == (None, None)
    assert route_weights(GUARD, state) is None
    state = judged(GUARD, judged(GUARD, state, GOOD), GOOD)
    assert state.phase == PROGRESSING and state.reason == "guarding: PASS"
    for _ in range(30):  # no data for long: a guard holds, it does not pause
        state = judged(GUARD, state, FEW)
    assert state.phase == HOLDING
    state = judged(GUARD, judged(GUARD, state, BAD), BAD)
    assert (state.phase, state.weight) == (FAILED, 0.0)
    assert route_weights(GUARD, state) == {"v1.1": 0.0}  # the stable keeps its replicas


def test_analysis_is_newest_first_and_bounded() -> None:
    state = start(SPEC, AT)
    for i in range(30):
        state = on_interval(SPEC, state, FEW, GOOD, f"t{i}").state
    assert len(state.analysis) == 20
    assert state.analysis[0]["at"] == "t29"
    gate = state.analysis[0]["gates"]["error_rate"]
    assert gate == {
        "verdict": "NODATA",
        "canary": 0.0,
        "stable": 0.01,
        "threshold": None,
        "canary_requests": 50,
        "stable_requests": 1000,
    }


# -- people -----------------------------------------------------------------------------


def test_actions_and_refusals() -> None:
    state = warm()
    assert act(SPEC, state, "resume", AT, "a") == Refused(
        "only a Paused rollout can be resumed; this one is Progressing"
    )
    paused = act(SPEC, state, "pause", AT, "alice")
    assert isinstance(paused, State) and paused.reason == "paused by alice"
    assert act(SPEC, paused, "pause", AT, "a") == Refused("the rollout is already Paused")
    resumed = act(SPEC, paused, "resume", AT, "bob")
    assert isinstance(resumed, State)
    assert (resumed.phase, resumed.step, resumed.weight) == (PROGRESSING, 0, 1.0)
    promoted = act(SPEC, resumed, "promote", AT, "carol")
    assert isinstance(promoted, State)
    assert (promoted.phase, promoted.step, promoted.weight) == (SUCCEEDED, 4, 100.0)
    assert isinstance(act(SPEC, promoted, "promote", AT, "c"), Refused)
    assert isinstance(act(SPEC, promoted, "retry", AT, "c"), Refused)
    aborted = act(SPEC, promoted, "abort", AT, "dave")
    assert isinstance(aborted, State) and (aborted.phase, aborted.weight) == (ABORTED, 0.0)
    assert act(SPEC, aborted, "abort", AT, "d") == Refused(
        "the rollout is Aborted: the canary is already at weight 0"
    )
    retried = act(SPEC, aborted, "retry", AT, "erin")
    assert isinstance(retried, State)
    assert (retried.phase, retried.step, retried.weight, retried.skip) == (
        PROGRESSING,
        0,
        1.0,
        True,
    )
    assert retried.reason == "retried by erin: step 0 at 1%"
    assert isinstance(act(GUARD, start(GUARD, AT), "promote", AT, "x"), Refused)
    assert isinstance(act(SPEC, state, "explode", AT, "x"), Refused)


def test_state_json_round_trip() -> None:
    state = judged(SPEC, warm(), BAD)
    assert State.from_json(state.to_json()) == state
    with pytest.raises(ValueError):
        State.from_json({**state.to_json(), "phase": "Exploded"})
    with pytest.raises(ValueError):
        State.from_json({"route": "x"})


# -- what the rules say --------------------------------------------------------------------

RULES = """\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:9001"]}
  v1.1: {endpoints: ["127.0.0.1:9002"]}
  v2: {endpoints: ["127.0.0.1:9003"]}
routes:
  - name: orders
    split: {v1: 80, v1.1: 0}
    rollout: {canary: v1.1, stable: v1, steps: [10, 50]}
  - name: other
    split: {v1: 1, v2: 1}
    rollout: {canary: v2, stable: v1.1, steps: [10]}
  - name: plain
    to: v2
"""


def test_specs_of_the_rules() -> None:
    specs = specs_of(load_snapshot_text(RULES, "rules.yaml"))
    assert list(specs) == ["orders"]  # `other`'s stable is not in its split (a warning)
    spec = specs["orders"]
    assert spec.pair == 80.0 and not spec.guard
    state = dataclasses.replace(start(spec, AT), weight=10.0)
    assert route_weights(spec, state) == {"v1.1": 8.0, "v1": 72.0}


def test_identity_changes_with_the_canary_its_endpoints_and_the_block_only() -> None:
    key = identity("orders", ROLLOUT, (("127.0.0.1", 9002),))
    assert key == identity("orders", ROLLOUT, (("127.0.0.1", 9002),))
    assert key != identity("orders", ROLLOUT, (("127.0.0.1", 9003),))
    assert key != identity(
        "orders", dataclasses.replace(ROLLOUT, canary="v2"), (("127.0.0.1", 9002),)
    )
    assert key != identity(
        "orders", dataclasses.replace(ROLLOUT, failures=3), (("127.0.0.1", 9002),)
    )
    assert key != identity("cart", ROLLOUT, (("127.0.0.1", 9002),))
    before = specs_of(load_snapshot_text(RULES, "rules.yaml"))["orders"].key
    unrelated = RULES.replace("split: {v1: 80, v1.1: 0}", "split: {v1: 90, v1.1: 0}").replace(
        "to: v2", "to: v1"
    )
    assert specs_of(load_snapshot_text(unrelated, "rules.yaml"))["orders"].key == before
    new_canary = RULES.replace(
        'v1.1: {endpoints: ["127.0.0.1:9002"]}', 'v1.1: {endpoints: ["127.0.0.1:9009"]}'
    )
    assert specs_of(load_snapshot_text(new_canary, "rules.yaml"))["orders"].key != before


# -- the adapter -------------------------------------------------------------------------------


class FakePlane:
    def __init__(self) -> None:
        self.weights: dict[str, Mapping[str, float] | None] = {}
        self.fallbacks: dict[str, str | None] = {}
        self.audits: list[dict[str, Any]] = []
        self.applied = True

    def put_weights(
        self, route: str, weights: Mapping[str, float] | None, fallback: tuple[str, str | None]
    ) -> None:
        self.weights[route] = weights
        self.fallbacks[fallback[0]] = fallback[1]

    def weights_applied(self) -> bool:
        return self.applied

    def weights_in_force(self, route: str) -> Mapping[str, float]:
        return {"v1": 3.0, "v1.1": 1.0}

    def audit(self, entry: dict[str, Any]) -> None:
        self.audits.append(entry)

    def now_iso(self) -> str:
        return AT

    def rules_digest(self) -> str:
        return "d" * 64


class MemoryStore:
    def __init__(self, saved: dict[str, dict[str, Any]] | None = None) -> None:
        self.saved = dict(saved or {})

    def load(self) -> dict[str, dict[str, Any]]:
        return dict(self.saved)

    def save(self, route: str, state: Mapping[str, Any]) -> None:
        self.saved[route] = dict(state)

    def remove(self, route: str) -> None:
        self.saved.pop(route, None)


class FakeCounts:
    def __init__(self) -> None:
        self.next: dict[str, dict[str, Counts]] = {}
        self.taken: list[str] = []

    def take(self, route: str) -> dict[str, Counts]:
        self.taken.append(route)
        return self.next.pop(route, {})


class FakeNotifier:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Mapping[str, Any]]] = []

    def send(self, url: str, payload: Mapping[str, Any]) -> None:
        self.sent.append((url, payload))


def controller(
    store: MemoryStore | None = None,
) -> tuple[RolloutController, FakePlane, FakeCounts, FakeNotifier]:
    plane, source, notifier = FakePlane(), FakeCounts(), FakeNotifier()
    ctl = RolloutController(plane, store or MemoryStore(), source, notifier)  # type: ignore[arg-type]
    return ctl, plane, source, notifier


NOTIFYING = RULES.replace(
    "steps: [10, 50]}", 'steps: [10, 50], notify: ["http://h/x"], failures: 1}'
)


def test_controller_starts_judges_rolls_back_and_tells() -> None:
    ctl, plane, source, notifier = controller()
    ctl.sync(load_snapshot_text(NOTIFYING, "rules.yaml"))
    assert plane.weights == {"orders": {"v1.1": 8.0, "v1": 72.0}}
    assert plane.fallbacks == {"v1.1": "v1"}
    assert [a["result"] for a in plane.audits] == ["Progressing"]
    assert [p["phase"] for _, p in notifier.sent] == ["Progressing"]
    ctl.tick("orders")  # warm-up
    source.next["orders"] = {"v1.1": BAD, "v1": GOOD, "v2": GOOD}
    ctl.tick("orders")
    assert ctl.states["orders"].phase == FAILED
    assert plane.weights["orders"] == {"v1.1": 0.0, "v1": 80.0}
    assert plane.audits[-1]["result"] == FAILED and plane.audits[-1]["from"] == PROGRESSING
    assert plane.audits[-1]["user"] == "rollout-controller"
    url, payload = notifier.sent[-1]
    assert url == "http://h/x" and payload["phase"] == FAILED and payload["weight"] == 0.0
    assert payload["analysis"]["verdict"] == "FAIL"
    assert ctl.verdicts[("orders", "error_rate", "FAIL")] == 1
    described = ctl.describe("orders")
    assert (
        described is not None
        and described["phase"] == FAILED
        and described["steps"] == [10.0, 50.0]
    )


def test_controller_actions_answer_http_statuses() -> None:
    ctl, plane, _, _ = controller()
    ctl.sync(load_snapshot_text(RULES, "rules.yaml"))
    who = {"user": "alice", "host": "laptop", "peer": "127.0.0.1"}
    status, body = ctl.act("orders", "resume", who)
    assert status == 409 and body["error"] == "refused" and body["rollout"]["phase"] == PROGRESSING
    status, body = ctl.act("orders", "abort", who)
    assert status == 200 and body["phase"] == ABORTED and body["weight"] == 0.0
    assert plane.audits[-1]["user"] == "alice" and plane.audits[-1]["trigger"] == "admin"
    assert ctl.act("nothing", "abort", who)[0] == 404


def test_controller_keeps_a_rollout_across_unrelated_reloads_and_restarts_a_changed_one() -> None:
    ctl, plane, _, _ = controller()
    ctl.sync(load_snapshot_text(RULES, "rules.yaml"))
    ctl.tick("orders")
    ctl.tick("orders")  # no data: Holding
    holding = ctl.states["orders"]
    assert holding.phase == HOLDING
    ctl.sync(load_snapshot_text(RULES.replace("to: v2", "to: v1"), "rules.yaml"))
    assert ctl.states["orders"] == holding
    ctl.sync(load_snapshot_text(RULES.replace("steps: [10, 50]", "steps: [5, 50]"), "rules.yaml"))
    assert ctl.states["orders"].phase == PROGRESSING and ctl.states["orders"].weight == 5.0
    assert plane.audits[-1]["reason"] == "the rollout changed: started again: step 0 at 5%"
    ctl.sync(
        load_snapshot_text(
            RULES.replace("    rollout: {canary: v1.1, stable: v1, steps: [10, 50]}\n", ""),
            "rules.yaml",
        )
    )
    assert "orders" not in ctl.states and plane.weights["orders"] is None
    assert plane.fallbacks["v1.1"] is None and plane.audits[-1]["result"] == "removed"


def test_controller_resumes_saved_state_after_a_restart() -> None:
    store = MemoryStore()
    ctl, _, _, _ = controller(store)
    ctl.sync(load_snapshot_text(RULES, "rules.yaml"))
    ctl.act("orders", "abort", {"user": "x"})
    again, plane, _, _ = controller(store)
    again.sync(load_snapshot_text(RULES, "rules.yaml"))
    assert again.states["orders"].phase == ABORTED
    assert plane.weights["orders"] == {"v1.1": 0.0, "v1": 80.0}
    assert plane.audits == []  # nothing happened: it is where it was
    # Saved state of another rollout (its block changed meanwhile) starts afresh.
    store.saved["orders"]["key"] = "0" * 64
    third, plane, _, _ = controller(store)
    third.sync(load_snapshot_text(RULES, "rules.yaml"))
    assert third.states["orders"].phase == PROGRESSING


def test_metric_families() -> None:
    ctl, _, _, _ = controller()
    ctl.sync(load_snapshot_text(RULES, "rules.yaml"))
    families = {f.name: f for f in ctl.metric_families()}
    weights = {s.labels["upstream"]: s.value for s in families["grayroute_rollout_weight"].samples}
    assert weights == {"v1.1": 10.0, "v1": 90.0}
    phases = {s.labels["phase"]: s.value for s in families["grayroute_rollout_phase"].samples}
    assert phases[PROGRESSING] == 1.0 and sum(phases.values()) == 1.0


def test_a_guard_reports_the_weight_the_replicas_give() -> None:
    ctl, plane, _, _ = controller()
    guard = RULES.replace("split: {v1: 80, v1.1: 0}", "split: {v1: replicas, v1.1: replicas}")
    ctl.sync(load_snapshot_text(guard.replace("steps: [10, 50]", "steps: [10]"), "rules.yaml"))
    assert ctl.describe("orders")["weight"] == 10.0  # type: ignore[index]
    replicas = RULES.replace("split: {v1: 80, v1.1: 0}", "split: replicas").replace(
        "rollout: {canary: v1.1, stable: v1, steps: [10, 50]}",
        "rollout: {canary: v1.1, stable: v1}",
    )
    ctl.sync(load_snapshot_text(replicas, "rules.yaml"))
    described = ctl.describe("orders")
    assert described is not None and described["mode"] == "guard" and described["step"] is None
    assert described["weight"] == 25.0  # 1 of the 4 endpoints in force
    assert plane.weights["orders"] is None  # a guard leaves the weights to the replicas
