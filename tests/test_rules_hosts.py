"""Host conditions: what a wildcard matches, what covers what, and the lookup of other names."""

from __future__ import annotations

import pytest

from router.rules.hosts import HostPatterns, host_matches, host_pattern_problem, pattern_covers


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "x.api.example.com", False),
        # nginx: a leading wildcard matches one label or more, never the bare domain
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "xexample.com", False),
        # nginx: a trailing wildcard matches whatever follows the dot, at least one character
        ("www.example.*", "www.example.com", True),
        ("www.example.*", "www.example.co.uk", True),
        ("www.example.*", "www.example", False),
        ("www.example.*", "www.example.", False),
        ("www.example.*", "wwwxexample.com", False),
    ],
)
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected
    patterns = HostPatterns([pattern] if "*" in pattern else [], [], lambda sig: "matched", "other")
    if "*" in pattern:
        assert (patterns.lookup(host) == "matched") is expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("*.example.com", None),
        ("www.example.*", None),
        ("*", "`*` alone matches every host"),
        ("a.*.com", "`a.*.com`: a wildcard is a whole first or last label"),
        ("*example.com", "`*example.com`: a wildcard is a whole first or last label"),
        ("*.*.com", "`*.*.com`: a wildcard is a whole first or last label"),
        ("*.example.*", "`*.example.*`: a wildcard is a whole first or last label"),
        ("api.example.com", None),
    ],
)
def test_host_pattern_problem(pattern: str, problem: str | None) -> None:
    found = host_pattern_problem(pattern)
    assert (found[0] if found else None) == problem


@pytest.mark.parametrize(
    ("first", "later", "expected"),
    [
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "*.a.example.com", True),
        ("*.a.example.com", "*.example.com", False),
        ("www.*", "www.example.*", True),
        ("www.example.*", "www.*", False),
        ("*.example.com", "www.example.*", False),  # not certain: only warnings use this
        ("a.com", "a.com", True),
        ("a.com", "*.a.com", False),
    ],
)
def test_pattern_covers(first: str, later: str, expected: bool) -> None:
    assert pattern_covers(first, later) is expected


def test_lookup_signatures_name_every_pattern_that_matches() -> None:
    built: list[tuple[int, ...]] = []

    def build(signature: tuple[int, ...]) -> str:
        built.append(signature)
        return "+".join(str(i) for i in signature)

    # ids: wildcards in the order given (0, 1, 2), then regexes (3)
    p = HostPatterns(["*.example.com", "*.b.example.com", "www.*"], ["^www"], build, "none")
    assert p.lookup("a.b.example.com") == "0+1"
    assert p.lookup("www.example.com") == "0+2+3"
    assert p.lookup("www.b.example.com") == "0+1+2+3"
    assert p.lookup("elsewhere.org") == "none"
    assert p.lookup("x.b.example.com") == "0+1"
    assert built == [(0, 1), (0, 2, 3), (0, 1, 2, 3)]  # one table per signature
