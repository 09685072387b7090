"""The console's memory of traffic: a bounded ring of samples of the workers' totals, and
the marks.

The supervisor already sums the workers' cumulative totals (router.metrics); the console
takes those totals every `SAMPLE_EVERY` seconds and keeps them for `KEEP_SECONDS`.
Nothing new is counted on the hot path.

    Sample        the totals at one moment, folded for the console: per route and
                  upstream requests and 5xx answers, per upstream the request-duration
                  histogram and the upstream errors by kind, per (upstream, fallback)
                  the requests the fallback took, all counted since the router started;
                  and, for the interval since the sample before, the split traffic a
                  rollout judges (requests, failures, its fine latency histogram:
                  router.rollout.stats), kept sparse
    Mark          a moment the charts mark: the rules reloaded, or a route's weights
                  in force changed (a rollout step, replicas that came or went)
    Window        what happened over the last N seconds: the newest sample minus the
                  one N seconds before it (one subtraction, whatever N), plus the judged
                  intervals in between
    SampleRing    the ring itself

Totals summed by one supervisor never go down (a worker that exits leaves its counts
behind: router.metrics.MetricsAggregator); a difference below zero is still taken as 0,
never as negative traffic.

`quantile()` reads a latency quantile from the duration histogram (router.metrics'
buckets) as Prometheus' histogram_quantile does: interpolated inside the bucket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

from router.metrics import DURATION_BUCKETS
from router.rollout.stats import new_row

if TYPE_CHECKING:
    from router.metrics import Totals

__all__ = [
    "KEEP_SECONDS",
    "SAMPLE_EVERY",
    "Interval",
    "Mark",
    "Sample",
    "SampleRing",
    "Window",
    "quantile",
]

SAMPLE_EVERY = 2.0  # seconds between samples
KEEP_SECONDS = 15 * 60.0  # how far back the charts reach
MAX_MARKS = 500

_Requests = Mapping[str, Mapping[str, tuple[int, int]]]  # route -> upstream -> (n, 5xx)
_RouteKey = tuple[str, str]  # (route, upstream); route "" when no route matched
# A rollout cohort's counts over one interval, kept sparse: (requests, failures,
# ((bucket, count), ...)). An interval fills a few of the rollout histogram's 162
# buckets; a dense copy per version per sample would be ~1 KB every 2 seconds.
_Cohort = tuple[int, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # Unix time
    requests: _Requests  # so far
    latency: Mapping[str, tuple[int, ...]]  # upstream -> count per duration bucket, so far
    errors: Mapping[tuple[str, str], int]  # (upstream, kind) -> upstream errors, so far
    fallbacks: Mapping[tuple[str, str], int]  # (upstream, fallback) -> requests, so far
    judged: Mapping[_RouteKey, _Cohort] = field(default_factory=dict)  # since the sample before


@dataclass(frozen=True, slots=True)
class Mark:
    at: float  # Unix time
    kind: str  # "reload" | "weights"
    route: str | None  # None: every route (a reload)
    text: str


@dataclass(slots=True)
class Window:
    """What happened over `seconds` (ending at `end`), `samples` intervals of it."""

    seconds: float = 0.0
    samples: int = 0
    end: float = 0.0
    requests: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    latency: dict[str, list[int]] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str], int] = field(default_factory=dict)
    # (route, upstream) -> router.rollout.stats row: [requests, failures, buckets...]
    judged: dict[_RouteKey, list[int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Interval:
    """One route's traffic between two samples, for its charts."""

    at: float  # the end
    seconds: float
    requests: Mapping[str, tuple[int, int]]  # upstream -> (requests, 5xx)


def quantile(
    counts: Sequence[int], q: float, bounds: Sequence[float] = DURATION_BUCKETS
) -> float | None:
    """The q-quantile (seconds) of a histogram given as per-bucket counts (the last
    bucket has no upper bound); None without data. Inside a bucket the values are taken
    as spread evenly; in the last bucket the answer is its lower bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = float(bounds[i - 1]) if i else 0.0
            return low + (float(bounds[i]) - low) * max(rank - seen, 0.0) / count
        seen += count
    return float(bounds[-1])


class SampleRing:
    """The samples of the last `keep` seconds (and the one before them, which the
    oldest interval is measured from), and the marks of that time."""

    def __init__(self, keep: float = KEEP_SECONDS, max_marks: int = MAX_MARKS) -> None:
        self.keep = keep
        self.samples: deque[Sample] = deque()
        self.marks: deque[Mark] = deque(maxlen=max_marks)
        self._totals: Totals | None = None

    @property
    def last_totals(self) -> Totals | None:
        """The cumulative totals of the newest sample."""
        return self._totals

    def record(self, at: float, totals: Totals) -> None:
        """Take the workers' summed totals seen at Unix time `at` (after the newest)."""
        if self.samples and at <= self.samples[-1].at:
            return
        judged: dict[_RouteKey, _Cohort] = {}
        if self._totals is not None:
            for key, cohort in totals.judged.items():
                earlier = self._totals.judged.get(key)
                d = cohort if earlier is None else cohort.since(earlier)
                if d.requests:
                    sparse = tuple((i, n) for i, n in enumerate(d.buckets) if n)
                    judged[key] = (d.requests, d.failures, sparse)
        folded: dict[str, dict[str, tuple[int, int]]] = {}
        for (route, upstream, cls), n in totals.requests.items():
            per_route = folded.setdefault(route, {})
            total, failed = per_route.get(upstream, (0, 0))
            per_route[upstream] = (total + n, failed + (n if cls == "5xx" else 0))
        requests: dict[str, Mapping[str, tuple[int, int]]] = dict(folded)
        latency = {upstream: tuple(counts) for upstream, (counts, _) in totals.durations.items()}
        if self.samples:  # what did not move is shared with the sample before (idle routes)
            last = self.samples[-1]
            for route, counts_now in requests.items():
                if last.requests.get(route) == counts_now:
                    requests[route] = last.requests[route]
            for upstream, buckets in latency.items():
                if last.latency.get(upstream) == buckets:
                    latency[upstream] = last.latency[upstream]
        sample = Sample(at, requests, latency, dict(totals.errors), dict(totals.fallbacks), judged)
        self._totals = totals
        self.samples.append(sample)
        # the oldest kept sample is where the oldest interval starts
        while len(self.samples) > 1 and self.samples[1].at <= at - self.keep:
            self.samples.popleft()

    def mark(self, at: float, kind: str, route: str | None, text: str) -> None:
        self.marks.append(Mark(at, kind, route, text))

    def window(self, seconds: float) -> Window:
        """The traffic from the sample `seconds` before the newest (or the oldest kept)
        to the newest."""
        samples = self.samples
        if len(samples) < 2:
            return Window()
        end = samples[-1]
        i = len(samples) - 1
        while i > 0 and samples[i - 1].at >= end.at - seconds - 1e-6:
            i -= 1
        if i == len(samples) - 1:
            i -= 1  # at least one interval
        start = samples[i]
        out = Window(seconds=end.at - start.at, samples=len(samples) - 1 - i, end=end.at)
        for route, now in end.requests.items():
            before = start.requests.get(route, {})
            per_route = {}
            for upstream, (n, failed) in now.items():
                was_n, was_failed = before.get(upstream, (0, 0))
                dn = max(n - was_n, 0)
                if dn:
                    per_route[upstream] = (dn, min(max(failed - was_failed, 0), dn))
            if per_route:
                out.requests[route] = per_route
        for upstream, counts in end.latency.items():
            was = start.latency.get(upstream)
            if was is None:
                d = list(counts)
            else:
                d = [max(a - b, 0) for a, b in zip(counts, was, strict=True)]
            if any(d):
                out.latency[upstream] = d
        out.errors = _difference(end.errors, start.errors)
        out.fallbacks = _difference(end.fallbacks, start.fallbacks)
        for sample in list(samples)[i + 1 :]:
            for key, (n, failed, buckets) in sample.judged.items():
                row = out.judged.get(key)
                if row is None:
                    row = out.judged[key] = new_row()
                row[0] += n
                row[1] += failed
                for b, count in buckets:
                    row[2 + b] += count
        return out

    def intervals(self, route: str, seconds: float) -> list[Interval]:
        """`route`'s traffic per interval over the last `seconds`, oldest first."""
        samples = list(self.samples)
        if len(samples) < 2:
            return []
        since = samples[-1].at - seconds
        out: list[Interval] = []
        for before, now in pairwise(samples):
            if now.at <= since:
                continue
            was = before.requests.get(route, {})
            counts = {}
            for upstream, (n, failed) in now.requests.get(route, {}).items():
                was_n, was_failed = was.get(upstream, (0, 0))
                dn = max(n - was_n, 0)
                counts[upstream] = (dn, min(max(failed - was_failed, 0), dn))
            out.append(Interval(now.at, now.at - before.at, counts))
        return out

    def marks_since(self, at: float, route: str | None = None) -> list[Mark]:
        """Marks from `at` on, for `route` (and those for every route)."""
        return [m for m in self.marks if m.at >= at and (m.route is None or m.route == route)]


def _difference(
    now: Mapping[tuple[str, str], int], before: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for key, n in now.items():
        d = n - before.get(key, 0)
        if d > 0:
            out[key] = d
    return out
