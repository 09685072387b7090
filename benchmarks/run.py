"""`make bench`: Grayroute against the Nginx + Lua baseline, in one interleaved run.

    .venv/bin/python -m benchmarks.run                  # the full run (about 3 minutes)
    .venv/bin/python -m benchmarks.run --quick          # 1-second rounds, for development
    .venv/bin/python -m benchmarks.run --profile        # also a py-spy flamegraph of workload (a)

What one run does, in order:
1. starts the upstreams (nginx by default; ``--backends python``) pinned to CPU 1, the
   Nginx + Lua baseline and ``grayroute serve --workers 1`` pinned to CPU 0; wrk runs on
   CPU 1 too, so each router gets one core to itself;
2. checks that each router routes like benchmarks/rules.yaml says (pins, a ~90/10 sticky
   split, the JSON body like the header); a router that routes wrongly is not measured;
3. measures, interleaved (backends, nginx+lua, grayroute, backends, ...; the median of
   ``--rounds`` rounds), workload (a) GET with a random X-User-Id out of 1,000,000 users
   and (b) POST of a ~300-byte JSON body carrying user_id; the upstreams are measured
   directly in the same run to show they are not the bottleneck;
4. measures latency at a fixed rate (2,500 req/s, open loop, corrected for coordinated
   omission: benchmarks/wrk/open_loop.lua);
5. over TLS, both routers with the same certificate: workload (c), keep-alive GETs
   (wrk), and new TLS connections per second, each a full handshake and one GET
   (``openssl s_time -new`` clients); ``--no-tls`` skips both;
6. prints the tables and writes them, with the machine, versions and command, into
   docs/benchmarks.md (between the ``results`` markers; ``--no-docs`` to skip).

Durations come from flags or the environment (GR_BENCH_DURATION, GR_BENCH_ROUNDS,
GR_BENCH_RATE_DURATION; GR_BENCH_QUICK=1 is ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from benchmarks import harness as h

ROUTER_CPU = 0
LOAD_CPU = 1  # wrk and the upstreams
WORKLOADS = {
    "get": ("get_header.lua", "(a) GET, X-User-Id"),
    "post": ("post_json.lua", "(b) POST, JSON body"),
    "tls": ("get_header.lua", "(c) GET over TLS, keep-alive"),
}
TLS_WORKLOADS = frozenset({"tls"})  # measured on the routers' TLS ports
TARGET_NAMES = ("backends", "nginx+lua", "grayroute-pure", "grayroute")
# Grayroute as installed (compiled where a C compiler was at hand), and the same package
# run as its sources, to show what the compiled build gains in the same run.
GRAYROUTE_BUILDS = {"grayroute-pure": {"GRAYROUTE_PURE": "1"}, "grayroute": {}}


class _Counted(Protocol):
    @property
    def requests(self) -> int: ...


_R = TypeVar("_R", bound=_Counted)


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    quick = os.environ.get("GR_BENCH_QUICK", "") not in ("", "0")
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        default=quick,
        help="short rounds for development: --duration 1 --rate-duration 3 --warmup 1",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measurement (default 5; env GR_BENCH_DURATION)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds, the median is reported (default 3; GR_BENCH_ROUNDS)",
    )
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up per target")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--users", type=int, default=1_000_000, help="user population (1,000,000)")
    p.add_argument(
        "--backends",
        choices=("nginx", "python"),
        default="nginx",
        help="what serves v1/v1.1/v2 (default nginx: C, cannot be the bottleneck)",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help="comma-separated subset of " + ",".join(TARGET_NAMES),
    )
    p.add_argument(
        "--workloads", default="get,post,tls", help="comma-separated subset of get,post,tls"
    )
    p.add_argument(
        "--no-tls",
        action="store_true",
        help="skip TLS: workload (c) and the new-connection (handshake) measurement",
    )
    p.add_argument(
        "--handshake-clients",
        type=int,
        default=8,
        help="concurrent `openssl s_time -new` clients for new TLS connections (8)",
    )
    p.add_argument("--rules", type=Path, default=h.DEFAULT_RULES, help="Grayroute rule file")
    p.add_argument("--rate", type=int, default=2500, help="fixed-rate test, req/s (2500)")
    p.add_argument(
        "--rate-duration",
        type=float,
        default=None,
        help="seconds per fixed-rate measurement (default 10; GR_BENCH_RATE_DURATION)",
    )
    p.add_argument(
        "--rate-connections",
        type=int,
        default=25,
        help="open-loop connections (one wrk thread each; default 25)",
    )
    p.add_argument("--no-rate", action="store_true", help="skip the fixed-rate test")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also record the grayroute worker with py-spy during workload (a); "
        "flamegraph and top summary in benchmarks/out/",
    )
    p.add_argument("--profile-duration", type=float, default=10.0, help="seconds (10)")
    p.add_argument(
        "--max-noise",
        type=float,
        default=0.10,
        help="measure again when other processes took more than this share of the "
        "router's or the load core (default 0.10)",
    )
    p.add_argument("--retries", type=int, default=2, help="at most this many times (2)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.duration = args.duration or _env_float("GR_BENCH_DURATION", 1 if args.quick else 5)
    args.rounds = args.rounds or int(_env_float("GR_BENCH_ROUNDS", 3))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.rate_duration = args.rate_duration or _env_float(
        "GR_BENCH_RATE_DURATION", 3 if args.quick else 10
    )
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.no_tls:
        args.workloads = [w for w in args.workloads if w not in TLS_WORKLOADS]
    for t in args.targets:
        if t not in TARGET_NAMES:
            p.error(f"--targets: {t!r} is not one of {', '.join(TARGET_NAMES)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"--workloads: {w!r} is not one of {', '.join(WORKLOADS)}")
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be at least 1")
    return args


# ---------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    root_pid: int  # this process and its children: whose CPU time is the target's cost
    proc: h.Proc | None = None
    skipped: str = ""  # why it is not measured
    load_pid: int = 0  # the upstreams' process (on the load CPU with wrk)
    tls_addr: str = ""  # HOST:PORT of its TLS listener (routers, unless --no-tls)
    build: str = ""  # Grayroute's: compiled or pure Python (`grayroute --version`)

    def url_for(self, workload: str) -> str:
        if workload in TLS_WORKLOADS:
            return f"https://{self.tls_addr}/api/orders" if self.tls_addr else ""
        return self.url


@dataclass
class Noise:
    """Shares of each pinned core that processes other than ours used during a run."""

    router_cpu: float | None  # None when the target is not a router
    load_cpu: float

    @property
    def worst(self) -> float:
        return max(self.router_cpu or 0.0, self.load_cpu)

    def __str__(self) -> str:
        r = "-" if self.router_cpu is None else f"{self.router_cpu:.0%}"
        return f"{r} / {self.load_cpu:.0%}"


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_req: float
    cpu_util: float
    noise: Noise


@dataclass
class Row:
    target: str
    workload: str
    samples: list[Sample] = field(default_factory=list)
    retries: int = 0  # measurements repeated because other processes took our cores

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


def measure(
    target: Target,
    script: str,
    duration: float,
    connections: int,
    env: dict[str, str],
    url: str = "",
) -> tuple[h.WrkResult, float, float, Noise]:
    """One wrk run; also the target's CPU µs per request, its share of one core, and how
    much of each pinned core other processes (the machine is shared) took meanwhile."""
    threads = connections if script == "open_loop.lua" else 1
    return measured(
        target,
        lambda: h.run_wrk(
            url or target.url, script, duration, connections, threads, LOAD_CPU, env=env
        ),
    )


def measured(target: Target, run: Callable[[], _R]) -> tuple[_R, float, float, Noise]:
    """`run()` (a load generator on the load CPU, whose result counts `requests`), with
    the target's CPU µs per request, its share of one core and the noise meanwhile."""
    pids = h.process_tree(target.root_pid)
    load_pids = [] if target.load_pid == target.root_pid else h.process_tree(target.load_pid)
    cpu0, load0, wrk0 = h.cpu_seconds(pids), h.cpu_seconds(load_pids), h.children_cpu_seconds()
    busy_r0, busy_l0 = h.cpu_busy_seconds(ROUTER_CPU), h.cpu_busy_seconds(LOAD_CPU)
    t0 = time.monotonic()
    res = run()
    wall = time.monotonic() - t0
    cpu = h.cpu_seconds(pids) - cpu0
    ours_on_load = h.cpu_seconds(load_pids) - load0 + h.children_cpu_seconds() - wrk0
    busy_r = h.cpu_busy_seconds(ROUTER_CPU) - busy_r0
    busy_l = h.cpu_busy_seconds(LOAD_CPU) - busy_l0
    per_req = cpu / res.requests * 1e6 if res.requests else 0.0
    if target.name == "backends":  # the target itself runs on the load CPU
        noise = Noise(None, max(0.0, busy_l - ours_on_load - cpu) / wall)
    else:
        noise = Noise(max(0.0, busy_r - cpu) / wall, max(0.0, busy_l - ours_on_load) / wall)
    return res, per_req, cpu / wall, noise


def measure_quiet(
    target: Target,
    script: str,
    duration: float,
    connections: int,
    env: dict[str, str],
    args: argparse.Namespace,
    url: str = "",
) -> tuple[h.WrkResult, float, float, Noise, int]:
    """`measure`, again (up to --retries times) while other processes took more than
    --max-noise of either pinned core; the last attempt counts. Also: the retries made."""
    return quiet(lambda: measure(target, script, duration, connections, env, url), target, args)


def quiet(
    once: Callable[[], tuple[_R, float, float, Noise]], target: Target, args: argparse.Namespace
) -> tuple[_R, float, float, Noise, int]:
    retries = 0
    while True:
        res, per_req, util, noise = once()
        if noise.worst <= args.max_noise or retries >= args.retries:
            return res, per_req, util, noise, retries
        retries += 1
        print(
            f"  {target.name}: other processes took {noise} of CPU {ROUTER_CPU} / "
            f"{LOAD_CPU}; measuring again ({retries}/{args.retries})",
            flush=True,
        )


def start_targets(args: argparse.Namespace, workdir: Path) -> tuple[list[Target], h.Proc]:
    backends = h.start_backends(args.backends, LOAD_CPU, workdir)
    addrs: dict[str, str] = backends.info["backends"]
    print(f"upstreams ({args.backends}) on CPU {LOAD_CPU}: {addrs}", flush=True)
    rules = h.load_rules(args.rules)
    tls = None if args.no_tls else h.make_certificate(workdir)
    targets: list[Target] = []
    if "backends" in args.targets:
        targets.append(Target("backends", f"http://{addrs['v1']}/api/orders", backends.pid))
    if "nginx+lua" in args.targets:
        missing = h.nginx_available()
        if missing:
            targets.append(Target("nginx+lua", "", 0, skipped=missing))
        else:
            proc = h.start_nginx_router(rules, addrs, ROUTER_CPU, workdir, tls=tls)
            targets.append(
                Target(
                    "nginx+lua",
                    f"http://{proc.addr}/api/orders",
                    proc.pid,
                    proc,
                    tls_addr=proc.info.get("tls_addr", ""),
                )
            )
    rules_file = h.write_rules_for(rules, addrs, workdir / "rules.yaml")
    for name, build_env in GRAYROUTE_BUILDS.items():
        if name not in args.targets:
            continue
        try:
            # TLS is measured on the installed build only: its cost is OpenSSL's.
            gr = h.start_grayroute(
                rules_file,
                ROUTER_CPU,
                workdir,
                workers=1,
                tls=tls if name == "grayroute" else None,
                extra_env=build_env,
            )
        except h.BenchError as exc:
            targets.append(Target(name, "", 0, skipped=f"grayroute serve: {exc}"))
            continue
        h.grayroute_worker_pids(gr, 1)
        targets.append(
            Target(
                name,
                f"http://{gr.addr}/api/orders",
                gr.pid,
                gr,
                tls_addr=gr.info.get("tls_addr", ""),
                build=h.grayroute_build(build_env),
            )
        )
    for t in targets:
        t.load_pid = backends.pid
    for t in targets:
        if t.proc is not None:
            pids = h.process_tree(t.root_pid)
            tls_note = f", TLS {t.tls_addr}" if t.tls_addr else ""
            where = f"{t.proc.addr}{tls_note}"
            print(f"{t.name} on CPU {ROUTER_CPU}: {where} (pids {pids})", flush=True)
    return targets, backends


def check_targets(targets: list[Target], rules: dict[str, Any]) -> list[str]:
    lines = []
    for t in targets:
        if t.skipped or t.proc is None:
            continue
        report = h.check_routing(t.name, t.proc.addr, rules)
        lines.append(report.summary())
        print(report.summary(), flush=True)
        if not report.ok:
            for problem in report.problems:
                print(f"    {problem}", flush=True)
            t.skipped = "routes wrongly: " + "; ".join(report.problems[:3])
    return lines


def throughput(targets: list[Target], args: argparse.Namespace) -> dict[tuple[str, str], Row]:
    env = {"GR_USERS": str(args.users)}
    live = [t for t in targets if not t.skipped]
    rows = {(t.name, w): Row(t.name, w) for t in live for w in args.workloads if t.url_for(w)}
    for w in args.workloads if args.warmup > 0 else []:
        script = WORKLOADS[w][0]
        for t in live:
            if t.url_for(w):
                h.run_wrk(t.url_for(w), script, args.warmup, args.connections, 1, LOAD_CPU, env=env)
    for rnd in range(args.rounds):
        for w in args.workloads:
            script = WORKLOADS[w][0]
            for t in live:
                if not t.url_for(w):
                    continue
                res, per_req, util, noise, retries = measure_quiet(
                    t, script, args.duration, args.connections, env, args, t.url_for(w)
                )
                rows[t.name, w].samples.append(
                    Sample(res.rps, res.p50_ms, res.p99_ms, res.errors, per_req, util, noise)
                )
                rows[t.name, w].retries += retries
                print(
                    f"round {rnd + 1}/{args.rounds} {w:4} {t.name:10} {res.rps:9.0f} req/s "
                    f"p50 {res.p50_ms:6.2f} ms p99 {res.p99_ms:6.2f} ms errors {res.errors} "
                    f"cpu {per_req:5.1f} us/req ({util:.0%}), others on CPU "
                    f"{ROUTER_CPU} / {LOAD_CPU}: {noise}",
                    flush=True,
                )
    return rows


def fixed_rate(targets: list[Target], args: argparse.Namespace) -> list[dict[str, Any]]:
    n = args.rate_connections
    env = {
        "GR_USERS": str(args.users),
        "GR_RATE": str(args.rate),
        "GR_THREADS": str(n),
        "GR_MODE": "get",
    }
    out = []
    for t in targets:
        if t.skipped:
            continue
        res, _, util, noise, retries = measure_quiet(
            t, "open_loop.lua", args.rate_duration, n, env, args
        )
        ol = res.extra["open_loop"]
        ol.update(
            target=t.name,
            socket_errors=sum(v for k, v in res.error_detail.items() if k != "status"),
            cpu_util=util,
            noise=str(noise),
            retries=retries,
        )
        out.append(ol)
        print(
            f"fixed rate {args.rate}/s {t.name:10} p50 {ol['p50_us'] / 1000:.2f} ms "
            f"p99 {ol['p99_us'] / 1000:.2f} ms p99.9 {ol['p999_us'] / 1000:.2f} ms "
            f"sent {ol['sent']} backlog {ol['backlog']} non-2xx {ol['non2xx']} "
            f"socket errors {ol['socket_errors']}",
            flush=True,
        )
    return out


def handshakes(targets: list[Target], args: argparse.Namespace) -> dict[str, Row]:
    """New TLS connections per second (full handshakes, one GET each), interleaved
    rounds like the throughput runs; `rps` of each sample is connections per second."""
    live = [t for t in targets if not t.skipped and t.tls_addr]
    rows = {t.name: Row(t.name, "handshake") for t in live}
    n = args.handshake_clients
    for rnd in range(args.rounds):
        for t in live:

            def once(t: Target = t) -> tuple[h.HandshakeResult, float, float, Noise]:
                return measured(
                    t,
                    lambda: h.run_handshakes(t.tls_addr, "/api/orders", args.duration, n, LOAD_CPU),
                )

            res, per_conn, util, noise, retries = quiet(once, t, args)
            errors = res.failed_clients
            rows[t.name].samples.append(Sample(res.rps, 0.0, 0.0, errors, per_conn, util, noise))
            rows[t.name].retries += retries
            print(
                f"round {rnd + 1}/{args.rounds} new TLS connections {t.name:10} "
                f"{res.rps:8.0f} /s ({res.requests} by {n} clients, {errors} failed) "
                f"cpu {per_conn:6.1f} us/connection ({util:.0%}), others on CPU "
                f"{ROUTER_CPU} / {LOAD_CPU}: {noise}",
                flush=True,
            )
    return rows


def handshake_table(rows: dict[str, Row]) -> str:
    out = [
        "| target | new connections/s | best round | target CPU µs/connection | target CPU "
        f"| others on CPU {ROUTER_CPU} / {LOAD_CPU} | Grayroute / Nginx+Lua |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = rows.get("nginx+lua")
    for name in TARGET_NAMES:
        row = rows.get(name)
        if row is None or not row.samples:
            continue
        ratio = ""
        if name == "grayroute" and base is not None and base.samples:
            ratio = (
                f"{row.median('rps') / base.median('rps'):.2f} (connections/s), "
                f"{row.median('cpu_us_per_req') / base.median('cpu_us_per_req'):.1f}x "
                "CPU/connection"
            )
        noise = row.samples[[s.rps for s in row.samples].index(_median_rps(row))].noise
        out.append(
            f"| {name} | {row.median('rps'):,.0f} | {max(s.rps for s in row.samples):,.0f} "
            f"| {row.median('cpu_us_per_req'):.0f} | {row.median('cpu_util'):.0%} "
            f"| {noise} | {ratio} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# profiling


def profile(target: Target, args: argparse.Namespace) -> list[Path]:
    """py-spy record on the grayroute worker during workload (a): a flamegraph (SVG) and
    a top summary (self and total time per function) from a second, raw recording."""
    assert target.proc is not None
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise h.BenchError("py-spy is not installed (pip install py-spy)")
    (pid,) = h.grayroute_worker_pids(target.proc, 1)[:1]
    h.OUT_DIR.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    svg = h.OUT_DIR / f"grayroute-get-{stamp}.svg"
    raw = h.OUT_DIR / f"grayroute-get-{stamp}.collapsed"
    env = {"GR_USERS": str(args.users)}
    for fmt, path in (("flamegraph", svg), ("raw", raw)):
        cmd = [
            *h.taskset(LOAD_CPU),
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--duration",
            str(round(args.profile_duration)),
            "--nonblocking",
            "--format",
            fmt,
            "--output",
            str(path),
        ]
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        h.run_wrk(
            target.url,
            "get_header.lua",
            args.profile_duration,
            args.connections,
            1,
            LOAD_CPU,
            env=env,
        )
        _, err = spy_proc.communicate(timeout=args.profile_duration + 30)
        if spy_proc.returncode != 0:
            raise h.BenchError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    top = h.OUT_DIR / f"grayroute-get-{stamp}-top.txt"
    top.write_text(top_summary(raw))
    print(f"profile: {svg}\nprofile: {top}", flush=True)
    print(top.read_text()[:2500], flush=True)
    return [svg, raw, top]


_LINE_NO = re.compile(r":\d+\)$")


def top_summary(collapsed: Path, limit: int = 30) -> str:
    """Self and total share of samples per function (line numbers folded together), from
    py-spy's raw (collapsed) output. Time in uvloop's C loop (socket I/O, callbacks'
    glue) shows as self time of `Runner.run` / `run`, which call into it."""
    self_n: dict[str, int] = {}
    total_n: dict[str, int] = {}
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        # py-spy's first frame names the process/thread; keep it out of the function table
        frames = [_LINE_NO.sub(")", f) for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_n[frames[-1]] = self_n.get(frames[-1], 0) + n
        for f in set(frames):
            total_n[f] = total_n.get(f, 0) + n
    if not samples:
        return "no samples\n"
    lines = [f"{samples} samples\n", "self %  total %  function"]
    for f, n in sorted(self_n.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100 * n / samples:6.1f}  {100 * total_n[f] / samples:7.1f}  {f}")
    lines += ["", "total %  function (inclusive, top)"]
    for f, n in sorted(total_n.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100 * n / samples:7.1f}  {f}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# report


def _median_rps(row: Row) -> float:
    """The req/s of the median round (the lower middle one for an even count)."""
    rps = sorted(s.rps for s in row.samples)
    return rps[(len(rps) - 1) // 2]


def throughput_table(rows: dict[tuple[str, str], Row], args: argparse.Namespace) -> str:
    head = (
        "| target | workload | req/s | best round | p50 ms | p99 ms | errors | target CPU µs/req "
        f"| target CPU | others on CPU {ROUTER_CPU} / {LOAD_CPU} "
        "| Grayroute / Nginx+Lua (compiled / pure) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    out = [head]
    for w in args.workloads:
        for name in TARGET_NAMES:
            row = rows.get((name, w))
            if row is None or not row.samples:
                continue
            ratio = ""
            base = rows.get(("nginx+lua", w))
            if name in GRAYROUTE_BUILDS and base is not None and base.samples:
                ratio = (
                    f"{row.median('rps') / base.median('rps'):.2f} (req/s), "
                    f"{row.median('cpu_us_per_req') / base.median('cpu_us_per_req'):.1f}x CPU/req"
                )
            pure = rows.get(("grayroute-pure", w))
            if name == "grayroute" and pure is not None and pure.samples:
                ratio += (
                    f"; {row.median('rps') / pure.median('rps'):.2f}x the pure build's req/s, "
                    f"{pure.median('cpu_us_per_req') / row.median('cpu_us_per_req'):.2f}x "
                    "less CPU/req"
                )
            noise = row.samples[[s.rps for s in row.samples].index(_median_rps(row))].noise
            out.append(
                f"| {name} | {WORKLOADS[w][1]} | {row.median('rps'):,.0f} "
                f"| {max(s.rps for s in row.samples):,.0f} "
                f"| {row.median('p50_ms'):.2f} | {row.median('p99_ms'):.2f} "
                f"| {sum(s.errors for s in row.samples)} | {row.median('cpu_us_per_req'):.1f} "
                f"| {row.median('cpu_util'):.0%} "
                f"| {noise} | {ratio} |"
            )
    return "\n".join(out)


def rate_table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        "| target | p50 ms | p99 ms | p99.9 ms | max ms | sent / scheduled | backlog at end "
        f"| non-2xx | socket errors | late by server (corrected) | target CPU "
        f"| others on CPU {ROUTER_CPU} / {LOAD_CPU} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        out.append(
            f"| {r['target']} | {r['p50_us'] / 1000:.2f} | {r['p99_us'] / 1000:.2f} "
            f"| {r['p999_us'] / 1000:.2f} | {r['max_us'] / 1000:.1f} | {r['sent']:,} / "
            f"{r['expected']:,} | {r['backlog']} | {r['non2xx']} | {r['socket_errors']} "
            f"| {r['corrected']} | {r['cpu_util']:.0%} | {r['noise']} |"
        )
    return "\n".join(out)


def noise_note(retries: int, args: argparse.Namespace) -> str:
    return (
        f"Measurements during which other processes took more than {args.max_noise:.0%} of "
        f"CPU {ROUTER_CPU} or {LOAD_CPU} were repeated (up to {args.retries} times; the last "
        f"attempt counts): {retries} repeated in this table."
    )


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    env = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("GR_BENCH_")
    )
    cmd = " ".join([".venv/bin/python -m benchmarks.run", *map(shlex.quote, args)])
    return f"{env} {cmd}".strip()


def report(
    args: argparse.Namespace,
    argv: list[str] | None,
    targets: list[Target],
    checks: list[str],
    rows: dict[tuple[str, str], Row],
    rates: list[dict[str, Any]],
    load_before: tuple[float, float, float],
    started: dt.datetime,
    shakes: dict[str, Row] | None = None,
) -> str:
    m = h.machine_info()
    v = h.versions()
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `{command_line(argv)}`"
        f"{' (make bench)' if not (sys.argv[1:] if argv is None else argv) else ''}.",
        "",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}; load average before "
        f"the run {load_before[0]:.2f}; shared with other jobs, so expect noise",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- layout: each router pinned to CPU {ROUTER_CPU} (Grayroute `--workers 1`, nginx "
        f"`worker_processes 1`); wrk and the upstreams ({args.backends}) pinned to CPU "
        f"{LOAD_CPU}",
        f"- throughput: wrk, {args.connections} connections, 1 thread, median of "
        f"{args.rounds} interleaved rounds of {args.duration:g} s (after {args.warmup:g} s "
        f"warm-up); users drawn from {args.users:,}",
        "- routing checks: " + ("; ".join(checks) if checks else "none ran"),
    ]
    builds = [f"{t.name}: {t.build}" for t in targets if t.build]
    if builds:
        lines.append("- builds: " + "; ".join(builds))
    for t in targets:
        if t.skipped:
            lines.append(f"- **{t.name} not measured**: {t.skipped}")
    lines += ["", "### Throughput (closed loop)", "", throughput_table(rows, args), ""]
    lines.append(
        "`target CPU µs/req` is the CPU time the measured target's processes used per "
        "request (router: nginx master + worker, or grayroute supervisor + worker; "
        "`backends`: the upstream server); `target CPU` is its share of one core during the "
        f"run; `others on CPU {ROUTER_CPU} / {LOAD_CPU}` is the share of the router's core and "
        "of the load core (wrk + upstreams) that other processes (the machine is shared) "
        "took meanwhile, in the median round. A router well below 100 % was not saturated: "
        f"its req/s is a lower bound, set by CPU {LOAD_CPU} (whose ceiling for wrk + "
        "upstreams alone is the `backends` row) or by those other processes; CPU µs/req "
        "stays comparable either way. `req/s` and the latencies are medians over the "
        "rounds, `best round` the highest req/s. `errors` = socket errors + HTTP "
        "status >= 400 (as wrk counts them), summed over rounds. "
        + noise_note(sum(r.retries for r in rows.values()), args)
    )
    if rates:
        lines += [
            "",
            f"### Latency at a fixed {args.rate:,} req/s (open loop, workload (a))",
            "",
            rate_table(rates, args),
            "",
            f"{args.rate_duration:g} s per target, {args.rate_connections} connections "
            "(one wrk thread each), benchmarks/wrk/open_loop.lua: latency from the intended "
            "send time whenever the server held the connection past it (the last column "
            "counts those requests), so a stall shows in the percentiles instead of "
            "vanishing. `backlog at end` = requests the schedule called for but not yet sent. "
            + noise_note(sum(r["retries"] for r in rates), args),
        ]
    if shakes:
        lines += [
            "",
            "### New TLS connections (full handshakes)",
            "",
            handshake_table(shakes),
            "",
            f"{args.handshake_clients} concurrent `openssl s_time -new` clients on CPU "
            f"{LOAD_CPU} for {args.duration:g} s per round, median of {args.rounds} "
            "interleaved rounds: every connection is a full TLS 1.3 handshake (ECDSA P-256 "
            "certificate, the same file for both routers; no session resumption) and one "
            "HTTP/1.0 GET, then closed. Workload (c) above is the keep-alive side: one "
            "handshake per wrk connection, then requests. "
            + noise_note(sum(r.retries for r in shakes.values()), args),
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not h.wrk_available():
        print("benchmarks: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="grayroute-bench-"))
    targets: list[Target] = []
    backends = None
    try:
        targets, backends = start_targets(args, workdir)
        rules = h.load_rules(args.rules)
        checks = check_targets(targets, rules)
        for t in targets:
            if t.skipped:
                print(f"{t.name}: NOT MEASURED: {t.skipped}", flush=True)
        rows = throughput(targets, args)
        rates = [] if args.no_rate else fixed_rate(targets, args)
        shakes: dict[str, Row] = {}
        if not args.no_tls:
            if h.s_time_available():
                shakes = handshakes(targets, args)
            else:
                print("new TLS connections: openssl is not installed; skipped", flush=True)
        text = report(args, argv, targets, checks, rows, rates, load_before, started, shakes)
        print("\n" + text, flush=True)
        if not args.no_docs:
            h.update_docs_block("results", text)
            print(f"\nwritten to {h.DOCS_PAGE}", flush=True)
        gr = next((t for t in targets if t.name == "grayroute" and not t.skipped), None)
        if args.profile:
            if gr is None:
                print("profile: grayroute is not running, nothing to profile", file=sys.stderr)
            else:
                profile(gr, args)
        return 0 if all(not t.skipped for t in targets) else 3
    except h.BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    finally:
        stoppers = [t.proc for t in targets if t.proc is not None]
        if backends is not None:
            stoppers.append(backends)
        threads = [threading.Thread(target=p.stop) for p in stoppers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(15)
        if args.keep:
            print(f"kept {workdir}", flush=True)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
