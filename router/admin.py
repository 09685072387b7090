"""The admin app: an aiohttp server run by the supervisor on `--admin` (default loopback).

    GET /metrics   Prometheus text format: all workers summed, plus supervisor counters
    GET /healthz   200 "ok" while the supervisor runs (liveness)
    GET /readyz    200 when every worker is up and accepting, else 503 (readiness)
    GET /rules     JSON: the rules in force and the result of the last reload
    GET /rules/history[?limit=N]
                   JSON: the last N (default 50) entries of the audit log: starts,
                   reloads and rollbacks, who/when/hash/result
    GET /          the release console (router.console.web: the page, its assets under
                   /console/assets/, its JSON under /console/)
    GET /rollouts, GET /rollouts/ROUTE, POST /rollouts/ROUTE/{pause,resume,promote,
                   abort,retry}: progressive rollouts (router.rollout.api)

When a token is configured every endpoint but /healthz and /readyz requires
`Authorization: Bearer TOKEN`; probes stay open so orchestrators need no secret, and so
do the console's page and assets, which hold no data (the page asks for the token). The app
refuses to start on a non-loopback address without a token (`ConfigError`).

The app only reads state through the `AdminSource` it is given; it owns no state itself.
"""

from __future__ import annotations

import hmac
import logging
import socket
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from router.config import is_loopback
from router.console import web as console_web
from router.errors import ConfigError
from router.rollout.api import RolloutControl
from router.rollout.api import add_routes as add_rollout_routes

if TYPE_CHECKING:
    from router.console import Console

log = logging.getLogger("grayroute.admin")

# Probes must work without the token: a load balancer or kubelet has no secret. The
# console's page and assets hold no data; its JSON endpoints do, and need the token.
OPEN_PATHS = frozenset({"/healthz", "/readyz"}) | console_web.OPEN_PATHS
OPEN_PREFIX = console_web.ASSETS_PREFIX

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminSource(Protocol):
    """What the admin app reads; the supervisor implements it."""

    def render_metrics(self) -> bytes: ...

    def readiness(self) -> tuple[bool, str]:
        """(ready, one-line explanation), e.g. (False, "1/2 workers up")."""
        ...

    def rules_info(self) -> dict[str, Any]: ...

    def rules_history(self, limit: int) -> dict[str, Any]:
        """The newest `limit` audit entries, oldest first."""
        ...

    def console(self) -> Console | None:
        """The release console's state (router.console), or None where there is none."""
        ...

    def rollout_control(self) -> RolloutControl | None:
        """The rollouts (router.rollout.api), or None where there are none to drive."""
        ...


def build_app(source: AdminSource, token: str = "") -> web.Application:
    middlewares = [_bearer_auth(token)] if token else []
    app = web.Application(middlewares=middlewares)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=source.render_metrics(), headers={"Content-Type": PROMETHEUS_CONTENT_TYPE}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, why = source.readiness()
        return web.Response(text=f"{why}\n", status=200 if ready else 503)

    async def rules(_: web.Request) -> web.Response:
        body = orjson.dumps(source.rules_info(), option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    async def rules_history(request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            limit = -1
        if limit < 1:
            return web.Response(
                status=400,
                body=orjson.dumps(
                    {"error": "bad limit", "detail": "give ?limit=N with N a positive integer"}
                ),
                content_type="application/json",
            )
        body = orjson.dumps(source.rules_history(limit), option=orjson.OPT_INDENT_2)
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/rules", rules)
    app.router.add_get("/rules/history", rules_history)
    console_web.add_routes(app, source.console)
    add_rollout_routes(app, source.rollout_control)
    return app


def _bearer_auth(token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and not request.path.startswith(OPEN_PREFIX):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return web.Response(
                    status=401,
                    body=orjson.dumps(
                        {
                            "error": "unauthorized",
                            "detail": "send the admin token as 'Authorization: Bearer TOKEN'",
                        }
                    ),
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="grayroute-admin"'},
                )
        result: web.StreamResponse = await handler(request)
        return result

    return bearer_auth


class AdminServer:
    """The admin app on its own socket; `start()` returns the port actually bound."""

    def __init__(self, source: AdminSource, host: str, port: int, token: str = "") -> None:
        if not token and not is_loopback(host):
            raise ConfigError(
                f"--admin: {host}:{port} is reachable from other machines; give --admin-token "
                "TOKEN, or use a loopback address such as 127.0.0.1"
            )
        self._app = build_app(source, token)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; raises OSError when the address cannot be bound."""
        sock = _bind(self._host, self._port)
        # access_log=None: scrapes every few seconds would drown the router's own log.
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        try:
            site = web.SockSite(runner, sock)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


def _bind(host: str, port: int) -> socket.socket:
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
