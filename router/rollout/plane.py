"""The rollout controller inside `grayroute serve`: how it acts through the supervisor.

`build_controller(supervisor)` wires a RolloutController to this router: counts summed
over its workers (router.metrics), state in its state directory, weights and the
canary's default fallback put in force in every worker through the supervisor's
effective state (merged with what others put there, e.g. endpoints found by DNS), the
audit log, notifications, and the rollout metrics on /metrics. With rules in etcd it is
a fleet's (router.fleet.rollouts): counts summed over the fleet, state in etcd, judged
by one router, the state directory keeping a copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from router.fleet import EtcdLocation, is_etcd_url
from router.history import now_iso
from router.rollout.controller import RolloutController
from router.rollout.notify import Notifier
from router.rollout.state import FileStore
from router.rollout.stats import LocalCounts

if TYPE_CHECKING:
    from router.config import Settings
    from router.history import AuditLog
    from router.metrics import SupervisorMetrics
    from router.rules import Snapshot
    from router.rules.effective import Effective

__all__ = ["SupervisorPlane", "build_controller"]

log = logging.getLogger("grayroute.rollout")


class _Supervisor(Protocol):
    """What the plane needs of router.supervisor.Supervisor."""

    state_dir: str
    settings: Settings
    router_id: str
    audit: AuditLog  # the router's one audit log: rollout entries share its bound
    effective: Effective
    snapshot: Snapshot
    metrics: SupervisorMetrics

    def set_effective(self, effective: Effective) -> None: ...

    def effective_applied(self) -> bool: ...

    @property
    def effective_snapshot(self) -> Snapshot: ...

    def readiness(self) -> tuple[bool, str]: ...


class SupervisorPlane:
    def __init__(self, supervisor: _Supervisor) -> None:
        self.supervisor = supervisor

    def put_weights(
        self, route: str, weights: Mapping[str, float] | None, fallback: tuple[str, str | None]
    ) -> None:
        sup = self.supervisor
        upstream, default = fallback
        sup.set_effective(
            sup.effective.with_weights(route, weights).with_fallback(upstream, default)
        )

    def weights_applied(self) -> bool:
        # Until every worker is up (at start, or one being replaced) an interval does
        # not count either: its traffic is not the traffic of the weights in force.
        sup = self.supervisor
        return sup.effective_applied() and sup.readiness()[0]

    def weights_in_force(self, route: str) -> Mapping[str, float]:
        for compiled in self.supervisor.effective_snapshot.routes:
            if compiled.name == route and compiled.split is not None:
                return dict(zip(compiled.split.names, compiled.split.weights, strict=True))
        return {}

    def audit(self, entry: dict[str, Any]) -> None:
        try:
            sup = self.supervisor
            sup.audit.append({**entry, "router": sup.router_id, "router_pid": os.getpid()})
        except OSError as exc:
            log.warning("cannot append to the audit log in %s: %s", self.supervisor.state_dir, exc)

    def now_iso(self) -> str:
        return now_iso()

    def rules_digest(self) -> str:
        return self.supervisor.snapshot.digest


def build_controller(supervisor: _Supervisor) -> RolloutController:
    aggregator = supervisor.metrics.aggregator
    settings = supervisor.settings
    controller: RolloutController
    if is_etcd_url(settings.rules_path):
        from router.fleet.rollouts import FleetController
        from router.fleet.source import etcd_client

        location = EtcdLocation.parse(settings.rules_path)
        controller = FleetController(
            SupervisorPlane(supervisor),
            FileStore(supervisor.state_dir),
            Notifier(),
            client=etcd_client(location, settings),
            key=location.key,
            router_id=supervisor.router_id,
            totals=aggregator.judged,
            leader_ttl=settings.leader_ttl,
        )
    else:
        controller = RolloutController(
            SupervisorPlane(supervisor),
            FileStore(supervisor.state_dir),
            LocalCounts(aggregator.judged),
            Notifier(),
            supervisor.router_id,
        )
    supervisor.metrics.collectors.append(controller.metric_families)
    return controller
