"""The console on the admin address: the page, its assets and the JSON it reads.

    GET /                            the page (it holds no data: open without the token)
    GET /console/assets/NAME         its script, style sheet and uPlot (open too)
    GET /console/status[?window=S]   routes, versions, upstreams, rules (status.py);
                                     S seconds of traffic, default 300
    GET /console/series?route=R[&seconds=S]
                                     a route's share, requests/s and error rate per
                                     version over the last S seconds (default: all kept),
                                     with the moments rules reloaded or weights changed
    GET /console/where?user=U[&route=R][&path=P][&host=H]
                                     where user U goes on each route, as `explain` says

The JSON endpoints need the admin token wherever the admin app requires one (the page
asks for it and sends it as `Authorization: Bearer`). The assets are package data,
read once through importlib.resources, so an installed wheel serves the same files as a
checkout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from router.console.status import Console

__all__ = ["ASSETS_PREFIX", "OPEN_PATHS", "add_routes", "assets"]

ASSETS_PREFIX = "/console/assets/"
OPEN_PATHS = frozenset({"/"})

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page loads only its own files and talks only to this address.
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}
_ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_MAX_SECONDS = 24 * 3600.0


@functools.cache
def assets() -> dict[str, tuple[bytes, str]]:
    """Every file under router/console/static: relative path -> (bytes, content type)."""
    out: dict[str, tuple[bytes, str]] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            name = prefix + child.name
            if child.is_dir():
                walk(child, name + "/")
            elif child.is_file():
                suffix = "." + child.name.rpartition(".")[2]
                out[name] = (child.read_bytes(), _CONTENT_TYPES.get(suffix, "text/plain"))

    walk(resources.files("router.console").joinpath("static"), "")
    return out


def add_routes(app: web.Application, console: Callable[[], Console | None]) -> None:
    """The console's routes on the admin app; `console()` is None where there is none."""

    async def page(_: web.Request) -> web.Response:
        body, content_type = assets()["index.html"]
        return web.Response(body=body, headers={"Content-Type": content_type, **_PAGE_HEADERS})

    async def asset(request: web.Request) -> web.Response:
        found = assets().get(request.match_info["name"])
        if found is None or request.match_info["name"] == "index.html":
            return _error(404, "no such asset", "the page's files are listed in docs/console.md")
        body, content_type = found
        return web.Response(body=body, headers={"Content-Type": content_type, **_ASSET_HEADERS})

    async def status(request: web.Request) -> web.Response:
        c = console()
        if c is None:
            return _no_console()
        seconds = _seconds(request, "window", 300.0)
        if seconds is None:
            return _bad_seconds("window")
        return _json(c.status(seconds))

    async def series(request: web.Request) -> web.Response:
        c = console()
        if c is None:
            return _no_console()
        route = request.query.get("route")
        if not route:
            return _error(400, "no route", "give ?route=NAME (a route of the rules in force)")
        seconds = _seconds(request, "seconds", c.ring.keep)
        if seconds is None:
            return _bad_seconds("seconds")
        data = c.series(route, seconds)
        if data is None:
            return _error(404, "no such route", f"the rules in force have no route {route!r}")
        return _json(data)

    async def where(request: web.Request) -> web.Response:
        c = console()
        if c is None:
            return _no_console()
        q = request.query
        user = q.get("user", "")
        if not user:
            return _error(400, "no user", "give ?user=ID (and &path=/p or &route=NAME)")
        path = q.get("path") or None
        if path is not None and not path.startswith("/"):
            return _error(400, "bad path", f"{path!r}: a path starts with /")
        return _json(c.where(user, q.get("route") or None, path, q.get("host") or None))

    app.router.add_get("/", page)
    app.router.add_get(ASSETS_PREFIX + "{name:.+}", asset)
    app.router.add_get("/console/status", status)
    app.router.add_get("/console/series", series)
    app.router.add_get("/console/where", where)


def _seconds(request: web.Request, name: str, default: float) -> float | None:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or not 0 < value <= _MAX_SECONDS:
        return None
    return value


def _json(data: Any) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": error, "detail": detail}),
        content_type="application/json",
    )


def _bad_seconds(name: str) -> web.Response:
    return _error(400, f"bad {name}", f"give ?{name}=S with S seconds, more than 0, at most 86400")


def _no_console() -> web.Response:
    return _error(404, "no console", "this admin address has no console data")
