"""The worker process: garbage-collector tuning and the timing of its collections."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from router.demo import DemoUpstream
from router.metrics import WorkerMetrics
from router.worker import GcPauses

from conftest import Serve, poll, scrape

RULES = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
routes:
  - name: all
    to: v1
"""


def test_every_collection_is_timed_by_generation() -> None:
    metrics = WorkerMetrics()
    pauses = GcPauses(metrics)
    gc.callbacks.append(pauses)
    try:
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle: only the collector frees it
        del garbage
        gc.collect(0)
        gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    by_generation = {g: (sum(counts), total) for g, counts, total in metrics.snapshot()["gc"]}
    assert by_generation["0"][0] >= 1
    assert by_generation["2"][0] >= 1
    assert 0 < by_generation["2"][1] < 5


def test_tuning_freezes_what_start_up_made_and_raises_the_young_threshold() -> None:
    # In a process of its own: the tuning is process-wide.
    code = (
        "import gc, orjson; from router.worker import tune_gc; import router.proxy; "
        "tune_gc(); print(orjson.dumps([gc.get_freeze_count(), gc.get_threshold()]).decode())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    frozen, threshold = orjson.loads(out.stdout)
    assert frozen > 10_000  # modules, classes, the rules machinery: out of every collection
    assert threshold == [7_000, 10, 10]


@pytest.mark.parametrize("tuning", [(), ("--no-gc-tuning",)], ids=["tuned", "untuned"])
async def test_a_serving_workers_collections_are_in_its_metrics(
    tmp_path: Path, upstreams: dict[str, DemoUpstream], serve_router: Serve, tuning: tuple[str]
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(v1=upstreams["v1"].endpoint))
    router = await serve_router(rules, workers=1, args=tuning)
    async with httpx.AsyncClient(timeout=10.0) as client:

        async def collected() -> dict[tuple[str, ...], float] | None:
            # New connections, each leaving garbage the collector must find (asyncio's
            # transports and protocols refer to each other), until a collection runs.
            for _ in range(50):
                await client.get(f"{router.url}/x", headers={"Connection": "close"})
            m = await scrape(client, router)
            return m if m.get(("grayroute_gc_pause_seconds_count", "generation=0")) else None

        m = await poll(collected, timeout=30)
    assert m[("grayroute_gc_pause_seconds_sum", "generation=0")] > 0
