"""Per-version counts of judged traffic: requests, failures and a latency histogram.

Only a route's split traffic is counted (router.rules.decide.JudgedDecision): requests a
pin, a `to`, a Lua script or `split_clients` decided are not comparable cohorts. A
failure is a 5xx answer (the router's own 502/503/504 for connect errors and timeouts
included) or a request the upstream chosen by the split could not take, so that its
fallback served it.

The histogram has fixed buckets, the same in every worker and on every router, so the
counts of many of them add up exactly: a worker keeps cumulative totals (`Row`), the
supervisor sums the workers' (router.metrics), and a `CountSource` hands the controller
the counts of one interval per route (`LocalCounts` here; a fleet sums every router's).

    LATENCY_BOUNDS   upper bounds (seconds) of the buckets, eight per doubling from
                     0.1 ms to 105 s (each ~9% wide); one more bucket above the last
    Counts           one version's counts over some time: add, subtract, quantile
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "LATENCY_BOUNDS",
    "NBUCKETS",
    "CountSource",
    "Counts",
    "LocalCounts",
    "counts_from_row",
    "new_row",
]

# Eight buckets per doubling: a quantile read from them is within ~4.5% of the true one
# (interpolated inside the bucket), far finer than the ratios the latency gate compares.
LATENCY_BOUNDS: tuple[float, ...] = tuple(0.0001 * 2 ** (i / 8) for i in range(161))
NBUCKETS = len(LATENCY_BOUNDS) + 1  # the last one has no upper bound


def new_row() -> list[int]:
    """A worker's cumulative counters of one (route, upstream): [requests, failures,
    bucket 0, ..., bucket NBUCKETS-1]; the hot path bumps three slots of it."""
    return [0] * (2 + NBUCKETS)


def counts_from_row(row: Sequence[int]) -> Counts:
    return Counts(row[0], row[1], tuple(row[2:]))


@dataclass(frozen=True, slots=True)
class Counts:
    """One version's requests, failures and latency histogram (per-bucket counts)."""

    requests: int = 0
    failures: int = 0
    buckets: tuple[int, ...] = ()  # () or NBUCKETS counts

    def __add__(self, other: Counts) -> Counts:
        if not other.buckets:
            buckets = self.buckets
        elif not self.buckets:
            buckets = other.buckets
        else:
            buckets = tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=True))
        return Counts(self.requests + other.requests, self.failures + other.failures, buckets)

    def since(self, earlier: Counts) -> Counts:
        """What was counted after `earlier` (cumulative totals of the same counters);
        never negative, even if a counter went back (a router of a fleet restarted)."""
        if not earlier.buckets:
            buckets = self.buckets
        elif not self.buckets:
            buckets = ()
        else:
            buckets = tuple(
                max(a - b, 0) for a, b in zip(self.buckets, earlier.buckets, strict=True)
            )
        return Counts(
            max(self.requests - earlier.requests, 0),
            max(self.failures - earlier.failures, 0),
            buckets,
        )

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency in seconds, interpolated inside its bucket; None
        without data. The bucket above the last bound reports that bound."""
        total = sum(self.buckets)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, count in enumerate(self.buckets):
            if count and seen + count >= rank:
                if i == len(LATENCY_BOUNDS):
                    return LATENCY_BOUNDS[-1]
                low = LATENCY_BOUNDS[i - 1] if i else 0.0
                high = LATENCY_BOUNDS[i]
                return low + (high - low) * max(rank - seen, 0.0) / count
            seen += count
        return LATENCY_BOUNDS[-1]

    def slower_than(self, seconds: float) -> float:
        """How many requests were slower than `seconds`: the buckets above it, and the
        share of the bucket it falls in that lies above it (spread evenly, as quantile()
        assumes)."""
        slower = 0.0
        for i, count in enumerate(self.buckets):
            if not count:
                continue
            low = LATENCY_BOUNDS[i - 1] if i else 0.0
            if low >= seconds:
                slower += count
            elif i < len(LATENCY_BOUNDS) and LATENCY_BOUNDS[i] > seconds:
                high = LATENCY_BOUNDS[i]
                slower += count * (high - seconds) / (high - low)
        return slower

    def to_json(self) -> dict[str, Any]:
        """{"requests", "failures", "buckets": [[index, count], ...]} (non-zero only)."""
        return {
            "requests": self.requests,
            "failures": self.failures,
            "buckets": [[i, n] for i, n in enumerate(self.buckets) if n],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Counts:
        """The inverse of to_json; ValueError on anything else."""
        try:
            requests = int(data["requests"])
            failures = int(data["failures"])
            sparse = [(int(i), int(n)) for i, n in data.get("buckets", ())]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not rollout counts: {exc}") from exc
        if not sparse:
            return cls(requests, failures)
        buckets = [0] * NBUCKETS
        for i, n in sparse:
            if not 0 <= i < NBUCKETS or n < 0:
                raise ValueError(f"not rollout counts: bucket {i} = {n}")
            buckets[i] += n
        return cls(requests, failures, tuple(buckets))


class CountSource(Protocol):
    """Where the controller gets counts: summed over every worker (and, for a fleet,
    every router). `take(route)` returns each upstream's counts since the previous
    `take` of that route (all counted so far on the first)."""

    def take(self, route: str) -> Mapping[str, Counts]: ...


class LocalCounts:
    """A CountSource over this router's workers: `totals()` gives the cumulative counts
    per (route, upstream) summed over workers (router.metrics.MetricsAggregator), and
    the counts of an interval are the difference from the previous take."""

    def __init__(self, totals: Callable[[], Mapping[tuple[str, str], Counts]]) -> None:
        self._totals = totals
        self._last: dict[str, dict[str, Counts]] = {}

    def take(self, route: str) -> dict[str, Counts]:
        now = {u: c for (r, u), c in self._totals().items() if r == route}
        last = self._last.get(route, {})
        self._last[route] = now
        return {u: c.since(last.get(u, Counts())) for u, c in now.items()}
