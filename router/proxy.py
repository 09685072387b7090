"""THE HOT PATH: one client connection, top to bottom.

    bytes from the client
      -> httptools parses the request line and headers        (HttpProxyProtocol.on_*)
      -> a small RequestView of what the rules look at        (_start)
      -> decide(snapshot, view), holding up to body_limit bytes of the body first
         only when the matched route reads the user ID from the body
      -> an idle keep-alive connection from the upstream pool, or a new one
      -> the request head (hop-by-hop headers removed, X-Forwarded-* set) and the body,
         streamed with flow control both ways                  (_send_request)
      -> the response head and body streamed back              (response_*)
      -> the upstream connection back to the pool, metrics counted, the next
         pipelined request served                              (_finish)

A WebSocket upgrade is routed like any request and forwarded with its Upgrade; when the
upstream answers 101, both connections are handed to router.tunnel (upstream_switched).

Everything that can be computed once is computed when the rules are installed
(`Router.install`) or once a second (`Router._tick`: the Date header, idle and slow-header
connections), never per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol, cast, final

import httptools

from router.errors import (
    BadRequestError,
    BodyTooLarge,
    ExpectationFailed,
    HeadersTooLarge,
    HeaderTimeout,
    InternalError,
    MethodNotAllowed,
    NoEndpoints,
    NoRouteError,
    ProxyError,
    TargetTooLong,
    TooManyTunnels,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from router.rules import (
    decide,
    keep_header,
    parse_target,
    request_view,
    route_host,
    wire_bytes,
)
from router.tunnel import TunnelMetrics, Tunnels
from router.upstream import (
    FRAMING_LENGTH,
    FRAMING_NONE,
    HOP_BY_HOP,
    UpstreamConnection,
    UpstreamPool,
)

if TYPE_CHECKING:
    from router.config import Settings
    from router.rules import CompiledRoute, Decision, RequestView, Snapshot

log = logging.getLogger("grayroute.proxy")

# The clock of timeouts and request durations, read a few times per request. A Final:
# compiled, it is a C static, not an attribute looked up on the time module per call.
_monotonic: Final = time.monotonic


class WorkerMetrics(TunnelMetrics, Protocol):
    def request_done(self, route: str, upstream: str, status: int, seconds: float) -> None: ...

    def upstream_error(self, upstream: str, kind: str) -> None: ...

    def fell_back(self, upstream: str, fallback: str) -> None: ...

    def split_done(self, route: str, upstream: str, failed: bool, seconds: float) -> None: ...


class AccessLog(Protocol):
    """One line per answered request; must buffer (it is called on the hot path)."""

    def log(
        self,
        client_ip: str,
        method: bytes,
        target: bytes,
        host: bytes | None,
        status: int,
        seconds: float,
        route: str,
        decision: Decision | None,
        traceparent: bytes | None = None,
        sw8: bytes | None = None,
    ) -> None: ...


# Request headers the proxy handles itself instead of forwarding as they are.
_H_FORWARD: Final = 0
_H_HOST: Final = 1
_H_LENGTH: Final = 2
_H_TE: Final = 3
_H_EXPECT: Final = 4
_H_CONNECTION: Final = 5
_H_XFF: Final = 6
_H_XFP: Final = 7
_H_DROP: Final = 8  # not forwarded (hop-by-hop), still seen by Lua routes as in nginx
_H_UPGRADE: Final = 9  # an Upgrade offer: kept aside, never forwarded as it is
_H_IGNORE: Final = 10  # not a header at all for us (a name with `_`, as nginx ignores it)
_H_TRACEPARENT: Final = 11  # trace context (W3C, SkyWalking): forwarded as it is, kept
_H_SW8: Final = 12  # for the access log's trace ID
_HEADER_INFO_CACHE_SIZE: Final = 512
_SPECIAL_REQUEST_HEADERS: Final[dict[bytes, int]] = {
    b"host": _H_HOST,
    b"content-length": _H_LENGTH,
    b"transfer-encoding": _H_TE,
    b"expect": _H_EXPECT,
    b"connection": _H_CONNECTION,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_XFP,
    **{name: _H_DROP for name in HOP_BY_HOP if name not in (b"connection", b"transfer-encoding")},
    b"proxy-authorization": _H_DROP,
    b"upgrade": _H_UPGRADE,
    # Belongs to an h2c Upgrade offer, which is this connection's only (RFC 9113 3.2.1).
    b"http2-settings": _H_DROP,
    b"traceparent": _H_TRACEPARENT,
    b"sw8": _H_SW8,
}
# header_count of a request once its head is parsed: past every limit, so that the
# limit check on_header already makes also catches trailer fields (see on_header).
_TRAILERS: Final = 1 << 62

# Refused before routing: CONNECT (this is no forward proxy) and, unless allowed, TRACE
# (nginx answers it 405: it would echo credentials back to a script).
_CONNECT_REFUSED: Final = "CONNECT is not supported: this is a reverse proxy"
_TRACE_REFUSED: Final = "TRACE is not allowed (grayroute serve --allow-trace)"

# Distinct Host values whose routing form is remembered (Router.host_names).
_HOST_CACHE_SIZE: Final = 512

# Safe to send again when a reused keep-alive connection turns out to be closed.
_IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_CRLF: Final = b"\r\n"
# X-Forwarded-Proto as each kind of listener sets it (chosen per connection).
FORWARDED_HTTP: Final = b"X-Forwarded-Proto: http\r\n"
FORWARDED_HTTPS: Final = b"X-Forwarded-Proto: https\r\n"
_STATUS_LINES: Final = {
    s.value: b"HTTP/1.1 %d %b\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"

# Request states.
_ROUTING: Final = 0
_READING_BODY: Final = 1
_CONNECTING: Final = 2
_STREAMING: Final = 3
_DONE: Final = 4

# Why reading from the client is paused (bit flags: reading resumes when none is left).
_PAUSE_PIPELINE: Final = 1  # a pipelined request waits for the one before it
_PAUSE_UPSTREAM_FULL: Final = 2  # the upstream's write buffer is full
_PAUSE_BUFFER_FULL: Final = 4  # body bytes are held while routing or connecting
_PAUSE_DONE: Final = 8  # the connection's last request was read: nothing more ever is

# Body bytes held per request before reading from the client pauses (beyond body_limit).
_HOLD_CAP: Final = 256 * 1024

# A chunked body is held this far before anything goes upstream, so that a malformed
# small chunked request never reaches an upstream half-parsed. A bad chunk further on
# aborts the upstream connection: the upstream sees a truncated request, never a
# complete wrong one.
_CHUNKED_HOLD: Final = 16 * 1024

# Seconds idle keep-alive connections stay open after a drain starts (see Router.drain).
_DRAIN_IDLE_GRACE: Final = 1.0

# The router's clock for timeouts: upstream read timeouts are checked every _TICK
# seconds (so they fire up to that late), client timeouts once a second.
_TICK: Final = 0.1
_TICKS_PER_SECOND: Final = 10

# Client framing of the response body.
_TO_CLIENT_NONE: Final = 0
_TO_CLIENT_RAW: Final = 1
_TO_CLIENT_CHUNKED: Final = 2


@final
class _HeaderInfo:
    """What a request header name, as a client spells it, means to the proxy: its _H_*
    kind, and the name the rules know it by (None: no rule reads it). An object, not a
    tuple: compiled, a tuple taken from a dict is unpacked into a C struct, and boxed
    again to be tested."""

    __slots__ = ("key", "kind")

    def __init__(self, kind: int, key: str | None) -> None:
        self.kind = kind
        self.key = key


class Router:
    """Per-worker state shared by every client connection: rules, pools, metrics."""

    def __init__(
        self,
        settings: Settings,
        snapshot: Snapshot,
        metrics: WorkerMetrics,
        access_log: AccessLog | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.access_log = access_log
        self.snapshot = snapshot
        self.pools: dict[str, UpstreamPool] = {}
        self.wanted_headers: frozenset[bytes] = frozenset()
        self.connections: set[HttpProxyProtocol] = set()
        # Connections whose request waits on an upstream: the ticker checks their read
        # timeout (a timer per request costs more than the request's own routing).
        self.awaiting_upstream: set[HttpProxyProtocol] = set()
        self.draining = False
        self.date_header = b""
        self.trusted_networks = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies
        )
        # Valid Host values as received -> the host routes match (RFC 9112 3.2): checked
        # once per distinct value; kept across reloads (no rule changes what a host is).
        self.host_names: dict[bytes, str] = {}
        self.normalize_paths = settings.normalize_paths
        # Limits checked on every request or header: fields of this (compiled) class, not
        # attribute lookups on the settings object.
        self.max_target_bytes = settings.max_target_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.max_header_count = settings.max_header_count
        self.max_body_bytes = settings.max_body_bytes
        self.refused_methods: dict[bytes, tuple[type[ProxyError], str]] = {
            b"CONNECT": (BadRequestError, _CONNECT_REFUSED)
        }
        if not settings.allow_trace:
            self.refused_methods[b"TRACE"] = (MethodNotAllowed, _TRACE_REFUSED)
        self.keepalive_requests = settings.keepalive_requests or 1 << 62
        # Body bytes held before routing a request whose body is not read by its route
        # (chunked ones always some, so that a small malformed one reaches no upstream).
        self.hold_length = settings.request_buffer_bytes
        self.hold_chunked = max(settings.request_buffer_bytes, _CHUNKED_HOLD)
        # WebSocket connections after their 101 (router.tunnel).
        self.tunnels = Tunnels(metrics, settings.tunnel_idle_timeout, settings.max_tunnels)
        self._ticker: asyncio.Task[None] | None = None
        self._refresh_date()
        self.install(snapshot)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started by the first connection instead
        self._start_background()

    def _start_background(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        for pool in self.pools.values():
            pool.start_health_checks()

    def install(self, snapshot: Snapshot) -> None:
        """Swap in new rules whole; pools whose upstream did not change are kept, and so
        are pools whose endpoints alone changed (with their connections to those that stay)."""
        pools: dict[str, UpstreamPool] = {}
        for name, spec in snapshot.upstreams.items():
            old = self.pools.get(name)
            if old is not None and old.follow(spec, self.settings):
                pools[name] = old
            else:
                pools[name] = UpstreamPool(spec, self.settings)
        for name, old in self.pools.items():
            if pools.get(name) is not old:
                old.close()
        for name, pool in pools.items():
            pool.fallbacks = tuple(pools[n] for n in snapshot.fallbacks.get(name, ()))
        if self._ticker is not None:  # running: health checks of new pools start now
            for pool in pools.values():
                pool.start_health_checks()
        self.wanted_headers = snapshot.header_keys
        if not self.settings.underscores_in_headers:
            for name in sorted(n for n in snapshot.header_names if "_" in n):
                log.warning(
                    "the rules read header %s, whose name has '_': such headers are dropped "
                    "(grayroute serve --underscores-in-headers keeps them)",
                    name,
                )
        # What each header name means, learnt once per spelling instead of lower-casing
        # every name of every request; reset with the rules (they decide what is wanted).
        self.header_info: dict[bytes, _HeaderInfo] = {}
        self.matches_hosts = snapshot.uses_host
        # Lua routes see every header as nginx does (repeated ones, framing headers too).
        self.keeps_raw_headers = snapshot.wants_raw_headers
        self.snapshot = snapshot
        self.pools = pools

    def learn_header(self, name: bytes) -> _HeaderInfo:
        lname = name.lower()
        if b"_" in name and not self.settings.underscores_in_headers:
            # nginx's underscores_in_headers off: `X_User_Id` could otherwise pass for
            # `X-User-Id` at an upstream that maps both to one variable (CGI, WSGI).
            info = _HeaderInfo(_H_IGNORE, None)
        else:
            info = _HeaderInfo(
                _SPECIAL_REQUEST_HEADERS.get(lname, _H_FORWARD),
                lname.decode("latin-1") if lname in self.wanted_headers else None,
            )
        if len(self.header_info) < _HEADER_INFO_CACHE_SIZE:
            self.header_info[name] = info
        return info

    def learn_host(self, value: bytes) -> str:
        """The host routes match for a Host value not seen before; 400 when invalid."""
        host = route_host(value)
        if host is None:
            raise BadRequestError(f"invalid Host {value.decode('latin-1')!r}")
        if len(self.host_names) < _HOST_CACHE_SIZE:
            self.host_names[value] = host
        return host

    def protocol_factory(self) -> HttpProxyProtocol:
        if self._ticker is None:
            self._start_background()
        return HttpProxyProtocol(self)

    def https_protocol_factory(self) -> HttpProxyProtocol:
        """For TLS listeners (router.tls): the same protocol, forwarded as https."""
        if self._ticker is None:
            self._start_background()
        return HttpProxyProtocol(self, FORWARDED_HTTPS)

    async def drain(self, timeout: float) -> None:
        """Finish requests in flight (up to `timeout`), then close everything.

        Every answer from now on says `Connection: close`, and no new WebSocket tunnel is
        opened. Idle keep-alive connections
        are left open for a short grace first: a client may have just sent a request on
        one, and closing under it would fail that request; within the grace it gets
        its answer, with `Connection: close`, instead.
        """
        self.draining = True
        started = _monotonic()
        deadline = started + timeout
        grace_ends = started + min(_DRAIN_IDLE_GRACE, timeout / 2)
        # Tunnels have no request to end with: they get the whole timeout, then are cut.
        while (self.connections or self.tunnels.open) and _monotonic() < deadline:
            if _monotonic() >= grace_ends:
                for conn in list(self.connections):
                    conn.close_if_idle()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self.tunnels.close_all()
        for pool in self.pools.values():
            pool.close()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _refresh_date(self) -> None:
        self.date_header = b"Date: " + formatdate(usegmt=True).encode() + _CRLF

    async def _tick(self) -> None:
        """Every 0.1 s: upstream read timeouts. Every second: the Date header, and client
        connections idle or slow for too long."""
        ticks = 0
        while True:
            await asyncio.sleep(_TICK)
            now = _monotonic()
            for conn in list(self.awaiting_upstream):
                conn.check_read_timeout(now)
            ticks += 1
            if ticks % _TICKS_PER_SECOND == 0:
                self._refresh_date()
                for conn in list(self.connections):
                    conn.check_timeouts(now)
                if self.tunnels.open:
                    self.tunnels.check_idle(now)


class _Request:
    """One request on a client connection, from its first byte to its last answer byte."""

    __slots__ = (
        "body_held",
        "body_parts",
        "body_total",
        "chunked",
        "client_ip",
        "complete",
        "conn",
        "connect_task",
        "connection_tokens",
        "content_length",
        "continue_sent",
        "decision",
        "expect_continue",
        "has_body",
        "head_bytes",
        "head_done",
        "header_count",
        "headers",
        "hold_limit",
        "host",
        "http11",
        "keep_alive",
        "match_host",
        "method",
        "path",
        "pools",
        "query",
        "raw_headers",
        "reads_body",
        "response_started",
        "retried",
        "route",
        "started",
        "state",
        "status",
        "sw8",
        "target",
        "to_client",
        "traceparent",
        "upgrade",
        "url",
        "view",
        "wanted",
        "xff",
        "xfp",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.client_ip = ""
        self.url = b""  # the target as received (logged)
        self.target = b""  # the target forwarded: origin-form
        self.path = ""  # what routes match: normalised (Settings.normalize_paths)
        self.query = ""
        self.match_host = ""  # the Host as routes match it
        self.upgrade: bytes | None = None  # an Upgrade offer (never forwarded as it is)
        self.headers: list[tuple[bytes, bytes]] = []
        self.wanted: dict[str, str] = {}
        self.host: bytes | None = None
        self.content_length: bytes | None = None
        self.chunked = False
        self.expect_continue = False
        self.connection_tokens: bytes | None = None
        self.xff: bytes | None = None
        self.xfp: bytes | None = None
        self.traceparent: bytes | None = None  # the first of each: what the log reads
        self.sw8: bytes | None = None
        self.method = b""
        self.http11 = True
        self.keep_alive = True
        self.has_body = False
        self.head_done = False
        self.complete = False
        self.body_parts: list[bytes] = []
        self.body_held = 0
        self.body_total = 0
        self.head_bytes = 0
        self.header_count = 0
        self.hold_limit = 0
        self.reads_body = False
        self.state = _ROUTING
        self.view: RequestView | None = None
        self.route: CompiledRoute | None = None
        self.decision: Decision | None = None
        self.pools: dict[str, UpstreamPool] = {}
        self.raw_headers: list[tuple[bytes, bytes]] | None = None
        self.conn: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.continue_sent = False
        self.response_started = False
        self.retried = False
        self.status = 0
        self.to_client = _TO_CLIENT_RAW


class HttpProxyProtocol(asyncio.Protocol):
    """One client connection: parse, decide, forward, stream back; pipelining in order."""

    def __init__(self, router: Router, forwarded_proto: bytes = FORWARDED_HTTP) -> None:
        self.router = router
        self.forwarded_proto = forwarded_proto  # the X-Forwarded-Proto line we add
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.peer_trusted = False
        self.parsing: _Request | None = None  # the request whose bytes are being parsed
        self.active: _Request | None = None  # the request being served
        self.waiting: deque[_Request] = deque()  # pipelined requests behind `active`
        self.read_paused = 0
        self.write_paused = False
        self.closed = False
        self.served = 0
        self.unfinished_head = 0  # bytes read while a request head is incomplete
        self.last_activity = self.opened = _monotonic()
        # Requests this connection may still carry (keepalive_requests, keepalive_time).
        self.requests_left = router.keepalive_requests
        # The last request of the connection was parsed (`close`, a limit, or one that
        # could not be parsed): nothing after it is read (RFC 9112 9.6).
        self.reading_done = False
        # A request refused while those before it on the connection are still being
        # answered: its answer waits its turn (RFC 9112 9.3.2), then the connection closes.
        self.rejection: ProxyError | None = None
        # Set while the parser ends a declined Upgrade offer at its head: see
        # _upgrade_offered.
        self.upgrade_body: _Request | None = None
        # A WebSocket offer taken up (_upgrade_offered), and what the client sent after
        # its head: the first bytes of the tunnel if the upstream answers 101.
        self.tunnel_offer: _Request | None = None
        self.tunnel_early = b""
        self._serving_next = False
        # Response bytes produced while one upstream read is handled; written with one
        # send() when it ends (flush_output), not one per head, chunk and terminator.
        self.out: list[bytes] = []

    # -- connection life ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance.
        self.transport = cast("asyncio.Transport", transport)
        if len(self.router.connections) >= self.router.settings.max_connections:
            log.warning(
                "max_connections (%d) reached: closing a new connection",
                self.router.settings.max_connections,
            )
            self.closed = True
            self.transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.peer_ip_bytes = self.peer_ip.encode()
        if self.router.trusted_networks and self.peer_ip:
            self.peer_trusted = _in_networks(self.peer_ip, self.router.trusted_networks)
        self.router.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.router.connections.discard(self)
        req = self.active
        if req is not None and req.state != _DONE:
            self._drop_upstream(req)
            # 499, as nginx logs it: the client went away before the answer was complete.
            self._count(req, 499)
        self.active = None
        self.waiting.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # answered and closing: whatever else the client sent is not read
        self.last_activity = _monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Handled below, outside this block: errors raised while parsing the rest
            # must not carry this exception as their cause.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProxyError):  # raised on purpose by our callbacks
                self._reject(cause)
            elif isinstance(cause, _NotRead):
                self._pause_reading(_PAUSE_DONE)
            else:
                log.error("request handling failed", exc_info=cause)
                self._reject(InternalError("request handling failed"))
            return
        except httptools.HttpParserError as exc:
            if self.reading_done and self.parsing is None:
                # llhttp's own refusal of bytes after `Connection: close`: not read.
                self._pause_reading(_PAUSE_DONE)
                return
            self._reject(BadRequestError(f"malformed request: {_parser_reason(exc)}"))
            return
        else:
            parsing = self.parsing
            if parsing is not None and not parsing.head_done:
                # A head spread over many reads: httptools holds its pieces until it ends.
                self.unfinished_head += len(data)
                if self.unfinished_head > self.router.max_header_bytes:
                    self._reject(HeadersTooLarge("request head too large"))
            return
        self._after_upgrade_offer(data[offset:])

    def pause_writing(self) -> None:
        self.write_paused = True
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.resume_reading()

    def close_if_idle(self) -> None:
        if self.active is None and self.parsing is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def check_timeouts(self, now: float) -> None:
        settings = self.router.settings
        if settings.keepalive_time and now - self.opened > settings.keepalive_time:
            # nginx's keepalive_time: the next request is the connection's last, so that
            # long-lived clients spread again over workers and machines.
            self.requests_left = 0
        active = self.active
        if active is not None:
            # A body we hold before routing that stops coming (upstream timeouts govern
            # the rest of a request in flight).
            if active.state == _READING_BODY and now - self.last_activity > settings.header_timeout:
                self._reject(HeaderTimeout(f"no request body bytes in {settings.header_timeout}s"))
            return
        if self.parsing is not None and not self.parsing.head_done:
            if now - self.parsing.started > settings.header_timeout:
                self._reject(
                    HeaderTimeout(f"no complete request head in {settings.header_timeout}s")
                )
        elif self.parsing is None:
            limit = settings.keepalive_timeout if self.served else settings.header_timeout
            if now - self.last_activity > limit and self.transport is not None:
                self.transport.close()

    # -- httptools callbacks: the request --------------------------------------------
    def on_message_begin(self) -> None:
        if self.reading_done:
            # llhttp would go on parsing (it knows nothing of our limits, nor of the
            # `close` of a request whose Upgrade offer was declined): stop it here.
            raise _NotRead
        # Called while a read is parsed: the request began when that read came.
        self.parsing = req = _Request(self.last_activity)
        if self.router.keeps_raw_headers:
            req.raw_headers = []

    def on_url(self, url: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.url += url
        if len(req.url) > self.router.max_target_bytes:
            raise TargetTooLong(f"request target over {self.router.max_target_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.head_bytes += len(name) + len(value) + 4
        req.header_count += 1
        router = self.router
        if req.header_count > router.max_header_count:
            if req.head_done:
                # A trailer field (after a chunked body): never merged into the header
                # section nor used for routing (RFC 9110 6.5.1); discarded, as nginx does.
                return
            raise HeadersTooLarge(f"more than {router.max_header_count} header fields")
        if req.head_bytes > router.max_header_bytes:
            raise HeadersTooLarge(f"header section over {router.max_header_bytes} bytes")
        if req.raw_headers is not None:
            req.raw_headers.append((name, value))
        info = router.header_info.get(name)
        if info is None:
            info = router.learn_header(name)
        special = info.kind
        if special == _H_FORWARD:
            req.headers.append((name, value))
        elif special == _H_HOST:
            if req.host is not None:
                raise BadRequestError("more than one Host header")
            req.host = value
            req.headers.append((name, value))
        elif special == _H_LENGTH:
            if req.content_length is not None or not value.isdigit():
                raise BadRequestError("repeated or invalid Content-Length")
            req.content_length = value
        elif special == _H_TE:
            if req.chunked or value.strip().lower() != b"chunked":
                raise BadRequestError("only Transfer-Encoding: chunked is accepted")
            req.chunked = True
        elif special == _H_EXPECT:
            if value.strip().lower() != b"100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            req.expect_continue = True
        elif special == _H_CONNECTION:
            # Every Connection line counts (RFC 9110 5.3, 7.6.1), not only the last.
            tokens = value.lower()
            if req.connection_tokens is not None:
                tokens = req.connection_tokens + b"," + tokens
            req.connection_tokens = tokens
        elif special == _H_XFF:
            req.xff = value if req.xff is None else req.xff + b", " + value
        elif special == _H_XFP:
            req.xfp = value
        elif special == _H_UPGRADE:
            req.upgrade = value
        elif special == _H_IGNORE:
            if req.raw_headers is not None:
                req.raw_headers.pop()
            return
        elif special == _H_TRACEPARENT:
            req.headers.append((name, value))
            if req.traceparent is None:
                req.traceparent = value
        elif special == _H_SW8:
            req.headers.append((name, value))
            if req.sw8 is None:
                req.sw8 = value
        key = info.key
        if key is not None:
            keep_header(req.wanted, key, value)

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        req.head_done = True
        req.header_count = _TRAILERS  # fields after this are trailers: see on_header
        self.unfinished_head = 0
        parser = self.parser
        router = self.router
        req.method = method = parser.get_method()
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadRequestError(f"HTTP/{version} is not supported (use HTTP/1.1)")
        req.http11 = version == "1.1"
        self.requests_left -= 1
        if not parser.should_keep_alive() or self.requests_left <= 0:
            req.keep_alive = False
            self.reading_done = True
        refused = router.refused_methods.get(method)
        if refused is not None:
            raise refused[0](refused[1])
        length = req.content_length
        if req.chunked:
            if length is not None:
                raise BadRequestError("both Content-Length and Transfer-Encoding")
            if not req.http11:
                raise BadRequestError("Transfer-Encoding in an HTTP/1.0 request")
        elif length is not None:
            if length[0] == 48 and len(length) > 1:  # leading zeros: forwarded canonical
                req.content_length = length = length.lstrip(b"0") or b"0"
            limit = router.max_body_bytes
            if limit and int(length) > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
        self._target_and_host(req)
        if req.connection_tokens is not None:
            _drop_connection_listed(req)
        req.has_body = req.chunked or (length is not None and length != b"0")
        if req.upgrade is not None and parser.should_upgrade():
            self._upgrade_offered(req)
        if self.active is None and not self.waiting:
            self.active = req
            self._start(req)
        else:
            self.waiting.append(req)
            self._pause_reading(_PAUSE_PIPELINE)

    def _target_and_host(self, req: _Request) -> None:
        """What routes match and what is forwarded, from the target and Host (RFC 9112
        3.2, 3.2.2): Host required in HTTP/1.1 and valid; an absolute-form target's
        authority is the Host, for routing and upstream alike."""
        # The same functions build explain's requests (router.rules.parse_target, route_host).
        try:
            path, query, authority, target = parse_target(req.url, self.router.normalize_paths)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from exc
        if authority is not None:
            # The target's authority is the Host, whatever a Host header says, so that
            # routing and the upstream see the same host.
            req.host = authority
            req.headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
            req.headers.append((b"Host", authority))
        req.target = target
        host = req.host
        if host is None:
            if req.http11:
                raise BadRequestError("HTTP/1.1 request without Host")
        else:
            req.match_host = self.router.host_names.get(host) or self.router.learn_host(host)
        req.path = path
        req.query = query

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        assert req is not None
        if req.chunked:
            req.body_total += len(body)
            limit = self.router.max_body_bytes
            if limit and req.body_total > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
        if req.state == _STREAMING and req is self.active:
            conn = req.conn
            assert conn is not None
            conn.send(b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body)
            return
        req.body_parts.append(body)
        req.body_held += len(body)
        if req.state == _READING_BODY and req is self.active and req.body_held >= req.hold_limit:
            self._route_with_body(req)
            return
        if req.body_held > _HOLD_CAP:
            self._pause_reading(_PAUSE_BUFFER_FULL)

    def on_message_complete(self) -> None:
        req = self.parsing
        assert req is not None
        self.parsing = None
        req.complete = True
        if req is not self.active:
            return
        if req.state == _STREAMING:
            if req.chunked and req.conn is not None:
                req.conn.send(_LAST_CHUNK)
        elif req.state == _READING_BODY:
            self._route_with_body(req)

    # -- Upgrade offers (RFC 9110 7.8) -------------------------------------------------
    def _upgrade_offered(self, req: _Request) -> None:
        """`Connection: upgrade` with `Upgrade: ...` (WebSocket, h2c). A WebSocket offer
        (a GET without a body) is taken up: forwarded with its Upgrade, and tunnelled if
        the upstream answers 101 (upstream_switched); any other answer is served as it is
        and ends the connection. Every other offer (h2c) is declined, as HTTP lets a
        server do, and the request is served as HTTP/1.1 with its body; Upgrade,
        HTTP2-Settings and what Connection names are not forwarded.

        llhttp ends such a request at its head and would take its body for the new
        protocol: with a Content-Length of 36, the next 36 bytes could be a request
        smuggled past routing. A declined offer's body is read as the body
        (_after_upgrade_offer); until then the early end of the message lands on a
        stand-in request.
        """
        if _is_websocket_offer(req) and not self.router.draining:
            if not self.router.tunnels.has_room():
                if self.router.tunnels.max_open:
                    raise TooManyTunnels("too many WebSocket connections (--max-tunnels)")
            else:
                self.tunnel_offer = req
                assert req.upgrade is not None
                req.headers += ((b"Connection", b"upgrade"), (b"Upgrade", req.upgrade))
                req.keep_alive = False  # what follows its head is the client's, not HTTP
                self.reading_done = True
                return
        if req.has_body:
            self.upgrade_body = req
            self.parsing = _Request(req.started)

    def _after_upgrade_offer(self, rest: bytes) -> None:
        """The parser stopped after the head of an Upgrade offer; `rest` is what followed
        it: the request's body if it has one, then the next requests; after a WebSocket
        offer, the client's first bytes for the tunnel, kept until the upstream answers."""
        if self.tunnel_offer is not None:
            self.tunnel_early += rest
            self._pause_reading(_PAUSE_DONE)
            return
        req = self.upgrade_body
        self.upgrade_body = None
        if req is None:
            self.parser = httptools.HttpRequestParser(self)
        else:
            self.parsing = req
            self.parser = _parser_for_body_of(req, self)
        if rest and not self.closed:
            self.data_received(rest)

    # -- routing -----------------------------------------------------------------------
    def _start(self, req: _Request) -> None:
        """The head of `req` is parsed and `req` is first in line: route it."""
        router = self.router
        snapshot = router.snapshot
        req.pools = router.pools
        view = self._view(req, snapshot)
        route = snapshot.match_route(view)
        if route is None:
            self._answer_error(req, NoRouteError(f"no route matched {view.method} {view.path}"))
            return
        req.route = route
        if req.has_body:
            # Hold the body before choosing: to read the user ID in it, and up to
            # request_buffer_bytes so that a slow uploader holds no upstream connection
            # (nginx proxy_request_buffering); chunked ones always 16 KiB, to check them.
            reads_body = route.wants_body(view)
            hold = 0
            if not req.complete:
                hold = router.hold_chunked if req.chunked else router.hold_length
            if reads_body or hold:
                req.view = view
                req.reads_body = reads_body
                # A chunked body of exactly body_limit bytes is whole only once its last
                # chunk is read: hold one byte more (a Content-Length says it at once).
                limit = route.body_limit + 1 if req.chunked else route.body_limit
                req.hold_limit = max(limit, hold) if reads_body else hold
                req.state = _READING_BODY
                if req.expect_continue and not req.continue_sent and not req.complete:
                    self._send_continue(req)
                if req.complete or req.body_held >= req.hold_limit:
                    self._route_with_body(req)
                return
        self._dispatch(req, decide(snapshot, view, route))

    def _view(self, req: _Request, snapshot: Snapshot) -> RequestView:
        client_ip = self.peer_ip
        if self.peer_trusted and req.xff is not None:
            client_ip = _client_behind_proxies(req.xff, self.router.trusted_networks) or client_ip
        req.client_ip = client_ip
        # The view is built as `grayroute explain` builds it (router.rules.request_view).
        return request_view(
            req.method,
            req.path,
            req.query,
            req.match_host if self.router.matches_hosts else "",
            req.wanted,
            client_ip,
            req.raw_headers,
        )

    def _route_with_body(self, req: _Request) -> None:
        """Enough of the body is held (to find the user ID in it, or to check its chunks)."""
        view, route = req.view, req.route
        assert view is not None and route is not None
        if req.reads_body:
            body = b"".join(req.body_parts)
            req.body_parts = [body] if body else []
            limit = route.body_limit
            view.body = body[:limit]
            # Whole when the request is, or when it is all its Content-Length announced:
            # a body of exactly body_limit bytes is read whole, as explain reads it.
            whole = req.complete or (
                req.content_length is not None and len(body) == int(req.content_length)
            )
            view.body_complete = whole and len(body) <= limit
        req.state = _ROUTING
        self._dispatch(req, decide(self.router.snapshot, view, route))

    def _dispatch(self, req: _Request, decision: Decision) -> None:
        req.decision = decision
        if decision.status:
            self._answer_for_script(req, decision)
            return
        upstream = decision.upstream
        pool = req.pools.get(upstream) if upstream is not None else None
        if pool is not None and pool.fallbacks and not pool.has_endpoint_up():
            pool = self._fall_back(req, pool)
        if pool is None or not pool.endpoints:
            self._answer_error(req, NoEndpoints(f"upstream {upstream!r} has no endpoints"))
            return
        endpoint = pool.next_endpoint()
        conn = pool.take_idle(endpoint)
        if conn is not None:
            self._send_request(req, conn)
            return
        req.state = _CONNECTING
        req.connect_task = self.loop.create_task(self._connect(req, pool, endpoint))

    async def _connect(self, req: _Request, pool: UpstreamPool, first: tuple[str, int]) -> None:
        """Open a connection, trying the other endpoints of the upstream when one fails."""
        endpoints = pool.endpoints
        if first not in endpoints:  # the list changed since (DNS); `first` was in it then
            endpoints = (first, *endpoints)
        start = endpoints.index(first)
        order = [endpoints[(start + i) % len(endpoints)] for i in range(len(endpoints))]
        timeouts = 0
        last: ProxyError = UpstreamUnavailable("no endpoint")
        for endpoint in order:
            try:
                conn = await pool.connect(endpoint)
            except UpstreamTimeout as exc:
                timeouts += 1
                last = exc
                self.router.metrics.upstream_error(pool.name, "timeout")
                continue
            except UpstreamUnavailable as exc:
                last = exc
                self.router.metrics.upstream_error(pool.name, "connect")
                continue
            req.connect_task = None
            if self.closed or req is not self.active:
                conn.abort()
                return
            self._send_request(req, conn)
            return
        req.connect_task = None
        if self.closed or req is not self.active:
            return
        if pool.fallbacks:
            standin = self._fall_back(req, pool)
            if standin is not pool:
                first = standin.next_endpoint()
                req.connect_task = self.loop.create_task(self._connect(req, standin, first))
                return
        if timeouts == len(order):
            self._answer_error(req, UpstreamTimeout(f"{pool.name}: {last.detail}"))
        else:
            self._answer_error(req, UpstreamUnavailable(f"{pool.name}: {last.detail}"))

    def _fall_back(self, req: _Request, pool: UpstreamPool) -> UpstreamPool:
        """`pool` has no endpoint up: the pool that takes the request instead, which the
        decision, the access log and the metrics then name (counted as a fallback)."""
        standin = pool.standin()
        decision = req.decision
        if standin is not pool and decision is not None:
            self.router.metrics.fell_back(pool.name, standin.name)
            decision.upstream = standin.name
            decision.reason = (
                f"{decision.reason}; {pool.name} has no endpoint up -> fallback {standin.name}"
            )
        return standin

    # -- upstream: request out ---------------------------------------------------------
    def _send_request(self, req: _Request, conn: UpstreamConnection) -> None:
        req.conn = conn
        req.state = _STREAMING
        conn.begin(self, head_only=req.method == b"HEAD")
        if req.decision is not None and req.decision.request_headers:
            _apply_script_headers(req, req.decision.request_headers)
        # A route that rewrites the path (prefix_rewrite, regex_rewrite) changes only what
        # the upstream is asked for; the log keeps the client's target.
        target = req.decision.target if req.decision is not None else None
        url = req.target if target is None else target.encode("latin-1")
        parts = [req.method, b" ", url, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            parts += (name, b": ", value, _CRLF)
        if req.host is None:
            parts.append(b"Host: %b:%d\r\n" % (conn.endpoint[0].encode(), conn.endpoint[1]))
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif req.content_length is not None:
            parts += (b"Content-Length: ", req.content_length, _CRLF)
        if req.xff is not None and self.peer_trusted:
            parts += (b"X-Forwarded-For: ", req.xff, b", ", self.peer_ip_bytes, _CRLF)
        else:
            parts += (b"X-Forwarded-For: ", self.peer_ip_bytes, _CRLF)
        if req.xfp is not None and self.peer_trusted:
            parts += (b"X-Forwarded-Proto: ", req.xfp, _CRLF)
        else:
            parts.append(self.forwarded_proto)
        parts.append(_CRLF)
        if req.body_parts:
            body = b"".join(req.body_parts)
            parts.append(b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body)
            req.body_parts = []
            req.body_held = 0
            self._resume_reading(_PAUSE_BUFFER_FULL)
        if req.complete and req.chunked:
            parts.append(_LAST_CHUNK)
        conn.send(b"".join(parts))
        if req.expect_continue and not req.continue_sent and not req.complete:
            self._send_continue(req)
        if self.write_paused and conn.transport is not None:
            conn.transport.pause_reading()
        self.router.awaiting_upstream.add(self)

    def _send_continue(self, req: _Request) -> None:
        req.continue_sent = True
        self.flush_output()
        if self.transport is not None:
            self.transport.write(_CONTINUE)

    def check_read_timeout(self, now: float) -> None:
        """Called by the router's ticker while this connection waits on an upstream."""
        req = self.active
        conn = req.conn if req is not None else None
        if req is None or conn is None or req.state != _STREAMING:
            self.router.awaiting_upstream.discard(self)
            return
        timeout = conn.pool.read_timeout
        if now - conn.last_io < timeout:
            return
        self.router.awaiting_upstream.discard(self)
        self.router.metrics.upstream_error(conn.pool.name, "timeout")
        req.conn = None
        conn.abort()
        if req.response_started:
            self._count(req, req.status)
            self._close_client()
        else:
            self._answer_error(req, UpstreamTimeout(f"{conn.pool.name}: no response in {timeout}s"))

    def upstream_switched(self, header_lines: list[bytes], rest: bytes) -> bool:
        """The upstream answered 101: when it is to our WebSocket offer, the 101 goes to
        the client and both connections become a tunnel; `rest` is what the upstream
        sent after its head. False for a 101 nobody asked for (a bad response)."""
        req = self.active
        if req is None or req is not self.tunnel_offer or self.closed:
            return False
        conn = req.conn
        transport = self.transport
        assert conn is not None and conn.transport is not None and transport is not None
        self.router.awaiting_upstream.discard(self)
        self.router.connections.discard(self)
        req.conn = None
        req.status = 101
        req.response_started = True
        assert req.upgrade is not None
        header_lines += (b"Upgrade: ", req.upgrade, b"\r\nConnection: upgrade\r\n\r\n")
        self.flush_output()
        transport.write(b"".join((_STATUS_LINES[101], *header_lines)))
        self._count(req, 101)
        req.state = _DONE
        self.active = None
        self.tunnel_offer = None
        self.closed = True  # the transport is the tunnel's now: nothing here touches it
        early, self.tunnel_early = self.tunnel_early, b""
        self.router.tunnels.start(transport, conn.transport, conn.pool.name, early, rest)
        return True

    def upstream_pause_writing(self) -> None:
        self._pause_reading(_PAUSE_UPSTREAM_FULL)

    def upstream_resume_writing(self) -> None:
        self._resume_reading(_PAUSE_UPSTREAM_FULL)

    # -- upstream: response back (ResponseSink) ----------------------------------------
    def response_head(
        self, status: int, header_lines: list[bytes], framing: int, content_length: bytes | None
    ) -> None:
        req = self.active
        assert req is not None
        req.response_started = True
        req.status = status
        parts = header_lines
        status_line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        parts.insert(0, status_line)
        if framing == FRAMING_NONE:
            req.to_client = _TO_CLIENT_NONE
            if content_length is not None and status != 204:
                parts += (b"Content-Length: ", content_length, _CRLF)
        elif framing == FRAMING_LENGTH:
            req.to_client = _TO_CLIENT_RAW
            assert content_length is not None
            parts += (b"Content-Length: ", content_length, _CRLF)
        elif req.http11:
            req.to_client = _TO_CLIENT_CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            # An HTTP/1.0 client knows no chunks: the body ends when we close.
            req.to_client = _TO_CLIENT_RAW
            req.keep_alive = False
        if not req.keep_alive or self.router.draining:
            req.keep_alive = False
            parts.append(b"Connection: close\r\n")
        elif not req.http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        self.out.append(b"".join(parts))

    def response_body(self, data: bytes) -> None:
        req = self.active
        assert req is not None
        if req.to_client == _TO_CLIENT_CHUNKED:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        elif req.to_client == _TO_CLIENT_RAW:
            self.out.append(data)

    def response_complete(self, reusable: bool) -> None:
        req = self.active
        assert req is not None
        if req.to_client == _TO_CLIENT_CHUNKED:
            self.out.append(_LAST_CHUNK)
        self.router.awaiting_upstream.discard(self)
        conn = req.conn
        req.conn = None
        if conn is not None:
            if reusable and req.complete:
                conn.pool.release(conn)
            else:
                conn.abort()
        self._count(req, req.status)
        self._finish(req)

    def flush_output(self) -> None:
        out = self.out
        if out:
            if self.transport is not None and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_failed(self, error: Exception, response_started: bool) -> None:
        req = self.active
        if req is None or req.state != _STREAMING:
            return
        conn = req.conn
        req.conn = None
        self.router.awaiting_upstream.discard(self)
        assert conn is not None
        pool = conn.pool
        kind = "bad_response" if isinstance(error, UpstreamBadResponse) else "reset"
        if not response_started and not req.response_started:
            # A keep-alive connection the upstream had closed just as we reused it:
            # safe to try once more on a new connection when no body was sent.
            if (
                conn.reused
                and not req.has_body
                and not req.retried
                and req.method in _IDEMPOTENT_METHODS
            ):
                req.retried = True
                req.state = _CONNECTING
                req.connect_task = self.loop.create_task(self._connect(req, pool, conn.endpoint))
                return
            self.router.metrics.upstream_error(pool.name, kind)
            assert isinstance(error, ProxyError)
            self._answer_error(req, error)
            return
        self.router.metrics.upstream_error(pool.name, kind)
        # The response was cut short: closing the client connection is the only way to
        # make sure a truncated body can never look complete.
        self._count(req, req.status)
        self._close_client()

    # -- answers of our own ------------------------------------------------------------
    def _answer_error(self, req: _Request, error: ProxyError) -> None:
        status = error.status
        # Unread request body bytes would be taken for the next request: close instead.
        # (A request without a body is complete once its head is: answered from
        # on_headers_complete, its on_message_complete has not come yet.)
        close = not req.keep_alive or (req.has_body and not req.complete) or self.router.draining
        self._write_answer(
            _error_status_line(error),
            [(b"Content-Type", b"application/json")],
            error_body(error.code, error.detail),
            close,
            head_only=req.method == b"HEAD",
        )
        req.status = status
        req.keep_alive = req.keep_alive and not close
        self._drop_upstream(req)
        self._count(req, status)
        self._finish(req)

    def _answer_for_script(self, req: _Request, decision: Decision) -> None:
        """The route answered itself: direct_response, redirect, a Lua script's ngx.exit
        or ngx.redirect, or a script failure."""
        status = decision.status
        if status == 444:  # nginx's "close the connection without an answer"
            self._drop_upstream(req)
            self._count(req, 444)
            req.state = _DONE
            self.active = None
            self._close_client()
            return
        # In the order the script set them; `ngx.header[name] = nil` clears the name, as in
        # nginx. The router frames the answer itself: no Content-Length or Connection.
        headers: list[tuple[bytes, bytes]] = []
        for n, v in decision.response_headers:
            lname = n.lower()
            if lname in ("content-length", "connection"):
                continue
            if v is None:
                headers = [(hn, hv) for hn, hv in headers if hn.lower() != wire_bytes(lname)]
            else:
                headers.append((wire_bytes(n), wire_bytes(v)))
        if decision.location is not None:
            headers.append((b"Location", wire_bytes(decision.location)))
        body = decision.body
        if not body and status >= 400:
            reason = decision.reason or "answered by the route's script"
            body = error_body("script_" + str(status), reason)
            headers.append((b"Content-Type", b"application/json"))
        close = not req.keep_alive or (req.has_body and not req.complete) or self.router.draining
        self._write_answer(
            _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status,
            headers,
            body,
            close,
            head_only=req.method == b"HEAD",
        )
        req.status = status
        req.keep_alive = req.keep_alive and not close
        self._count(req, status)
        self._finish(req)

    def _reject(self, error: ProxyError) -> None:
        """A request we cannot parse or accept: its answer follows those of the requests
        before it on the connection (RFC 9112 9.3.2; a client must not retry a POST that
        was applied), then the connection closes. Nothing after it is read."""
        self.reading_done = True
        self._pause_reading(_PAUSE_DONE)
        req = self.parsing
        self.parsing = None
        if req is not None and req is self.active:
            # Its own body is what is wrong, while it is being served.
            if req.state != _DONE:
                self._drop_upstream(req)
                if req.response_started:
                    self._close_client()
                    return
            self.active = None
        elif req is not None and self.waiting and self.waiting[-1] is req:
            self.waiting.pop()  # queued by its head; this answer takes its place
        if self.active is not None or self.waiting:
            self.rejection = error
            return
        self._answer_rejection(error)

    def _answer_rejection(self, error: ProxyError) -> None:
        self.rejection = None
        if self.transport is None or self.closed:
            return
        self._write_answer(
            _error_status_line(error),
            [(b"Content-Type", b"application/json")],
            error_body(error.code, error.detail),
            close=True,
        )
        self.router.metrics.request_done("", "", error.status, 0.0)
        self.active = None
        self.parsing = None
        self.waiting.clear()
        self._close_client()

    def _write_answer(
        self,
        status_line: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        close: bool,
        head_only: bool = False,
    ) -> None:
        """Write an answer of the router's own, after what is pending for the client."""
        parts = [status_line]
        for name, value in headers:
            parts += (name, b": ", value, _CRLF)
        parts += (b"Content-Length: %d\r\n" % len(body), self.router.date_header)
        parts.append(b"Connection: close\r\n\r\n" if close else _CRLF)
        if not head_only:
            parts.append(body)
        self.flush_output()
        assert self.transport is not None
        self.transport.write(b"".join(parts))

    # -- end of a request --------------------------------------------------------------
    def _finish(self, req: _Request) -> None:
        req.state = _DONE
        self.active = None
        self.served += 1
        if not req.keep_alive or (req.has_body and not req.complete):
            self._close_client()
            return
        self._serve_next()

    def _serve_next(self) -> None:
        # A loop, not recursion: a burst of pipelined requests answered at once (404s)
        # must not grow the stack.
        if self._serving_next:
            return
        self._serving_next = True
        try:
            while self.active is None and self.waiting and not self.closed:
                req = self.waiting.popleft()
                self.active = req
                self._start(req)
            if not self.waiting:
                if self.rejection is not None and self.active is None:
                    self._answer_rejection(self.rejection)
                    return
                self._resume_reading(_PAUSE_PIPELINE)
        finally:
            self._serving_next = False

    def _drop_upstream(self, req: _Request) -> None:
        self.router.awaiting_upstream.discard(self)
        if req.connect_task is not None:
            req.connect_task.cancel()
            req.connect_task = None
        if req.conn is not None:
            req.conn.abort()
            req.conn = None

    def _count(self, req: _Request, status: int) -> None:
        decision = req.decision
        route = req.route.name if req.route is not None else ""
        upstream = (decision.upstream or "") if decision is not None else ""
        seconds = _monotonic() - req.started
        router = self.router
        router.metrics.request_done(route, upstream, status, seconds)
        pick = decision.split_pick if decision is not None else ""
        if pick:  # a rollout judges this route's split: 5xx, or its pick could not take it
            router.metrics.split_done(route, pick, status >= 500 or upstream != pick, seconds)
        if router.access_log is not None:
            router.access_log.log(
                req.client_ip or self.peer_ip,
                req.method,
                req.url,
                req.host,
                status,
                seconds,
                route,
                decision,
                req.traceparent,
                req.sw8,
            )

    def _close_client(self) -> None:
        self.flush_output()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def _pause_reading(self, why: int) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= why

    def _resume_reading(self, why: int) -> None:
        if self.read_paused & why:
            self.read_paused &= ~why
            if not self.read_paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()


# -- pure helpers ------------------------------------------------------------------------
def _is_websocket_offer(req: _Request) -> bool:
    """RFC 6455 4.1: a GET over HTTP/1.1, without a body, asking for `websocket`."""
    upgrade = req.upgrade
    return (
        upgrade is not None
        and req.method == b"GET"
        and req.http11
        and not req.has_body
        and b"websocket" in {t.strip() for t in upgrade.lower().split(b",")}
    )


def _drop_connection_listed(req: _Request) -> None:
    """Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1)."""
    tokens = req.connection_tokens
    assert tokens is not None
    # Host is never dropped: the upstream must get the one routing used.
    listed = {t.strip() for t in tokens.split(b",")} - {b"close", b"keep-alive", b"host", b""}
    if listed:
        req.headers = [(n, v) for n, v in req.headers if n.lower() not in listed]


def _error_status_line(error: ProxyError) -> bytes:
    return b"HTTP/1.1 %d %b\r\n" % (error.status, error.reason.encode())


def _apply_script_headers(req: _Request, edits: tuple[tuple[str, str | None], ...]) -> None:
    """ngx.req.set_header / clear_header of a Lua route, in the order the script made them."""
    headers = req.headers
    for name, value in edits:
        bname = wire_bytes(name)
        lname = bname.lower()
        headers = [(n, v) for n, v in headers if n.lower() != lname]
        if lname == b"host":
            req.host = None if value is None else wire_bytes(value)
        if value is not None:
            headers.append((bname, wire_bytes(value)))
    req.headers = headers


class _NotRead(Exception):
    """Raised in a parser callback to stop parsing what follows a connection's last request."""


def _parser_for_body_of(req: _Request, conn: HttpProxyProtocol) -> httptools.HttpRequestParser:
    """A parser that reads the body of `req`, whose head was parsed already, then the
    requests after it: primed with a head that frames the same body."""
    parser = httptools.HttpRequestParser(_BodyThenRequests(conn))
    if req.chunked:
        parser.feed_data(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    else:
        assert req.content_length is not None
        parser.feed_data(b"POST / HTTP/1.1\r\nContent-Length: %b\r\n\r\n" % req.content_length)
    return parser


class _BodyThenRequests:
    """Parser callbacks after a declined Upgrade offer (see _parser_for_body_of): the
    primed head is nobody's; body, trailers and end go to the offer's request; after
    that, every callback goes to the connection as usual. Only such connections pay
    the indirection."""

    def __init__(self, conn: HttpProxyProtocol) -> None:
        self.conn = conn
        self.past_head = False  # the primed head is parsed: the offer's body follows
        self.past_body = False  # the offer's request is complete: requests follow

    def on_message_begin(self) -> None:
        if self.past_body:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self.past_body:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.past_head:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.past_body:
            self.conn.on_headers_complete()
        self.past_head = True

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        if self.past_body or self.conn.parsing is not None:
            self.conn.on_message_complete()
        self.past_body = True


_Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _in_networks(ip: str, networks: _Networks) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in networks)


def _client_behind_proxies(xff: bytes, trusted: _Networks) -> str | None:
    """The first untrusted hop of X-Forwarded-For, read from the right."""
    for hop in reversed(xff.decode("latin-1").split(",")):
        hop = hop.strip()
        if hop and not _in_networks(hop, trusted):
            return hop
    return None


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(":", 1)[-1].strip() if text else type(exc).__name__
