"""Checking a route's `rollout:` block (the grammar; what the router does with it is
router/rollout/ and docs/rollout.md):

    rollout:
      canary: UPSTREAM            required: the upstream whose weight the rollout drives
      stable: UPSTREAM            required: what it is compared with; takes the remainder
      steps: [1, 5, 20, 50, 100]  canary weight (percent) per step, increasing, 0 < s <= 100;
                                  omitted only with `split: replicas` (a guard, no steps)
      interval: DURATION          default 30s
      min_requests: N             default 200 (per version per interval)
      max_nodata: N               default 10
      failures: N                 default 2
      gates:
        error_rate: {max_increase: PERCENT, confidence: PERCENT}     1%, 99%
        latency: {quantile: 0.99, max_ratio: 1.2, min_increase: DURATION,
                  confidence: PERCENT}                               0.99, 1.2, 50ms, 99%
        max_error_rate: PERCENT                                      50%
      notify: [URL, ...]          http(s) URLs told of every phase change

    PERCENT  a number with a % sign: 1%, 0.5%, 99.9%

Errors and warnings go through the validator (validate.py) like every other key's, with
FILE:LINE:COLUMN and a hint. A canary or stable that the route's split does not name is
a warning: the file works, but the rollout has nothing to drive until it does.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from router.rules.load import MapNode, ScalarNode
from router.rules.model import ErrorRateGate, LatencyGate, Rollout, Split

if TYPE_CHECKING:
    from router.rules.load import Entry, Node
    from router.rules.validate import _Validator

__all__ = [
    "ERROR_RATE_KEYS",
    "GATES_KEYS",
    "LATENCY_KEYS",
    "ROLLOUT_KEYS",
    "canary_written",
    "parse_percent",
    "validate_rollout",
]

ROLLOUT_KEYS = (
    "canary",
    "stable",
    "steps",
    "interval",
    "min_requests",
    "max_nodata",
    "failures",
    "gates",
    "notify",
)
GATES_KEYS = ("error_rate", "latency", "max_error_rate")
ERROR_RATE_KEYS = ("max_increase", "confidence")
LATENCY_KEYS = ("quantile", "max_ratio", "min_increase", "confidence")

EXAMPLE_STEPS = "[1, 5, 20, 50, 100]"


def parse_percent(text: str) -> float:
    """'1%' -> 0.01, '99.9 %' -> 0.999; ValueError without the sign or a number."""
    number, sign, rest = text.strip().partition("%")
    if not sign or rest.strip():
        raise ValueError(text)
    try:
        value = Decimal(number.strip())
    except InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite():
        raise ValueError(text)
    return float(value / 100)


def canary_written(entry: Entry | None) -> str | None:
    """The canary a `rollout:` entry names, as written (before it is checked)."""
    if entry is None or not isinstance(entry.value, MapNode):
        return None
    canary = entry.value.items.get("canary")
    if canary is None or not isinstance(canary.value, ScalarNode):
        return None
    return canary.value.text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}"


def validate_rollout(
    v: _Validator, node: Node, path: str, split: Split | None, action: str | None
) -> Rollout | None:
    """The route's rollout, or None (reported). `split`: the route's, when it has one
    and it is valid; `action`: the key that decides the route otherwise (`to`, `lua`...)."""
    fields = v.mapping(
        node,
        path,
        ROLLOUT_KEYS,
        required=("canary", "stable"),
        example="write `canary: UPSTREAM`, `stable: UPSTREAM` and `steps: "
        f"{EXAMPLE_STEPS}` under it",
    )
    if fields is None:
        return None
    if action is not None:
        v.error(
            node,
            path,
            f"a rollout drives the weights of a `split`; this route has `{action}`",
            "write `split: {STABLE: 100, CANARY: 0}` instead, where the rollout starts",
        )
        return None
    ok = "canary" in fields and "stable" in fields
    names: dict[str, str | None] = {}
    for key in ("canary", "stable"):
        if key in fields:
            names[key] = _member(v, fields[key], _join(path, key), split)
            ok = ok and names[key] is not None
    canary, stable = names.get("canary"), names.get("stable")
    if canary is not None and canary == stable:
        v.error(
            fields["stable"].value,
            _join(path, "stable"),
            f"`{stable}` is the canary too",
            "the stable version is the one the canary is compared with: name another upstream",
        )
        ok = False
    steps: tuple[float, ...] | None = None
    if "steps" in fields:
        steps = _steps(v, fields["steps"].value, _join(path, "steps"))
        ok = ok and steps is not None
    elif split is not None and not split.replicas:
        v.error(
            node,
            _join(path, "steps"),
            "missing `steps`",
            f"add `steps: {EXAMPLE_STEPS}` (canary weight per step); only a `split: "
            "replicas` rollout may go without, as a guard",
        )
        ok = False
    interval: float | None = 30.0
    if "interval" in fields:
        interval = v.duration(fields["interval"].value, _join(path, "interval"))
        ok = ok and interval is not None
    counts: dict[str, int | None] = {"min_requests": 200, "max_nodata": 10, "failures": 2}
    for key in counts:
        if key in fields:
            counts[key] = _count(v, fields[key].value, _join(path, key))
            ok = ok and counts[key] is not None
    gates: tuple[ErrorRateGate, LatencyGate, float] | None = (ErrorRateGate(), LatencyGate(), 0.5)
    if "gates" in fields:
        gates = _gates(v, fields["gates"].value, _join(path, "gates"))
        ok = ok and gates is not None
    notify: tuple[str, ...] | None = ()
    if "notify" in fields:
        notify = _notify(v, fields["notify"].value, _join(path, "notify"))
        ok = ok and notify is not None
    if not ok or canary is None or stable is None or interval is None or gates is None:
        return None
    if notify is None or None in counts.values():
        return None
    error_rate, latency, max_error_rate = gates
    return Rollout(
        canary,
        stable,
        steps,
        interval,
        counts["min_requests"] or 0,
        counts["max_nodata"] or 0,
        counts["failures"] or 0,
        error_rate,
        latency,
        max_error_rate,
        notify,
    )


def _member(v: _Validator, entry: Entry, path: str, split: Split | None) -> str | None:
    """An upstream name that must exist; a warning when the split does not name it."""
    node = entry.value
    name = v.text(node, path, "upstream name", numbers_ok=True)
    if name is None or not v.check_upstream_name(node, path, name):
        return None
    if split is not None and name not in dict(split.weights):
        v.warn(
            node,
            path,
            f"`{name}` is not in this route's split, so the rollout has no weight to drive",
            f"add `{name}: 0` to the split (the stable version at 100 where the rollout starts)",
        )
    return name


def _steps(v: _Validator, node: Node, path: str) -> tuple[float, ...] | None:
    items = v.seq(node, path, EXAMPLE_STEPS)
    if items is None:
        return None
    if not items:
        v.error(node, path, "no steps", f"write e.g. {EXAMPLE_STEPS}")
        return None
    steps: list[float] = []
    ok = True
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if isinstance(item, ScalarNode) and isinstance(item.value, str) and "%" in item.value:
            v.error(
                item,
                item_path,
                f"`{item.text}`: write the weight without %",
                f"write {item.value.replace('%', '').strip()}",
            )
            ok = False
            continue
        value = v.number(item, item_path, "a step", "5")
        if value is None:
            ok = False
            continue
        if not 0 < value <= 100:
            v.error(
                item,
                item_path,
                f"{value:g} is not a canary weight above 0 and at most 100",
                "steps are percentages of the split's traffic, e.g. 1, 5, 20, 50, 100",
            )
            ok = False
            continue
        if round(value, 2) != value:
            v.error(item, item_path, f"{value:g}: at most two decimals", f"write {value:.2f}")
            ok = False
            continue
        if steps and value <= steps[-1]:
            v.error(
                item,
                item_path,
                f"{value:g} does not come after {steps[-1]:g}",
                "steps only go up: each gives the canary more of the traffic",
            )
            ok = False
            continue
        steps.append(float(value))
    return tuple(steps) if ok else None


def _count(v: _Validator, node: Node, path: str) -> int | None:
    value = v.number(node, path, "a count", "10")
    if value is None:
        return None
    if not isinstance(value, int) or value < 1:
        v.error(node, path, f"{value:g} is not a whole number of 1 or more", "write e.g. 10")
        return None
    return value


def _percent(
    v: _Validator,
    node: Node,
    path: str,
    example: str,
    low: float,
    high: float,
    low_included: bool = False,
) -> float | None:
    """A PERCENT above `low` (or equal to it, with low_included) and at most `high`;
    both fractions."""
    value: float | None = None
    if isinstance(node, ScalarNode) and isinstance(node.value, str):
        try:
            value = parse_percent(node.value)
        except ValueError:
            value = None
    if value is None:
        shown = f"`{node.text}`" if isinstance(node, ScalarNode) else node.kind
        hint = f"write e.g. {example}"
        if isinstance(node, ScalarNode) and isinstance(node.value, int | float):
            hint = f"write the percentage with its sign, e.g. {example}"
        v.error(node, path, f"not a percentage: {shown}", hint)
        return None
    if not (low <= value if low_included else low < value) or value > high:
        lowest = f"{low * 100:g}% or more" if low_included else f"above {low * 100:g}%"
        v.error(
            node,
            path,
            f"{value * 100:g}% is out of range",
            f"write a percentage {lowest} and at most {high * 100:g}%",
        )
        return None
    return value


def _gates(v: _Validator, node: Node, path: str) -> tuple[ErrorRateGate, LatencyGate, float] | None:
    fields = v.mapping(
        node, path, GATES_KEYS, example="write `error_rate:`, `latency:` or `max_error_rate:`"
    )
    if fields is None:
        return None
    error_rate: ErrorRateGate | None = ErrorRateGate()
    latency: LatencyGate | None = LatencyGate()
    max_error_rate: float | None = 0.5
    if "error_rate" in fields:
        error_rate = _error_rate(v, fields["error_rate"].value, _join(path, "error_rate"))
    if "latency" in fields:
        latency = _latency(v, fields["latency"].value, _join(path, "latency"))
    if "max_error_rate" in fields:
        max_error_rate = _percent(
            v, fields["max_error_rate"].value, _join(path, "max_error_rate"), "50%", 0.0, 1.0
        )
    if error_rate is None or latency is None or max_error_rate is None:
        return None
    return error_rate, latency, max_error_rate


def _confidence(v: _Validator, node: Node, path: str) -> float | None:
    value = _percent(v, node, path, "99%", 0.5, 1.0)
    if value is not None and value >= 1.0:
        v.error(
            node,
            path,
            "100% confidence is never reached: the gate could never fail",
            "write e.g. 99% or 99.9%",
        )
        return None
    return value


def _error_rate(v: _Validator, node: Node, path: str) -> ErrorRateGate | None:
    fields = v.mapping(
        node, path, ERROR_RATE_KEYS, example="write e.g. `{max_increase: 1%, confidence: 99%}`"
    )
    if fields is None:
        return None
    gate = ErrorRateGate()
    max_increase: float | None = gate.max_increase
    confidence: float | None = gate.confidence
    if "max_increase" in fields:
        max_increase = _percent(
            v,
            fields["max_increase"].value,
            _join(path, "max_increase"),
            "1%",
            0.0,
            1.0,
            low_included=True,
        )
    if "confidence" in fields:
        confidence = _confidence(v, fields["confidence"].value, _join(path, "confidence"))
    if max_increase is None or confidence is None:
        return None
    return ErrorRateGate(max_increase, confidence)


def _latency(v: _Validator, node: Node, path: str) -> LatencyGate | None:
    fields = v.mapping(
        node,
        path,
        LATENCY_KEYS,
        example="write e.g. `{quantile: 0.99, max_ratio: 1.2, min_increase: 50ms}`",
    )
    if fields is None:
        return None
    gate = LatencyGate()
    quantile: float | None = gate.quantile
    max_ratio: float | None = gate.max_ratio
    min_increase: float | None = gate.min_increase
    confidence: float | None = gate.confidence
    if "quantile" in fields:
        qnode = fields["quantile"].value
        quantile = v.number(qnode, _join(path, "quantile"), "quantile", "0.99")
        if quantile is not None and not 0 < quantile < 1:
            v.error(
                qnode,
                _join(path, "quantile"),
                f"{quantile:g} is not a quantile between 0 and 1",
                "write e.g. 0.99 for the 99th percentile, 0.5 for the median",
            )
            quantile = None
    if "max_ratio" in fields:
        rnode = fields["max_ratio"].value
        max_ratio = v.number(rnode, _join(path, "max_ratio"), "max_ratio", "1.2")
        if max_ratio is not None and max_ratio < 1:
            v.error(
                rnode,
                _join(path, "max_ratio"),
                f"{max_ratio:g} is below 1: a canary as fast as the stable version would fail",
                "write 1 or more, e.g. 1.2 for 20% slower",
            )
            max_ratio = None
    if "min_increase" in fields:
        min_increase = _min_increase(v, fields["min_increase"].value, _join(path, "min_increase"))
    if "confidence" in fields:
        confidence = _confidence(v, fields["confidence"].value, _join(path, "confidence"))
    if quantile is None or max_ratio is None or min_increase is None or confidence is None:
        return None
    return LatencyGate(float(quantile), float(max_ratio), min_increase, confidence)


def _min_increase(v: _Validator, node: Node, path: str) -> float | None:
    """A duration that may be 0 (then only `max_ratio` decides)."""
    if isinstance(node, ScalarNode) and node.value in (0, "0", "0ms", "0s"):
        return 0.0
    return v.duration(node, path)


def _notify(v: _Validator, node: Node, path: str) -> tuple[str, ...] | None:
    items = v.seq(node, path, '["http://alerts.internal:9000/hook"]')
    if items is None:
        return None
    urls: list[str] = []
    ok = True
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        url = v.text(item, item_path, "URL")
        if url is None:
            ok = False
            continue
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # a port that is not a number raises here
        except ValueError:
            valid = False
        if not valid:
            v.error(
                item,
                item_path,
                f"`{url}` is not an http(s) URL",
                "write e.g. http://alerts.internal:9000/hook",
            )
            ok = False
            continue
        urls.append(url)
    return tuple(urls) if ok else None
