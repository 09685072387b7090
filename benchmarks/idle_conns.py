"""Worker memory with many idle keep-alive client connections (10,000 by default).

    .venv/bin/python -m benchmarks.idle_conns [--connections 10000] [--target grayroute]
                                              [--target nginx+lua] [--docs]

For each target: start the Python upstreams and the router (`grayroute serve
--workers 1`, or the Nginx + Lua baseline), send 200 requests to warm up, read the
worker's RSS, then open the connections from a small uvloop client (in batches), send
one request on each, read its response and leave the connection open and idle. After
`--settle` seconds the worker's RSS is read again, a sample of the connections is used
once more (proving they are still open), and everything is closed. Reported: RSS
before, with the connections idle, the growth per connection, and RSS after closing.

The open-file limit is raised for this process and the servers it starts (they inherit
it); the router's own `keepalive_timeout` (75 s by default) must exceed the settle time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import uvloop

from benchmarks import harness as h

ROUTER_CPU = 0
CLIENT_CPU = 1


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard < need:
        with contextlib.suppress(ValueError, OSError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, min(nr_open, need))))
            return need
        need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


class _Conn(asyncio.Protocol):
    """One client connection: one request at a time, response complete = head + body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) >= length and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(head.split(b"\r\n", 1)[0])
            self.buf = rest[length:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    async def request(self, uid: int) -> bytes:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(
            b"GET /api/orders HTTP/1.1\r\nHost: bench\r\nX-User-Id: "
            + str(uid).encode()
            + b"\r\n\r\n"
        )
        return await asyncio.wait_for(self.waiter, 10)


async def open_idle(addr: str, n: int, batch: int) -> list[_Conn]:
    host, port = addr.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    conns: list[_Conn] = []

    async def one(i: int) -> _Conn:
        _, proto = await loop.create_connection(_Conn, host, int(port))
        status = await proto.request(i + 1)
        if b" 200 " not in status + b" ":
            raise h.BenchError(f"connection {i}: {status!r}")
        return proto

    for start in range(0, n, batch):
        conns += await asyncio.gather(*(one(i) for i in range(start, min(n, start + batch))))
    return conns


async def reuse_sample(conns: list[_Conn], k: int) -> int:
    sample = conns[:: max(1, len(conns) // k)][:k]
    results = await asyncio.gather(*(c.request(7) for c in sample), return_exceptions=True)
    return sum(1 for r in results if isinstance(r, bytes) and b" 200 " in r + b" ")


def measure(target: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    backends = h.start_python_backends(h.VERSIONS, CLIENT_CPU, workdir)
    proc = None
    try:
        rules = h.load_rules(args.rules)
        addrs = backends.info["backends"]
        if target == "grayroute":
            rules_file = h.write_rules_for(rules, addrs, workdir / "rules.yaml")
            proc = h.start_grayroute(rules_file, ROUTER_CPU, workdir, workers=1)
            (worker,) = h.grayroute_worker_pids(proc, 1)[:1]
        else:
            missing = h.nginx_available()
            if missing:
                raise h.BenchError(missing)
            proc = h.start_nginx_router(rules, addrs, ROUTER_CPU, workdir)
            time.sleep(0.5)
            worker = proc.worker_pid()

        async def run() -> dict[str, float]:
            warm = await open_idle(proc.addr, 20, 20)
            for c in warm:
                for _ in range(10):
                    await c.request(3)
            for c in warm:
                assert c.transport is not None
                c.transport.close()
            await asyncio.sleep(0.5)
            before = h.rss_kib(worker)
            t0 = time.monotonic()
            conns = await open_idle(proc.addr, args.connections, args.batch)
            opened_s = time.monotonic() - t0
            await asyncio.sleep(args.settle)
            idle = h.rss_kib(worker)
            alive = sum(1 for c in conns if not c.closed)
            reused = await reuse_sample(conns, 100)
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
            await asyncio.sleep(args.settle)
            after = h.rss_kib(worker)
            return {
                "rss_before_kib": before,
                "rss_idle_kib": idle,
                "rss_after_close_kib": after,
                "per_conn_kib": (idle - before) / args.connections,
                "alive": alive,
                "reused_ok": reused,
                "open_s": opened_s,
            }

        return uvloop.run(run())
    finally:
        if proc is not None:
            proc.stop()
        backends.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.idle_conns")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500, help="connections opened concurrently")
    p.add_argument("--settle", type=float, default=3.0, help="seconds idle before measuring")
    p.add_argument(
        "--target",
        action="append",
        choices=("grayroute", "nginx+lua"),
        help="repeatable; default grayroute",
    )
    p.add_argument("--rules", type=Path, default=h.DEFAULT_RULES)
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    targets = args.target or ["grayroute"]
    limit = raise_nofile(args.connections * 2 + 2000)
    if limit < args.connections + 500:
        print(
            f"idle_conns: open-file limit {limit} is too low for {args.connections}",
            file=sys.stderr,
        )
        return 1
    with contextlib.suppress(OSError):
        if CLIENT_CPU in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {CLIENT_CPU})
    rows = []
    for target in targets:
        with tempfile.TemporaryDirectory(prefix="grayroute-idle-") as tmp:
            try:
                r = measure(target, args, Path(tmp))
            except h.BenchError as exc:
                print(f"idle_conns: {target}: {exc}", file=sys.stderr)
                return 1
        rows.append(
            f"| {target} | {r['rss_before_kib'] / 1024:.1f} | {r['rss_idle_kib'] / 1024:.1f} "
            f"| {r['per_conn_kib']:.2f} | {r['rss_after_close_kib'] / 1024:.1f} "
            f"| {r['alive']:,} | {r['reused_ok']}/100 | {r['open_s']:.1f} |"
        )
        print(f"{target}: {r}", flush=True)
    text = "\n".join(
        [
            f"{args.connections:,} idle keep-alive client connections, each used for one "
            f"request, then idle {args.settle:g} s (`python -m benchmarks.idle_conns`):",
            "",
            "| target | worker RSS before (MiB) | with connections idle (MiB) | KiB per connection "
            "| after closing (MiB) | still open | reused after idling | seconds to open |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    print(text)
    if args.docs:
        h.update_docs_block("idle", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
