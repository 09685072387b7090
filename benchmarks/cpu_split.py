"""User and system CPU per request of each router's worker, under the same wrk load.

    .venv/bin/python -m benchmarks.cpu_split [--duration 3] [--rounds 2]

Where `make bench` reports the whole CPU time per request, this splits it: system time
is the kernel's (socket reads, writes, loopback delivery, wake-ups), user time is the
router's own code (for Grayroute: the interpreter, llhttp and uvloop). Same layout as
`make bench`: routers on CPU 0, wrk and the nginx upstreams on CPU 1; workload (a).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from benchmarks import harness as h

ROUTER_CPU, LOAD_CPU = 0, 1


def _ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime in clock ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if problem := h.nginx_available():
        print(f"cpu_split: {problem}")
        return 2
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    work = Path(tempfile.mkdtemp(prefix="grayroute-cpu-split-"))
    rules = h.load_rules()
    backends = h.start_backends("nginx", LOAD_CPU, work)
    procs = [backends]
    try:
        addrs = backends.info["backends"]
        nginx = h.start_nginx_router(rules, addrs, ROUTER_CPU, work)
        procs.append(nginx)
        gray = h.start_grayroute(h.write_rules_for(rules, addrs, work / "rules.yaml"), 0, work)
        procs.append(gray)
        workers = {"nginx+lua": (nginx, nginx.worker_pid())}
        workers["grayroute"] = (gray, h.grayroute_worker_pids(gray)[0])
        script = str(h.WRK_DIR / "get_header.lua")
        print("| round | router | requests | user us/req | system us/req | total us/req |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        for round_no in range(1, args.rounds + 1):
            for name, (proc, pid) in workers.items():
                u0, s0 = _ticks(pid)
                out = subprocess.run(
                    [*h.taskset(LOAD_CPU), "wrk", "-t1", "-c50", f"-d{args.duration}s",
                     "-s", script, f"http://{proc.addr}/"],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                u1, s1 = _ticks(pid)
                n = int(next(line for line in out.splitlines() if "requests in" in line).split()[0])
                user, system = (u1 - u0) * tick_us / n, (s1 - s0) * tick_us / n
                print(f"| {round_no} | {name} | {n:,} | {user:.1f} | {system:.1f} | "
                      f"{user + system:.1f} |")  # fmt: skip
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
