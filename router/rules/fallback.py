"""Fallback upstreams: where an upstream's requests go while none of its endpoints is up.

`fallback: NAME` on an upstream names another upstream. The proxy sends a request there
instead of answering 502 when the upstream it was decided for has no endpoint up: it has
none, each is down (by its health check, or a failed connection in the last
`--fail-timeout`), or each refuses this request's connection. When the fallback has no
endpoint up either, its own fallback is next, and so on down the chain.

The file's fallbacks are checked by validate.py (a known name, not the upstream itself,
no cycle). The control plane may give defaults on top of them without rewriting the file
(`with_default_fallbacks`: a rollout's canary falls back to its stable version unless the
file says otherwise); `Effective.fallbacks` carries them to every worker (effective.py).
Either way the snapshot carries every chain resolved once,
`Snapshot.fallbacks`, and the proxy follows it through its pools with no lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.rules.compile import Snapshot
    from router.rules.model import RuleSet

__all__ = ["fallback_chains", "file_fallbacks", "find_cycle", "with_default_fallbacks"]

Chains = Mapping[str, tuple[str, ...]]


def find_cycle(fallbacks: Mapping[str, str], start: str) -> tuple[str, ...] | None:
    """The circle that following fallbacks from `start` runs into, written from its first
    member back to it (e.g. ("b", "c", "b")); None when the chain ends."""
    path: list[str] = []
    seen: dict[str, int] = {}
    name: str | None = start
    while name is not None:
        if name in seen:
            return (*path[seen[name] :], name)
        seen[name] = len(path)
        path.append(name)
        name = fallbacks.get(name)
    return None


def fallback_chains(fallbacks: Mapping[str, str]) -> Chains:
    """upstream -> the upstreams its requests may fall back to, in the order they are
    tried. A chain stops before it would come back to a name already in it."""
    chains: dict[str, tuple[str, ...]] = {}
    for name in fallbacks:
        chain: list[str] = []
        seen = {name}
        target = fallbacks.get(name)
        while target is not None and target not in seen:
            chain.append(target)
            seen.add(target)
            target = fallbacks.get(target)
        if chain:
            chains[name] = tuple(chain)
    return MappingProxyType(chains)


def file_fallbacks(ruleset: RuleSet) -> dict[str, str]:
    """The fallbacks the rule file gives: upstream -> fallback."""
    return {u.name: u.fallback for u in ruleset.upstreams if u.fallback is not None}


def with_default_fallbacks(snapshot: Snapshot, defaults: Mapping[str, str]) -> Snapshot:
    """`snapshot` with `defaults` (upstream -> fallback) for the upstreams whose fallback
    the file does not give; the same object when that changes nothing.

    For the control plane: a rollout makes its stable version the canary's default. The
    file's own fallbacks always win. A default naming an upstream the snapshot does not
    have, the upstream itself, or one that would close a circle is left out, so a stale
    default can never make a snapshot invalid. Applying it again with other defaults
    replaces the earlier ones (it starts from the file each time).
    """
    direct = file_fallbacks(snapshot.ruleset)
    upstreams = snapshot.upstreams
    for name, target in defaults.items():
        if name in direct or name == target or name not in upstreams or target not in upstreams:
            continue
        direct[name] = target
        if find_cycle(direct, name) is not None:
            del direct[name]
    chains = fallback_chains(direct)
    if chains == snapshot.fallbacks:
        return snapshot
    return dataclasses.replace(snapshot, fallbacks=chains)
