"""The gates: one interval's counts of the canary and the stable version in, verdicts out.

Pure functions of numbers: no clock, no I/O, no state. The controller calls `judge()`
once per interval; the simulation (benchmarks/rollout_sim.py) calls the same code.

    error_rate      FAIL when the canary's failure rate exceeds the stable version's by
                    more than `max_increase` AND a one-sided test says the canary fails
                    more often, at `confidence`: two-proportion z-test, or Fisher's exact
                    test when fewer than 5 failures (or successes) are expected in a
                    version, where the normal approximation is poor.
    latency         FAIL when the canary's `quantile` exceeds both `max_ratio` x the
                    stable version's and the stable version's + `min_increase`, AND a
                    one-sided binomial test says more than (1 - quantile) of the canary's
                    requests are slower than that threshold, at `confidence`. Without the
                    test, a p99 from a few hundred requests (the 2nd or 3rd slowest) would
                    fail equal versions every few intervals.
    max_error_rate  the hard guard: the canary's failure rate above it, over at least 20
                    requests, rolls back at once, whatever `min_requests` says.

Each gate gives PASS, FAIL or NODATA. NODATA (either version had fewer than
`min_requests`) holds the weight and is never a failure. When the stable version breaches
`max_error_rate` too, the platform is failing, not the canary: the verdict is HOLD.

The statistics are written with the standard library (math.erfc, math.lgamma): they are
a few lines each, exact enough in double precision, and scipy (the one well-kept library
that has them) would add tens of megabytes to the router for two functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from router.rollout.stats import Counts
    from router.rules.model import ErrorRateGate, LatencyGate, Rollout

__all__ = [
    "FAIL",
    "GATES",
    "GUARD_MIN_REQUESTS",
    "HOLD",
    "NODATA",
    "PASS",
    "GateResult",
    "Judgement",
    "binomial_upper_tail",
    "error_rate_gate",
    "fisher_upper_tail",
    "guard_gate",
    "judge",
    "latency_gate",
    "two_proportion_p",
]

PASS: Final = "PASS"
FAIL: Final = "FAIL"
NODATA: Final = "NODATA"
HOLD: Final = "HOLD"  # an interval's verdict only: both versions breached together

GATES = ("error_rate", "latency", "max_error_rate")
GUARD_MIN_REQUESTS = 20
# Fewer expected failures (or successes) than this in a version: Fisher's exact test.
_FISHER_BELOW = 5.0


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate's verdict on one interval, with what it was decided on."""

    gate: str
    verdict: str  # PASS, FAIL or NODATA
    canary: float | None  # error rate (fraction) or latency (seconds)
    stable: float | None
    threshold: float | None  # the canary's value above which the gate may fail
    canary_requests: int
    stable_requests: int
    p_value: float | None = None  # of the one-sided test, when it was run
    stable_breach: bool = False  # max_error_rate: the stable version is above it too

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict,
            "canary": self.canary,
            "stable": self.stable,
            "threshold": self.threshold,
            "canary_requests": self.canary_requests,
            "stable_requests": self.stable_requests,
        }
        if self.p_value is not None:
            out["p_value"] = self.p_value
        if self.stable_breach:
            out["stable_breach"] = True
        return out


@dataclass(frozen=True, slots=True)
class Judgement:
    """An interval's verdict: PASS, FAIL, NODATA or HOLD. `hard`: the FAIL is a breach
    of max_error_rate (roll back at once)."""

    verdict: str
    gates: tuple[GateResult, ...]
    hard: bool = False


def judge(canary: Counts, stable: Counts, rollout: Rollout) -> Judgement:
    """Every gate on one interval's counts, and the interval's verdict."""
    guard = guard_gate(canary, stable, rollout.max_error_rate)
    error_rate = error_rate_gate(canary, stable, rollout.error_rate, rollout.min_requests)
    latency = latency_gate(canary, stable, rollout.latency, rollout.min_requests)
    gates = (error_rate, latency, guard)
    if guard.verdict == FAIL:
        if guard.stable_breach:
            return Judgement(HOLD, gates)
        return Judgement(FAIL, gates, hard=True)
    verdicts = (error_rate.verdict, latency.verdict)
    if NODATA in verdicts:
        return Judgement(NODATA, gates)
    if FAIL in verdicts:
        return Judgement(FAIL, gates)
    return Judgement(PASS, gates)


def guard_gate(canary: Counts, stable: Counts, max_error_rate: float) -> GateResult:
    nc, ns = canary.requests, stable.requests
    rc, rs = canary.error_rate, stable.error_rate
    if nc < GUARD_MIN_REQUESTS or rc is None:
        return GateResult("max_error_rate", NODATA, rc, rs, max_error_rate, nc, ns)
    if rc <= max_error_rate:
        return GateResult("max_error_rate", PASS, rc, rs, max_error_rate, nc, ns)
    stable_breach = ns >= GUARD_MIN_REQUESTS and rs is not None and rs > max_error_rate
    return GateResult(
        "max_error_rate", FAIL, rc, rs, max_error_rate, nc, ns, stable_breach=stable_breach
    )


def error_rate_gate(
    canary: Counts, stable: Counts, gate: ErrorRateGate, min_requests: int
) -> GateResult:
    nc, ns = canary.requests, stable.requests
    rc, rs = canary.error_rate, stable.error_rate
    if nc < min_requests or ns < min_requests or rc is None or rs is None:
        return GateResult("error_rate", NODATA, rc, rs, None, nc, ns)
    threshold = rs + gate.max_increase
    if rc - rs <= gate.max_increase:
        return GateResult("error_rate", PASS, rc, rs, threshold, nc, ns)
    p = two_proportion_p(canary.failures, nc, stable.failures, ns)
    verdict = FAIL if p < 1.0 - gate.confidence else PASS
    return GateResult("error_rate", verdict, rc, rs, threshold, nc, ns, p_value=p)


def latency_gate(
    canary: Counts, stable: Counts, gate: LatencyGate, min_requests: int
) -> GateResult:
    nc, ns = canary.requests, stable.requests
    qc, qs = canary.quantile(gate.quantile), stable.quantile(gate.quantile)
    if nc < min_requests or ns < min_requests or qc is None or qs is None:
        return GateResult("latency", NODATA, qc, qs, None, nc, ns)
    threshold = max(gate.max_ratio * qs, qs + gate.min_increase)
    if qc <= threshold:
        return GateResult("latency", PASS, qc, qs, threshold, nc, ns)
    timed = sum(canary.buckets)
    slower = math.floor(canary.slower_than(threshold))
    p = binomial_upper_tail(slower, timed, 1.0 - gate.quantile)
    verdict = FAIL if p < 1.0 - gate.confidence else PASS
    return GateResult("latency", verdict, qc, qs, threshold, nc, ns, p_value=p)


# -- statistics ---------------------------------------------------------------------------


def two_proportion_p(f1: int, n1: int, f2: int, n2: int) -> float:
    """One-sided p-value of "version 1 fails more often than version 2" (f failures out
    of n requests each): the two-proportion z-test with pooled variance, or Fisher's
    exact test when a version expects fewer than 5 failures or successes."""
    n = n1 + n2
    k = f1 + f2
    if n1 <= 0 or n2 <= 0:
        return 1.0
    expected = min(k * n1 / n, k * n2 / n, (n - k) * n1 / n, (n - k) * n2 / n)
    if expected < _FISHER_BELOW:
        return fisher_upper_tail(f1, n1, f2, n2)
    pooled = k / n
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
    z = (f1 / n1 - f2 / n2) / se
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_upper_tail(f1: int, n1: int, f2: int, n2: int) -> float:
    """Fisher's exact test, one-sided: P(X >= f1) where X, the failures of version 1, is
    hypergeometric given the failures of both (f1 + f2) and the group sizes."""
    k = f1 + f2
    n = n1 + n2
    top = min(k, n1)
    lowest = max(0, k - n2)
    if f1 <= lowest:
        return 1.0
    log_total = _log_choose(n, n1)
    total = 0.0
    for x in range(f1, top + 1):
        term = math.exp(_log_choose(k, x) + _log_choose(n - k, n1 - x) - log_total)
        total += term
        # Past f1 >= the mode the terms only shrink: stop once they no longer count.
        if term < total * 1e-17:
            break
    return min(total, 1.0)


def binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space from the nearer end."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)

    def pmf(x: int) -> float:
        return math.exp(_log_choose(n, x) + x * log_p + (n - x) * log_q)

    mean = n * p
    if k > mean:  # the upper tail: terms shrink from k on
        total = 0.0
        for x in range(k, n + 1):
            term = pmf(x)
            total += term
            if term < total * 1e-17:
                break
        return min(total, 1.0)
    lower = 0.0  # 1 - P(X <= k - 1): terms shrink from k - 1 down
    for x in range(k - 1, -1, -1):
        term = pmf(x)
        lower += term
        if term < lower * 1e-17:
            break
    return max(0.0, 1.0 - lower)
