"""Shared loopback fixtures: real upstream servers and the real router on 127.0.0.1.

- `backends`: start aiohttp upstreams that answer with their version name and a digest
  of the body they received (and can be told to stall, fail or stream).
- `switchable`: raw upstreams that can be stopped and started on the same port, with a
  health endpoint that can be told to fail.
- `proxy`: the real router (router.proxy.Router) in this test's event loop, on an
  ephemeral port, with a metrics recorder.
- `threaded_proxy`: a backend and the router on an event loop in a thread of their own,
  for synchronous clients (hypothesis drives the router through blocking sockets).
- `raw_upstream`: an upstream on a raw socket that records the exact bytes it received
  on each connection and answers each request (as httptools delimits them) with
  scripted bytes: for the HTTP tests that must see what went on the wire.
- `upstreams`: the demo upstreams v1 and v2 (router.demo).
- `webhooks`: receivers of JSON POSTs (rollout notifications) that keep what they get,
  and can be told to answer 503 or to be slow.
- `serve_router`: `grayroute serve` as a real subprocess (supervisor + workers); `poll`;
  `scrape` reads its /metrics.
- `Traffic`: requests from many users (every 10th the pinned one, PINNED) to a router
  at a bounded rate, until stopped: what a rollout judges; `rollout_rules` the rules of
  such a rollout (v1.1 against v1).
- `tls_ca`: a throw-away certificate authority (trustme) that issues certificates as
  files, and client contexts that trust it; `proxy(..., tls=pairs)` adds a TLS listener.
- `dnsmasq`: a real DNS server (Debian's dnsmasq) on a loopback port, answering for one
  domain from a hosts file that tests rewrite as pods come and go.
- `pods`: upstream servers on distinct loopback addresses (127.0.0.2, 127.0.0.3, ...: on
  Linux all of 127.0.0.0/8 reaches this host) and one port, standing for pods.
- `etcd`: a real etcd (Debian's etcd-server) shared by the session, `etcd_key` a fresh
  key in it per test; `own_etcd`: a private one a test may stop, kill and start again.
- `chromium`: headless Chromium (Debian's chromium + chromium-driver) driven by selenium,
  with a fresh profile; skipped only when the browser or its driver is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
import trustme
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lua_compat.nginx_check import free_ports
from router import native
from router.config import Settings
from router.demo import DemoUpstream, RouterProcess, start_upstream
from router.proxy import Router
from router.rules import load_snapshot_text
from router.server import reuseport_socket
from router.tls import TlsTerminator, load_certificates

ROOT = Path(__file__).resolve().parent.parent


def pytest_report_header() -> str:
    # Compiled or pure, and why (router/native.py): the same tests run against either.
    return f"grayroute build: {native.build_info()}"


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    # The router runs on uvloop in production; test it there.
    return {"uvloop": uvloop.new_event_loop}


# -- upstreams -------------------------------------------------------------------------
@dataclass
class Backend:
    """One real upstream server; `seen` counts the requests that reached it.

    It can be told to misbehave on every request, as a bad release would: answer
    `fail_status` to exactly `fail_ratio` of them (every 1/ratio-th, not at random, so a
    test knows the rate), and wait `delay` seconds before each answer."""

    version: str
    port: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    host: str = "127.0.0.1"
    fail_ratio: float = 0.0
    fail_status: int = 503
    delay: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


def _backend_app(backend: Backend) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        info = {
            "version": backend.version,
            "host": backend.host,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_sha256": digest.hexdigest(),
            "body_bytes": size,
        }
        backend.seen.append(info)
        n, ratio = len(backend.seen), backend.fail_ratio
        if backend.delay:
            await asyncio.sleep(backend.delay)
        if ratio and int(n * ratio) > int((n - 1) * ratio):
            return web.Response(status=backend.fail_status, headers={"X-Version": backend.version})
        q = request.query
        if "sleep" in q:
            await asyncio.sleep(float(q["sleep"]))
        if "status" in q:
            return web.Response(status=int(q["status"]), headers={"X-Version": backend.version})
        if "stream_bytes" in q:
            # A large chunked response, written piece by piece.
            resp = web.StreamResponse(headers={"X-Version": backend.version})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            left = int(q["stream_bytes"])
            piece = b"x" * 65536
            while left > 0:
                await resp.write(piece[: min(left, len(piece))])
                left -= len(piece)
            await resp.write_eof()
            return resp
        return web.json_response(info, headers={"X-Version": backend.version})

    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Any]]:
    """`await backends("v1", "v2")` starts one real upstream per version name."""
    runners: list[web.AppRunner] = []

    async def start(*versions: str) -> list[Backend]:
        started = []
        for version in versions:
            backend = Backend(version)
            runner = web.AppRunner(_backend_app(backend), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            backend.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            runners.append(runner)
            started.append(backend)
        return started

    yield start
    for runner in runners:
        await runner.cleanup()


class Switchable:
    """A raw upstream on a port it keeps: stopped, its port refuses connections; started
    again, it accepts on the same port. `healthy` decides what GET /healthz answers; every
    other request gets 200 with `X-Version: NAME` and is counted in `requests`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.healthy = True
        self.requests = 0
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):  # keep-alive connections end too
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /healthz "):
                    status = b"200 OK" if self.healthy else b"503 Service Unavailable"
                else:
                    self.requests += 1
                    status = b"200 OK"
                body = self.name.encode()
                writer.write(
                    b"HTTP/1.1 %b\r\nX-Version: %b\r\nContent-Length: %d\r\n\r\n%b"
                    % (status, body, len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def switchable() -> AsyncIterator[Callable[[str], Awaitable[Switchable]]]:
    """`await switchable("v1")` starts a Switchable upstream; stopped at teardown."""
    started: list[Switchable] = []

    async def start(name: str) -> Switchable:
        up = Switchable(name)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


# -- a raw-socket upstream ----------------------------------------------------------------
RAW_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


Answer = Callable[[int, int], bytes | None]


@dataclass
class RawUpstream:
    """`received[i]`: every byte connection i brought, in order. `answer(conn, n)` gives
    the bytes sent back when the n-th request (1-based) on connection `conn` (1-based)
    is complete; None closes the connection instead."""

    answer: Answer
    port: int = 0
    received: list[bytearray] = field(default_factory=list)
    requests: int = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def all_bytes(self) -> bytes:
        return b"".join(self.received)


class _RawUpstreamConnection(asyncio.Protocol):
    def __init__(self, upstream: RawUpstream) -> None:
        self.upstream = upstream
        upstream.received.append(bytearray())
        self.number = len(upstream.received)
        self.served = 0
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.upstream.received[self.number - 1] += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        self.served += 1
        self.upstream.requests += 1
        reply = self.upstream.answer(self.number, self.served)
        assert self.transport is not None
        if reply is None:
            self.transport.close()
        else:
            self.transport.write(reply)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Awaitable[RawUpstream]]]:
    """`await raw_upstream(answer=lambda conn, n: RAW_OK)` starts one; closed at teardown."""
    servers: list[asyncio.AbstractServer] = []

    async def start(answer: Answer = lambda c, n: RAW_OK) -> RawUpstream:
        upstream = RawUpstream(answer)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RawUpstreamConnection(upstream), "127.0.0.1", 0)
        upstream.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return upstream

    yield start
    for server in servers:
        server.close()


# -- the router in this process ------------------------------------------------------------
class RecordingMetrics:
    """Counts what the proxy (and router.tls, router.tunnel) reports, for assertions."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.fallbacks: Counter[tuple[str, str]] = Counter()
        self.judged: Counter[tuple[str, str, bool]] = Counter()  # (route, upstream, failed)
        self.handshakes: Counter[tuple[str, str]] = Counter()
        self.handshake_failures: Counter[str] = Counter()
        self.tunnels_opened: Counter[str] = Counter()
        self.tunnels_closed: Counter[tuple[str, str]] = Counter()

    def request_done(self, route: str, upstream: str, status: int, seconds: float) -> None:
        self.requests[(route, upstream, status)] += 1

    def upstream_error(self, upstream: str, kind: str) -> None:
        self.errors[(upstream, kind)] += 1

    def fell_back(self, upstream: str, fallback: str) -> None:
        self.fallbacks[(upstream, fallback)] += 1

    def split_done(self, route: str, upstream: str, failed: bool, seconds: float) -> None:
        self.judged[(route, upstream, failed)] += 1

    def tls_handshake(self, certificate: str, version: str) -> None:
        self.handshakes[(certificate, version)] += 1

    def tls_handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] += 1

    def tunnel_opened(self, upstream: str) -> None:
        self.tunnels_opened[upstream] += 1

    def tunnel_closed(self, upstream: str, reason: str) -> None:
        self.tunnels_closed[(upstream, reason)] += 1


@dataclass
class RunningProxy:
    router: Router
    metrics: RecordingMetrics
    server: asyncio.AbstractServer
    port: int
    tls: TlsTerminator | None = None
    tls_server: asyncio.AbstractServer | None = None
    tls_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reload(self, rules_yaml: str) -> None:
        self.router.install(load_snapshot_text(textwrap.dedent(rules_yaml), "rules.yaml"))


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[..., Any]]:
    """`await proxy(rules_yaml, **settings)` runs the real Router in this event loop."""
    running: list[RunningProxy] = []

    async def start(
        rules_yaml: str, tls: list[tuple[str, str]] | None = None, **settings: Any
    ) -> RunningProxy:
        snapshot = load_snapshot_text(textwrap.dedent(rules_yaml), "rules.yaml")
        metrics = RecordingMetrics()
        config = Settings(**settings)
        router = Router(config, snapshot, metrics)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(router.protocol_factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rp = RunningProxy(router, metrics, server, port)
        running.append(rp)
        if tls:
            rp.tls = TlsTerminator(load_certificates(tls), tls, metrics, config.header_timeout)
            sock = reuseport_socket("127.0.0.1", 0)
            sock.setblocking(False)
            rp.tls_server = await rp.tls.serve(sock, router.https_protocol_factory, 100)
            rp.tls_port = sock.getsockname()[1]
        return rp

    yield start
    for rp in running:
        rp.server.close()
        if rp.tls_server is not None:
            rp.tls_server.close()
        if rp.tls is not None:
            rp.tls.close()
        await rp.router.drain(0.5)
        await rp.server.wait_closed()


class ThreadedProxy:
    """A backend and the router serving from a thread; errors they log are collected."""

    def __init__(self, rules_template: str, **settings: Any) -> None:
        self.rules_template = rules_template
        self.settings = settings
        self.backend = Backend("v1")
        self.metrics = RecordingMetrics()
        self.port = 0
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="threaded-proxy", daemon=True)

    def __enter__(self) -> ThreadedProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("threaded proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(
            lambda _loop, ctx: self.errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}")
        )
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(_backend_app(self.backend), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.backend.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        rules = textwrap.dedent(self.rules_template.format(v1=self.backend.endpoint))
        router = Router(
            Settings(**self.settings), load_snapshot_text(rules, "rules.yaml"), self.metrics
        )
        server = await asyncio.get_running_loop().create_server(
            router.protocol_factory, "127.0.0.1", 0
        )
        self.port = server.sockets[0].getsockname()[1]
        handler = _ErrorCollector(self.errors)
        logging.getLogger("grayroute").addHandler(handler)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            logging.getLogger("grayroute").removeHandler(handler)
            server.close()
            await router.drain(0.5)
            await runner.cleanup()


class _ErrorCollector(logging.Handler):
    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(self.format(record))


@pytest.fixture
def threaded_proxy() -> Callable[..., ThreadedProxy]:
    """`with threaded_proxy(rules_template, **settings) as tp:`; `{v1}` is the backend."""
    return ThreadedProxy


# -- webhook receivers ------------------------------------------------------------------------
class Webhook:
    """A real receiver of JSON POSTs on /hook; `got` keeps every body it accepted."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.fail_first = 0  # answer 503 to this many POSTs first
        self.delay = 0.0  # seconds before each answer
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503)
        self.got.append(await request.json())
        return web.Response(text="ok")


@pytest.fixture
async def webhooks() -> AsyncIterator[Callable[[], Awaitable[Webhook]]]:
    """`await webhooks()` starts one more receiver; its URL is `.url`."""
    runners: list[web.AppRunner] = []

    async def start() -> Webhook:
        hook = Webhook()
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        hook.url = f"http://127.0.0.1:{port}/hook"
        runners.append(runner)
        return hook

    yield start
    for runner in runners:
        await runner.cleanup()


# -- the router as a real process ---------------------------------------------------------
Serve = Callable[..., Awaitable[RouterProcess]]


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, DemoUpstream]]:
    """The demo upstreams `v1` and `v2` (router.demo), on ephemeral ports."""
    ups = {name: await start_upstream(name) for name in ("v1", "v2")}
    yield ups
    for up in ups.values():
        await up.close()


@pytest.fixture
async def serve_router(tmp_path: Path) -> AsyncIterator[Serve]:
    """`await serve_router(rules_path, workers=2, args=())` runs `grayroute serve` for real;
    stopped (SIGTERM, then SIGKILL) at teardown, its log printed (shown when a test fails)."""
    started: list[RouterProcess] = []
    log = tmp_path / "router.log"

    async def start(rules: Path, workers: int = 2, args: tuple[str, ...] = ()) -> RouterProcess:
        with open(log, "ab") as stderr:
            router = await RouterProcess.start(rules, workers=workers, args=args, stderr=stderr)
        started.append(router)
        return router

    yield start
    for router in started:
        await router.stop(timeout=10)
    if log.exists():
        print(log.read_text())


async def scrape(client: httpx.AsyncClient, router: RouterProcess) -> dict[tuple[str, ...], float]:
    """/metrics as {(sample name, label=value, ...): value}."""
    resp = await client.get(f"{router.admin_url}/metrics")
    assert resp.status_code == 200
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            key = (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items())))
            out[key] = s.value
    return out


async def poll(check: Callable[[], Awaitable[Any]], timeout: float = 8.0) -> Any:
    """Call `check` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


async def until(check: Callable[[], object], timeout: float = 8.0) -> None:
    """`poll` for a plain (not awaitable) condition, e.g. a counter the router updates."""

    async def probe() -> object:
        return check()

    await poll(probe, timeout)


# -- traffic -------------------------------------------------------------------------------
PINNED = "10086"  # the user the rollout tests' rules pin to the stable version


ROLLOUT_RULES = """\
format: 1
upstreams:
  v1: {{endpoints: ["{v1}"]}}
  v1.1: {{endpoints: ["{v11}"]}}
user_id:
  - header: X-User-Id
routes:
  - name: orders
    pins:
      - {{to: v1, users: ["{pinned}"]}}
    split: {{v1: 100, v1.1: 0}}
    rollout:
      canary: v1.1
      stable: v1
      steps: {steps}
      interval: {interval}
      min_requests: {min_requests}
      max_nodata: {max_nodata}
      failures: 2
{notify}{gates}"""


def rollout_rules(
    v1: Backend,
    v11: Backend,
    hook: str = "",
    steps: str = "[50, 100]",
    interval: str = "2s",
    max_nodata: int = 1000,
    min_requests: int = 40,
    gates: str = "",
) -> str:
    """Rules with a rollout of v1.1 against v1 on the route `orders` (PINNED pinned to v1);
    `gates`, e.g. "{latency: {min_increase: 1s}}", replaces the default gates."""
    return ROLLOUT_RULES.format(
        v1=v1.endpoint,
        v11=v11.endpoint,
        pinned=PINNED,
        notify=f'      notify: ["{hook}"]\n' if hook else "",
        steps=steps,
        interval=interval,
        max_nodata=max_nodata,
        min_requests=min_requests,
        gates=f"      gates: {gates}\n" if gates else "",
    )


class Traffic:
    """Requests from many users (every 10th the pinned one) at a bounded rate, until
    stopped; a lean keep-alive client, so that the test's own side is not what limits
    the rate on a busy machine."""

    def __init__(
        self, url: str, rate: float = 200.0, concurrency: int = 8, pin_every: int = 10
    ) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)
        self.rate = rate
        self.concurrency = concurrency
        self.pin_every = pin_every
        self.sent = 0
        self.pinned_answers: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.concurrency)))

    async def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        pause = self.concurrency / self.rate
        writer: asyncio.StreamWriter | None = None
        try:
            while True:
                started = loop.time()
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                pinned = self.pin_every and self.sent % self.pin_every == 0
                user = PINNED if pinned else str(rng.randrange(1_000_000))
                self.sent += 1
                writer.write(
                    b"GET /orders HTTP/1.1\r\nHost: t\r\nX-User-Id: %b\r\n\r\n" % user.encode()
                )
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    fields = dict(
                        line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
                    )
                    await reader.readexactly(int(fields.get(b"Content-Length", b"0")))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    writer.close()
                    writer = None
                    continue
                if user == PINNED:
                    self.pinned_answers.append(fields.get(b"X-Version", b"").decode())
                if fields.get(b"Connection") == b"close":
                    writer.close()
                    writer = None
                await asyncio.sleep(max(0.0, pause - (loop.time() - started)))
        finally:
            if writer is not None:
                writer.close()


# -- TLS ---------------------------------------------------------------------------------
class LocalCA:
    """A certificate authority of this test only; certificates are written as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cafile = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self._issued = 0

    def issue(self, *names: str, directory: Path | None = None) -> tuple[str, str]:
        """(certificate file, key file) for `names` (DNS names, `*.` wildcards)."""
        self._issued += 1
        where = directory or self.dir
        where.mkdir(parents=True, exist_ok=True)
        leaf = self.ca.issue_cert(*names)
        cert = where / f"cert{self._issued}.pem"
        key = where / f"key{self._issued}.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def tls_ca(tmp_path: Path) -> LocalCA:
    return LocalCA(tmp_path / "pki")


# -- DNS and pods ----------------------------------------------------------------------------
DNS_DOMAIN = "pods.test"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"  # sbin: not on every user's PATH


class Dnsmasq:
    """Debian's dnsmasq on 127.0.0.1:`port`, authoritative for DNS_DOMAIN from a hosts file.

    `await set(label, *addresses)` rewrites the file, reloads (SIGHUP) and returns once the
    server answers with the new records; no addresses removes the name (NXDOMAIN, thanks to
    --local; without it a removed name answers REFUSED). `pause()`/`resume()` stop and
    continue the process: meanwhile nobody answers, so lookups time out.
    """

    def __init__(self, workdir: Path) -> None:
        self.hosts = workdir / "dns-hosts"
        self.log = workdir / "dnsmasq.log"
        self.records: dict[str, tuple[str, ...]] = {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def resolver(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def name(label: str) -> str:
        return f"{label}.{DNS_DOMAIN}"

    def start(self) -> None:
        self._write()
        for _ in range(5):  # the free port found may be taken before dnsmasq binds it
            self.port = _free_udp_port()
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        DNSMASQ, "--no-daemon", "--conf-file=/dev/null",
                        f"--port={self.port}", "--listen-address=127.0.0.1",
                        "--bind-interfaces", "--no-resolv", "--no-hosts",
                        f"--addn-hosts={self.hosts}", f"--local=/{DNS_DOMAIN}/",
                        "--local-ttl=1", "--pid-file=", "--log-facility=-",
                        # stay who we are: the hosts file is re-read on SIGHUP, from a
                        # directory only we may read
                        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
                    ],
                    stdout=log,
                    stderr=log,
                )  # fmt: skip
            if self._wait_answering():
                return
            self.stop()
        raise AssertionError(f"dnsmasq did not start: {self.log.read_text()[-2000:]}")

    def _wait_answering(self) -> bool:
        import dns.message
        import dns.query

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            query = dns.message.make_query(self.name("probe"), "A")
            with contextlib.suppress(Exception):
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
                return True
            time.sleep(0.05)
        return False

    def _write(self) -> None:
        lines = [f"{a} {self.name(label)}" for label, addrs in self.records.items() for a in addrs]
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.hosts)

    async def set(self, label: str, *addresses: str) -> None:
        import dns.asyncquery
        import dns.message
        import dns.rcode

        if addresses:
            self.records[label] = addresses
        else:
            self.records.pop(label, None)
        self._write()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        want = sorted(a for a in addresses if ":" not in a)

        async def answers() -> bool:
            query = dns.message.make_query(self.name(label), "A")
            try:
                reply = await dns.asyncquery.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
            except Exception:
                return False
            if not addresses:
                return reply.rcode() == dns.rcode.NXDOMAIN
            got = sorted(rr.address for rrset in reply.answer for rr in rrset)
            return reply.rcode() == dns.rcode.NOERROR and got == want

        await poll(answers, timeout=10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused process would not act on SIGTERM
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _free_udp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    """A running dnsmasq for DNS_DOMAIN (see Dnsmasq); stopped by its pid at teardown."""
    server = Dnsmasq(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pods() -> AsyncIterator[Callable[..., Awaitable[list[Backend]]]]:
    """`await pods("canary", ["127.0.0.20", "127.0.0.21"], port)` starts one upstream per
    address, all on `port` (0: a free one, then the same for every later call), each
    answering as the `backends` fixture's do, with its version and its host."""
    runners: list[web.AppRunner] = []
    chosen = {"port": 0}

    async def start(version: str, hosts: list[str], port: int = 0) -> list[Backend]:
        port = port or chosen["port"]
        started = []
        for host in hosts:
            backend = Backend(version, port, host=host)
            runner = web.AppRunner(_backend_app(backend), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            runners.append(runner)
            server = site._server
            assert server is not None
            port = backend.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            chosen["port"] = port
            started.append(backend)
        return started

    yield start
    for runner in runners:
        await runner.cleanup()


# -- etcd ----------------------------------------------------------------------------------
class EtcdServer:
    """A real etcd on two loopback ports with its own data directory; stopped by its pid.

    `stop()` and `start()` again keep the ports and the data (etcd down, etcd back).
    With `tls` (certificate file, key file, CA file) clients must speak TLS.
    """

    def __init__(self, data_dir: Path, tls: tuple[str, str, str] | None = None) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.tls = tls

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, key: str) -> str:
        return f"etcd://{self.endpoint}{key}"

    def start(self, timeout: float = 20.0) -> None:
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = ["--cert-file", self.tls[0], "--key-file", self.tls[1]] if self.tls else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary, "--name", "test", "--data-dir", str(self.data_dir),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"test={peer}",
                    "--logger", "zap", "--log-level", "error", *tls,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_healthy(client, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, client: str, timeout: float) -> None:
        assert self.proc is not None
        verify = ssl.create_default_context(cafile=self.tls[2]) if self.tls else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}): {self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(f"{client}/health", timeout=1.0, verify=verify)
                if answer.json().get("health") == "true":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not become healthy within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole session; tests keep to their own keys (`etcd_key`)."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_key(etcd: EtcdServer, request: pytest.FixtureRequest) -> str:
    """A key of this test's own in the shared etcd, e.g. /t/test_push_3f2a/rules."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    return f"/t/{name}_{os.urandom(3).hex()}/rules"


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd this test may stop, kill and start again."""
    server = EtcdServer(tmp_path / "etcd-data")
    server.start()
    yield server
    server.stop()


# -- a real browser ----------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def spki_sha256(cert_file: str) -> str:
    """base64 sha256 of a certificate's public key: what Chromium's
    --ignore-certificate-errors-spki-list trusts (that key only, not every error)."""
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`chromium(trust=[cert_file], hosts={"app.test": "127.0.0.1"})`: a headless Chromium
    WebDriver with a fresh profile that trusts those certificates' keys and resolves those
    names; quit at teardown. Its calls block: from an async test, run them with
    `asyncio.to_thread` so the servers in the test's event loop can answer the browser."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def start(trust: tuple[str, ...] = (), hosts: dict[str, str] | None = None) -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        profile = tmp_path / f"chromium-profile-{len(drivers)}"
        for flag in (
            "--headless",
            "--no-sandbox",  # tests run as root
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
        ):
            options.add_argument(flag)
        if trust:
            # honoured only with --user-data-dir: trusts these keys, not every error
            spkis = ",".join(spki_sha256(cert) for cert in trust)
            options.add_argument(f"--ignore-certificate-errors-spki-list={spkis}")
        if hosts:
            rules = ",".join(f"MAP {name} {address}" for name, address in hosts.items())
            options.add_argument(f"--host-resolver-rules={rules}")
        service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(30)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()
