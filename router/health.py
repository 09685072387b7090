"""Endpoint health as the workers see it, merged in the supervisor for /rules and metrics.

Health is kept per worker: each worker's upstream pools (router/upstream.py) leave out an
endpoint whose connection failed (passive, for `--fail-timeout`) or that fails its
`health_check` (active). Each worker sends its pools' endpoint states to the supervisor
over the report channel whenever they change (`worker_report()`, as {"ev": "health"});
the supervisor keeps the latest report of every live worker (`HealthBoard`) and merges
them:

    state         "down" when at least one worker has the endpoint down (some traffic then
                  avoids it, and what one worker saw fail usually has), else "up";
                  "unknown" until a worker has reported it
    by            for a down endpoint: "active" when a health check of one of those
                  workers failed it, else "passive"
    since         for a down endpoint, the earliest time one of the workers that have it
                  down marked it so; for an up one, the latest time a worker saw it come
                  up (or started routing to it)
    workers_down  how many of the reporting `workers` have it down

A report is the state now, not a change: one lost on a full pipe is superseded by the
next, and a worker that exits takes its report with it (`retire`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from router.history import iso_utc
from router.server import format_hostport

if TYPE_CHECKING:
    from router.upstream import UpstreamPool

__all__ = ["HealthBoard", "report_token", "worker_report"]

log = logging.getLogger("grayroute.health")

_STATES = frozenset({"up", "active", "passive"})

# upstream -> [(endpoint "HOST:PORT", state, since)] as one worker reported it
_Report = dict[str, list[tuple[str, str, float]]]


def worker_report(pools: Mapping[str, UpstreamPool]) -> dict[str, list[list[Any]]]:
    """One worker's endpoint states, as JSON-able data for the supervisor."""
    return {
        name: [
            [format_hostport(*endpoint), state, round(since, 2)]
            for endpoint, state, since in pool.endpoint_states()
        ]
        for name, pool in pools.items()
    }


def report_token(pools: Mapping[str, UpstreamPool], now: float) -> list[tuple[Any, ...]]:
    """What `worker_report` depends on, cheaply: when it has not moved, neither has the
    report (a few integers per pool, where building the report costs milliseconds for a
    thousand endpoints). `now`: time.monotonic()."""
    return [(n, p.created, p.transitions, p.lapsed(now)) for n, p in pools.items()]


class HealthBoard:
    """The latest health report of every live worker, and their merge."""

    def __init__(self) -> None:
        self.reports: dict[str, _Report] = {}
        self._merged: dict[str, dict[str, dict[str, Any]]] | None = None  # until a report

    def update(self, worker: str, data: Mapping[str, Any]) -> None:
        """Replace `worker`'s report (a malformed one is ignored)."""
        try:
            report: _Report = {
                str(upstream): [(str(ep), str(state), float(since)) for ep, state, since in rows]
                for upstream, rows in data.items()
            }
        except (TypeError, ValueError) as exc:
            log.warning("worker %s: malformed health report: %s", worker, exc)
            return
        if any(state not in _STATES for rows in report.values() for _, state, _ in rows):
            log.warning("worker %s: health report with an unknown state", worker)
            return
        self.reports[worker] = report
        self._merged = None

    def retire(self, worker: str) -> None:
        if self.reports.pop(worker, None) is not None:
            self._merged = None

    def merged(self) -> dict[str, dict[str, dict[str, Any]]]:
        """upstream -> endpoint -> {state, by, since, workers_down, workers}; computed
        once per change of the reports (scrapes and /rules read it; do not change it)."""
        if self._merged is None:
            self._merged = self._merge()
        return self._merged

    def _merge(self) -> dict[str, dict[str, dict[str, Any]]]:
        seen: dict[str, dict[str, list[tuple[str, float]]]] = {}
        for report in self.reports.values():
            for upstream, rows in report.items():
                endpoints = seen.setdefault(upstream, {})
                for endpoint, state, since in rows:
                    endpoints.setdefault(endpoint, []).append((state, since))
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for upstream, endpoints in seen.items():
            merged = out[upstream] = {}
            for endpoint, views in endpoints.items():
                down = [(state, since) for state, since in views if state != "up"]
                entry: dict[str, Any]
                if down:
                    by = "active" if any(state == "active" for state, _ in down) else "passive"
                    entry = {"state": "down", "by": by, "since": min(s for _, s in down)}
                else:
                    entry = {"state": "up", "since": max(s for _, s in views)}
                entry["since"] = iso_utc(entry["since"])
                entry["workers_down"] = len(down)
                entry["workers"] = len(views)
                merged[endpoint] = entry
        return out

    def counts(self) -> dict[str, tuple[int, int]]:
        """upstream -> (endpoints up, endpoints), as merged."""
        return {
            upstream: (sum(1 for e in endpoints.values() if e["state"] == "up"), len(endpoints))
            for upstream, endpoints in self.merged().items()
        }

    def describe(self, upstream: str, endpoints: list[str]) -> dict[str, dict[str, Any]]:
        """For /rules: `endpoints` (and any other the workers route to) with their state."""
        merged = self.merged().get(upstream, {})
        out = {ep: merged.get(ep, {"state": "unknown"}) for ep in endpoints}
        out.update((ep, entry) for ep, entry in merged.items() if ep not in out)
        return out
