"""The console's ring of samples: cumulative worker totals in, traffic per window out."""

from __future__ import annotations

import pytest

from router.console.samples import SampleRing, quantile
from router.metrics import DURATION_BUCKETS, MetricsAggregator, Totals, WorkerMetrics


def totals(*workers: WorkerMetrics) -> Totals:
    agg = MetricsAggregator()
    for i, w in enumerate(workers):
        agg.update(str(i), w.snapshot())
    return agg.total()


def test_the_first_sample_is_where_traffic_is_counted_from() -> None:
    ring = SampleRing(keep=60.0)
    w = WorkerMetrics()
    for _ in range(5):
        w.request_done("orders", "v1", 200, 0.003)
    ring.record(100.0, totals(w))
    assert ring.window(60.0).samples == 0  # what came before the console started
    for _ in range(3):
        w.request_done("orders", "v1", 200, 0.003)
    w.request_done("orders", "v1", 503, 0.2)
    w.request_done("orders", "v1.1", 502, 0.004)
    w.request_done("", "", 404, 0.0001)
    w.fell_back("v1.1", "v1")
    w.upstream_error("v1.1", "connect")
    ring.record(102.0, totals(w))
    window = ring.window(60.0)
    assert (window.seconds, window.samples, window.end) == (2.0, 1, 102.0)
    assert window.requests == {"orders": {"v1": (4, 1), "v1.1": (1, 1)}, "": {"": (1, 0)}}
    assert sum(window.latency["v1"]) == 4  # the 5 before the first sample are not in it
    assert window.fallbacks == {("v1.1", "v1"): 1}
    assert window.errors == {("v1.1", "connect"): 1}
    # a quiet interval: nothing in it, and the window still reaches back
    ring.record(104.0, totals(w))
    assert ring.window(1.0).requests == {} and ring.window(1.0).latency == {}
    assert ring.window(60.0).requests["orders"]["v1"] == (4, 1)
    assert ring.record(103.0, totals(w)) is None and len(ring.samples) == 3  # not after


def test_totals_that_go_back_count_as_no_traffic() -> None:
    ring = SampleRing()
    a, b = WorkerMetrics(), WorkerMetrics()
    for _ in range(10):
        a.request_done("r", "v1", 200, 0.001)
    ring.record(0.0, totals(a))
    b.request_done("r", "v1", 200, 0.001)
    ring.record(1.0, totals(b))  # 1 < 10: never -9 requests
    window = ring.window(60.0)
    assert window.requests == {} and "v1" not in window.latency


def test_windows_intervals_and_the_ring_forgetting_old_samples() -> None:
    ring = SampleRing(keep=10.0)
    w = WorkerMetrics()
    ring.record(0.0, totals(w))
    for t in range(1, 21):  # 20 one-second intervals with t requests each
        for _ in range(t):
            w.request_done("r", "v1", 500 if t % 2 else 200, 0.01)
        ring.record(float(t), totals(w))
    # the last 10 seconds are kept, measured from the sample before them
    assert [s.at for s in ring.samples] == [float(t) for t in range(10, 21)]
    last3 = ring.window(3.0)
    assert (last3.samples, last3.seconds) == (3, 3.0)
    assert last3.requests == {"r": {"v1": (18 + 19 + 20, 19)}}  # 19 is the odd one: 5xx
    assert sum(last3.latency["v1"]) == 57
    everything = ring.window(3600.0)
    assert everything.samples == 10 and everything.requests["r"]["v1"][0] == sum(range(11, 21))
    intervals = ring.intervals("r", 2.5)
    assert [(i.at, i.seconds) for i in intervals] == [(18.0, 1.0), (19.0, 1.0), (20.0, 1.0)]
    assert [i.requests["v1"] for i in intervals] == [(18, 0), (19, 19), (20, 0)]
    assert ring.intervals("other", 60.0)[0].requests == {}
    assert SampleRing().window(60.0).samples == 0 and SampleRing().intervals("r", 9) == []


def test_an_idle_route_shares_its_counts_with_the_sample_before() -> None:
    ring = SampleRing()
    w = WorkerMetrics()
    w.request_done("idle", "v1", 200, 0.001)
    w.request_done("busy", "v2", 200, 0.001)
    ring.record(0.0, totals(w))
    w.request_done("busy", "v2", 200, 0.001)
    ring.record(1.0, totals(w))
    first, second = ring.samples
    assert second.requests["idle"] is first.requests["idle"]
    assert second.requests["busy"] is not first.requests["busy"]


def test_marks_are_bounded_and_filtered_by_route() -> None:
    ring = SampleRing(max_marks=3)
    ring.mark(1.0, "weights", "a", "a 1")
    ring.mark(2.0, "reload", None, "reload")
    ring.mark(3.0, "weights", "b", "b 1")
    ring.mark(4.0, "weights", "a", "a 2")
    assert [m.text for m in ring.marks] == ["reload", "b 1", "a 2"]
    assert [m.text for m in ring.marks_since(0.0, "a")] == ["reload", "a 2"]
    assert [m.text for m in ring.marks_since(2.5, "b")] == ["b 1"]


def test_quantile_interpolates_inside_the_bucket() -> None:
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    i10 = DURATION_BUCKETS.index(0.01)
    counts[i10] = 100  # 100 requests between 5 ms and 10 ms
    assert quantile(counts, 0.5) == pytest.approx(0.0075)
    assert quantile(counts, 0.99) == pytest.approx(0.005 + 0.005 * 0.99)
    counts[-1] = 100  # and 100 above the last bound: reported as that bound
    assert quantile(counts, 0.99) == DURATION_BUCKETS[-1]
    assert quantile(counts, 0.25) == pytest.approx(0.0075)
    assert quantile([0] * len(counts), 0.5) is None
    first = [4] + [0] * len(DURATION_BUCKETS)
    assert quantile(first, 0.5) == pytest.approx(DURATION_BUCKETS[0] / 2)


def test_a_rollouts_cohorts_are_kept_sparse_and_added_up_dense() -> None:
    ring = SampleRing()
    w = WorkerMetrics()
    w.split_done("r", "canary", True, 0.05)
    ring.record(0.0, totals(w))
    for failed, seconds in ((False, 0.01), (True, 0.01), (False, 0.2)):
        w.split_done("r", "canary", failed, seconds)
    w.split_done("r", "stable", False, 0.01)
    ring.record(2.0, totals(w))
    requests, failures, buckets = ring.samples[-1].judged[("r", "canary")]
    assert (requests, failures) == (3, 1)
    assert len(buckets) == 2 and sum(n for _, n in buckets) == 3  # two buckets, not 162
    w.split_done("r", "canary", False, 0.2)
    ring.record(4.0, totals(w))
    row = ring.window(60.0).judged[("r", "canary")]
    assert row[:2] == [4, 1] and sum(row[2:]) == 4
    assert ring.window(60.0).judged[("r", "stable")][:2] == [1, 0]
    assert ring.window(1.0).judged[("r", "canary")][:2] == [1, 0]  # the last interval
