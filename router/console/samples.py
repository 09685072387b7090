"""The console's memory of traffic: a bounded ring of per-interval samples and marks.

The supervisor already sums the workers' cumulative totals (router.metrics); the console
takes those totals every `SAMPLE_EVERY` seconds and keeps what changed since the last
look, for the last `KEEP_SECONDS`. Nothing new is counted on the hot path.

    Sample        one interval: per (route, upstream) requests and 5xx answers, per
                  upstream the request-duration histogram and the upstream errors by
                  kind, per (upstream, fallback) the requests the fallback took, and per
                  (route, upstream) the split traffic a rollout judges (its requests,
                  failures and fine latency histogram: router.rollout.stats)
    Mark          a moment the charts mark: the rules reloaded, or a route's weights
                  in force changed (a rollout step, replicas that came or went)
    Window        samples added up over the last N seconds: what the status shows
    SampleRing    the ring itself; `record(at, totals)` turns cumulative totals into
                  a Sample (a counter that goes back, e.g. a fleet router restarted,
                  counts as 0, never as negative traffic)

`quantile()` reads a latency quantile from the duration histogram (router.metrics'
buckets) as Prometheus' histogram_quantile does: interpolated inside the bucket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from router.metrics import DURATION_BUCKETS
from router.rollout.stats import new_row

if TYPE_CHECKING:
    from router.metrics import Totals

__all__ = [
    "KEEP_SECONDS",
    "SAMPLE_EVERY",
    "Mark",
    "Sample",
    "SampleRing",
    "Window",
    "quantile",
]

SAMPLE_EVERY = 2.0  # seconds between samples
KEEP_SECONDS = 15 * 60.0  # how far back the charts reach
MAX_MARKS = 500

_RouteKey = tuple[str, str]  # (route, upstream); route "" when no route matched
# A rollout cohort's counts over one interval, kept sparse: (requests, failures,
# ((bucket, count), ...)). An interval fills a few of the rollout histogram's 162
# buckets; a dense copy per version per sample would be ~1 KB every 2 seconds.
_Cohort = tuple[int, int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # Unix time at the end of the interval
    seconds: float  # the interval's length
    requests: Mapping[_RouteKey, tuple[int, int]]  # -> (requests, 5xx answers)
    latency: Mapping[str, tuple[int, ...]]  # upstream -> count per duration bucket
    errors: Mapping[tuple[str, str], int]  # (upstream, kind) -> upstream errors
    fallbacks: Mapping[tuple[str, str], int]  # (upstream, fallback) -> requests
    judged: Mapping[_RouteKey, _Cohort] = field(default_factory=dict)  # a rollout's cohorts


@dataclass(frozen=True, slots=True)
class Mark:
    at: float  # Unix time
    kind: str  # "reload" | "weights"
    route: str | None  # None: every route (a reload)
    text: str


@dataclass(slots=True)
class Window:
    """Samples added up: what happened over `seconds` (ending at `end`)."""

    seconds: float = 0.0
    samples: int = 0
    end: float = 0.0
    requests: dict[_RouteKey, list[int]] = field(default_factory=dict)
    latency: dict[str, list[int]] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str], int] = field(default_factory=dict)
    # (route, upstream) -> router.rollout.stats row: [requests, failures, buckets...]
    judged: dict[_RouteKey, list[int]] = field(default_factory=dict)

    def add(self, sample: Sample) -> None:
        self.seconds += sample.seconds
        self.samples += 1
        self.end = max(self.end, sample.at)
        for key, (n, failed) in sample.requests.items():
            row = self.requests.get(key)
            if row is None:
                self.requests[key] = [n, failed]
            else:
                row[0] += n
                row[1] += failed
        for upstream, counts in sample.latency.items():
            have = self.latency.get(upstream)
            if have is None:
                self.latency[upstream] = list(counts)
            else:
                for i, c in enumerate(counts):
                    have[i] += c
        for key2, n in sample.errors.items():
            self.errors[key2] = self.errors.get(key2, 0) + n
        for key2, n in sample.fallbacks.items():
            self.fallbacks[key2] = self.fallbacks.get(key2, 0) + n
        for key, (requests, failures, buckets) in sample.judged.items():
            row = self.judged.get(key)
            if row is None:
                row = self.judged[key] = new_row()
            row[0] += requests
            row[1] += failures
            for i, count in buckets:
                row[2 + i] += count


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
    """The last `keep` seconds of samples, and the marks of that time."""

    def __init__(self, keep: float = KEEP_SECONDS, max_marks: int = MAX_MARKS) -> None:
        self.keep = keep
        self.samples: deque[Sample] = deque()
        self.marks: deque[Mark] = deque(maxlen=max_marks)
        self._last: Totals | None = None
        self._last_at = 0.0

    def record(self, at: float, totals: Totals) -> Sample | None:
        """Take cumulative `totals` seen at Unix time `at`; the sample of the interval
        since the previous call (None on the first call: it only sets the baseline)."""
        last, last_at = self._last, self._last_at
        self._last, self._last_at = totals, at
        if last is None or at <= last_at:
            return None
        sample = _difference(totals, last, at, at - last_at)
        self.samples.append(sample)
        horizon = at - self.keep
        while self.samples and self.samples[0].at <= horizon:
            self.samples.popleft()
        return sample

    @property
    def last_totals(self) -> Totals | None:
        """The cumulative totals of the newest sample."""
        return self._last

    def mark(self, at: float, kind: str, route: str | None, text: str) -> None:
        self.marks.append(Mark(at, kind, route, text))

    def window(self, seconds: float) -> Window:
        """The newest samples that end within `seconds` of the newest one."""
        out = Window()
        if not self.samples:
            return out
        since = self.samples[-1].at - seconds
        for sample in reversed(self.samples):
            if sample.at - sample.seconds < since - 1e-6:
                break
            out.add(sample)
        return out

    def since(self, seconds: float) -> list[Sample]:
        """The samples of the last `seconds` (before the newest one's end), oldest first."""
        if not self.samples:
            return []
        since = self.samples[-1].at - seconds
        return [s for s in self.samples if s.at > since]

    def marks_since(self, at: float, route: str | None = None) -> list[Mark]:
        """Marks from `at` on, for `route` (and those for every route)."""
        return [m for m in self.marks if m.at >= at and (m.route is None or m.route == route)]


def _difference(now: Totals, before: Totals, at: float, seconds: float) -> Sample:
    requests: dict[_RouteKey, tuple[int, int]] = {}
    old = _by_route(before.requests.items())
    for key, (n, failed) in _by_route(now.requests.items()).items():
        was_n, was_failed = old.get(key, (0, 0))
        dn, df = max(n - was_n, 0), max(failed - was_failed, 0)
        if dn or df:
            requests[key] = (dn, min(df, dn) if dn else 0)
    latency: dict[str, tuple[int, ...]] = {}
    for upstream, (counts, _) in now.durations.items():
        previous = before.durations.get(upstream)
        if previous is None:
            delta = tuple(counts)
        else:
            delta = tuple(max(a - b, 0) for a, b in zip(counts, previous[0], strict=True))
        if any(delta):
            latency[upstream] = delta
    judged: dict[_RouteKey, _Cohort] = {}
    for key, cohort in now.judged.items():
        earlier = before.judged.get(key)
        d = cohort if earlier is None else cohort.since(earlier)
        if d.requests:
            sparse = tuple((i, n) for i, n in enumerate(d.buckets) if n)
            judged[key] = (d.requests, d.failures, sparse)
    return Sample(
        at,
        seconds,
        requests,
        latency,
        _counter_delta(now.errors, before.errors),
        _counter_delta(now.fallbacks, before.fallbacks),
        judged,
    )


def _by_route(
    items: Iterable[tuple[tuple[str, str, str], int]],
) -> dict[_RouteKey, tuple[int, int]]:
    """(route, upstream, status class) -> n, folded into (route, upstream) -> (n, 5xx)."""
    out: dict[_RouteKey, tuple[int, int]] = {}
    for (route, upstream, cls), n in items:
        total, failed = out.get((route, upstream), (0, 0))
        out[(route, upstream)] = (total + n, failed + (n if cls == "5xx" else 0))
    return out


def _counter_delta(
    now: Mapping[tuple[str, str], int], before: Mapping[tuple[str, str], int]
) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for key, n in now.items():
        d = n - before.get(key, 0)
        if d > 0:
            out[key] = d
    return out
