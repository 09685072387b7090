"""A soak at a fixed rate: Grayroute's tail latency (p99, p99.9, stalls) over minutes.

    .venv/bin/python -m benchmarks.soak                       # 10 min at 2,500 req/s
    .venv/bin/python -m benchmarks.soak --ab gc-tuning        # with and without, interleaved
    .venv/bin/python -m benchmarks.soak --quick               # 20 s, to check it works

Stalls of a few tens of milliseconds that hit every connection of a worker at once
(a garbage collection, a blocking call) vanish in a throughput run and in short
latency runs; they show at p99.9 over a long fixed-rate run. This one:

1. starts the nginx upstreams and wrk on CPU 1, Grayroute (``--workers 1`` unless told
   otherwise) on CPU 0, as benchmarks/run.py does; with ``--ab FLAG``, a second
   Grayroute started with ``--no-FLAG`` beside the first (each idle while the other is
   measured);
2. sends GET requests at ``--rate`` for ``--duration`` seconds with
   benchmarks/wrk/open_loop.lua (latency from the intended send time: a stall counts
   for every request it delays), in windows of ``--window`` seconds; with ``--ab`` the
   windows alternate between the two routers, so that both see the same machine;
3. merges the windows' histograms per router and prints p50, p99, p99.9, the max, how
   many requests took longer than 20/50 ms, and the worst window;
4. prints each router's garbage collections over the run from its /metrics
   (grayroute_gc_pause_seconds): how many per generation, their total and how many held
   the worker longer than 10 and 50 ms, which says whether the stalls were collections.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks import harness as h

ROUTER_CPU = 0
LOAD_CPU = 1
K = 1 / math.log(1.01)  # open_loop.lua's histogram: bucket b is exp(b / K) microseconds
SLOW_MS = (20, 50)


@dataclass
class Variant:
    name: str
    proc: h.Proc
    hist: dict[int, int] = field(default_factory=dict)
    windows: list[dict[str, float]] = field(default_factory=list)
    non2xx: int = 0
    socket_errors: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.proc.addr}/api/orders"

    def add(self, ol: dict[str, Any], socket_errors: int) -> None:
        for bucket, count in ol["hist"]:
            self.hist[int(bucket)] = self.hist.get(int(bucket), 0) + int(count)
        self.windows.append({k: float(ol[k]) for k in ("p99_us", "p999_us", "max_us")})
        self.non2xx += int(ol["non2xx"])
        self.socket_errors += socket_errors


def percentile(hist: dict[int, int], p: float) -> float:
    """The latency (µs) at percentile `p` of a merged histogram, as open_loop.lua says it."""
    total = sum(hist.values())
    want, seen = total * p / 100, 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= want:
            return math.exp((bucket + 0.5) / K)
    return 0.0


def slower_than(hist: dict[int, int], ms: float) -> int:
    return sum(n for b, n in hist.items() if math.exp(b / K) > ms * 1000)


def summary(v: Variant) -> str:
    if not v.hist:
        return f"{v.name}: no requests measured"
    p = {q: percentile(v.hist, q) / 1000 for q in (50, 99, 99.9)}
    worst = max(w["max_us"] for w in v.windows) / 1000
    worst_p999 = max(w["p999_us"] for w in v.windows) / 1000
    slow = ", ".join(f"> {ms} ms: {slower_than(v.hist, ms)}" for ms in SLOW_MS)
    return (
        f"{v.name}: {sum(v.hist.values()):,} requests in {len(v.windows)} windows; "
        f"p50 {p[50]:.2f} ms, p99 {p[99]:.2f} ms, p99.9 {p[99.9]:.2f} ms, max {worst:.1f} ms; "
        f"{slow}; worst window p99.9 {worst_p999:.2f} ms; non-2xx {v.non2xx}, "
        f"socket errors {v.socket_errors}"
    )


def gc_pauses(proc: h.Proc) -> str:
    """The router's garbage collections so far, from grayroute_gc_pause_seconds."""
    with urllib.request.urlopen(f"http://{proc.info['admin']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    count: dict[str, float] = {}
    total: dict[str, float] = {}
    longer = {ms: 0.0 for ms in (10, 50)}
    for family in text_string_to_metric_families(text):
        if family.name != "grayroute_gc_pause_seconds":
            continue
        for sample in family.samples:
            generation = sample.labels.get("generation", "")
            if sample.name.endswith("_count"):
                count[generation] = sample.value
            elif sample.name.endswith("_sum"):
                total[generation] = sample.value
            elif sample.name.endswith("_bucket"):
                for ms in longer:
                    if sample.labels["le"] == repr(ms / 1000):
                        longer[ms] -= sample.value
    for ms in longer:
        longer[ms] += sum(count.values())
    per_generation = ", ".join(
        f"generation {g}: {count[g]:,.0f} ({total[g] * 1000:,.0f} ms)" for g in sorted(count)
    )
    over = ", ".join(f"> {ms} ms: {n:.0f}" for ms, n in longer.items())
    return f"collections {per_generation or 'none'}; {over}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=doc)
    p.add_argument("--rate", type=int, default=2500, help="requests per second (2500)")
    p.add_argument("--duration", type=float, default=600, help="seconds in all (600)")
    p.add_argument("--window", type=float, default=30, help="seconds per wrk run (30)")
    p.add_argument("--connections", type=int, default=25, help="open-loop connections (25)")
    p.add_argument("--workers", type=int, default=1, help="grayroute workers (1)")
    p.add_argument(
        "--ab",
        metavar="FLAG",
        default="",
        help="also run `grayroute serve --no-FLAG` and alternate windows (e.g. gc-tuning)",
    )
    p.add_argument("--quick", action="store_true", help="20 s in 5-second windows")
    p.add_argument("--users", type=int, default=1_000_000)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.window = 20.0, 5.0
    if args.window < 1 or args.duration < args.window:
        p.error("--window must be at least 1 s and --duration at least one window")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not h.wrk_available():
        print("benchmarks: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="grayroute-soak-"))
    procs: list[h.Proc] = []
    try:
        backends = h.start_backends("nginx", LOAD_CPU, workdir)
        procs.append(backends)
        rules = h.write_rules_for(h.load_rules(), backends.info["backends"], workdir / "r.yaml")
        cpu = ROUTER_CPU if args.workers == 1 else None
        variants = []
        for name, extra in [("grayroute", ())] + (
            [(f"grayroute --no-{args.ab}", (f"--no-{args.ab}",))] if args.ab else []
        ):
            proc = h.start_grayroute(rules, cpu, workdir, args.workers, extra_args=extra)
            procs.append(proc)
            h.grayroute_worker_pids(proc, args.workers)
            variants.append(Variant(name, proc))
        env = {
            "GR_USERS": str(args.users),
            "GR_RATE": str(args.rate),
            "GR_THREADS": str(args.connections),
            "GR_MODE": "get",
        }
        windows = max(1, round(args.duration / args.window))
        print(
            f"soak: {args.rate} req/s for {windows} x {args.window:g} s per router; "
            f"{', '.join(v.name for v in variants)}",
            flush=True,
        )
        for i in range(windows * len(variants)):
            v = variants[i % len(variants)]
            res = h.run_wrk(
                v.url, "open_loop.lua", args.window, args.connections, args.connections,
                LOAD_CPU, env=env,
            )  # fmt: skip
            ol = res.extra["open_loop"]
            errors = sum(n for k, n in res.error_detail.items() if k != "status")
            v.add(ol, errors)
            print(
                f"  {v.name:32} window {i // len(variants) + 1}/{windows}: "
                f"p99 {ol['p99_us'] / 1000:.2f} ms p99.9 {ol['p999_us'] / 1000:.2f} ms "
                f"max {ol['max_us'] / 1000:.1f} ms backlog {ol['backlog']}",
                flush=True,
            )
        print()
        for v in variants:
            print(summary(v), flush=True)
            print(f"  {v.name} gc: {gc_pauses(v.proc)}", flush=True)
        return 0
    except h.BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
