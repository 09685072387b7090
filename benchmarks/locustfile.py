"""QA load for a running Grayroute, with a routing check when the test stops.

    .venv/bin/locust -f benchmarks/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 50 -r 50 -t 60s                     # both workloads
    ... HeaderUser                                        # only (a) GET with X-User-Id
    ... JsonBodyUser                                      # only (b) POST with a JSON body

User classes: `HeaderUser` sends GET /api/orders with a random ``X-User-Id``;
`JsonBodyUser` POSTs a ~300-byte JSON order whose ``user_id`` names the user (and no
header). Users are drawn from 1..GR_USERS (default 1,000,000).

Every response says which version answered (the ``X-Version`` header, else the body, as
the benchmark backends do). At the end the observed split is compared with the rule file
(GR_RULES, default benchmarks/rules.yaml; its first route with a `split`):
- users that a `users`, `user_ranges`, `user_suffixes` or `user_pattern` pin holds must
  land on the pin's upstream;
- the others must split by the weights within GR_SPLIT_TOLERANCE (absolute, default 0.03)
  or 4 standard errors, whichever is wider.
When either is off, or fewer than GR_MIN_SAMPLES (default 200) split responses were seen,
locust's exit code is set to 1 and the reason is logged. Routes that use other pin kinds
(`user_percent`, `headers`, `client_cidrs`) cannot be predicted here: such a pin makes the
check skip the pinned-user rule and only report.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from pathlib import Path
from typing import Any

import yaml
from locust import FastHttpUser, constant, events, task

LOG = logging.getLogger("grayroute.locust")
USERS = int(os.environ.get("GR_USERS", "1000000"))
RULES = Path(os.environ.get("GR_RULES", Path(__file__).with_name("rules.yaml")))
TOLERANCE = float(os.environ.get("GR_SPLIT_TOLERANCE", "0.03"))
MIN_SAMPLES = int(os.environ.get("GR_MIN_SAMPLES", "200"))
PATH = os.environ.get("GR_PATH", "/api/orders")
WAIT = float(os.environ.get("GR_WAIT", "0"))  # seconds between a user's requests (0: none)


class Expected:
    """The part of the rule file the check can predict without the router's hash."""

    def __init__(self, rules_path: Path) -> None:
        doc = yaml.safe_load(rules_path.read_text())
        route = next((r for r in doc["routes"] if "split" in r), None)
        if route is None or not isinstance(route["split"], dict):
            raise SystemExit(f"{rules_path}: no route with weighted `split` to check against")
        weights = {str(k): float(v) for k, v in route["split"].items()}
        total = sum(weights.values())
        self.split = {k: v / total for k, v in weights.items()}
        self.pins: list[tuple[str, dict[str, Any]]] = []
        self.unpredictable = False
        for pin in route.get("pins", []):
            kinds = set(pin) - {"to"}
            if kinds - {"users", "user_ranges", "user_suffixes", "user_pattern"}:
                self.unpredictable = True
            self.pins.append((str(pin["to"]), pin))
        self._patterns = {
            id(p): re.compile(p["user_pattern"]) for _, p in self.pins if "user_pattern" in p
        }
        self._users = {id(p): {str(u) for u in p.get("users", [])} for _, p in self.pins}

    def pinned_to(self, uid: str) -> str | None:
        """The upstream a predictable pin sends uid to, or None."""
        for to, pin in self.pins:
            if set(pin) - {"to"} - {"users", "user_ranges", "user_suffixes", "user_pattern"}:
                continue
            if "users" in pin and uid not in self._users[id(pin)]:
                continue
            if "user_ranges" in pin and not (
                uid.isdigit() and any(lo <= int(uid) <= hi for lo, hi in pin["user_ranges"])
            ):
                continue
            if "user_suffixes" in pin and not any(
                uid.endswith(str(s)) for s in pin["user_suffixes"]
            ):
                continue
            pattern = self._patterns.get(id(pin))
            if pattern is not None and not pattern.fullmatch(uid):
                continue
            return to
        return None


class Tally:
    """Responses per version, shared by all users of this locust process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.split: dict[str, int] = {}
        self.pinned_ok = 0
        self.pinned_wrong: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, uid: str, version: str, expected: Expected) -> None:
        want = expected.pinned_to(uid)
        with self.lock:
            if want is not None:
                if version == want:
                    self.pinned_ok += 1
                else:
                    key = f"{version} (want {want})"
                    self.pinned_wrong[key] = self.pinned_wrong.get(key, 0) + 1
                    if len(self.examples) < 5:
                        self.examples.append(f"user {uid} -> {version}, pinned to {want}")
            else:
                self.split[version] = self.split.get(version, 0) + 1

    def verdict(self, expected: Expected) -> tuple[bool, list[str]]:
        lines = []
        ok = True
        n = sum(self.split.values())
        shares = {k: v / n for k, v in self.split.items()} if n else {}
        lines.append(
            "split: "
            + ", ".join(
                f"{k} {shares.get(k, 0):.2%} (want {w:.2%})"
                for k, w in sorted(expected.split.items())
            )
            + f" over {n} responses; pinned: {self.pinned_ok} right, "
            f"{sum(self.pinned_wrong.values())} wrong"
        )
        if n < MIN_SAMPLES:
            ok = False
            lines.append(f"too few split responses ({n} < GR_MIN_SAMPLES={MIN_SAMPLES})")
        for version, want in expected.split.items():
            if not n:
                break
            se = (want * (1 - want) / n) ** 0.5
            tol = max(TOLERANCE, 4 * se)
            if abs(shares.get(version, 0.0) - want) > tol:
                ok = False
                lines.append(
                    f"{version}: {shares.get(version, 0):.2%} is off {want:.2%} "
                    f"by more than {tol:.2%}"
                )
        strays = {k: v for k, v in self.split.items() if k not in expected.split}
        if strays:
            ok = False
            lines.append(f"unpinned users answered by versions outside the split: {strays}")
        if self.pinned_wrong and not expected.unpredictable:
            ok = False
            lines.append(
                f"pinned users routed wrongly: {self.pinned_wrong}; " + "; ".join(self.examples)
            )
        return ok, lines


EXPECTED = Expected(RULES)
TALLY = Tally()
_BODY_TAIL = '","order":{"sku":"SKU-000123","qty":2,"currency":"EUR"},"note":"' + "x" * 222 + '"}'


def _version(resp: Any) -> str:
    version = resp.headers.get("X-Version")
    if version:
        return str(version)
    return (resp.text or "").strip()[:32]


class _GrayUser(FastHttpUser):
    abstract = True
    wait_time = constant(WAIT)

    def _check(self, resp: Any, uid: str) -> None:
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}")
            return
        TALLY.add(uid, _version(resp), EXPECTED)
        resp.success()


class HeaderUser(_GrayUser):
    """(a) GET with the user in X-User-Id."""

    @task
    def get_with_header(self) -> None:
        uid = str(random.randint(1, USERS))
        with self.client.get(
            PATH, headers={"X-User-Id": uid}, name="GET X-User-Id", catch_response=True
        ) as resp:
            self._check(resp, uid)


class JsonBodyUser(_GrayUser):
    """(b) POST with the user in a ~300-byte JSON body, no header."""

    @task
    def post_json(self) -> None:
        uid = str(random.randint(1, USERS))
        body = '{"user_id":"' + uid + _BODY_TAIL
        with self.client.post(
            PATH,
            data=body,
            headers={"Content-Type": "application/json"},
            name="POST JSON user_id",
            catch_response=True,
        ) as resp:
            self._check(resp, uid)


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _check_split(environment: Any, **_kw: Any) -> None:
    ok, lines = TALLY.verdict(EXPECTED)
    for line in lines:
        LOG.info("grayroute split check: %s", line)
    summary = {
        "ok": ok,
        "split": TALLY.split,
        "pinned_ok": TALLY.pinned_ok,
        "pinned_wrong": TALLY.pinned_wrong,
        "messages": lines,
    }
    out = os.environ.get("GR_CHECK_OUT")
    if out:
        Path(out).write_text(json.dumps(summary))
    if not ok:
        LOG.error("grayroute split check FAILED: %s", " | ".join(lines))
        environment.process_exit_code = 1
