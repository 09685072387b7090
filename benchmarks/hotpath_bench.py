"""The hot path without sockets: µs (or CPU instructions) per proxied request.

    .venv/bin/python -m benchmarks.hotpath_bench [--workload get|post] [--requests 50000]
    GRAYROUTE_PURE=1 .venv/bin/python -m benchmarks.hotpath_bench      # the pure build
    .venv/bin/python -m benchmarks.hotpath_bench --instructions   # valgrind's count

The real router (`Router`, `HttpProxyProtocol`, the upstream pools and their
`UpstreamConnection`s, the worker's metrics) on the benchmark rules, driven by hand: each
request's bytes go to the client protocol's `data_received` as one read; the upstream
connection the router chose gets the nginx upstream's answer the same way; transports
only collect what is written. What remains is exactly the Python (or compiled) work per
request that a worker does between its reads and writes: parsing, routing, the request
head, the response head, metrics; without the event loop and the system calls, which
nginx pays too.

Requests are those of `make bench`: (a) GET with an X-User-Id from 1..1,000,000, (b) POST
of the ~300-byte JSON body carrying user_id; keep-alive, one client connection.
`--instructions` counts CPU instructions instead (valgrind): a run's count less that of
a run without the measured requests, per request; repeatable where timings are not.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from router.config import Settings
from router.metrics import WorkerMetrics
from router.native import build_info
from router.proxy import HttpProxyProtocol, Router
from router.rules import load_snapshot_text
from router.upstream import UpstreamConnection

RULES = Path(__file__).with_name("rules.yaml")
ENDPOINTS = {
    "v1": "127.0.0.1:18101",
    "v1.1": "127.0.0.1:18102",
    "v2": "127.0.0.1:18103",
}  # as there
# What each nginx upstream (benchmarks/nginx/backends.conf.in) answers, as it sends it.
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 04 Dec 2025 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
    b"X-Version: %b\r\n\r\n%b"
)
_JSON_TAIL = b'","order":{"sku":"SKU-000123","qty":2,"currency":"EUR"},"note":"' + b"x" * 222
_JSON_TAIL += b'"}'


class Transport:
    """Collects what is written; the rest of asyncio.Transport that the router calls."""

    def __init__(self, peer: tuple[str, int], protocol: Any = None) -> None:
        self.peer = peer
        self.protocol = protocol
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the benchmark's connections are never closed")

    abort = close


def requests(workload: str, n: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        user = str(rnd.randint(1, 1_000_000)).encode()
        if workload == "get":
            out.append(
                b"GET /api/orders HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-User-Id: %b\r\n\r\n" % user
            )
        else:
            body = b'{"user_id":"' + user + _JSON_TAIL
            out.append(
                b"POST /api/orders HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(body), body)
            )
    return out


async def run(workload: str, n: int, warmup: int, check: bool) -> float:
    """Seconds for `n` requests, after `warmup` others."""
    # keepalive_requests=0: one connection carries them all (with nginx's default of
    # 1,000, the router would close it, and wrk's clients would open a new one).
    settings = Settings(keepalive_requests=0)
    router = Router(settings, load_snapshot_text(RULES.read_text(), "rules.yaml"), WorkerMetrics())
    assert router._ticker is not None
    router._ticker.cancel()  # timeouts and the Date header: once a second, not per request
    upstreams: dict[int, Transport] = {}  # id(transport) -> transport, to find the written
    for pool in router.pools.values():
        for endpoint in pool.endpoints:
            conn = UpstreamConnection(pool, endpoint)
            transport = Transport(endpoint, conn)
            conn.connection_made(transport)  # type: ignore[arg-type]
            pool.release(conn)
            upstreams[id(transport)] = transport
    client = Transport(("127.0.0.1", 40000))
    proto = HttpProxyProtocol(router)
    proto.connection_made(client)  # type: ignore[arg-type]
    answers = {
        ep: ANSWER % (len(name), name.encode(), name.encode())
        for name, ep in ((n, tuple(ep.split(":"))) for n, ep in ENDPOINTS.items())
    }
    by_port = {int(ep[1]): a for ep, a in answers.items()}
    ups = list(upstreams.values())

    def one(data: bytes) -> None:
        proto.data_received(data)
        for up in ups:
            if up.written:
                up.written.clear()
                up.protocol.data_received(by_port[up.peer[1]])
                return
        raise AssertionError(f"no upstream got the request; client got {client.written!r}")

    warm = requests(workload, warmup, seed=2)
    for data in warm:
        one(data)
    if check and warm:
        got = b"".join(client.written)
        assert got.count(b"HTTP/1.1 200 OK\r\n") == len(warm), got[:500]
    client.written.clear()
    batch = requests(workload, n)
    gc.collect()
    began = time.perf_counter()
    for data in batch:
        one(data)
        client.written.clear()
    return time.perf_counter() - began


def instructions(args: argparse.Namespace) -> float:
    """Instructions per request, counted by valgrind (callgrind): a run of --requests
    after the warm-up, less one of the warm-up alone. Deterministic (a fixed hash seed),
    unlike a timing on a shared machine; slow (about a minute)."""

    def count(n: int) -> int:
        cmd = [
            *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
            *(sys.executable, "-m", "benchmarks.hotpath_bench", "--workload", args.workload),
            *("--requests", str(n), "--warmup", str(args.warmup), "--quiet"),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        line = next(x for x in done.stderr.splitlines() if "Collected :" in x)
        return int(line.rsplit(":", 1)[1])

    return (count(args.requests) - count(0)) / args.requests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--workload", choices=("get", "post"), default="get")
    p.add_argument("--requests", type=int, default=None, help="measured (50,000; 2,000 counted)")
    p.add_argument("--warmup", type=int, default=None, help="requests first (2,000; 500 counted)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs; the best counts (3)")
    p.add_argument(
        "--instructions",
        action="store_true",
        help="CPU instructions per request (valgrind's count) instead of µs",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing, one run")
    args = p.parse_args(argv)
    if args.requests is None:
        args.requests = 2000 if args.instructions else 50_000
    if args.warmup is None:
        args.warmup = 500 if args.instructions else 2000
    build = build_info()
    if args.instructions:
        per = instructions(args)
        print(f"{args.workload}: {per:,.0f} instructions/request ({build})")
        return 0
    loop = asyncio.new_event_loop()
    try:
        best = min(
            loop.run_until_complete(run(args.workload, args.requests, args.warmup, check=True))
            for _ in range(1 if args.quiet else args.repeat)
        )
    finally:
        loop.close()
    if not args.quiet and args.requests:
        print(
            f"{args.workload}: {best / args.requests * 1e6:.2f} µs/request, best of "
            f"{args.repeat} x {args.requests:,} ({build})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
