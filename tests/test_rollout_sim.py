"""benchmarks/rollout_sim.py in its quick form: the real gates and controller on simulated
traffic give the answers docs/rollout.md reports, and its sampler draws what it should."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import rollout_sim as sim  # noqa: E402
from router.rollout import controller, gates  # noqa: E402


def test_it_runs_the_real_gates_and_controller() -> None:
    assert sim.JUDGES["grayroute"] is gates.judge
    assert sim.on_interval is controller.on_interval


@pytest.mark.parametrize(("n", "p"), [(30, 0.01), (1500, 0.01), (20000, 0.3), (50, 0.9)])
def test_binomial_draws_have_the_right_mean_and_variance(n: int, p: float) -> None:
    rng = random.Random(3)
    draws = [sim.binomial(rng, n, p) for _ in range(4000)]
    assert statistics.fmean(draws) == pytest.approx(n * p, rel=0.05, abs=0.05)
    assert statistics.pvariance(draws) == pytest.approx(n * p * (1 - p), rel=0.12)
    assert all(0 <= d <= n for d in draws)


def test_histogram_draws_are_the_lognormal() -> None:
    counts = sim.draw(random.Random(4), 1000.0, 0.01, 1.0)
    assert sum(counts.buckets) == counts.requests == 30_000
    assert counts.quantile(0.5) == pytest.approx(sim.MEDIAN, rel=0.05)
    assert counts.quantile(0.99) == pytest.approx(0.2, rel=0.08)  # 50 ms x e^(2.33 x 0.6)


def test_quick_table() -> None:
    rows = {(r.scenario.name, r.judge): r for r in sim.simulate(runs=40, seed=1)}
    ours = {name: row for (name, judge), row in rows.items() if judge == "grayroute"}
    theirs = {name: row for (name, judge), row in rows.items() if judge != "grayroute"}
    for name, row in ours.items():
        if row.scenario.bad:
            assert row.failed == row.runs, name
            assert statistics.median(row.detect) <= 5, name
        else:
            assert row.failed == 0, name
    assert ours["canary with too little traffic (1-5 req/s)"].paused == 40
    # The absolute threshold rolls back equal versions, incidents and quiet canaries.
    assert theirs["equal versions, 1% errors"].failed > 10
    assert theirs["platform incident: both at 10% errors for 5 intervals"].failed > 30
    assert theirs["canary with too little traffic (1-5 req/s)"].failed > 10
    text = sim.table(list(rows.values()))
    assert text.count("\n") == len(rows) + 1 and "| grayroute |" in text


def test_docs_block_is_rewritten(tmp_path: Path) -> None:
    doc = tmp_path / "rollout.md"
    doc.write_text("intro\n<!-- BEGIN rollout_sim -->\nold\n<!-- END rollout_sim -->\nend\n")
    sim.update_docs(doc, "| table |", "python -m benchmarks.rollout_sim")
    assert doc.read_text() == (
        "intro\n<!-- BEGIN rollout_sim -->\n```sh\npython -m benchmarks.rollout_sim\n```\n\n"
        "| table |\n<!-- END rollout_sim -->\nend\n"
    )
