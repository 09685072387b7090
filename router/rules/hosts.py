"""Host conditions of a route: exact names, wildcards, `host_regex` and `default_host`.

The Host a route looks at is the request's Host header lower-cased, without its port
and without IPv6 brackets (decide.host_from_header). What a `hosts` entry matches, as
nginx's `server_name` and Envoy's `domains` do:

    api.example.com       exactly this name
    *.example.com         any name that ends with `.example.com` (`a.example.com`,
                          `a.b.example.com`), not `example.com` itself
    www.example.*         any name that starts with `www.example.` and goes on
                          (`www.example.com`, `www.example.co.uk`)

`host_regex` is searched in the name. `default_host: true` holds for a name that no
route's `hosts` or `host_regex` matches: the requests nginx gives its default server.

compile.py keeps exact names in a dict; `HostPatterns` resolves other names against the
wildcards and regexes, and remembers a bounded number of the answers.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "HostPatterns",
    "host_matches",
    "host_pattern_problem",
    "is_wildcard",
    "pattern_covers",
]

_LABELS = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")

# Host names a worker remembers the route lookup of; names are chosen by clients, so
# the memory is bounded and the rest is computed each time.
HOST_CACHE_SIZE = 4096

T = TypeVar("T")


def is_wildcard(pattern: str) -> bool:
    return pattern.startswith("*.") or pattern.endswith(".*")


def host_pattern_problem(pattern: str) -> tuple[str, str] | None:
    """(what is wrong, hint) for a `hosts` entry that contains `*`, else None."""
    if "*" not in pattern:
        return None
    hint = (
        "write *.example.com (names ending in .example.com) or www.example.* "
        "(names starting with www.example.)"
    )
    if pattern == "*":
        return "`*` alone matches every host", "remove `hosts` to match every host"
    body = (
        pattern[2:]
        if pattern.startswith("*.")
        else pattern[:-2]
        if pattern.endswith(".*")
        else None
    )
    if body is None or "*" in body or not _LABELS.fullmatch(body.lower()):
        return f"`{pattern}`: a wildcard is a whole first or last label", hint
    return None


def host_matches(pattern: str, host: str) -> bool:
    """`host` (lower-case) is matched by a `hosts` entry (lower-case)."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    if pattern.endswith(".*"):
        return host.startswith(pattern[:-1]) and len(host) > len(pattern) - 1
    return host == pattern


def pattern_covers(first: str, later: str) -> bool:
    """Every name `later` matches, `first` matches too (only when certain)."""
    if first == later:
        return True
    if not is_wildcard(later):
        return host_matches(first, later)
    if first.startswith("*.") and later.startswith("*."):
        return later.endswith(first[1:])
    if first.endswith(".*") and later.endswith(".*"):
        return later.startswith(first[:-1])
    return False


class HostPatterns(Generic[T]):
    """The route lookup for host names that are not written exactly in any route.

    `signature(host)` says which wildcards and regexes match a name; names with the
    same signature share one lookup table (`build(signature)`), built on first use.
    """

    __slots__ = (
        "_build",
        "_by_host",
        "_by_signature",
        "_default",
        "_leading",
        "_regexes",
        "_trailing",
    )

    def __init__(
        self,
        wildcards: list[str],
        regexes: list[str],
        build: Callable[[tuple[int, ...]], T],
        default: T,
    ) -> None:
        # Pattern ids: wildcards in the order given, then regexes.
        self._leading: dict[str, int] = {}  # ".example.com" -> id
        self._trailing: dict[str, int] = {}  # "www.example." -> id
        for i, w in enumerate(wildcards):
            if w.startswith("*."):
                self._leading[w[1:]] = i
            else:
                self._trailing[w[:-1]] = i
        self._regexes = tuple(
            (len(wildcards) + i, re.compile(rx).search) for i, rx in enumerate(regexes)
        )
        self._build = build
        self._default = default
        self._by_signature: dict[tuple[int, ...], T] = {}
        self._by_host: dict[str, T] = {}

    def lookup(self, host: str) -> T:
        found = self._by_host.get(host)
        if found is not None:
            return found
        signature = self.signature(host)
        if not signature:
            found = self._default
        else:
            found = self._by_signature.get(signature)
            if found is None:
                found = self._by_signature[signature] = self._build(signature)
        if len(self._by_host) < HOST_CACHE_SIZE:
            self._by_host[host] = found
        return found

    def signature(self, host: str) -> tuple[int, ...]:
        ids: list[int] = []
        if self._leading:
            dot = host.find(".", 1)
            while dot > 0:
                i = self._leading.get(host[dot:])
                if i is not None:
                    ids.append(i)
                dot = host.find(".", dot + 1)
        if self._trailing:
            dot = host.rfind(".", 0, len(host) - 1)
            while dot > 0:
                i = self._trailing.get(host[: dot + 1])
                if i is not None:
                    ids.append(i)
                dot = host.rfind(".", 0, dot)
        for i, search in self._regexes:
            if search(host) is not None:
                ids.append(i)
        return tuple(sorted(ids))
