"""Metrics: cheap counters in each worker, summed in the supervisor, exposed to Prometheus.

Three parts, in the order data flows:

    WorkerMetrics        one per worker process; the proxy calls `request_done()`,
                         `upstream_error()` and `fell_back()` on the hot path (plain dict
                         and list updates, ~0.2 us). `snapshot()` returns the worker's
                         cumulative totals as a JSON-able dict; the worker sends one
                         every `metrics_interval` seconds and at exit (router.worker).
                         `split_done()` counts the split traffic of routes a rollout
                         judges (router.rollout.stats: requests, failures, latency).
                         router.tls calls `tls_handshake()` and
                         `tls_handshake_failed()` once per TLS connection, router.tunnel
                         `tunnel_opened()` and `tunnel_closed()` once per tunnel.
    MetricsAggregator    in the supervisor: the latest snapshot of every live worker plus
                         the summed last snapshots of workers that have exited, so that a
                         sum over all workers never goes down when a worker is replaced.
    SupervisorMetrics    the supervisor's own counters (reloads, restarts, live workers,
                         the rules in force: digest, load time, whether the last reload
                         took), the workers' endpoint health (router.health) and the one
                         prometheus-client Collector that renders everything in the
                         Prometheus text format.

Worker snapshots carry cumulative totals, never deltas: a snapshot that is lost or
skipped (a full pipe) costs nothing, because the next one supersedes it.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from router.health import HealthBoard
from router.rollout.stats import LATENCY_BOUNDS, Counts, counts_from_row, new_row

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("grayroute.metrics")

# Upper bounds (seconds) of the request-duration histogram buckets; +Inf is implicit.
# Sub-millisecond buckets because the router's own overhead is what operators compare.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_NBUCKETS = len(DURATION_BUCKETS) + 1  # the last one is +Inf

UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "bad_response")

_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def status_class(status: int) -> str:
    """200 -> "2xx"; anything outside 100-599 (e.g. 0: no response was sent) -> "other"."""
    return _STATUS_CLASSES.get(status // 100, "other") if status >= 0 else "other"


class _Histograms(dict[str, list[Any]]):
    """key (an upstream, a gc generation) -> [count in bucket 0, ..., count in +Inf
    bucket, sum of seconds], over DURATION_BUCKETS.

    Bucket counts are per bucket (not cumulative) so one request touches one slot;
    they are made cumulative only when rendered.
    """

    def __missing__(self, upstream: str) -> list[Any]:
        row: list[Any] = [0] * _NBUCKETS
        row.append(0.0)
        self[upstream] = row
        return row


class _JudgedRows(dict[tuple[str, str], list[int]]):
    """(route, upstream) -> router.rollout.stats row: [requests, failures, buckets...]."""

    def __missing__(self, key: tuple[str, str]) -> list[int]:
        row = self[key] = new_row()
        return row


class WorkerMetrics:
    """Per-worker counters, updated on the hot path. Not thread-safe (one loop per worker)."""

    __slots__ = (
        "_durations",
        "_errors",
        "_fallbacks",
        "_gc_pauses",
        "_handshake_failures",
        "_handshakes",
        "_judged",
        "_requests",
        "_tunnels_closed",
        "_tunnels_opened",
    )

    def __init__(self) -> None:
        self._requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self._durations = _Histograms()
        self._errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._fallbacks: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._handshakes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._handshake_failures: defaultdict[str, int] = defaultdict(int)
        self._tunnels_opened: defaultdict[str, int] = defaultdict(int)  # upstream
        self._tunnels_closed: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._judged = _JudgedRows()
        self._gc_pauses = _Histograms()  # generation ("0", "1", "2") -> pause durations

    # The two hot-path calls: no allocation but the key tuple, no formatting, no locks.
    # The status is kept as given; it becomes a status class in the supervisor.
    def request_done(
        self,
        route: str,
        upstream: str,
        status: int,
        seconds: float,
        _bisect: Callable[[tuple[float, ...], float], int] = bisect_left,
        _bounds: tuple[float, ...] = DURATION_BUCKETS,
    ) -> None:
        self._requests[(route, upstream, status)] += 1
        row = self._durations[upstream]
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus `le`).
        row[_bisect(_bounds, seconds)] += 1
        row[-1] += seconds

    def upstream_error(self, upstream: str, kind: str) -> None:
        self._errors[(upstream, kind)] += 1

    def fell_back(self, upstream: str, fallback: str) -> None:
        """A request for `upstream` went to `fallback`: no endpoint of it was up."""
        self._fallbacks[(upstream, fallback)] += 1

    def split_done(
        self,
        route: str,
        upstream: str,
        failed: bool,
        seconds: float,
        _bisect: Callable[[tuple[float, ...], float], int] = bisect_left,
        _bounds: tuple[float, ...] = LATENCY_BOUNDS,
    ) -> None:
        """A request the split of a judged route gave `upstream` (a rollout counts it)."""
        row = self._judged[(route, upstream)]
        row[0] += 1
        if failed:
            row[1] += 1
        row[2 + _bisect(_bounds, seconds)] += 1

    # Once per TLS connection (router.tls), not per request.
    def tls_handshake(self, certificate: str, version: str) -> None:
        self._handshakes[(certificate, version)] += 1

    def tls_handshake_failed(self, reason: str) -> None:
        self._handshake_failures[reason] += 1

    # Once per tunnel (router.tunnel), when it opens and when it closes.
    def tunnel_opened(self, upstream: str) -> None:
        self._tunnels_opened[upstream] += 1

    def tunnel_closed(self, upstream: str, reason: str) -> None:
        self._tunnels_closed[(upstream, reason)] += 1

    # Once per garbage collection (router.worker.GcPauses).
    def gc_pause(self, generation: str, seconds: float) -> None:
        row = self._gc_pauses[generation]
        row[bisect_left(DURATION_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def snapshot(self) -> dict[str, Any]:
        """The cumulative totals since this worker started, as plain JSON-able data."""
        data: dict[str, Any] = {
            "requests": [[r, u, s, n] for (r, u, s), n in self._requests.items()],
            "durations": [[u, row[:-1], row[-1]] for u, row in self._durations.items()],
            "errors": [[u, k, n] for (u, k), n in self._errors.items()],
            "fallbacks": [[u, f, n] for (u, f), n in self._fallbacks.items()],
        }
        if self._handshakes or self._handshake_failures:
            data["tls"] = [[c, v, n] for (c, v), n in self._handshakes.items()]
            data["tls_failures"] = [[r, n] for r, n in self._handshake_failures.items()]
        if self._tunnels_opened:
            closed: defaultdict[str, int] = defaultdict(int)
            for (upstream, _), n in self._tunnels_closed.items():
                closed[upstream] += n
            data["tunnels"] = [[u, n, n - closed[u]] for u, n in self._tunnels_opened.items()]
            data["tunnels_closed"] = [[u, r, n] for (u, r), n in self._tunnels_closed.items()]
        if self._gc_pauses:
            data["gc"] = [[g, row[:-1], row[-1]] for g, row in self._gc_pauses.items()]
        if self._judged:
            data["judged"] = [
                [r, u, counts_from_row(row).to_json()] for (r, u), row in self._judged.items()
            ]
        return data


class Totals:
    """Cumulative totals of one or more workers, with status codes folded into classes."""

    __slots__ = (
        "durations",
        "errors",
        "fallbacks",
        "gc_pauses",
        "handshake_failures",
        "handshakes",
        "judged",
        "requests",
        "tunnels_closed",
        "tunnels_open",
        "tunnels_opened",
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        # upstream -> (per-bucket counts, sum of seconds)
        self.durations: dict[str, tuple[list[int], float]] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.fallbacks: dict[tuple[str, str], int] = {}  # (upstream, fallback) -> requests
        self.handshakes: dict[tuple[str, str], int] = {}  # (certificate, TLS version)
        self.handshake_failures: dict[str, int] = {}  # reason
        self.tunnels_opened: dict[str, int] = {}  # upstream -> tunnels opened
        # upstream -> tunnels open now: a gauge, so a retired worker's is dropped
        self.tunnels_open: dict[str, int] = {}
        self.tunnels_closed: dict[tuple[str, str], int] = {}  # (upstream, reason)
        self.judged: dict[tuple[str, str], Counts] = {}  # (route, upstream): a rollout's
        # gc generation -> (per-bucket counts of its pauses, sum of seconds)
        self.gc_pauses: dict[str, tuple[list[int], float]] = {}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Totals:
        """Parse a `WorkerMetrics.snapshot()`; raises ValueError on a malformed one."""
        totals = cls()
        try:
            for route, upstream, status, n in data.get("requests", ()):
                key = (str(route), str(upstream), status_class(int(status)))
                totals.requests[key] = totals.requests.get(key, 0) + int(n)
            for upstream, buckets, total in data.get("durations", ()):
                _add_histogram(totals.durations, str(upstream), _bucket_counts(buckets), total)
            for generation, buckets, total in data.get("gc", ()):
                _add_histogram(totals.gc_pauses, str(generation), _bucket_counts(buckets), total)
            for upstream, kind, n in data.get("errors", ()):
                key2 = (str(upstream), str(kind))
                totals.errors[key2] = totals.errors.get(key2, 0) + int(n)
            for upstream, fallback, n in data.get("fallbacks", ()):
                key2 = (str(upstream), str(fallback))
                totals.fallbacks[key2] = totals.fallbacks.get(key2, 0) + int(n)
            for certificate, version, n in data.get("tls", ()):
                key3 = (str(certificate), str(version))
                totals.handshakes[key3] = totals.handshakes.get(key3, 0) + int(n)
            for reason, n in data.get("tls_failures", ()):
                failures = totals.handshake_failures
                failures[str(reason)] = failures.get(str(reason), 0) + int(n)
            for upstream, opened, still_open in data.get("tunnels", ()):
                name = str(upstream)
                totals.tunnels_opened[name] = totals.tunnels_opened.get(name, 0) + int(opened)
                totals.tunnels_open[name] = totals.tunnels_open.get(name, 0) + int(still_open)
            for upstream, reason, n in data.get("tunnels_closed", ()):
                key4 = (str(upstream), str(reason))
                totals.tunnels_closed[key4] = totals.tunnels_closed.get(key4, 0) + int(n)
            for route, upstream, counts_json in data.get("judged", ()):
                key4 = (str(route), str(upstream))
                totals.judged[key4] = totals.judged.get(key4, Counts()) + Counts.from_json(
                    counts_json
                )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed metrics snapshot: {exc}") from exc
        return totals

    def add(self, other: Totals) -> None:
        for key, n in other.requests.items():
            self.requests[key] = self.requests.get(key, 0) + n
        for upstream, (counts, total) in other.durations.items():
            _add_histogram(self.durations, upstream, counts, total)
        for generation, (counts, total) in other.gc_pauses.items():
            _add_histogram(self.gc_pauses, generation, counts, total)
        for key2, n in other.errors.items():
            self.errors[key2] = self.errors.get(key2, 0) + n
        for key2, n in other.fallbacks.items():
            self.fallbacks[key2] = self.fallbacks.get(key2, 0) + n
        for key3, n in other.handshakes.items():
            self.handshakes[key3] = self.handshakes.get(key3, 0) + n
        for reason, n in other.handshake_failures.items():
            self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + n
        for upstream, n in other.tunnels_opened.items():
            self.tunnels_opened[upstream] = self.tunnels_opened.get(upstream, 0) + n
        for upstream, n in other.tunnels_open.items():
            self.tunnels_open[upstream] = self.tunnels_open.get(upstream, 0) + n
        for key4, n in other.tunnels_closed.items():
            self.tunnels_closed[key4] = self.tunnels_closed.get(key4, 0) + n
        for key4, c in other.judged.items():
            self.judged[key4] = self.judged.get(key4, Counts()) + c


def _bucket_counts(buckets: Iterable[Any]) -> list[int]:
    counts = [int(c) for c in buckets]
    if len(counts) != _NBUCKETS:
        raise ValueError(f"{len(counts)} histogram buckets, expected {_NBUCKETS}")
    return counts


def _add_histogram(
    table: dict[str, tuple[list[int], float]], key: str, counts: list[int], total: float
) -> None:
    old = table.get(key)
    if old is None:
        table[key] = (list(counts), float(total))
    else:
        merged = [a + b for a, b in zip(old[0], counts, strict=True)]
        table[key] = (merged, old[1] + float(total))


class MetricsAggregator:
    """Sums worker totals: the latest snapshot of each live worker + those of dead ones.

    Workers are keyed by an id that is never reused (the supervisor uses the pid and a
    spawn counter). `retire()` moves a worker's last totals into `retired`, so a counter
    summed over workers never goes down when one dies and is replaced.
    """

    def __init__(self) -> None:
        self.live: dict[str, Totals] = {}
        self.retired = Totals()

    def update(self, worker: str, data: Mapping[str, Any]) -> None:
        """Replace `worker`'s totals with a new cumulative snapshot (ignored if malformed)."""
        try:
            self.live[worker] = Totals.from_snapshot(data)
        except ValueError as exc:
            log.warning("worker %s: %s; keeping its previous totals", worker, exc)

    def retire(self, worker: str) -> None:
        totals = self.live.pop(worker, None)
        if totals is not None:
            totals.tunnels_open.clear()  # a gauge: its tunnels went with it
            self.retired.add(totals)

    def total(self) -> Totals:
        out = Totals()
        out.add(self.retired)
        for totals in self.live.values():
            out.add(totals)
        return out

    def judged(self) -> dict[tuple[str, str], Counts]:
        """The split traffic rollouts judge, (route, upstream) -> counts, summed over
        every worker so far (router.rollout.stats.LocalCounts takes intervals of it)."""
        out = dict(self.retired.judged)
        for totals in self.live.values():
            for key, c in totals.judged.items():
                out[key] = out.get(key, Counts()) + c
        return out


class SupervisorMetrics:
    """The supervisor's view: worker totals plus its own counters, and the registry.

    The registry and its one Collector are created once, here; `render()` reads the
    current values at scrape time, so nothing is copied into prometheus-client objects
    between scrapes.
    """

    def __init__(self, workers_alive: Callable[[], int] | None = None) -> None:
        self.aggregator = MetricsAggregator()
        self.health = HealthBoard()
        self.reloads = {"success": 0, "failure": 0}
        self.worker_restarts = 0
        self.rules_digest = ""
        self.rules_source = ""
        self.rules_loaded_at = 0.0  # unix time the rules in force were loaded; 0 = none yet
        self.last_reload_ok = True  # False while the last reload attempt failed
        # More metric families, rendered after the workers' (the rollout controller's).
        self.collectors: list[Callable[[], Iterable[Any]]] = []
        # TLS certificates in force, (label, certificate file, expiry as Unix time); kept
        # by router.tls.CertificateWatch. Empty without TLS listeners.
        self.certificates: list[tuple[str, str, float]] = []
        self.certificate_reloads = {"success": 0, "failure": 0}
        # Where the rules in force came from: {"file": 1}, or {"etcd": 0, "cache": 1}.
        self.rules_source_kinds: Callable[[], Mapping[str, int]] = dict
        # (route, the earlier route that takes all its requests) in the rules in force
        self.shadowed_routes: tuple[tuple[str, str], ...] = ()
        self._workers_alive = workers_alive or (lambda: 0)
        # Endpoints from DNS (router.fleet.dns): lookups by (upstream, result), and the
        # addresses in use now per upstream, as the supervisor knows them.
        self.dns_lookups: dict[tuple[str, str], int] = {}
        self.upstream_endpoints: Callable[[], Mapping[str, int]] = dict
        self.registry = _build_registry(self)

    def set_workers_alive(self, fn: Callable[[], int]) -> None:
        self._workers_alive = fn

    def workers_alive(self) -> int:
        return self._workers_alive()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _build_registry(state: SupervisorMetrics) -> CollectorRegistry:
    # prometheus-client is imported here, not at module level: worker processes import
    # this module for WorkerMetrics only and should not pay for it at start.
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.registry import Collector, CollectorRegistry

    class GrayrouteCollector(Collector):
        def collect(self) -> Iterator[Any]:
            totals = state.aggregator.total()

            requests = CounterMetricFamily(
                "grayroute_requests",
                "Requests answered, by route, upstream and status class "
                "(route and upstream are empty when no route matched).",
                labels=("route", "upstream", "status_class"),
            )
            for (route, upstream, cls), n in sorted(totals.requests.items()):
                requests.add_metric((route, upstream, cls), n)
            yield requests

            durations = HistogramMetricFamily(
                "grayroute_request_duration_seconds",
                "Time from the first byte of a request to the last byte of its response.",
                labels=("upstream",),
            )
            for upstream, (counts, total) in sorted(totals.durations.items()):
                durations.add_metric((upstream,), _cumulative_buckets(counts), total)
            yield durations

            gc_pauses = HistogramMetricFamily(
                "grayroute_gc_pause_seconds",
                "How long the workers' garbage collections held their event loops, by "
                "generation (2: a full collection); every connection of a worker waits "
                "meanwhile.",
                labels=("generation",),
            )
            for generation, (counts, total) in sorted(totals.gc_pauses.items()):
                gc_pauses.add_metric((generation,), _cumulative_buckets(counts), total)
            yield gc_pauses

            errors = CounterMetricFamily(
                "grayroute_upstream_errors",
                "Failures talking to an upstream, by kind: connect, timeout, reset, bad_response.",
                labels=("upstream", "kind"),
            )
            for (upstream, kind), n in sorted(totals.errors.items()):
                errors.add_metric((upstream, kind), n)
            yield errors

            fallbacks = CounterMetricFamily(
                "grayroute_fallback_requests",
                "Requests for an upstream with no endpoint up that its fallback took instead "
                "(counted in grayroute_requests_total under the fallback).",
                labels=("upstream", "fallback"),
            )
            for (upstream, fallback), n in sorted(totals.fallbacks.items()):
                fallbacks.add_metric((upstream, fallback), n)
            yield fallbacks

            healthy = GaugeMetricFamily(
                "grayroute_upstream_healthy_endpoints",
                "Endpoints of an upstream that are up (one down in any worker counts as down).",
                labels=("upstream",),
            )
            for upstream, (up, _) in sorted(state.health.counts().items()):
                healthy.add_metric((upstream,), up)
            yield healthy

            workers = GaugeMetricFamily(
                "grayroute_workers", "Worker processes currently up and accepting."
            )
            workers.add_metric((), state.workers_alive())
            yield workers

            info = GaugeMetricFamily(
                "grayroute_rules_info",
                "The rules in force: always 1, labelled with their digest and source file.",
                labels=("digest", "source"),
            )
            if state.rules_digest:
                info.add_metric((state.rules_digest, state.rules_source), 1)
            yield info

            kinds = GaugeMetricFamily(
                "grayroute_rules_source",
                "Where the rules in force came from: 1 for file, etcd, or cache (the last "
                "good rules of an etcd key, kept in the state directory), 0 for the others.",
                labels=("source",),
            )
            for kind, value in sorted(state.rules_source_kinds().items()):
                kinds.add_metric((kind,), value)
            yield kinds

            if state.rules_loaded_at:
                loaded = GaugeMetricFamily(
                    "grayroute_rules_loaded_timestamp_seconds",
                    "When the rules in force were loaded (at start or by the last successful "
                    "reload), in seconds since the Unix epoch.",
                )
                loaded.add_metric((), state.rules_loaded_at)
                yield loaded

            reloads = CounterMetricFamily(
                "grayroute_rules_reloads",
                "Rule reloads (SIGHUP, a changed rule file, a rollback), by result: success "
                "or failure (the rules in force were kept).",
                labels=("result",),
            )
            for result in ("success", "failure"):
                reloads.add_metric((result,), state.reloads[result])
            yield reloads

            last_ok = GaugeMetricFamily(
                "grayroute_rules_last_reload_successful",
                "1 when the last reload took (or none was tried), 0 when it failed and the "
                "rule file on disk is not the rules in force.",
            )
            last_ok.add_metric((), 1 if state.last_reload_ok else 0)
            yield last_ok

            shadowed = GaugeMetricFamily(
                "grayroute_route_shadowed",
                "1 for each route of the rules in force that never gets a request, because "
                "an earlier route (shadowed_by) matches every request it matches.",
                labels=("route", "shadowed_by"),
            )
            for route, by in state.shadowed_routes:
                shadowed.add_metric((route, by), 1)
            yield shadowed

            restarts = CounterMetricFamily(
                "grayroute_worker_restarts",
                "Worker processes that exited unexpectedly and were replaced.",
            )
            restarts.add_metric((), state.worker_restarts)
            yield restarts

            if state.certificates:
                yield from _tls_metrics(state, totals)
            yield from _tunnel_metrics(totals)

            endpoints = GaugeMetricFamily(
                "grayroute_upstream_endpoints",
                "Endpoints (addresses) each upstream has in use now: its list, or what DNS "
                "gave last for `endpoints: {dns: ...}`; 0 for a name with no records.",
                labels=("upstream",),
            )
            for upstream, count in sorted(state.upstream_endpoints().items()):
                endpoints.add_metric((upstream,), count)
            yield endpoints

            lookups = CounterMetricFamily(
                "grayroute_dns_lookups",
                "DNS lookups of `endpoints: {dns: ...}` upstreams, by result: ok, nxdomain "
                "(no such name: 0 endpoints), or timeout, servfail, error (the endpoints "
                "found last are kept).",
                labels=("upstream", "result"),
            )
            for (upstream, result), n in sorted(state.dns_lookups.items()):
                lookups.add_metric((upstream, result), n)
            yield lookups

            for more in state.collectors:
                yield from more()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GrayrouteCollector())
    return registry


def _tls_metrics(state: SupervisorMetrics, totals: Totals) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    handshakes = CounterMetricFamily(
        "grayroute_tls_handshakes",
        "TLS handshakes completed, by the certificate chosen (its first name) and the TLS version.",
        labels=("certificate", "version"),
    )
    for (certificate, version), n in sorted(totals.handshakes.items()):
        handshakes.add_metric((certificate, version), n)
    yield handshakes

    failures = CounterMetricFamily(
        "grayroute_tls_handshake_failures",
        "TLS handshakes that failed, by reason: version, cipher, plain_http, "
        "certificate_rejected, malformed, incomplete, other.",
        labels=("reason",),
    )
    for reason, n in sorted(totals.handshake_failures.items()):
        failures.add_metric((reason,), n)
    yield failures

    expiry = GaugeMetricFamily(
        "grayroute_tls_certificate_expiry_timestamp_seconds",
        "When each certificate in force expires, in seconds since the Unix epoch.",
        labels=("certificate", "file"),
    )
    for label, path, not_after in state.certificates:
        expiry.add_metric((label, path), not_after)
    yield expiry

    reloads = CounterMetricFamily(
        "grayroute_tls_certificate_reloads",
        "Certificate reloads after their files changed (or SIGHUP), by result: success "
        "or failure (the certificates in force were kept).",
        labels=("result",),
    )
    for result in ("success", "failure"):
        reloads.add_metric((result,), state.certificate_reloads[result])
    yield reloads


def _tunnel_metrics(totals: Totals) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    opened = CounterMetricFamily(
        "grayroute_tunnels",
        "Tunnels opened (an upstream answered 101 to an Upgrade: WebSocket), by upstream.",
        labels=("upstream",),
    )
    for upstream, n in sorted(totals.tunnels_opened.items()):
        opened.add_metric((upstream,), n)
    yield opened

    still_open = GaugeMetricFamily(
        "grayroute_tunnels_open", "Tunnels open now, by upstream.", labels=("upstream",)
    )
    for upstream in sorted(totals.tunnels_opened):
        still_open.add_metric((upstream,), totals.tunnels_open.get(upstream, 0))
    yield still_open

    closed = CounterMetricFamily(
        "grayroute_tunnels_closed",
        "Tunnels closed, by upstream and reason: client_closed, upstream_closed, "
        "idle_timeout, drain.",
        labels=("upstream", "reason"),
    )
    for (upstream, reason), n in sorted(totals.tunnels_closed.items()):
        closed.add_metric((upstream, reason), n)
    yield closed


def _cumulative_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts over DURATION_BUCKETS as Prometheus' cumulative `le` buckets."""
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
        cumulative += count
        buckets.append((_float_label(bound), cumulative))
    return buckets


def _float_label(value: float) -> str:
    """Prometheus spelling of a bucket bound: 0.5 -> "0.5", 1.0 -> "1.0", inf -> "+Inf"."""
    return "+Inf" if value == float("inf") else repr(float(value))
