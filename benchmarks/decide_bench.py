"""decide() micro-benchmark: µs per routing decision on a large generated rule file.

    .venv/bin/python -m benchmarks.decide_bench [--requests 20000] [--repeat 7] [--check] [--docs]

The rule file has 50 routes. The first 49 match on host, path prefix and method and send
everything to one upstream; the last (`orders`, matched by path prefix only, so a request
passes the other 49 first) carries a 10,000-user `users` pin, five pins of the other
kinds (`user_ranges`, `user_suffixes`, `user_pattern`, `user_percent`, `headers`) and a
95/5 split. Scenarios, each over `--requests` distinct pre-built RequestViews:

    split         header user ID that every pin misses -> all pins checked, then the split
    pinned        header user ID in the 10,000-user list -> first pin holds
    json-body     no header, the user ID in a ~300-byte JSON body -> parse, pins, split
    mixed         header user IDs drawn from 1..1,000,000 (what workload (a) sends)
    first-route   a request for the first route (host + prefix + method): the cheap case

Reported: the best of `--repeat` passes, in µs per decide() call (loop overhead
included). The target is <= 5 µs for `mixed`; `--check` exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

TARGET_US = 5.0
N_ROUTES = 50
N_PINNED_USERS = 10_000


def rules_text(seed: int = 1) -> str:
    """The generated rule file (YAML)."""
    rnd = random.Random(seed)
    lines = [
        "format: 1",
        "upstreams:",
        '  v1: {endpoints: ["127.0.0.1:9001"]}',
        '  v1.1: {endpoints: ["127.0.0.1:9002"]}',
        '  v2: {endpoints: ["127.0.0.1:9003"]}',
        "user_id:",
        "  - header: X-User-Id",
        "  - json: user_id",
        "body_limit: 64KiB",
        "routes:",
    ]
    for i in range(N_ROUTES - 1):
        lines += [
            f"  - name: svc{i:02d}",
            "    match:",
            f"      hosts: [svc{i:02d}.example.com]",
            f"      path_prefix: /svc{i:02d}",
            "      methods: [GET, POST]",
            "    to: v1",
        ]
    pinned = rnd.sample(range(1_000_000, 9_999_999), N_PINNED_USERS)
    users = ", ".join(f'"{u}"' for u in pinned)
    lines += [
        "  - name: orders",
        "    match:",
        "      path_prefix: /orders",
        "    pins:",
        "      - to: v2",
        f"        users: [{users}]",
        "      - to: v2",
        "        user_ranges: [[100000, 109999]]",
        "      - to: v2",
        '        user_suffixes: ["0007"]',
        "      - to: v2",
        '        user_pattern: "qa-[a-z]+"',
        "      - to: v2",
        "        user_percent: 1",
        "      - to: v2",
        '        headers: {X-App-Version: "^3\\\\."}',
        "    split:",
        "      v1: 95",
        "      v1.1: 5",
    ]
    return "\n".join(lines) + "\n"


def pinned_users(seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    return [str(u) for u in rnd.sample(range(1_000_000, 9_999_999), N_PINNED_USERS)]


def json_body(uid: str) -> bytes:
    tail = '","order":{"sku":"SKU-000123","qty":2,"currency":"EUR"},"note":"' + "x" * 222 + '"}'
    return ('{"user_id":"' + uid + tail).encode()


def build(n: int, seed: int = 2) -> tuple[Any, dict[str, list[Any]]]:
    from router.rules import RequestView, decide, load_snapshot_text

    snap = load_snapshot_text(rules_text(), "decide_bench.yaml")
    rnd = random.Random(seed)

    def view(
        uid: str | None,
        *,
        body: bytes | None = None,
        path: str = "/orders/42",
        host: str = "api.example.com",
        method: str = "GET",
    ) -> Any:
        headers = {"x-app-version": "2.4.1"}
        if uid is not None:
            headers["x-user-id"] = uid
        if body is not None:
            headers["content-type"] = "application/json"
        return RequestView(method, path, "", host, headers, "10.1.2.3", body, body is not None)

    # users that every pin misses: checked against decide() itself
    split_users: list[str] = []
    while len(split_users) < n:
        uid = str(rnd.randrange(200_000, 1_000_000))
        if decide(snap, view(uid)).reason.startswith("split"):
            split_users.append(uid)
    pins = pinned_users()
    scenarios = {
        "split": [view(u) for u in split_users],
        "pinned": [view(pins[i % len(pins)]) for i in range(n)],
        "json-body": [view(None, body=json_body(u), method="POST") for u in split_users],
        "mixed": [view(str(rnd.randint(1, 1_000_000))) for _ in range(n)],
        "first-route": [
            view(u, path="/svc00/items", host="svc00.example.com") for u in split_users
        ],
    }
    # sanity: the scenarios do what they say
    assert decide(snap, scenarios["pinned"][0]).upstream == "v2"
    assert decide(snap, scenarios["json-body"][0]).user_id == split_users[0]
    assert decide(snap, scenarios["first-route"][0]).route == "svc00"
    return snap, scenarios


def time_per_call(fn: Callable[[Any, Any], Any], snap: Any, views: list[Any], repeat: int) -> float:
    """Best-of-`repeat` µs per call over all views (GC off while timing, like timeit)."""
    best = float("inf")
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for v in views:
                fn(snap, v)
            best = min(best, (time.perf_counter_ns() - t0) / len(views) / 1000)
    finally:
        if gc_was:
            gc.enable()
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decide_bench")
    p.add_argument("--requests", type=int, default=20_000, help="views per scenario")
    p.add_argument("--repeat", type=int, default=7, help="passes; the best is reported")
    p.add_argument("--check", action="store_true", help=f"exit 1 when mixed > {TARGET_US} µs")
    p.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    from router.rules import decide

    t0 = time.perf_counter()
    snap, scenarios = build(args.requests)
    setup_s = time.perf_counter() - t0
    results = {
        name: time_per_call(decide, snap, views, args.repeat) for name, views in scenarios.items()
    }
    if args.json:
        print(json.dumps({"us_per_decide": results, "target_us": TARGET_US}))
    else:
        lines = [
            f"decide() on {N_ROUTES} routes, a {N_PINNED_USERS:,}-user pin, 5 other pins and a "
            f"split (python {sys.version.split()[0]}; rule file compiled in {setup_s:.2f} s "
            "incl. building the views)",
            "",
            "| scenario | µs per decide() |",
            "| --- | ---: |",
            *(f"| {name} | {us:.2f} |" for name, us in results.items()),
            "",
            f"Target: <= {TARGET_US:g} µs for `mixed`: "
            + ("met." if results["mixed"] <= TARGET_US else "**missed**."),
        ]
        text = "\n".join(lines)
        print(text)
        if args.docs:
            from benchmarks.harness import update_docs_block

            update_docs_block("decide", text)
    if args.check and results["mixed"] > TARGET_US:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
