"""Upstream pools: keep-alive connections, round-robin over endpoints, the upstream Protocol.

One `UpstreamPool` per upstream (service version) per worker. A pool hands out idle
keep-alive connections (newest first, so the ones the upstream is most likely to keep
open are reused) and opens new ones when none is idle. `UpstreamConnection` parses the
response with httptools and reports it to the client connection whose request it
carries, its sink, through the sink's few upstream-facing methods (response_head,
response_body, response_complete, flush_output, upstream_*); it knows nothing else
about clients. The sink is typed as the proxy's class itself, not as a Protocol:
compiled, those calls are then direct C calls rather than Python method calls.

Endpoint health, as nginx does it (max_fails=1, fail_timeout=10s by default; an upstream's
`max_fails`/`fail_timeout` change them): an endpoint whose connections are refused or time
out max_fails times within fail_timeout is skipped by round-robin for fail_timeout
(passive). With `health_check: {path, interval}` on the upstream, each worker also
asks every endpoint for `path` every `interval`; an endpoint that does not answer 2xx/3xx
is skipped until it does (active). When every endpoint is down, the upstream's `fallback`
takes its requests (`standin()`); without one they are tried anyway: a guess is better
than a certain 502.

A pool follows its upstream's endpoint list when only that changes (endpoints from DNS:
pods come and go): keep-alive connections to the endpoints that stay are kept, those to
endpoints that left are closed (`follow`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, cast

import httptools

from router.config import DEFAULT_FAIL_TIMEOUT
from router.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable

if TYPE_CHECKING:
    from router.config import Settings
    from router.proxy import HttpProxyProtocol
    from router.rules import UpstreamSpec
    from router.rules.model import HealthCheck

log = logging.getLogger("grayroute.upstream")

# The clock of timeouts and request durations, read a few times per request. A Final:
# compiled, it is a C static, not an attribute looked up on the time module per call.
_monotonic: Final = time.monotonic

Endpoint = tuple[str, int]

# Seconds an endpoint that failed a connection is left out of round-robin, by default.
FAIL_TIMEOUT: Final = DEFAULT_FAIL_TIMEOUT

# Response headers that describe one hop only; the proxy sets its own framing.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# What the proxy does with a response header, by name. The names upstreams send most,
# in their usual spellings, are looked up as they come; others are lower-cased first.
_FORWARD: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CONNECTION: Final = 3
_DROP: Final = 4
_RESPONSE_HEADER_KIND: Final[dict[bytes, int]] = {
    b"content-length": _LENGTH,
    b"transfer-encoding": _CHUNKED,
}
_RESPONSE_HEADER_KIND.update({name: _DROP for name in HOP_BY_HOP if name != b"transfer-encoding"})
_RESPONSE_HEADER_KIND[b"connection"] = _CONNECTION
# Connection tokens that name no header of their own.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b""})
_KNOWN_RESPONSE_NAMES: Final[dict[bytes, int]] = {}
for _lower in (
    *_RESPONSE_HEADER_KIND,
    *(
        b"server date content-type cache-control etag last-modified vary set-cookie expires "
        b"location content-encoding content-language accept-ranges age pragma "
        b"access-control-allow-origin x-request-id x-version".split()
    ),
):
    _kind = _RESPONSE_HEADER_KIND.get(_lower, _FORWARD)
    _KNOWN_RESPONSE_NAMES[_lower] = _kind
    _KNOWN_RESPONSE_NAMES[_lower.title()] = _kind
    _KNOWN_RESPONSE_NAMES[_lower.upper()] = _kind
_KNOWN_RESPONSE_NAMES[b"ETag"] = _FORWARD
_KNOWN_RESPONSE_NAMES[b"WWW-Authenticate"] = _FORWARD

FRAMING_LENGTH: Final = 1  # Content-Length given
FRAMING_CHUNKED: Final = 2  # Transfer-Encoding: chunked
FRAMING_CLOSE: Final = 3  # body runs until the upstream closes
FRAMING_NONE: Final = 4  # no body (1xx, 204, 304, or a response to HEAD)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to one endpoint; parses responses with httptools."""

    def __init__(self, pool: UpstreamPool, endpoint: Endpoint) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.sink: HttpProxyProtocol | None = None
        self.closed = False
        self.reused = False  # served a request before: may have been closed by the peer
        self.last_io = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False
        self._started = False  # some response bytes arrived for the current request
        self._header_lines: list[bytes] = []  # "name: value\r\n" pieces, to be joined
        self._connection_listed: set[bytes] | None = None  # headers named in Connection
        self._content_length: bytes | None = None
        self._chunked = False
        self._framing_error = False
        self._framing = FRAMING_NONE
        self._interim = False
        self._switching = False  # the response being parsed is a 101
        self._head_bytes = 0  # of the response header section being parsed
        # The sink of a response that ended in the read being parsed, told once the
        # whole read is parsed: bytes after the end of a response must be seen (and the
        # connection dropped) before it can go back to the pool (see on_message_begin).
        self._done: HttpProxyProtocol | None = None
        self._keep_alive = False

    # -- lending -----------------------------------------------------------------------
    def begin(self, sink: HttpProxyProtocol, head_only: bool) -> None:
        """Attach to a request; `head_only` for a response to HEAD (never has a body).
        The request's head is sent at once (send: the read timeout counts from there)."""
        self.sink = sink
        self._head_only = head_only
        self._started = False

    def send(self, data: bytes) -> None:
        # The read timeout counts from the last byte either way: a long upload is not
        # an upstream that stopped answering.
        self.last_io = _monotonic()
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection: the request it carried did not finish cleanly."""
        self.sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.last_io = _monotonic()
        self._started = True
        sink = self.sink
        if sink is None:
            # Bytes on an idle connection: the upstream is not speaking HTTP correctly.
            self.abort()
            self.pool.forget(self)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamBadResponse):  # raised on purpose (on_*)
                self._fail(cause)
            elif not isinstance(cause, _OutOfStep):
                log.error("response handling failed", exc_info=cause)
                self._fail(UpstreamBadResponse("response handling failed"))
        except httptools.HttpParserUpgrade as exc:
            # 101 Switching Protocols: the sink takes the connection over when it asked
            # for that upgrade (a WebSocket tunnel); it is a bad response otherwise.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if self._switch(sink, data[offset:]):
                return
            self._fail(UpstreamBadResponse("101 Switching Protocols that was not asked for"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBadResponse(f"invalid HTTP response: {exc!r}"))
        else:
            if self._framing_error:
                self._fail(UpstreamBadResponse("ambiguous response framing"))
            elif not self._headers_done and self.sink is not None:
                # A head spread over reads: httptools holds its pieces until it ends.
                self._head_bytes += len(data)
                if self._head_bytes > self.pool.max_head_bytes:
                    self._fail(UpstreamBadResponse(self._head_too_large()))
        done = self._done
        if done is not None:
            self._done = None
            done.response_complete(self._keep_alive and not self.closed)
        sink.flush_output()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if self._framing == FRAMING_CLOSE and self._headers_done:
            sink.response_complete(False)
            sink.flush_output()
            return
        sink.upstream_failed(UpstreamUnavailable("upstream closed the connection"), self._started)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_resume_writing()

    # -- httptools callbacks -----------------------------------------------------------
    _headers_done = False

    def on_message_begin(self) -> None:
        if self.sink is None:
            # A response nobody asked for (bytes after the end of the last one): the
            # connection is out of step with its requests and must never be reused,
            # and none of those bytes may reach a client.
            self.abort()
            self.pool.forget(self)
            raise _OutOfStep
        self._header_lines = []
        self._head_bytes = 0
        self._connection_listed = None
        self._content_length = None
        self._chunked = False
        self._headers_done = False
        self._framing = FRAMING_NONE

    # No on_status: the reason phrase is the standard one for the status (as in
    # nginx), and httptools skips callbacks a parser object does not have.

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        kind = _KNOWN_RESPONSE_NAMES.get(name)
        if kind is None:
            kind = _RESPONSE_HEADER_KIND.get(name.lower(), _FORWARD)
        if kind == _FORWARD:
            self._header_lines += (name, b": ", value, b"\r\n")
        elif kind == _LENGTH:
            if self._content_length is not None and self._content_length != value:
                self._framing_error = True
            self._content_length = value
        elif kind == _CHUNKED:
            if value.strip().lower() != b"chunked" or self._chunked:
                self._framing_error = True
            self._chunked = True
        elif kind == _CONNECTION and value.lower() not in _CONNECTION_OPTIONS:
            listed = {t.strip() for t in value.lower().split(b",")} - _CONNECTION_OPTIONS
            self._connection_listed = (self._connection_listed or set()) | listed

    def _drop_connection_listed(self) -> None:
        """Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1)."""
        listed = self._connection_listed
        self._connection_listed = None
        if listed:
            lines = self._header_lines
            self._header_lines = [
                piece
                for i in range(0, len(lines), 4)
                if lines[i].lower() not in listed
                for piece in lines[i : i + 4]
            ]

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            # Interim response (100 Continue, 103 Early Hints): not forwarded; wait
            # for the final one. A 101 ends the parse (HttpParserUpgrade: _switch).
            self._interim = True
            self._switching = status == 101
            return
        if self._head_bytes > self.pool.max_head_bytes:
            # nginx: "upstream sent too big header" (proxy_buffer_size) -> 502
            raise UpstreamBadResponse(self._head_too_large())
        self._interim = False
        self._headers_done = True
        if self._framing_error or (self._chunked and self._content_length is not None):
            self._framing_error = True
            return
        length = self._content_length
        if length is not None and length[0] == 48 and len(length) > 1:
            self._content_length = length.lstrip(b"0") or b"0"  # forwarded canonical
        if self._connection_listed:
            self._drop_connection_listed()
        if self._head_only or status in (204, 304):
            framing = FRAMING_NONE
        elif self._chunked:
            framing = FRAMING_CHUNKED
        elif self._content_length is not None:
            framing = FRAMING_LENGTH
        else:
            framing = FRAMING_CLOSE
        self._framing = framing
        sink = self.sink
        if sink is not None:
            sink.response_head(status, self._header_lines, framing, self._content_length)
            if self._head_only:
                # llhttp does not know the request was HEAD and would wait for a body
                # of Content-Length bytes; finish here and never reuse the connection.
                self.sink = None
                self.closed = True
                sink.response_complete(False)
                if self.transport is not None:
                    self.transport.close()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and not self._interim:
            sink.response_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        self._keep_alive = self._parser.should_keep_alive()
        self._done = sink  # told when the whole read is parsed (data_received)

    def _switch(self, sink: HttpProxyProtocol, rest: bytes) -> bool:
        """Hand this connection to `sink` after a 101; it never comes back to the pool."""
        if self.sink is not sink or not self._switching:
            return False
        self._switching = False
        if not sink.upstream_switched(self._header_lines, rest):
            return False
        self.sink = None
        self.closed = True  # for the pool: never lent again; the transport is the tunnel's
        self.pool.forget(self)
        return True

    def _head_too_large(self) -> str:
        return f"response header section over {self.pool.max_head_bytes} bytes"

    def _fail(self, error: Exception) -> None:
        if self._done is not None:
            # The response was complete: what follows it is what is wrong. The client
            # has its answer; the connection is dropped (abort below).
            self.abort()
            self.pool.forget(self)
            return
        sink = self.sink
        started = self._headers_done
        self.abort()
        self.pool.forget(self)
        if sink is not None:
            sink.upstream_failed(error, started)


class _OutOfStep(Exception):
    """Raised in a parser callback: bytes after a complete response are not parsed."""


class UpstreamPool:
    """Connections to the endpoints of one upstream, in one worker."""

    def __init__(self, spec: UpstreamSpec, settings: Settings) -> None:
        self.name = spec.name
        key = _pool_key(spec, settings)
        self.endpoints, self.connect_timeout, self.read_timeout, _, self.max_fails = key[:5]
        self.fail_timeout = key[5]
        self.max_idle = settings.upstream_keepalive
        self.max_head_bytes = settings.max_response_header_bytes
        self.health_check = spec.health_check
        # Where requests go while no endpoint is up, in order (set by Router.install).
        self.fallbacks: tuple[UpstreamPool, ...] = ()
        self.closed = False
        self._idle: dict[Endpoint, list[UpstreamConnection]] = {ep: [] for ep in self.endpoints}
        self._next = 0
        self._failed_until: dict[Endpoint, float] = {}  # passive: connection failures
        self._fails: dict[Endpoint, tuple[int, float]] = {}  # below max_fails: (count, since)
        self._unhealthy: set[Endpoint] = set()  # active: failed its last health check
        self._checker: asyncio.Task[None] | None = None
        # Unix time each endpoint's state last changed (for reports; the pool's birth else),
        # and how many changes there were (reports are rebuilt only when it moves).
        self.created = time.time()
        self._changed: dict[Endpoint, float] = {}
        self.transitions = 0

    def follow(self, spec: UpstreamSpec, settings: Settings) -> bool:
        """Serve `spec` from now on if it differs from this pool at most by its endpoints
        (then taken in place); False when it needs a pool of its own."""
        endpoints, *rest = _pool_key(spec, settings)
        if tuple(rest) != (
            self.connect_timeout,
            self.read_timeout,
            self.health_check,
            self.max_fails,
            self.fail_timeout,
        ):
            return False
        if endpoints != self.endpoints:
            self._set_endpoints(endpoints)
        return True

    def _set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        old_idle = self._idle
        self._idle = {ep: old_idle.pop(ep, []) for ep in endpoints}
        for gone in old_idle.values():  # endpoints that left: their pods are going away
            for conn in gone:
                conn.abort()
        kept = self._idle.keys()
        self._failed_until = {ep: t for ep, t in self._failed_until.items() if ep in kept}
        self._fails = {ep: f for ep, f in self._fails.items() if ep in kept}
        self._unhealthy.intersection_update(kept)
        now, before = time.time(), set(self.endpoints)
        self._changed = {ep: t for ep, t in self._changed.items() if ep in kept}
        self._changed.update({ep: now for ep in kept if ep not in before})  # joined now
        self.endpoints = endpoints
        self.transitions += 1
        self._next = self._next % len(endpoints) if endpoints else 0

    def next_endpoint(self) -> Endpoint:
        """Round-robin over the endpoints that are up (over all of them when none is)."""
        endpoints = self.endpoints
        count = len(endpoints)
        index = self._next
        if not self._failed_until and not self._unhealthy:
            self._next = (index + 1) % count
            return endpoints[index]
        now = _monotonic()
        for step in range(count):
            endpoint = endpoints[(index + step) % count]
            if self.is_up(endpoint, now):
                self._next = (index + step + 1) % count
                return endpoint
        self._next = (index + 1) % count
        return endpoints[index]

    def has_endpoint_up(self) -> bool:
        if not self._failed_until and not self._unhealthy:
            return bool(self.endpoints)
        now = _monotonic()
        return any(self.is_up(endpoint, now) for endpoint in self.endpoints)

    def standin(self) -> UpstreamPool:
        """The pool that takes this upstream's requests now: itself while an endpoint is
        up, else the first fallback with one up. When none is up anywhere, itself if it
        has endpoints (a guess, as without a fallback), else the first fallback that has."""
        if self.has_endpoint_up():
            return self
        for pool in self.fallbacks:
            if pool.has_endpoint_up():
                return pool
        if not self.endpoints:
            for pool in self.fallbacks:
                if pool.endpoints:
                    return pool
        return self

    def is_up(self, endpoint: Endpoint, now: float) -> bool:
        if endpoint in self._unhealthy:
            return False
        until = self._failed_until.get(endpoint)
        if until is None:
            return True
        if now >= until:
            del self._failed_until[endpoint]
            self._state_changed(endpoint, time.time() - (now - until))
            return True
        return False

    def mark_failed(self, endpoint: Endpoint) -> None:
        now = _monotonic()
        if self.max_fails != 1:  # nginx: max_fails failures within fail_timeout; 0: never
            if not self.max_fails:
                return
            count, since = self._fails.get(endpoint, (0, now))
            if now - since >= self.fail_timeout:
                count, since = 0, now
            if count + 1 < self.max_fails:
                self._fails[endpoint] = (count + 1, since)
                return
            self._fails.pop(endpoint, None)
        until = self._failed_until.get(endpoint)
        if until is None or now >= until:
            log.warning(
                "%s: endpoint %s:%d failed; skipped for %gs",
                self.name,
                *endpoint,
                self.fail_timeout,
            )
            self._state_changed(endpoint, time.time())
        self._failed_until[endpoint] = now + self.fail_timeout

    def mark_ok(self, endpoint: Endpoint) -> None:
        self._fails.pop(endpoint, None)
        until = self._failed_until.pop(endpoint, None)
        if until is not None:
            self._state_changed(endpoint, time.time() - max(0.0, _monotonic() - until))

    def _state_changed(self, endpoint: Endpoint, when: float) -> None:
        self._changed[endpoint] = when
        self.transitions += 1

    def lapsed(self, now: float) -> int:
        """Passive downs that have run out but nobody has looked at since: their state
        changed without a transition being counted."""
        return sum(1 for until in self._failed_until.values() if until <= now)

    def endpoint_states(self) -> list[tuple[Endpoint, str, float]]:
        """(endpoint, state, since) for reports: state is "up", "active" (failed its health
        check) or "passive" (a connection failed within fail_timeout); since is the Unix
        time it last changed."""
        now, wall = _monotonic(), time.time()
        states = []
        for endpoint in self.endpoints:
            since = self._changed.get(endpoint, self.created)
            until = self._failed_until.get(endpoint)
            if endpoint in self._unhealthy:
                state = "active"
            elif until is not None and now < until:
                state = "passive"
            else:
                state = "up"
                if until is not None:  # over, but nothing has looked since
                    since = max(since, wall - (now - until))
            states.append((endpoint, state, since))
        return states

    def take_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
        idle = self._idle.get(endpoint)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, endpoint: Endpoint) -> UpstreamConnection:
        """A new connection to `endpoint`, or UpstreamUnavailable / UpstreamTimeout."""
        loop = asyncio.get_running_loop()
        host, port = endpoint
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self, endpoint), host, port),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            self.mark_failed(endpoint)
            raise UpstreamTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            self.mark_failed(endpoint)
            raise UpstreamUnavailable(f"connect to {host}:{port} failed: {exc.strerror}") from exc
        if self._failed_until or self._fails:
            self.mark_ok(endpoint)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange finished cleanly."""
        conn.sink = None
        if conn.closed:
            return
        idle = self._idle.get(conn.endpoint)
        if self.closed or idle is None or len(idle) >= self.max_idle:
            conn.abort()
            return
        conn.reused = True
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.endpoint)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close idle connections; ones lent out close when their request ends."""
        self.closed = True
        if self._checker is not None:
            self._checker.cancel()
            self._checker = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
            idle.clear()

    # -- active health checks ----------------------------------------------------------
    def start_health_checks(self) -> None:
        """Start asking the endpoints for health_check.path (needs a running loop)."""
        if self.health_check is not None and self._checker is None and not self.closed:
            self._checker = asyncio.get_running_loop().create_task(self._check_forever())

    async def _check_forever(self) -> None:
        assert self.health_check is not None
        while True:
            endpoints = self.endpoints
            results = await asyncio.gather(*(self._probe(ep) for ep in endpoints))
            current = self._idle.keys()  # the list may have changed meanwhile (DNS)
            for endpoint, healthy in zip(endpoints, results, strict=True):
                if endpoint not in current:
                    continue
                if healthy and endpoint in self._unhealthy:
                    log.warning("%s: endpoint %s:%d is healthy again", self.name, *endpoint)
                    self._unhealthy.discard(endpoint)
                    self._state_changed(endpoint, time.time())
                elif not healthy and endpoint not in self._unhealthy:
                    log.warning("%s: endpoint %s:%d failed its health check", self.name, *endpoint)
                    self._unhealthy.add(endpoint)
                    self._state_changed(endpoint, time.time())
            await asyncio.sleep(self.health_check.interval)

    async def _probe(self, endpoint: Endpoint) -> bool:
        """One GET of the health path on a connection of its own; True for 2xx/3xx."""
        assert self.health_check is not None
        host, port = endpoint
        request = (
            f"GET {self.health_check.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: grayroute-health-check\r\nConnection: close\r\n\r\n"
        ).encode()
        writer = None
        try:
            async with asyncio.timeout(self.connect_timeout + self.read_timeout):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(request)
                status_line = await reader.readline()
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
        parts = status_line.split(None, 2)
        return len(parts) >= 2 and parts[1][:1] in (b"2", b"3")

    @property
    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())


def _pool_key(
    spec: UpstreamSpec, settings: Settings
) -> tuple[tuple[Endpoint, ...], float, float, HealthCheck | None, int, float]:
    """What a pool is built from: endpoints, timeouts (server defaults filled in), checks,
    passive health (max_fails, fail_timeout)."""
    return (
        tuple(spec.endpoints),
        spec.connect_timeout if spec.connect_timeout is not None else settings.connect_timeout,
        spec.read_timeout if spec.read_timeout is not None else settings.read_timeout,
        spec.health_check,
        1 if spec.max_fails is None else spec.max_fails,
        settings.fail_timeout if spec.fail_timeout is None else spec.fail_timeout,
    )
