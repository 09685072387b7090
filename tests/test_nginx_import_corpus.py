"""`import-nginx` against real nginx: every config in tests/nginx_corpus/ runs in a private
nginx and, imported, in `grayroute serve`; the same requests must get the same decisions.

Each config is an http-level file as teams keep them in conf.d/ (upstream, map,
split_clients and server blocks, OpenResty scripts under lua/). Upstream endpoints are
written as 10.x.x.x addresses; here every one of them is a real server on 127.0.0.1 that
answers with its name and the request line it received. nginx runs with the Lua module,
its own prefix and `real_ip_header X-Forwarded-For` (so requests can come "from" any
address); `grayroute serve` runs the imported rule file with `--trusted-proxy 127.0.0.1`.

A decision, as both sides are observed:

    "NAME GET /target"       proxied to upstream NAME, which received this request line
    "redirect 301 /x"        a redirect; nginx's absolute form of a relative Location
                             ("http://host:port/x") is written relative
    "answer 200 ok"          an answer of the server's own, with its body (except nginx's
    "answer 404"             HTML error pages and Grayroute's JSON ones: status only)
    "close"                  the connection closed without an answer (444)

Requests: each config's NAME.requests.jsonl (the lines `grayroute explain` reads) and, for
every config, the hosts of its server_names and the paths of its locations crossed.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lua_compat.nginx_check import (
    NginxLua,
    ProbeRequest,
    Response,
    nginx_unavailable,
    send_raw,
)
from lua_compat.nginx_conf import parse_nginx
from lua_compat.nginx_import import import_nginx, run_import
from router.demo import RouterProcess

CORPUS = Path(__file__).resolve().parent / "nginx_corpus"
CONFIGS = sorted(p.stem for p in CORPUS.glob("*.conf"))
_ENDPOINT = re.compile(r"\b10\.\d+\.\d+\.\d+:\d+\b")
_ENDPOINT_LOCAL = re.compile(r"\b127\.0\.0\.1:\d+\b")
_LISTEN = re.compile(r"(\blisten\s+)(\d+)\b")

# What import-nginx reports as not translated, by config: each must be listed, with its
# file and line, and nothing else; these configs are imported with --partial.
UNTRANSLATED: dict[str, list[str]] = {
    "ip_buckets": ["server 10.6.0.11:8100 weight=3;"],
}

pytestmark = pytest.mark.skipif(nginx_unavailable() is not None, reason=str(nginx_unavailable()))


# -- upstreams that say who they are -----------------------------------------------------


def _upstream_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            text=f"{request.method} {request.raw_path}",
            headers={"X-Endpoint": name},
        )

    app = web.Application(client_max_size=2**24)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def endpoints() -> AsyncIterator[Callable[[list[str]], Any]]:
    """`await endpoints(["10.0.1.11:8080", ...])` -> {address: local port}."""
    runners: list[web.AppRunner] = []

    async def start(addresses: list[str]) -> dict[str, int]:
        ports: dict[str, int] = {}
        for address in addresses:
            runner = web.AppRunner(_upstream_app(address), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            assert site._server is not None
            ports[address] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            runners.append(runner)
        return ports

    yield start
    for runner in runners:
        await runner.cleanup()


# -- requests ------------------------------------------------------------------------------


def _generated(text: str) -> list[ProbeRequest]:
    """Every host a server_name stands for, crossed with paths around every location."""
    hosts: list[str] = ["unknown.invalid"]
    paths: list[str] = ["/", "/nothing/here"]
    for server in (d for d in parse_nginx(text) if d.name == "server"):
        for d in server.block or []:
            if d.name == "server_name":
                for name in d.args:
                    if name.startswith("*."):
                        hosts += ["a" + name[1:], "b.c" + name[1:], name[2:]]
                    elif name.endswith(".*"):
                        hosts += [name[:-1] + "com", name[:-1] + "co.uk", name[:-2]]
                    elif name not in ("_", "") and not name.startswith("~"):
                        hosts.append(name)
            if d.name == "location" and d.args and d.args[0] not in ("~", "~*"):
                path = d.args[-1]
                if path.startswith("/"):
                    paths += [path, path + "x", path.rstrip("/") + "/y/z?q=1", path.rstrip("/")]
    hosts = list(dict.fromkeys(hosts))
    paths = [p for p in dict.fromkeys(paths) if p]
    return [ProbeRequest("GET", p, (("Host", h),)) for h in hosts for p in paths]


def _from_file(path: Path) -> list[ProbeRequest]:
    probes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            headers = tuple((str(n), str(v)) for n, v in d.get("headers", []))
            if "client_ip" in d:
                headers += (("X-Forwarded-For", d["client_ip"]),)
            body = d.get("body")
            probes.append(
                ProbeRequest(
                    d.get("method", "GET"),
                    d.get("path", "/"),
                    headers,
                    None if body is None else str(body).encode("utf-8"),
                )
            )
    return probes


# -- observing a decision ------------------------------------------------------------------


def observe(response: Response, groups: dict[str, str], probe: ProbeRequest) -> str:
    if response.status is None:
        return "close"
    endpoint = response.header("x-endpoint")
    if endpoint is not None:
        return f"{groups[endpoint]} {response.body.decode('latin-1')}"
    if response.status in (301, 302, 303, 307, 308):
        location = response.header("location") or ""
        host = next((v for n, v in probe.headers if n.lower() == "host"), "")
        # nginx makes a relative Location absolute with the request's own host and port.
        location = re.sub(rf"^http://{re.escape(host.split(':')[0])}(:\d+)?(?=/)", "", location)
        return f"redirect {response.status} {location}"
    body = response.body
    if b"<center>nginx" in body or body.startswith(b'{"error":'):
        return f"answer {response.status}"
    return f"answer {response.status} {body.decode('latin-1')!r}"


def _upstream_of(text: str) -> dict[str, str]:
    """Endpoint address -> the upstream block it is in (a backup: NAME-backup)."""
    groups: dict[str, str] = {}
    for d in parse_nginx(text):
        if d.name == "upstream" and d.args:
            for s in d.block or []:
                if s.name == "server" and s.args:
                    groups[s.args[0]] = d.args[0] + ("-backup" if "backup" in s.args else "")
    for address in _ENDPOINT.findall(text):
        groups.setdefault(address, address)
    return groups


# -- the comparison ------------------------------------------------------------------------


async def _compare(name: str, endpoints: Any, tmp_path: Path) -> tuple[int, list[str]]:
    text = (CORPUS / f"{name}.conf").read_text(encoding="utf-8")
    groups = _upstream_of(text)
    ports = await endpoints(sorted(groups))
    local = _ENDPOINT.sub(lambda m: f"127.0.0.1:{ports[m.group(0)]}", text)
    local = _LISTEN.sub(lambda m: m.group(1) + "127.0.0.1:{port:listen}", local)
    local = local.replace("lua/", f"{CORPUS}/lua/")
    http = "set_real_ip_from 127.0.0.1;\nreal_ip_header X-Forwarded-For;\n" + local
    nginx = NginxLua([], extra_http=http, extra_ports=["listen"])
    nginx.start()
    try:
        assert nginx._dir is not None
        conf = Path(nginx._dir.name) / "nginx.conf"
        rules = tmp_path / "rules.yaml"
        expected = UNTRANSLATED.get(name, [])
        result = import_nginx(str(conf), scripts_dir="scripts")
        original = {f"127.0.0.1:{port}": address for address, port in ports.items()}
        listed = [
            _ENDPOINT_LOCAL.sub(lambda m: original[m.group(0)], n.text) for n in result.untranslated
        ]
        assert listed == expected, result.report()
        # each with the file and line it was written at
        assert all(n.file == str(conf) and n.line > 0 for n in result.untranslated)
        code = run_import(str(conf), str(rules), "scripts", partial=bool(expected))
        assert code == 0
        if expected:
            assert run_import(str(conf), str(tmp_path / "strict.yaml"), "scripts") == 1
        assert rules.read_text(encoding="utf-8").endswith("\n")
        router = await RouterProcess.start(
            rules, workers=1, args=("--trusted-proxy", "127.0.0.1"), stderr=sys.stderr
        )
        try:
            serve_port = int(router.url.rsplit(":", 1)[1])
            probes = _from_file(CORPUS / f"{name}.requests.jsonl") + _generated(text)
            differ: list[str] = []
            for probe in probes:
                raw = probe.raw()
                theirs = await asyncio.to_thread(send_raw, nginx.ports["listen"], raw)
                ours = await asyncio.to_thread(send_raw, serve_port, raw)
                seen = observe(theirs, groups, probe), observe(ours, groups, probe)
                if seen[0] != seen[1]:
                    differ.append(
                        f"{probe.method} {probe.target} {list(probe.headers)}\n"
                        f"    nginx: {seen[0]}\n    serve: {seen[1]}"
                    )
            return len(probes), differ
        finally:
            await router.stop()
    finally:
        nginx.stop()


@pytest.mark.parametrize("name", CONFIGS)
async def test_imported_rules_decide_as_nginx(name: str, endpoints: Any, tmp_path: Path) -> None:
    count, differ = await _compare(name, endpoints, tmp_path)
    print(f"{name}: {count - len(differ)} of {count} requests decided as nginx did")
    assert not differ, f"{len(differ)} of {count} differ:\n" + "\n".join(differ[:20])


def test_the_corpus_is_what_the_docs_say() -> None:
    assert len(CONFIGS) >= 8
    for name in CONFIGS:
        assert (CORPUS / f"{name}.requests.jsonl").exists(), name
