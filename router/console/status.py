"""What the console shows, as JSON: built in the supervisor from the rules in force, the
effective state and the ring of samples (router.console.samples).

    Console.status(window)       every route with its versions side by side, every
                                 upstream with its endpoints, the rules in force
    Console.series(route, secs)  share, requests/s and error rate per version over time,
                                 with the moments the rules reloaded or weights changed
    Console.where(user, ...)     where a user goes on each route, by `explain`

The numbers, per version of a route, over the window:

    configured   the version's share of the split as the rule file writes it (percent)
    effective    its share of the split in force now: the file's weights with a
                 rollout's or the replica counts' on top (router/rules/effective.py)
    observed     its share of the route's requests answered in the window, pins and
                 fallbacks included (so it can differ from the split's share)
    rps, error_rate
                 requests answered per second and the percentage of them answered 5xx
    p50_ms, p99_ms, latency_samples
                 latency quantiles of the upstream over the window, from the
                 request-duration histogram (every route that uses it), and how many
                 requests they rest on
    split        on a route a rollout judges: the version's split traffic alone (what
                 the gates compare: no pins, no other route), its requests, failures
                 (5xx, or taken by a fallback), error rate and p50/p99 from the
                 rollout's finer histogram
    role         "canary" or "stable" on a route with a rollout

`Console.run()` is the supervisor's task: it samples the workers' totals every
`SAMPLE_EVERY` seconds and looks for reloads and weight changes twice a second. Nothing
here runs per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from router.console.samples import KEEP_SECONDS, SAMPLE_EVERY, SampleRing, Window, quantile
from router.history import iso_utc
from router.rollout.stats import Counts, counts_from_row
from router.rules.effective import Effective, apply_effective

if TYPE_CHECKING:
    from router.metrics import SupervisorMetrics
    from router.rollout.api import RolloutControl
    from router.rules import Snapshot
    from router.rules.model import Pin, Route

__all__ = ["Console", "ConsoleSource", "pin_kinds"]

MARK_EVERY = 0.5  # seconds between looks for reloads and weight changes
DEFAULT_WINDOW = 300.0  # seconds the side-by-side numbers cover unless asked otherwise


class ConsoleSource(Protocol):
    """What the console reads; the supervisor has it all."""

    snapshot: Snapshot
    effective: Effective
    metrics: SupervisorMetrics
    last_reload: dict[str, Any] | None

    def rules_info(self) -> dict[str, Any]: ...

    def rollout_control(self) -> RolloutControl | None: ...


class Console:
    """The console's state in the supervisor: the sample ring and what it last saw."""

    def __init__(
        self, source: ConsoleSource, every: float = SAMPLE_EVERY, keep: float = KEEP_SECONDS
    ) -> None:
        self.source = source
        self.every = every
        self.ring = SampleRing(keep)
        self._snap: Snapshot | None = None
        self._eff: Effective | None = None
        self._in_force: Snapshot | None = None
        self._weights: dict[str, dict[str, float]] | None = None
        self._seen_reload: dict[str, Any] | None = source.last_reload

    # -- the supervisor's task --------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sample = loop.time()
        while True:
            self.look(time.time())
            if loop.time() >= next_sample:
                self.sample(time.time())
                next_sample = max(next_sample + self.every, loop.time())
            await asyncio.sleep(MARK_EVERY)

    def sample(self, now: float) -> None:
        self.ring.record(now, self.source.metrics.aggregator.total())

    def look(self, now: float) -> None:
        """Mark a reload, and every route whose weights in force changed."""
        reload = self.source.last_reload
        if reload is not self._seen_reload:
            self._seen_reload = reload
            if reload is not None:
                self.ring.mark(now, "reload", None, _reload_text(reload))
        before = self._weights
        self.in_force()
        after = self._weights
        if before is None or after is None or after is before:
            return
        for route, weights in after.items():
            old = before.get(route)
            if old is not None and old != weights:
                self.ring.mark(now, "weights", route, "weights " + _weights_change(old, weights))

    def in_force(self) -> Snapshot:
        """The rules as the workers route now (computed again only when they change)."""
        snap, eff = self.source.snapshot, self.source.effective
        if snap is not self._snap or eff is not self._eff or self._in_force is None:
            self._snap, self._eff = snap, eff
            self._in_force = apply_effective(snap, eff)
            self._weights = _split_weights(self._in_force)
        return self._in_force

    # -- JSON -------------------------------------------------------------------------------

    def status(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        now = time.time()
        info = self.source.rules_info()
        snapshot = self.source.snapshot
        in_force = self.in_force()
        w = self.ring.window(window)
        per_second = 1.0 / w.seconds if w.seconds > 0 else 0.0
        control = self.source.rollout_control()
        routes = [
            _route_status(
                model_route,
                i,
                snapshot,
                in_force,
                w,
                per_second,
                control.describe(model_route.name) if control is not None else None,
            )
            for i, model_route in enumerate(r.model for r in snapshot.routes)
        ]
        unrouted = w.requests.get("", {}).get("", (0, 0))
        return {
            "generated_at": iso_utc(now),
            "window": {
                "seconds": window,
                "covered": round(w.seconds, 3),
                "samples": w.samples,
                "sample_every": self.every,
            },
            "rules": self._rules(info, now),
            "routes": routes,
            "upstreams": self._upstreams(info, w, per_second),
            "unrouted": {"requests": unrouted[0], "rps": _rate(unrouted[0], per_second)},
        }

    def series(self, route: str, seconds: float = KEEP_SECONDS) -> dict[str, Any] | None:
        """None when the rules in force have no such route."""
        snapshot = self.source.snapshot
        model = next((r.model for r in snapshot.routes if r.name == route), None)
        if model is None:
            return None
        intervals = self.ring.intervals(route, seconds)
        names = _versions_of(model)
        for interval in intervals:
            names.extend(u for u, (n, _) in interval.requests.items() if n and u not in names)
        t: list[float] = []
        versions: dict[str, dict[str, list[float | None]]] = {
            name: {"rps": [], "share": [], "error_rate": []} for name in names
        }
        for interval in intervals:
            t.append(round(interval.at, 3))
            total = sum(n for n, _ in interval.requests.values())
            for name in names:
                n, failed = interval.requests.get(name, (0, 0))
                v = versions[name]
                v["rps"].append(round(n / interval.seconds, 3))
                v["share"].append(round(100.0 * n / total, 2) if total else None)
                v["error_rate"].append(round(100.0 * failed / n, 2) if n else None)
        first = intervals[0] if intervals else None
        start = first.at - first.seconds if first is not None else time.time() - seconds
        marks = [
            {"at": round(m.at, 3), "kind": m.kind, "text": m.text}
            for m in self.ring.marks_since(start, route)
        ]
        return {"route": route, "step": self.every, "t": t, "versions": versions, "marks": marks}

    def where(
        self, user: str, route: str | None = None, path: str | None = None, host: str | None = None
    ) -> dict[str, Any]:
        from router.console.where import where

        in_force = self.in_force()
        return {
            "user": user,
            "rules": in_force.digest,
            "answers": where(in_force, user, route, path, host),
        }

    # -- parts ------------------------------------------------------------------------------

    def _rules(self, info: Mapping[str, Any], now: float) -> dict[str, Any]:
        snapshot = self.source.snapshot
        loaded = self.source.metrics.rules_loaded_at
        workers = info.get("workers") or {}
        shadowed = snapshot.ruleset.shadowed_by
        return {
            "source": info.get("source"),
            "digest": snapshot.digest,
            "loaded_at": info.get("loaded_at"),
            "age_seconds": round(now - loaded, 1) if loaded else None,
            "last_reload": info.get("last_reload"),
            "warnings": [str(p) for p in snapshot.warnings],
            "shadowed": [{"route": r, "by": by} for r, by in shadowed],
            "workers": {
                "ready": sum(1 for w in workers.values() if w.get("ready")),
                "running": len(workers),
            },
        }

    def _upstreams(
        self, info: Mapping[str, Any], w: Window, per_second: float
    ) -> dict[str, dict[str, Any]]:
        requests: dict[str, list[int]] = {}
        for per_route in w.requests.values():
            for upstream, (n, failed) in per_route.items():
                if upstream:
                    row = requests.setdefault(upstream, [0, 0])
                    row[0] += n
                    row[1] += failed
        last = self.ring.last_totals
        out: dict[str, dict[str, Any]] = {}
        for name, described in (info.get("upstreams") or {}).items():
            n, failed = requests.get(name, (0, 0))
            entry = dict(described)
            entry.update(_traffic(n, failed, per_second))
            entry.update(_latency(w.latency.get(name)))
            entry["upstream_errors"] = {k: c for (u, k), c in sorted(w.errors.items()) if u == name}
            taken = sum(c for (u, _), c in w.fallbacks.items() if u == name)
            total = sum(c for (u, _), c in last.fallbacks.items() if u == name) if last else 0
            entry["fallback_use"] = {"window": taken, "total": total}
            out[name] = entry
        return out


def _route_status(
    route: Route,
    index: int,
    snapshot: Snapshot,
    in_force: Snapshot,
    w: Window,
    per_second: float,
    rollout: Mapping[str, Any] | None,
) -> dict[str, Any]:
    configured: dict[str, float] = {}
    effective: dict[str, float] = {}
    if route.split is not None:
        configured = _percent(dict(route.split.weights))
        table = in_force.routes[index].split
        if table is not None:
            effective = _percent(dict(zip(table.names, table.weights, strict=True)))
            effective = {name: effective.get(name, 0.0) for name in configured}
    elif route.to is not None:
        configured = effective = {route.to: 100.0}
    names = _versions_of(route)
    traffic = w.requests.get(route.name, {})
    names.extend(upstream for upstream in traffic if upstream not in names)
    total = sum(n for n, _ in traffic.values())
    failed_total = sum(f for _, f in traffic.values())
    versions = []
    for name in names:
        n, failed = traffic.get(name, (0, 0))
        version: dict[str, Any] = {
            "upstream": name,
            "configured": configured.get(name) if configured else None,
            "effective": effective.get(name) if effective else None,
            "observed": round(100.0 * n / total, 2) if total else None,
        }
        version.update(_traffic(n, failed, per_second))
        version.update(_latency(w.latency.get(name) if name else None))
        judged = w.judged.get((route.name, name))
        if judged is not None:
            version["split"] = _split_traffic(counts_from_row(judged), per_second)
        if rollout is not None and name in (rollout.get("canary"), rollout.get("stable")):
            version["role"] = "canary" if name == rollout.get("canary") else "stable"
        versions.append(version)
    pins = []
    by_kind: dict[str, int] = {}
    for i, pin in enumerate(route.pins):
        kinds = pin_kinds(pin)
        pins.append({"index": i, "to": pin.to, "kinds": kinds})
        for kind in kinds:
            by_kind[kind["kind"]] = by_kind.get(kind["kind"], 0) + kind["count"]
    out: dict[str, Any] = {
        "name": route.name,
        "shadowed_by": dict(snapshot.ruleset.shadowed_by).get(route.name),
        "match": {
            k: list(v) if isinstance(v, tuple) else v for k, v in route.match.written().items()
        },
        "decides": _decides(route),
        "user_id": [src.label for src in snapshot.ruleset.sources_of(route)],
        "versions": versions,
        "pins": pins,
        "pins_by_kind": by_kind,
    }
    out.update(_traffic(total, failed_total, per_second))
    if rollout is not None:
        keys = ("phase", "canary", "stable", "step", "steps", "weight", "since")
        out["rollout"] = {k: rollout.get(k) for k in keys}
    return out


def _split_traffic(counts: Counts, per_second: float) -> dict[str, Any]:
    """A version's split traffic as a rollout judges it (router.rollout.stats)."""
    p50, p99 = counts.quantile(0.5), counts.quantile(0.99)
    out = _traffic(counts.requests, counts.failures, per_second)
    out["p50_ms"] = None if p50 is None else round(p50 * 1000.0, 2)
    out["p99_ms"] = None if p99 is None else round(p99 * 1000.0, 2)
    return out


def pin_kinds(pin: Pin) -> list[dict[str, Any]]:
    """What a pin holds for, by kind, with counts: [{"kind", "count", "text"}]."""
    out: list[dict[str, Any]] = []
    if pin.users is not None:
        n = len(pin.users)
        out.append({"kind": "users", "count": n, "text": _plural(n, "user ID")})
    if pin.user_ranges is not None:
        n = len(pin.user_ranges)
        ids = sum(hi - lo + 1 for lo, hi in pin.user_ranges)
        text = f"{_plural(n, 'range')} ({_plural(ids, 'ID')})"
        out.append({"kind": "user_ranges", "count": n, "text": text})
    if pin.user_suffixes is not None:
        n = len(pin.user_suffixes)
        text = f"{_plural(n, 'suffix', 'suffixes')}: {', '.join(pin.user_suffixes[:5])}"
        out.append({"kind": "user_suffixes", "count": n, "text": text + _more(n, 5)})
    if pin.user_pattern is not None:
        out.append({"kind": "user_pattern", "count": 1, "text": f"pattern {pin.user_pattern}"})
    if pin.user_percent is not None:
        text = f"{pin.user_percent:g}% of user IDs"
        out.append({"kind": "user_percent", "count": 1, "text": text})
    if pin.headers is not None:
        n = len(pin.headers)
        names = ", ".join(name for name, _ in pin.headers[:5])
        out.append({"kind": "headers", "count": n, "text": f"{names}{_more(n, 5)}"})
    if pin.client_cidrs is not None:
        n = len(pin.client_cidrs)
        text = f"{_plural(n, 'network')}: {', '.join(pin.client_cidrs[:5])}{_more(n, 5)}"
        out.append({"kind": "client_cidrs", "count": n, "text": text})
    return out


# What decides a route's requests once no pin holds: exactly one of these is given.
_DECIDERS = ("split", "to", "split_clients", "lua", "direct_response", "redirect")


def _decides(route: Route) -> str:
    return next((key for key in _DECIDERS if getattr(route, key) is not None), "pins")


def _versions_of(route: Route) -> list[str]:
    """The upstreams a route names, in the order the file names them."""
    names: list[str] = []
    if route.split is not None:
        names.extend(name for name, _ in route.split.weights)
    if route.to is not None:
        names.append(route.to)
    if route.split_clients is not None:
        names.extend(up for _, up in route.split_clients.buckets)
    for pin in route.pins:
        names.append(pin.to)
    return list(dict.fromkeys(names))


def _split_weights(snapshot: Snapshot) -> dict[str, dict[str, float]]:
    return {
        r.name: dict(zip(r.split.names, r.split.weights, strict=True))
        for r in snapshot.routes
        if r.split is not None
    }


def _percent(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        return {name: 0.0 for name in weights}
    return {name: round(100.0 * w / total, 2) for name, w in weights.items()}


def _traffic(n: int, failed: int, per_second: float) -> dict[str, Any]:
    return {
        "requests": n,
        "rps": _rate(n, per_second),
        "errors": failed,
        "error_rate": round(100.0 * failed / n, 2) if n else None,
    }


def _latency(counts: list[int] | None) -> dict[str, Any]:
    if not counts:
        return {"p50_ms": None, "p99_ms": None, "latency_samples": 0}
    p50, p99 = quantile(counts, 0.5), quantile(counts, 0.99)
    return {
        "p50_ms": None if p50 is None else round(p50 * 1000.0, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000.0, 2),
        "latency_samples": sum(counts),
    }


def _rate(n: int, per_second: float) -> float:
    return round(n * per_second, 3)


def _reload_text(reload: Mapping[str, Any]) -> str:
    trigger = reload.get("trigger", "")
    if reload.get("result") == "success":
        previous = str(reload.get("previous_digest") or "")[:12]
        return f"rules reloaded ({trigger}), replacing {previous}"
    problems = reload.get("problems") or []
    return f"reload failed ({trigger}): {_plural(len(problems), 'problem')}; rules kept"


def _weights_change(old: Mapping[str, float], new: Mapping[str, float]) -> str:
    names = list(dict.fromkeys([*old, *new]))
    return ", ".join(
        f"{name} {old.get(name, 0.0):g}→{new.get(name, 0.0):g}"
        for name in names
        if old.get(name, 0.0) != new.get(name, 0.0)
    )


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def _more(n: int, shown: int) -> str:
    return f" and {n - shown:,} more" if n > shown else ""
