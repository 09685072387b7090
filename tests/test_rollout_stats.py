"""Per-version counts: the fixed latency buckets, quantiles, sums and interval deltas."""

from __future__ import annotations

import random
from bisect import bisect_left
from itertools import pairwise
from typing import Any

import httpx
import pytest

from router.rollout.stats import (
    LATENCY_BOUNDS,
    NBUCKETS,
    Counts,
    LocalCounts,
    counts_from_row,
    new_row,
)


def counts_of(latencies: list[float], failures: int = 0) -> Counts:
    buckets = [0] * NBUCKETS
    for seconds in latencies:
        buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1
    return Counts(len(latencies), failures, tuple(buckets))


def test_buckets_are_eight_per_doubling_from_a_tenth_of_a_millisecond() -> None:
    assert LATENCY_BOUNDS[0] == pytest.approx(0.0001)
    assert LATENCY_BOUNDS[8] == pytest.approx(0.0002)
    assert LATENCY_BOUNDS[-1] > 100.0
    assert all(b / a == pytest.approx(2 ** (1 / 8)) for a, b in pairwise(LATENCY_BOUNDS))
    assert len(LATENCY_BOUNDS) + 1 == NBUCKETS


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_quantile_is_within_five_percent_of_the_exact_one(q: float) -> None:
    rng = random.Random(7)
    latencies = sorted(rng.lognormvariate(-3.0, 0.8) for _ in range(20_000))
    exact = latencies[int(q * len(latencies))]
    assert counts_of(latencies).quantile(q) == pytest.approx(exact, rel=0.05)


def test_quantile_edges() -> None:
    assert Counts().quantile(0.99) is None
    assert Counts(3, 0, (0,) * NBUCKETS).quantile(0.5) is None  # requests but no timings
    assert counts_of([1000.0]).quantile(0.99) == LATENCY_BOUNDS[-1]
    one = counts_of([0.120])
    assert LATENCY_BOUNDS[bisect_left(LATENCY_BOUNDS, 0.120) - 1] <= one.quantile(0.99) <= 0.13


def test_slower_than_counts_the_buckets_above_and_a_share_of_the_one_it_falls_in() -> None:
    c = counts_of([0.010] * 5 + [0.100] * 3 + [1.0] * 2)
    assert c.slower_than(0.050) == 5
    assert c.slower_than(0.0) == 10
    assert c.slower_than(2.0) == 0
    # 0.1 s falls in a bucket (0.0955, 0.1041]: about half of it lies above 0.099.
    i = bisect_left(LATENCY_BOUNDS, 0.100)
    low, high = LATENCY_BOUNDS[i - 1], LATENCY_BOUNDS[i]
    assert c.slower_than(0.099) == pytest.approx(2 + 3 * (high - 0.099) / (high - low))


def test_add_and_since_are_exact_and_never_negative() -> None:
    a = counts_of([0.01, 0.02, 0.5], failures=1)
    b = counts_of([0.02, 3.0], failures=2)
    total = a + b
    assert (total.requests, total.failures) == (5, 3)
    assert sum(total.buckets) == 5
    assert total.since(a) == b
    assert a.since(total) == Counts(0, 0, (0,) * NBUCKETS)
    assert Counts() + a == a and a + Counts() == a
    assert a.since(Counts()) == a
    assert a.error_rate == pytest.approx(1 / 3) and Counts().error_rate is None


def test_json_round_trip_is_sparse() -> None:
    c = counts_of([0.01, 0.01, 0.2], failures=1)
    data = c.to_json()
    assert data["requests"] == 3 and data["failures"] == 1
    assert len(data["buckets"]) == 2
    assert Counts.from_json(data) == c
    assert Counts.from_json({"requests": 4, "failures": 0}) == Counts(4, 0)
    for bad in (
        {"requests": 1},
        {"requests": 1, "failures": 0, "buckets": [[NBUCKETS, 1]]},
        {"requests": "x", "failures": 0},
        {"requests": 1, "failures": 0, "buckets": [[0, -1]]},
    ):
        with pytest.raises(ValueError):
            Counts.from_json(bad)


def test_worker_rows() -> None:
    row = new_row()
    assert len(row) == 2 + NBUCKETS
    row[0] += 2
    row[1] += 1
    row[2 + 5] += 2
    c = counts_from_row(row)
    assert (c.requests, c.failures, c.buckets[5], sum(c.buckets)) == (2, 1, 2, 2)


def test_local_counts_hand_out_each_interval_once() -> None:
    cumulative: dict[tuple[str, str], Counts] = {}
    source = LocalCounts(lambda: cumulative)
    assert source.take("orders") == {}
    cumulative[("orders", "v1")] = counts_of([0.01] * 10, failures=1)
    cumulative[("orders", "v2")] = counts_of([0.01] * 4)
    cumulative[("other", "v1")] = counts_of([0.01] * 99)
    first = source.take("orders")
    assert {u: c.requests for u, c in first.items()} == {"v1": 10, "v2": 4}
    cumulative[("orders", "v1")] = counts_of([0.01] * 15, failures=3)
    second = source.take("orders")
    assert (second["v1"].requests, second["v1"].failures) == (5, 2)
    assert second["v2"].requests == 0
    assert source.take("other")["v1"].requests == 99


# -- what the proxy counts for a rollout --------------------------------------------------

JUDGED = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"], fallback: v1}}
  pinned: {{endpoints: ["{v1}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    match: {{path_prefix: /orders}}
    pins:
      - {{to: pinned, users: ["10086"]}}
    split: {{v1: 50, v1.1: 50}}
    rollout: {{canary: v1.1, stable: v1, steps: [50]}}
  - name: other
    match: {{path_prefix: /other}}
    split: {{v1: 50, v1.1: 50}}
"""


async def test_the_proxy_counts_split_traffic_only_and_5xx_as_failures(
    backends: Any, proxy: Any
) -> None:
    v1, v11 = await backends("v1", "v1.1")
    v11.fail_ratio = 0.5
    rp = await proxy(JUDGED.format(v1=v1.endpoint, v11=v11.endpoint))
    async with httpx.AsyncClient(base_url=rp.url) as client:
        for user in range(200):
            await client.get("/orders", headers={"X-User-Id": str(user)})
            await client.get("/other", headers={"X-User-Id": str(user)})  # no rollout
        for _ in range(20):
            await client.get("/orders", headers={"X-User-Id": "10086"})  # pinned
    judged = rp.metrics.judged
    assert set(judged) <= {("orders", u, f) for u in ("v1", "v1.1") for f in (True, False)}
    assert sum(judged.values()) == 200
    assert judged[("orders", "v1", True)] == 0
    canary = judged[("orders", "v1.1", True)] + judged[("orders", "v1.1", False)]
    assert judged[("orders", "v1.1", True)] == pytest.approx(canary / 2, abs=1)


async def test_a_request_the_canary_could_not_take_is_its_failure(
    backends: Any, proxy: Any
) -> None:
    (v1,) = await backends("v1")
    # The canary's endpoint refuses connections: its requests fall back to v1 and
    # succeed for the users, but the canary failed them.
    closed = "127.0.0.1:9"
    rp = await proxy(JUDGED.format(v1=v1.endpoint, v11=closed), connect_timeout=1.0)
    async with httpx.AsyncClient(base_url=rp.url) as client:
        answers = [
            (await client.get("/orders", headers={"X-User-Id": str(user)})).status_code
            for user in range(60)
        ]
    assert set(answers) == {200}
    judged = rp.metrics.judged
    assert judged[("orders", "v1.1", True)] > 10 and judged[("orders", "v1.1", False)] == 0
    assert judged[("orders", "v1", True)] == 0
