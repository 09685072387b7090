"""Bytes both ways after an Upgrade (WebSocket): a client connection and an upstream
connection joined, with flow control, an idle timeout and a limit on open tunnels.

The proxy (router/proxy.py) routes the upgrade request like any other and forwards it
with its Upgrade headers; when the upstream answers `101 Switching Protocols` and the
proxy has written that answer to the client, it hands both transports here
(`Tunnels.start`) and forgets them. From then on nothing is parsed: what one side sends
is written to the other as it comes.

    client transport ──► _End(to upstream) ──► upstream transport.write
    client transport.write ◄── _End(to client) ◄── upstream transport

Flow control: when one side's write buffer is full (that side reads slowly), reading
from the other side pauses until it drains, so a tunnel holds at most one write buffer
per direction (the transports' high-water marks, 64 KiB by default) whatever the peers
do. A half-close (EOF) is passed on where the other transport can send one (TCP), else
that side is closed once its buffer is written (TLS). When either side goes away, the
other is closed after its buffer is written.

Per worker, `Tunnels` keeps the open tunnels: it refuses new ones past `max_open`
(the proxy asks `has_room()` before it connects upstream), closes tunnels that carried
no byte either way for `idle_timeout` seconds (checked once a second by the router's
ticker), closes every tunnel when a drain ends (`close_all`), and counts them
(`TunnelMetrics`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger("grayroute.tunnel")

# Why a tunnel ended (metrics labels).
CLIENT_CLOSED = "client_closed"
UPSTREAM_CLOSED = "upstream_closed"
IDLE_TIMEOUT = "idle_timeout"
DRAIN = "drain"
CLOSE_REASONS = (CLIENT_CLOSED, UPSTREAM_CLOSED, IDLE_TIMEOUT, DRAIN)

# Seconds a closing side gets to take what is still buffered for it.
FLUSH_TIMEOUT = 5.0


class TunnelMetrics(Protocol):
    def tunnel_opened(self, upstream: str) -> None: ...

    def tunnel_closed(self, upstream: str, reason: str) -> None: ...


class _End(asyncio.Protocol):
    """One side of a tunnel: the protocol of `source`; what it reads goes to `sink`."""

    __slots__ = ("closed_reason", "eof", "sink", "source", "tunnel")

    def __init__(self, tunnel: Tunnel, source: asyncio.Transport, sink: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.source = source
        self.sink = sink
        self.eof = False
        self.closed_reason = ""  # why the tunnel ends when this side goes away

    def data_received(self, data: bytes) -> None:
        self.tunnel.last_io = time.monotonic()
        self.sink.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        tunnel = self.tunnel
        if not tunnel.ended_first:
            tunnel.ended_first = self.closed_reason
        # Half-close only where both transports can (TCP); TLS has no half-close here.
        if tunnel.other_end(self).eof or not (
            self.sink.can_write_eof() and self.source.can_write_eof()
        ):
            tunnel.close(self.closed_reason)
            return False
        self.sink.write_eof()
        return True  # keep our own transport open: the other side may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close(self.closed_reason)

    # Our transport's write buffer is the other side's data waiting: stop reading it.
    def pause_writing(self) -> None:
        self.tunnel.other_end(self).source.pause_reading()

    def resume_writing(self) -> None:
        self.tunnel.other_end(self).source.resume_reading()


class Tunnel:
    """One client connection joined to one upstream connection."""

    __slots__ = (
        "client_end",
        "closed",
        "ended_first",
        "last_io",
        "tunnels",
        "upstream",
        "upstream_end",
    )

    def __init__(
        self,
        tunnels: Tunnels,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        upstream_name: str,
    ) -> None:
        self.tunnels = tunnels
        self.upstream = upstream_name
        self.closed = False
        self.ended_first = ""  # the side that sent EOF first: it closed the tunnel
        self.last_io = time.monotonic()
        # Each end reads its own transport and writes to the other's.
        self.client_end = _End(self, client, upstream)
        self.client_end.closed_reason = CLIENT_CLOSED
        self.upstream_end = _End(self, upstream, client)
        self.upstream_end.closed_reason = UPSTREAM_CLOSED

    def other_end(self, end: _End) -> _End:
        return self.upstream_end if end is self.client_end else self.client_end

    def close(self, reason: str) -> None:
        """Close both sides, each after what is buffered for it is written (for at most
        FLUSH_TIMEOUT seconds: a peer that reads nothing must not keep it open)."""
        if self.closed:
            return
        self.closed = True
        if self.ended_first and reason in (CLIENT_CLOSED, UPSTREAM_CLOSED):
            reason = self.ended_first
        for end in (self.client_end, self.upstream_end):
            transport = end.source
            if transport.get_write_buffer_size():
                loop = asyncio.get_running_loop()
                loop.call_later(FLUSH_TIMEOUT, transport.abort)
            transport.close()
        self.tunnels.closed(self, reason)

    def abort(self, reason: str) -> None:
        """Drop both sides at once (the end of a drain)."""
        if not self.closed:
            self.client_end.source.abort()
            self.upstream_end.source.abort()
        self.close(reason)


class Tunnels:
    """The open tunnels of one worker."""

    def __init__(self, metrics: TunnelMetrics, idle_timeout: float, max_open: int) -> None:
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.max_open = max_open
        self.open: set[Tunnel] = set()

    def has_room(self) -> bool:
        return len(self.open) < self.max_open

    def start(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        upstream_name: str,
        to_upstream: bytes = b"",
        to_client: bytes = b"",
    ) -> Tunnel:
        """Join `client` and `upstream` (both already past the 101 exchange).

        `to_upstream` and `to_client` are bytes the HTTP side read beyond the upgrade
        request and the 101 answer (the first frames, when a peer did not wait): they
        are sent first.
        """
        tunnel = Tunnel(self, client, upstream, upstream_name)
        self.open.add(tunnel)
        self.metrics.tunnel_opened(upstream_name)
        client.set_protocol(tunnel.client_end)
        upstream.set_protocol(tunnel.upstream_end)
        if to_upstream:
            upstream.write(to_upstream)
        if to_client:
            client.write(to_client)
        # Either may have been paused by the HTTP side (a full buffer, a pipelined
        # request waiting); a closing one is closed by its connection_lost.
        for transport, end in ((client, tunnel.client_end), (upstream, tunnel.upstream_end)):
            if transport.is_closing():
                tunnel.close(end.closed_reason)
                break
            transport.resume_reading()
        return tunnel

    def closed(self, tunnel: Tunnel, reason: str) -> None:
        if tunnel in self.open:
            self.open.discard(tunnel)
            self.metrics.tunnel_closed(tunnel.upstream, reason)

    def check_idle(self, now: float) -> int:
        """Close tunnels idle for `idle_timeout`; how many. Called once a second."""
        limit = now - self.idle_timeout
        idle = [t for t in self.open if t.last_io < limit]
        for tunnel in idle:
            tunnel.close(IDLE_TIMEOUT)
        return len(idle)

    def close_all(self) -> None:
        """The end of a drain: every tunnel is dropped."""
        for tunnel in list(self.open):
            tunnel.abort(DRAIN)
