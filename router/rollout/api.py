"""The rollouts on the admin address (router.admin mounts these; the admin token, when one
is configured, covers them like every other path):

    GET  /rollouts                    {"rollouts": [ROLLOUT, ...]}
    GET  /rollouts/ROUTE              ROLLOUT; 404 when the route has no rollout
    POST /rollouts/ROUTE/ACTION       pause | resume | promote | abort | retry: the
                                      ROLLOUT after it; 409 {"error": "refused",
                                      "detail": why, "rollout": ROLLOUT} when the phase
                                      does not allow it; 404 as above; in a fleet,
                                      503 when etcd cannot take the new state (nothing
                                      changed)

A POST may carry {"by": "alice@laptop"}: who acted, for the audit log (the CLI sends the
login name and host); the peer address is recorded either way. ROUTE is the route's
name, URL-encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web

from router.rollout.controller import ACTIONS

__all__ = ["RolloutControl", "add_routes"]


class RolloutControl(Protocol):
    def describe_all(self) -> list[dict[str, Any]]: ...

    def describe(self, route: str) -> dict[str, Any] | None: ...

    async def perform(
        self, route: str, action: str, who: Mapping[str, Any]
    ) -> tuple[int, dict[str, Any]]: ...


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2),
        content_type="application/json",
    )


def _unavailable() -> web.Response:
    return _json({"error": "unavailable", "detail": "rollouts are not running yet"}, 503)


def add_routes(app: web.Application, control: Callable[[], RolloutControl | None]) -> None:
    async def list_rollouts(_: web.Request) -> web.Response:
        ctl = control()
        if ctl is None:
            return _unavailable()
        return _json({"rollouts": ctl.describe_all()})

    async def one(request: web.Request) -> web.Response:
        ctl = control()
        if ctl is None:
            return _unavailable()
        route = request.match_info["route"]
        found = ctl.describe(route)
        if found is None:
            return _json({"error": "no rollout", "detail": f"route {route!r} has no rollout"}, 404)
        return _json(found)

    async def action(request: web.Request) -> web.Response:
        ctl = control()
        if ctl is None:
            return _unavailable()
        by = ""
        if request.can_read_body:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return _json(
                    {"error": "bad body", "detail": 'send no body, or {"by": "NAME"}'}, 400
                )
            if isinstance(body, dict) and isinstance(body.get("by"), str):
                by = body["by"][:200]
        user, _, host = by.partition("@")
        who = {"user": user or "admin-api", "host": host or None, "peer": request.remote}
        route, verb = request.match_info["route"], request.match_info["action"]
        status, result = await ctl.perform(route, verb, who)
        return _json(result, status)

    actions = "|".join(ACTIONS)
    app.router.add_get("/rollouts", list_rollouts)
    app.router.add_post(f"/rollouts/{{route:.+}}/{{action:{actions}}}", action)
    app.router.add_get("/rollouts/{route:.+}", one)
