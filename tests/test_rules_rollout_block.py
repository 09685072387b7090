"""The `rollout:` block of a route: the model it builds, and every mistake at its
FILE:LINE:COLUMN with a hint."""

from __future__ import annotations

import pytest

from router.rules import check_text, load_snapshot_text
from router.rules.decide import Decision, JudgedDecision, RequestView, decide
from router.rules.load import load_text
from router.rules.model import ErrorRateGate, LatencyGate, Rollout
from router.rules.rollout_block import parse_percent
from router.rules.validate import validate

# Line numbers below refer to this text.
BASE = """\
format: 1
upstreams:
  orders-v1: {endpoints: ["127.0.0.1:9001"]}
  orders-v1.1: {endpoints: ["127.0.0.1:9002"]}
  orders-v2: {endpoints: ["127.0.0.1:9003"]}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    pins:
      - {to: orders-v2, users: ["10086"]}
    split: {orders-v1: 100, orders-v1.1: 0}
    rollout:
      canary: orders-v1.1
      stable: orders-v1
      steps: [1, 5, 20, 50, 100]
"""

FULL = (
    BASE
    + """\
      interval: 10s
      min_requests: 50
      max_nodata: 3
      failures: 1
      gates:
        error_rate: {max_increase: 0.5%, confidence: 99.9%}
        latency: {quantile: 0.9, max_ratio: 1.5, min_increase: 20ms, confidence: 95%}
        max_error_rate: 30%
      notify: ["http://alerts.internal:9000/hook", "https://chat.example/x"]
"""
)


def problems(text: str) -> list[str]:
    return [str(p) for p in check_text(text, "rules.yaml")]


def only(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def rollout_of(text: str) -> Rollout:
    root, _ = load_text(text, "rules.yaml")
    rules, found = validate(root, "rules.yaml")
    assert rules is not None, [str(p) for p in found]
    rollout = rules.routes[0].rollout
    assert rollout is not None
    return rollout


def test_defaults_and_no_warning_for_the_canary_at_zero() -> None:
    assert problems(BASE) == []
    assert rollout_of(BASE) == Rollout(
        canary="orders-v1.1",
        stable="orders-v1",
        steps=(1.0, 5.0, 20.0, 50.0, 100.0),
        interval=30.0,
        min_requests=200,
        max_nodata=10,
        failures=2,
        error_rate=ErrorRateGate(0.01, 0.99),
        latency=LatencyGate(0.99, 1.2, 0.05, 0.99),
        max_error_rate=0.5,
        notify=(),
    )


def test_every_key_builds_the_model() -> None:
    assert problems(FULL) == []
    rollout = rollout_of(FULL)
    assert rollout.interval == 10.0
    assert (rollout.min_requests, rollout.max_nodata, rollout.failures) == (50, 3, 1)
    assert rollout.error_rate == ErrorRateGate(0.005, 0.999)
    assert rollout.latency == LatencyGate(0.9, 1.5, 0.02, 0.95)
    assert rollout.max_error_rate == pytest.approx(0.3)
    assert rollout.notify == ("http://alerts.internal:9000/hook", "https://chat.example/x")


def test_another_upstream_at_zero_still_warns() -> None:
    text = edit(
        "split: {orders-v1: 100, orders-v1.1: 0}",
        "split: {orders-v1: 100, orders-v1.1: 0, orders-v2: 0}",
    )
    assert only(text) == (
        "rules.yaml:12:56: warning: routes[0].split.orders-v2: weight 0: this upstream gets "
        "no requests from this split (raise the weight or remove the line)"
    )


def test_replicas_without_steps_is_a_guard() -> None:
    text = edit("split: {orders-v1: 100, orders-v1.1: 0}", "split: replicas")
    text = edit("      steps: [1, 5, 20, 50, 100]\n", "", text)
    # (without the pin: orders-v2 would be in the replicas split too, a warning of its own)
    text = edit('    pins:\n      - {to: orders-v2, users: ["10086"]}\n', "", text)
    text = edit('  orders-v2: {endpoints: ["127.0.0.1:9003"]}\n', "", text)
    assert problems(text) == []
    assert rollout_of(text).steps is None


def test_steps_are_required_with_weights() -> None:
    text = edit("      steps: [1, 5, 20, 50, 100]\n", "")
    assert only(text) == (
        "rules.yaml:14:7: routes[0].rollout.steps: missing `steps` (add `steps: [1, 5, 20, 50, "
        "100]` (canary weight per step); only a `split: replicas` rollout may go without, as "
        "a guard)"
    )


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("[]", "16:14: routes[0].rollout.steps: no steps (write e.g. [1, 5, 20, 50, 100])"),
        ("5", "16:14: routes[0].rollout.steps: expected a list, found a number"),
        (
            "[1, 5, 5]",
            "16:21: routes[0].rollout.steps[2]: 5 does not come after 5 (steps only go up: "
            "each gives the canary more of the traffic)",
        ),
        (
            "[0, 5]",
            "16:15: routes[0].rollout.steps[0]: 0 is not a canary weight above 0 and at most "
            "100 (steps are percentages of the split's traffic, e.g. 1, 5, 20, 50, 100)",
        ),
        (
            "[50, 150]",
            "16:19: routes[0].rollout.steps[1]: 150 is not a canary weight above 0 and at most "
            "100 (steps are percentages of the split's traffic, e.g. 1, 5, 20, 50, 100)",
        ),
        (
            "[1, 5%]",
            "16:18: routes[0].rollout.steps[1]: `5%`: write the weight without % (write 5)",
        ),
        ("[0.125]", "16:15: routes[0].rollout.steps[0]: 0.125: at most two decimals (write 0.12)"),
        ("[1, x]", "16:18: routes[0].rollout.steps[1]: a step must be a number, found `x`"),
    ],
)
def test_bad_steps(steps: str, message: str) -> None:
    text = edit("steps: [1, 5, 20, 50, 100]", f"steps: {steps}")
    assert only(text).startswith(f"rules.yaml:{message}")


def test_unknown_names_and_the_same_upstream_twice() -> None:
    text = edit("canary: orders-v1.1", "canary: orders-v1.2")
    assert (
        "rules.yaml:14:15: routes[0].rollout.canary: unknown upstream (known: orders-v1, "
        "orders-v1.1, orders-v2; did you mean orders-v1.1?)"
    ) in problems(text)
    text = edit("stable: orders-v1", "stable: orders-v1.1")
    assert "rules.yaml:15:15: routes[0].rollout.stable: `orders-v1.1` is the canary too" in only(
        text
    )


def test_canary_or_stable_missing_from_the_split_is_a_warning() -> None:
    text = edit("stable: orders-v1", "stable: orders-v2")
    assert only(text) == (
        "rules.yaml:15:15: warning: routes[0].rollout.stable: `orders-v2` is not in this route's "
        "split, so the rollout has no weight to drive (add `orders-v2: 0` to the split (the "
        "stable version at 100 where the rollout starts))"
    )


def test_a_rollout_needs_a_split() -> None:
    text = edit("split: {orders-v1: 100, orders-v1.1: 0}", "to: orders-v1")
    assert only(text) == (
        "rules.yaml:14:7: routes[0].rollout: a rollout drives the weights of a `split`; this "
        "route has `to` (write `split: {STABLE: 100, CANARY: 0}` instead, where the rollout "
        "starts)"
    )


def test_missing_and_unknown_keys() -> None:
    text = edit("      stable: orders-v1\n", "      stabel: orders-v1\n")
    assert problems(text) == [
        "rules.yaml:14:7: routes[0].rollout.stable: missing `stable` (add `stable:` to "
        "routes[0].rollout)",
        "rules.yaml:15:7: routes[0].rollout.stabel: unknown key (did you mean `stable`?)",
    ]
    assert only(BASE + "      gates: {error_rates: {}}\n") == (
        "rules.yaml:17:15: routes[0].rollout.gates.error_rates: unknown key (did you mean "
        "`error_rate`?)"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("interval: soon", "routes[0].rollout.interval: not a duration: `soon`"),
        ("interval: 0s", "routes[0].rollout.interval: must be longer than 0"),
        ("min_requests: 0", "routes[0].rollout.min_requests: 0 is not a whole number"),
        ("max_nodata: 2.5", "routes[0].rollout.max_nodata: 2.5 is not a whole number"),
        ("failures: many", "routes[0].rollout.failures: a count must be a number"),
        (
            "gates: {error_rate: {max_increase: 0.01}}",
            "routes[0].rollout.gates.error_rate.max_increase: not a percentage: `0.01` "
            "(write the percentage with its sign, e.g. 1%)",
        ),
        (
            "gates: {error_rate: {confidence: 100%}}",
            "routes[0].rollout.gates.error_rate.confidence: 100% confidence is never reached",
        ),
        (
            "gates: {error_rate: {confidence: 40%}}",
            "routes[0].rollout.gates.error_rate.confidence: 40% is out of range (write a "
            "percentage above 50% and at most 100%)",
        ),
        (
            "gates: {latency: {quantile: 99}}",
            "routes[0].rollout.gates.latency.quantile: 99 is not a quantile between 0 and 1",
        ),
        (
            "gates: {latency: {max_ratio: 0.8}}",
            "routes[0].rollout.gates.latency.max_ratio: 0.8 is below 1",
        ),
        (
            "gates: {latency: {min_increase: fast}}",
            "routes[0].rollout.gates.latency.min_increase: not a duration: `fast`",
        ),
        (
            "gates: {max_error_rate: 150%}",
            "routes[0].rollout.gates.max_error_rate: 150% is out of range",
        ),
        (
            'notify: ["alerts:9000/hook"]',
            "routes[0].rollout.notify[0]: `alerts:9000/hook` is not an http(s) URL",
        ),
        (
            'notify: "http://alerts/hook"',
            "routes[0].rollout.notify: expected a list, found text",
        ),
    ],
)
def test_bad_values(line: str, message: str) -> None:
    text = BASE + f"      {line}\n"
    where, _, what = message.partition(" ")
    key = where.rsplit(".", 1)[-1].rstrip(":").partition("[")[0]
    # Reported at the value written after `key: ` (at the first item of a list).
    at = line.index(f"{key}: ") + len(key) + 2
    column = 7 + at + (1 if where.endswith("[0]:") else 0)
    assert only(text).startswith(f"rules.yaml:17:{column}: {where} {what}")


def test_zero_min_increase_leaves_the_ratio_alone() -> None:
    text = BASE + "      gates: {latency: {min_increase: 0}}\n"
    assert problems(text) == []
    assert rollout_of(text).latency.min_increase == 0.0


def test_parse_percent() -> None:
    assert parse_percent("1%") == pytest.approx(0.01)
    assert parse_percent(" 99.9 % ") == pytest.approx(0.999)
    for bad in ("1", "%", "1%%", "x%", "nan%"):
        with pytest.raises(ValueError):
            parse_percent(bad)


def test_split_decisions_of_a_judged_route_are_judged_and_pins_are_not() -> None:
    text = edit(
        "split: {orders-v1: 100, orders-v1.1: 0}", "split: {orders-v1: 50, orders-v1.1: 50}"
    )
    snapshot = load_snapshot_text(text, "rules.yaml")

    def view(user: str | None) -> RequestView:
        headers = {"x-user-id": user} if user is not None else {}
        return RequestView("GET", "/", "", "", headers, "127.0.0.1")

    pinned = decide(snapshot, view("10086"))
    assert pinned.upstream == "orders-v2" and type(pinned) is Decision
    assert pinned.split_pick == ""
    for user in ("1", "2", "3", None):
        judged = decide(snapshot, view(user))
        assert isinstance(judged, JudgedDecision)
        assert judged.split_pick == judged.upstream
    plain = load_snapshot_text(text.split("    rollout:")[0], "rules.yaml")
    assert type(decide(plain, view("1"))) is Decision
