"""What the control plane changes on top of the rule file, without rewriting it.

The rule file says what a release manager wrote; at run time two things may differ from
it, and both are decided outside the rule engine:

    weights     a rollout drives its canary's weight step by step (router/rollout/), so a
                route's split uses weights the file does not name
    endpoints   endpoints found at run time (DNS: one address per ready pod) replace an
                upstream's list, and a `split: replicas` follows their counts
    fallbacks   defaults for upstreams whose `fallback:` the file does not give: a
                rollout's canary falls back to its stable version (rules/fallback.py)

`apply_effective(snapshot, effective)` is pure: it returns a new frozen Snapshot that
shares every compiled route it does not change (Lua states, pins, user-ID sources), so
applying it costs a few split tables and the route index, not a recompile. Workers apply
it to every snapshot they install, the way a reload swaps rules whole; the supervisor
decides the Effective state and sends it to them as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from router.rules.compile import Snapshot, _compile_split, _route_index
from router.rules.fallback import with_default_fallbacks
from router.rules.model import Split

__all__ = ["Effective", "apply_effective", "effective_weights"]

_Endpoints = tuple[tuple[str, int], ...]


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Effective:
    """Run-time changes to the rules in force; empty means the file as written."""

    # route name -> {upstream: weight}: replaces those upstreams' weights in the route's
    # split (upstreams not named keep the file's, or the replica count's, weight)
    weights: Mapping[str, Mapping[str, float]] = field(default_factory=_empty)
    # upstream name -> its endpoints now (replaces the file's list)
    endpoints: Mapping[str, _Endpoints] = field(default_factory=_empty)
    # upstream name -> its fallback where the file gives none (the file's always wins)
    fallbacks: Mapping[str, str] = field(default_factory=_empty)

    def __bool__(self) -> bool:
        return bool(self.weights) or bool(self.endpoints) or bool(self.fallbacks)

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": {route: dict(ws) for route, ws in self.weights.items()},
            "endpoints": {
                name: [[host, port] for host, port in eps] for name, eps in self.endpoints.items()
            },
            "fallbacks": dict(self.fallbacks),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Effective:
        """The inverse of to_json; raises ValueError on anything else."""
        if not data:
            return cls()
        try:
            weights = {
                str(route): MappingProxyType({str(u): float(w) for u, w in ws.items()})
                for route, ws in (data.get("weights") or {}).items()
            }
            endpoints = {
                str(name): tuple((str(host), int(port)) for host, port in eps)
                for name, eps in (data.get("endpoints") or {}).items()
            }
            fallbacks = {str(k): str(v) for k, v in (data.get("fallbacks") or {}).items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"not an effective state: {exc}") from exc
        for ws in weights.values():
            if any(w < 0 for w in ws.values()):
                raise ValueError("not an effective state: a negative weight")
        return cls(
            MappingProxyType(weights), MappingProxyType(endpoints), MappingProxyType(fallbacks)
        )

    def with_weights(self, route: str, weights: Mapping[str, float] | None) -> Effective:
        """A copy with `route`'s weights replaced (None: the file's weights again)."""
        merged = dict(self.weights)
        if weights is None:
            merged.pop(route, None)
        else:
            merged[route] = MappingProxyType(dict(weights))
        return dataclasses.replace(self, weights=MappingProxyType(merged))

    def with_endpoints(self, upstream: str, endpoints: _Endpoints | None) -> Effective:
        """A copy with `upstream`'s endpoints replaced (None: the file's list again)."""
        merged = dict(self.endpoints)
        if endpoints is None:
            merged.pop(upstream, None)
        else:
            merged[upstream] = tuple(endpoints)
        return dataclasses.replace(self, endpoints=MappingProxyType(merged))

    def with_fallback(self, upstream: str, fallback: str | None) -> Effective:
        """A copy where `upstream` falls back to `fallback` unless the file says otherwise
        (None: no default for it any more)."""
        merged = dict(self.fallbacks)
        if fallback is None:
            merged.pop(upstream, None)
        else:
            merged[upstream] = fallback
        return dataclasses.replace(self, fallbacks=MappingProxyType(merged))


def effective_weights(
    split: Split, upstreams: Mapping[str, Any], overrides: Mapping[str, float] | None
) -> tuple[tuple[str, float], ...]:
    """A split's weights now: replica counts of the endpoints in use for `split: replicas`
    (and weights written `replicas`), then the control plane's overrides; file order kept."""
    weights = []
    for name, weight in split.weights:
        if split.counts_replicas(name) and name in upstreams:
            weight = float(len(upstreams[name].endpoints))
        if overrides is not None and name in overrides:
            weight = overrides[name]
        weights.append((name, weight))
    return tuple(weights)


def apply_effective(snapshot: Snapshot, effective: Effective) -> Snapshot:
    """`snapshot` (as compiled from the file) with `effective` applied; the same object
    when nothing changes.

    Names the file no longer has (a route or upstream removed by a reload) are ignored,
    so a stale state can never make a snapshot invalid. A split whose effective weights
    sum to zero keeps the file's weights: a request must always have somewhere to go.
    A default fallback that would close a circle is left out.
    """
    if not effective:
        return snapshot
    if effective.fallbacks:
        snapshot = with_default_fallbacks(snapshot, effective.fallbacks)
    upstreams = dict(snapshot.upstreams)
    for name, endpoints in effective.endpoints.items():
        spec = upstreams.get(name)
        if spec is not None and spec.endpoints != endpoints:
            upstreams[name] = dataclasses.replace(spec, endpoints=endpoints)
    routes = list(snapshot.routes)
    changed = upstreams != dict(snapshot.upstreams)
    for i, route in enumerate(routes):
        split = route.model.split
        if split is None or route.split is None:
            continue
        weights = effective_weights(split, upstreams, effective.weights.get(route.name))
        if weights == split.weights or sum(w for _, w in weights) <= 0:
            continue
        routes[i] = dataclasses.replace(
            route, split=_compile_split(dataclasses.replace(split, weights=weights), route.salt)
        )
        changed = True
    if not changed:
        return snapshot
    new_routes = tuple(routes)
    by_host, other_host, host_patterns = _route_index(snapshot.ruleset.routes, new_routes)
    return dataclasses.replace(
        snapshot,
        upstreams=MappingProxyType(upstreams),
        routes=new_routes,
        by_host=by_host,
        other_host=other_host,
        host_patterns=host_patterns,
    )
