"""Metrics: the per-worker counters, their summing in the supervisor, and the exposition."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import (
    DURATION_BUCKETS,
    MetricsAggregator,
    SupervisorMetrics,
    Totals,
    WorkerMetrics,
    status_class,
)


def samples(state: SupervisorMetrics) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(state.render().decode()):
        for s in family.samples:
            out[(s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))] = s.value
    return out


def wire(worker: WorkerMetrics) -> dict[str, object]:
    """What the supervisor receives: the snapshot after a JSON round trip."""
    data: dict[str, object] = orjson.loads(orjson.dumps(worker.snapshot()))
    return data


@pytest.mark.parametrize(
    ("status", "cls"),
    [(100, "1xx"), (200, "2xx"), (204, "2xx"), (302, "3xx"), (404, "4xx"), (499, "4xx"),
     (502, "5xx"), (599, "5xx"), (0, "other"), (600, "other"), (-1, "other")],
)  # fmt: skip
def test_status_class(status: int, cls: str) -> None:
    assert status_class(status) == cls


def test_worker_counts_requests_errors_and_durations() -> None:
    m = WorkerMetrics()
    m.request_done("orders", "v1", 200, 0.003)
    m.request_done("orders", "v1", 201, 0.003)
    m.request_done("orders", "v1", 503, 0.2)
    m.request_done("", "", 404, 0.0001)
    m.upstream_error("v1", "connect")
    m.upstream_error("v1", "connect")
    m.upstream_error("v1", "timeout")
    snap = m.snapshot()
    assert sorted(map(tuple, snap["requests"])) == [
        ("", "", 404, 1),
        ("orders", "v1", 200, 1),
        ("orders", "v1", 201, 1),
        ("orders", "v1", 503, 1),
    ]
    assert sorted(map(tuple, snap["errors"])) == [("v1", "connect", 2), ("v1", "timeout", 1)]
    durations = {u: (counts, total) for u, counts, total in snap["durations"]}
    counts, total = durations["v1"]
    assert len(counts) == len(DURATION_BUCKETS) + 1
    assert sum(counts) == 3
    assert total == pytest.approx(0.206)
    assert counts[DURATION_BUCKETS.index(0.005)] == 2  # 0.003 lies in (0.0025, 0.005]
    assert counts[DURATION_BUCKETS.index(0.25)] == 1


def test_bucket_bounds_are_inclusive_and_inf_catches_the_rest() -> None:
    m = WorkerMetrics()
    m.request_done("r", "u", 200, 0.5)  # exactly a bound: counted in le="0.5"
    m.request_done("r", "u", 200, 1e9)  # beyond the last bound: +Inf only
    state = SupervisorMetrics()
    state.aggregator.update("w", wire(m))
    s = samples(state)
    b = "grayroute_request_duration_seconds_bucket"
    assert s[(b, "le=0.25", "upstream=u")] == 0
    assert s[(b, "le=0.5", "upstream=u")] == 1
    assert s[(b, "le=30.0", "upstream=u")] == 1
    assert s[(b, "le=+Inf", "upstream=u")] == 2
    assert s[("grayroute_request_duration_seconds_count", "upstream=u")] == 2


def test_totals_fold_statuses_into_classes() -> None:
    m = WorkerMetrics()
    for status in (200, 201, 204, 404, 502, 504):
        m.request_done("r", "u", status, 0.01)
    totals = Totals.from_snapshot(wire(m))
    assert totals.requests == {("r", "u", "2xx"): 3, ("r", "u", "4xx"): 1, ("r", "u", "5xx"): 2}


def test_sum_over_workers_and_dead_workers_are_kept() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    agg = MetricsAggregator()
    for _ in range(3):
        a.request_done("r", "u", 200, 0.01)
    for _ in range(5):
        b.request_done("r", "u", 200, 0.01)
    b.upstream_error("u", "reset")
    agg.update("a", wire(a))
    agg.update("b", wire(b))
    assert agg.total().requests == {("r", "u", "2xx"): 8}

    # A newer cumulative snapshot replaces the older one (no double counting).
    a.request_done("r", "u", 200, 0.01)
    agg.update("a", wire(a))
    assert agg.total().requests == {("r", "u", "2xx"): 9}

    # Worker b dies; its replacement starts from zero; the sum does not go down.
    agg.retire("b")
    replacement = WorkerMetrics()
    agg.update("b2", wire(replacement))
    total = agg.total()
    assert total.requests == {("r", "u", "2xx"): 9}
    assert total.errors == {("u", "reset"): 1}
    replacement.request_done("r", "u", 200, 0.01)
    agg.update("b2", wire(replacement))
    assert agg.total().requests == {("r", "u", "2xx"): 10}
    assert sum(agg.total().durations["u"][0]) == 10

    agg.retire("never-seen")  # a worker that died before its first report: nothing to do
    assert agg.total().requests == {("r", "u", "2xx"): 10}


def test_malformed_snapshot_keeps_previous_totals() -> None:
    agg = MetricsAggregator()
    m = WorkerMetrics()
    m.request_done("r", "u", 200, 0.01)
    agg.update("w", wire(m))
    agg.update("w", {"requests": [["r", "u", "two hundred", 1]]})
    agg.update("w", {"durations": [["u", [1, 2], 0.5]]})  # wrong number of buckets
    agg.update("w", {"errors": "nope"})
    assert agg.total().requests == {("r", "u", "2xx"): 1}


def test_fallbacks_are_summed_over_workers_and_kept_when_one_dies() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.fell_back("v1.1", "v1")
    b.fell_back("v1.1", "v1")
    b.fell_back("v2", "v1")
    state = SupervisorMetrics()
    state.aggregator.update("a", wire(a))
    state.aggregator.update("b", wire(b))
    state.aggregator.retire("b")
    s = samples(state)
    assert s[("grayroute_fallback_requests_total", "fallback=v1", "upstream=v1.1")] == 2
    assert s[("grayroute_fallback_requests_total", "fallback=v1", "upstream=v2")] == 1
    assert "# TYPE grayroute_fallback_requests_total counter\n" in state.render().decode()


def test_exposition_has_every_metric() -> None:
    state = SupervisorMetrics(workers_alive=lambda: 3)
    state.rules_digest = "ab" * 32
    state.rules_source = "rules/demo.yaml"
    state.reloads["success"] = 2
    state.reloads["failure"] = 1
    state.worker_restarts = 4
    state.rules_loaded_at = 1767607200.25
    state.last_reload_ok = False
    state.shadowed_routes = (("canary", "all"),)
    m = WorkerMetrics()
    m.request_done("orders", "orders-v1", 200, 0.002)
    m.request_done("", "", 404, 0.0001)
    m.upstream_error("orders-v1", "bad_response")
    state.aggregator.update("w1", wire(m))

    s = samples(state)
    assert s[("grayroute_requests_total", "route=orders", "status_class=2xx",
              "upstream=orders-v1")] == 1  # fmt: skip
    assert s[("grayroute_requests_total", "route=", "status_class=4xx", "upstream=")] == 1
    assert s[("grayroute_upstream_errors_total", "kind=bad_response", "upstream=orders-v1")] == 1
    assert s[("grayroute_request_duration_seconds_count", "upstream=orders-v1")] == 1
    assert s[("grayroute_workers",)] == 3
    assert s[("grayroute_rules_info", f"digest={'ab' * 32}", "source=rules/demo.yaml")] == 1
    assert s[("grayroute_rules_reloads_total", "result=success")] == 2
    assert s[("grayroute_rules_reloads_total", "result=failure")] == 1
    assert s[("grayroute_worker_restarts_total",)] == 4
    assert s[("grayroute_rules_loaded_timestamp_seconds",)] == 1767607200.25
    assert s[("grayroute_rules_last_reload_successful",)] == 0
    assert s[("grayroute_route_shadowed", "route=canary", "shadowed_by=all")] == 1

    text = state.render().decode()
    for name, kind in [
        ("grayroute_requests_total", "counter"),
        ("grayroute_request_duration_seconds", "histogram"),
        ("grayroute_upstream_errors_total", "counter"),
        ("grayroute_workers", "gauge"),
        ("grayroute_rules_info", "gauge"),
        ("grayroute_rules_reloads_total", "counter"),
        ("grayroute_worker_restarts_total", "counter"),
        ("grayroute_rules_loaded_timestamp_seconds", "gauge"),
        ("grayroute_rules_last_reload_successful", "gauge"),
        ("grayroute_route_shadowed", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text


def test_rules_gauges_before_any_rules_and_before_any_reload() -> None:
    s = samples(SupervisorMetrics())
    assert ("grayroute_rules_loaded_timestamp_seconds",) not in s  # no rules yet: no sample
    assert s[("grayroute_rules_last_reload_successful",)] == 1  # nothing has failed
    assert s[("grayroute_rules_reloads_total", "result=failure")] == 0
    assert not any(key[0] == "grayroute_route_shadowed" for key in s)  # none: no sample


def test_render_twice_uses_the_same_collectors() -> None:
    state = SupervisorMetrics()
    registry = state.registry
    first = state.render()
    state.worker_restarts += 1
    assert state.registry is registry
    assert first != state.render()
    assert b"grayroute_worker_restarts_total 1.0" in state.render()


def test_snapshot_is_json_and_stable_when_idle() -> None:
    m = WorkerMetrics()
    m.request_done("r", "u", 200, 0.01)
    assert orjson.dumps(m.snapshot()) == orjson.dumps(m.snapshot())


def test_tls_handshakes_are_summed_and_shown_only_with_tls() -> None:
    state = SupervisorMetrics()
    assert "grayroute_tls_" not in state.render().decode()  # no --listen-tls: no families
    a, b = WorkerMetrics(), WorkerMetrics()
    a.tls_handshake("api.example.com", "TLSv1.3")
    a.tls_handshake("api.example.com", "TLSv1.3")
    b.tls_handshake("api.example.com", "TLSv1.2")
    b.tls_handshake_failed("version")
    state.aggregator.update("a", wire(a))
    state.aggregator.update("b", wire(b))
    state.aggregator.retire("b")  # a dead worker's handshakes stay counted
    state.certificates = [("api.example.com", "/etc/tls/tls.crt", 1767607200.0)]
    state.certificate_reloads["failure"] = 1
    s = samples(state)
    assert s[("grayroute_tls_handshakes_total", "certificate=api.example.com",
              "version=TLSv1.3")] == 2  # fmt: skip
    assert s[("grayroute_tls_handshakes_total", "certificate=api.example.com",
              "version=TLSv1.2")] == 1  # fmt: skip
    assert s[("grayroute_tls_handshake_failures_total", "reason=version")] == 1
    assert s[("grayroute_tls_certificate_expiry_timestamp_seconds",
              "certificate=api.example.com", "file=/etc/tls/tls.crt")] == 1767607200.0  # fmt: skip
    assert s[("grayroute_tls_certificate_reloads_total", "result=failure")] == 1
    assert s[("grayroute_tls_certificate_reloads_total", "result=success")] == 0
    assert "tls" not in WorkerMetrics().snapshot()  # nothing extra on the pipe without TLS


def test_tunnels_open_is_a_gauge_that_leaves_with_its_worker() -> None:
    state = SupervisorMetrics()
    a, b = WorkerMetrics(), WorkerMetrics()
    for _ in range(3):
        a.tunnel_opened("chat-v2")
    a.tunnel_closed("chat-v2", "client_closed")
    b.tunnel_opened("chat-v2")
    b.tunnel_opened("chat-v1")
    state.aggregator.update("a", wire(a))
    state.aggregator.update("b", wire(b))
    s = samples(state)
    assert s[("grayroute_tunnels_total", "upstream=chat-v2")] == 4
    assert s[("grayroute_tunnels_open", "upstream=chat-v2")] == 3  # 2 in a, 1 in b
    assert s[("grayroute_tunnels_open", "upstream=chat-v1")] == 1
    assert s[("grayroute_tunnels_closed_total", "reason=client_closed", "upstream=chat-v2")] == 1
    state.aggregator.retire("b")  # killed with two tunnels open: they are gone
    s = samples(state)
    assert s[("grayroute_tunnels_total", "upstream=chat-v2")] == 4  # a counter stays
    assert s[("grayroute_tunnels_open", "upstream=chat-v2")] == 2
    assert s[("grayroute_tunnels_open", "upstream=chat-v1")] == 0
    assert "tunnels" not in WorkerMetrics().snapshot()


def test_judged_split_traffic_is_summed_exactly_over_workers() -> None:
    agg = MetricsAggregator()
    a, b = WorkerMetrics(), WorkerMetrics()
    a.split_done("orders", "v1.1", True, 0.120)
    a.split_done("orders", "v1.1", False, 0.002)
    b.split_done("orders", "v1.1", False, 0.121)
    b.split_done("orders", "v1", False, 0.002)
    agg.update("a", wire(a))
    agg.update("b", wire(b))
    judged = agg.judged()
    canary = judged[("orders", "v1.1")]
    assert (canary.requests, canary.failures, sum(canary.buckets)) == (3, 1, 3)
    assert 0.11 < (canary.quantile(0.99) or 0) < 0.13
    agg.retire("a")  # a worker that died: its counts stay
    assert agg.judged()[("orders", "v1.1")] == canary
    assert "judged" not in WorkerMetrics().snapshot()  # no rollout, nothing sent
    # Not a Prometheus metric: the rollout controller reads them.
    state = SupervisorMetrics()
    state.aggregator.update("a", wire(a))
    assert not [k for k in samples(state) if "judged" in k[0]]


def test_more_collectors_are_rendered() -> None:
    from prometheus_client.core import GaugeMetricFamily

    def extra() -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily("grayroute_extra", "Extra.", labels=("x",))
        family.add_metric(("1",), 7.0)
        return [family]

    state = SupervisorMetrics()
    state.collectors.append(extra)
    assert samples(state)[("grayroute_extra", "x=1")] == 7.0


def test_gc_pauses_are_a_histogram_per_generation_summed_over_workers() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.gc_pause("0", 0.0004)
    a.gc_pause("2", 0.03)
    b.gc_pause("2", 0.07)
    state = SupervisorMetrics()
    state.aggregator.update("a", wire(a))
    state.aggregator.update("b", wire(b))
    state.aggregator.retire("b")  # a dead worker's pauses still count
    s = samples(state)
    assert s[("grayroute_gc_pause_seconds_count", "generation=2")] == 2
    assert s[("grayroute_gc_pause_seconds_bucket", "generation=2", "le=0.025")] == 0
    assert s[("grayroute_gc_pause_seconds_bucket", "generation=2", "le=0.05")] == 1
    assert s[("grayroute_gc_pause_seconds_bucket", "generation=2", "le=0.1")] == 2
    assert s[("grayroute_gc_pause_seconds_sum", "generation=2")] == pytest.approx(0.1)
    assert s[("grayroute_gc_pause_seconds_bucket", "generation=0", "le=0.0005")] == 1
    assert ("grayroute_gc_pause_seconds_count", "generation=1") not in s
    assert "# TYPE grayroute_gc_pause_seconds histogram\n" in state.render().decode()
