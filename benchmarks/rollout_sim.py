"""How good a judge is the rollout controller? Simulated rollouts, run through the real
gates and controller (router.rollout.gates.judge, router.rollout.controller.on_interval),
and beside them the same controller with an absolute-threshold judge (Flagger's default
checks), on the same simulated traffic.

    nice -n 19 .venv/bin/python -m benchmarks.rollout_sim [--runs 1000] [--seed 1]
                                                          [--quick] [--docs docs/rollout.md]

Each run is one rollout with the default block (steps 1, 5, 20, 50, 100; interval 30 s;
min_requests 200; failures 2; max_nodata 10; error_rate 1% / 99%; latency p99 x1.2 and
+50 ms; max_error_rate 50%), interval by interval until it has Succeeded, Failed or
Paused (or 60 intervals). Per interval and version the simulation draws:

    requests   rate x 30 s, the rate drawn once per run and version, log-uniform in
               50..1,000 req/s (the "too little traffic" canary: 1..5 req/s)
    failures   binomial(requests, error rate)
    latencies  a latency histogram in the router's own buckets (router.rollout.stats),
               multinomial over a lognormal: median 50 ms, sigma 0.6 (p99 about 200 ms)

Scenarios: equal versions (1% errors); a canary at 3x the stable error rate; a canary
1.5x slower at every quantile (so its p99 is 1.5x); a platform incident (both versions
at 10% errors, or at 60%, for 5 intervals from a random interval in the first 8); a
canary with too little traffic. Reported per scenario and judge: how many runs rolled
back (Failed), how many Succeeded or were Paused, and the median number of intervals
from the start to the rollback.

The absolute judge is Flagger's default analysis: request-success-rate below 99% fails,
request-duration p99 above 500 ms fails, and an interval without requests fails (Flagger
cannot tell "no data" from "bad"). It runs inside our controller (failures 2 per step),
which is kinder than Flagger itself (its threshold defaults to 1 failed check, counted
over the whole analysis).

Traffic per version is independent of the step (a simplification: the question is how
often each judge errs on the same numbers, not how traffic shifts). Same seed, same
table. This is not a load benchmark: it only uses CPU, for a minute or two.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from router.rollout.controller import FAILED, PAUSED, SUCCEEDED, Spec, on_interval, start
from router.rollout.gates import FAIL, PASS, GateResult, Judgement, judge
from router.rollout.stats import LATENCY_BOUNDS, Counts
from router.rules.model import Rollout

INTERVAL = 30.0
MAX_INTERVALS = 60
ROLLOUT = Rollout("canary", "stable", (1.0, 5.0, 20.0, 50.0, 100.0))
SPEC = Spec("sim", ROLLOUT, "sim", 100.0)

MEDIAN = 0.050  # seconds
SIGMA = 0.6

Judge = Callable[[Counts, Counts, Rollout], Judgement]


# -- drawing counts ------------------------------------------------------------------------


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A draw from Binomial(n, p): the geometric method when n*p is small, else
    Hörmann's transformed rejection with squeeze (BTRS, 1993)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    if n * p < 10.0:
        log_q = math.log1p(-p)
        x = y = 0
        while True:
            y += int(math.log(1.0 - rng.random()) / log_q) + 1
            if y > n:
                return x
            x += 1
    spq = math.sqrt(n * p * (1.0 - p))
    b = 1.15 + 2.53 * spq
    a = -0.0873 + 0.0248 * b + 0.01 * p
    c = n * p + 0.5
    v_r = 0.92 - 4.2 / b
    alpha = (2.83 + 5.1 / b) * spq
    log_odds = math.log(p / (1.0 - p))
    mode = math.floor((n + 1) * p)
    h = math.lgamma(mode + 1) + math.lgamma(n - mode + 1)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + c)
        if k < 0 or k > n:
            continue
        if us >= 0.07 and v <= v_r:
            return k
        v *= alpha / (a / (us * us) + b)
        if math.log(v) <= h - math.lgamma(k + 1) - math.lgamma(n - k + 1) + (k - mode) * log_odds:
            return k


def _lognormal_buckets(median: float, sigma: float) -> list[float]:
    """P(latency in bucket i) for a lognormal, in the router's buckets."""

    def cdf(x: float) -> float:
        return 0.5 * math.erfc(-(math.log(x) - math.log(median)) / (sigma * math.sqrt(2.0)))

    probs, below = [], 0.0
    for bound in LATENCY_BOUNDS:
        at = cdf(bound)
        probs.append(at - below)
        below = at
    probs.append(1.0 - below)
    return probs


_SHAPES: dict[float, list[float]] = {}


def histogram(rng: random.Random, n: int, slowdown: float) -> tuple[int, ...]:
    """n latencies from the lognormal, slowed by `slowdown`, as per-bucket counts
    (conditional binomials: an exact multinomial draw)."""
    probs = _SHAPES.get(slowdown)
    if probs is None:
        probs = _SHAPES[slowdown] = _lognormal_buckets(MEDIAN * slowdown, SIGMA)
    counts = [0] * len(probs)
    left, mass = n, 1.0
    for i, p in enumerate(probs):
        if left == 0:
            break
        if p <= 0.0:
            continue
        x = left if p >= mass else binomial(rng, left, p / mass)
        counts[i] = x
        left -= x
        mass -= p
    return tuple(counts)


def draw(rng: random.Random, rate: float, error_rate: float, slowdown: float) -> Counts:
    n = round(rate * INTERVAL)
    return Counts(n, binomial(rng, n, error_rate), histogram(rng, n, slowdown))


# -- scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    error_rate: float = 0.01
    slowdown: float = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    canary: Version = Version()
    stable: Version = Version()
    canary_rates: tuple[float, float] = (50.0, 1000.0)
    incident: float | None = None  # both versions' error rate during the incident
    bad: bool = False  # a rollback is the right answer


SCENARIOS = (
    Scenario("equal versions, 1% errors"),
    Scenario("canary at 3x the error rate (3% vs 1%)", canary=Version(0.03), bad=True),
    Scenario("canary 1.5x slower (p99 ~300 vs ~200 ms)", canary=Version(slowdown=1.5), bad=True),
    Scenario("platform incident: both at 10% errors for 5 intervals", incident=0.10),
    Scenario("platform incident: both at 60% errors for 5 intervals", incident=0.60),
    Scenario("canary with too little traffic (1-5 req/s)", canary_rates=(1.0, 5.0)),
)


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def run_one(scenario: Scenario, judge_fn: Judge, seed: int) -> tuple[str, int]:
    """One rollout: (its phase at the end, the intervals it took)."""
    rng = random.Random(seed)
    canary_rate = _log_uniform(rng, *scenario.canary_rates)
    stable_rate = _log_uniform(rng, 50.0, 1000.0)
    incident_at = rng.randrange(8)
    state = start(SPEC, "0")
    for i in range(MAX_INTERVALS):
        c_err, s_err = scenario.canary.error_rate, scenario.stable.error_rate
        if scenario.incident is not None and incident_at <= i < incident_at + 5:
            c_err = s_err = scenario.incident
        canary = draw(rng, canary_rate, c_err, scenario.canary.slowdown)
        stable = draw(rng, stable_rate, s_err, scenario.stable.slowdown)
        state = on_interval(SPEC, state, canary, stable, str(i + 1), judge=judge_fn).state
        if state.phase in (SUCCEEDED, FAILED, PAUSED):
            return state.phase, i + 1
    return state.phase, MAX_INTERVALS


def absolute_judge(canary: Counts, stable: Counts, rollout: Rollout) -> Judgement:
    """Flagger's default checks on the canary alone: success rate >= 99%, p99 <= 500 ms;
    no requests at all is a failed check."""
    n = canary.requests
    rate = canary.error_rate
    success = GateResult(
        "success_rate", FAIL if rate is None or rate > 0.01 else PASS, rate, None, 0.01, n, 0
    )
    p99 = canary.quantile(0.99)
    duration = GateResult(
        "duration", FAIL if p99 is None or p99 > 0.5 else PASS, p99, None, 0.5, n, 0
    )
    failed = FAIL in (success.verdict, duration.verdict)
    return Judgement(FAIL if failed else PASS, (success, duration))


JUDGES: dict[str, Judge] = {"grayroute": judge, "absolute (Flagger default)": absolute_judge}


@dataclass
class Row:
    scenario: Scenario
    judge: str
    runs: int
    failed: int
    succeeded: int
    paused: int
    detect: list[int]

    @property
    def rolled_back(self) -> float:
        return self.failed / self.runs


def simulate(runs: int, seed: int, progress: bool = False) -> list[Row]:
    rows = []
    for k, scenario in enumerate(SCENARIOS):
        for name, judge_fn in JUDGES.items():
            outcomes = [
                run_one(scenario, judge_fn, seed * 1_000_003 + k * 10_007 + r) for r in range(runs)
            ]
            rows.append(
                Row(
                    scenario,
                    name,
                    runs,
                    sum(1 for p, _ in outcomes if p == FAILED),
                    sum(1 for p, _ in outcomes if p == SUCCEEDED),
                    sum(1 for p, _ in outcomes if p == PAUSED),
                    [n for p, n in outcomes if p == FAILED],
                )
            )
            if progress:
                print(f"  {scenario.name} / {name}: done", file=sys.stderr)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | judge | rolled back | succeeded | paused | median intervals to roll back |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        median = f"{statistics.median(row.detect):g}" if row.detect else "-"
        verdict = " (right)" if row.scenario.bad else " (wrong)" if row.failed else ""
        lines.append(
            f"| {row.scenario.name} | {row.judge} | {100 * row.rolled_back:.1f}%{verdict} | "
            f"{100 * row.succeeded / row.runs:.1f}% | {100 * row.paused / row.runs:.1f}% | "
            f"{median} |"
        )
    return "\n".join(lines)


_BLOCK = re.compile(r"(<!-- BEGIN rollout_sim -->\n).*?(<!-- END rollout_sim -->)", re.S)


def update_docs(path: Path, text: str, command: str) -> None:
    doc = path.read_text(encoding="utf-8")
    body = f"```sh\n{command}\n```\n\n{text}\n"
    if not _BLOCK.search(doc):
        raise SystemExit(
            f"{path}: no <!-- BEGIN rollout_sim --> ... <!-- END rollout_sim --> block"
        )
    path.write_text(_BLOCK.sub(lambda m: m.group(1) + body + m.group(2), doc), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout_sim")
    parser.add_argument("--runs", type=int, default=1000, help="rollouts per scenario and judge")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="50 runs each (a smoke test)")
    parser.add_argument("--docs", type=Path, help="write the table into this file's block")
    args = parser.parse_args(argv)
    runs = 50 if args.quick else args.runs
    rows = simulate(runs, args.seed, progress=True)
    text = table(rows)
    print(text)
    if args.docs is not None:
        command = (
            f"nice -n 19 python -m benchmarks.rollout_sim --runs {runs} --seed {args.seed} "
            f"--docs {args.docs}"
        )
        update_docs(args.docs, text, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
