"""Tunnels (router/tunnel.py): two real TCP connections joined as the proxy joins them
after a 101, with a test peer on each side: bytes both ways, flow control, half-close,
a side going away, the idle timeout, the limit and the drain."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from router.tunnel import (
    CLIENT_CLOSED,
    DRAIN,
    IDLE_TIMEOUT,
    UPSTREAM_CLOSED,
    Tunnel,
    Tunnels,
)

from conftest import RecordingMetrics, poll, until

EARLY_UP = b"first frame from the client"
EARLY_DOWN = b"first frame from the upstream"


@dataclass
class Joined:
    """A client and an upstream peer, joined by a tunnel in this process."""

    tunnels: Tunnels
    metrics: RecordingMetrics
    tunnel: Tunnel
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    servers: list[asyncio.AbstractServer] = field(default_factory=list)


class _Front(asyncio.Protocol):
    """What the proxy does at the handover: connect upstream, join the two."""

    def __init__(self, tunnels: Tunnels, upstream_port: int, joined: asyncio.Future[Tunnel]):
        self.tunnels = tunnels
        self.upstream_port = upstream_port
        self.joined = joined
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.task = asyncio.get_running_loop().create_task(self.join(transport))

    async def join(self, client: Any) -> None:
        loop = asyncio.get_running_loop()
        port = self.upstream_port
        upstream, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        tunnel = self.tunnels.start(client, upstream, "v1", EARLY_UP, EARLY_DOWN)
        self.joined.set_result(tunnel)


@pytest.fixture
async def join() -> AsyncIterator[Callable[..., Awaitable[Joined]]]:
    made: list[Joined] = []

    async def start(
        idle_timeout: float = 60.0, max_open: int = 10, tunnels: Tunnels | None = None
    ) -> Joined:
        loop = asyncio.get_running_loop()
        metrics = RecordingMetrics()
        if tunnels is None:
            tunnels = Tunnels(metrics, idle_timeout=idle_timeout, max_open=max_open)
        peer: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future()
        )

        async def upstream_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer.set_result((r, w))

        upstream_server = await asyncio.start_server(upstream_peer, "127.0.0.1", 0)
        upstream_port = upstream_server.sockets[0].getsockname()[1]
        joined: asyncio.Future[Tunnel] = loop.create_future()
        front = await loop.create_server(
            lambda: _Front(tunnels, upstream_port, joined), "127.0.0.1", 0
        )
        client = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
        tunnel = await asyncio.wait_for(joined, 10)
        j = Joined(tunnels, metrics, tunnel, client, await peer, [upstream_server, front])
        made.append(j)
        return j

    yield start
    for j in made:
        j.tunnels.close_all()
        for _, writer in (j.client, j.upstream):
            writer.close()
        for server in j.servers:
            server.close()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset, as a crashed process's kernel may."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


async def test_bytes_both_ways_early_bytes_first(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    assert await read_exactly(c_reader, len(EARLY_DOWN)) == EARLY_DOWN
    assert await read_exactly(u_reader, len(EARLY_UP)) == EARLY_UP
    for i in range(3):
        c_writer.write(b"ping %d" % i)
        assert await read_exactly(u_reader, 6) == b"ping %d" % i
        u_writer.write(b"pong %d" % i)
        assert await read_exactly(c_reader, 6) == b"pong %d" % i
    assert j.metrics.tunnels_opened == {"v1": 1} and not j.metrics.tunnels_closed
    assert j.tunnels.open == {j.tunnel}


@pytest.mark.parametrize("direction", ["down", "up"])
async def test_flow_control_bounds_what_a_slow_reader_costs(
    join: Callable[..., Awaitable[Joined]], direction: str
) -> None:
    """A fast sender and a reader that reads nothing: the tunnel stops reading from the
    sender once the reader's buffer is full, so the sender is held back by TCP instead
    of the router's memory growing; then everything arrives, intact."""
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    if direction == "down":
        sender, receiver = u_writer, c_reader
        reading_side, writing_side = j.tunnel.upstream_end.source, j.tunnel.client_end.source
    else:
        sender, receiver = c_writer, u_reader
        reading_side, writing_side = j.tunnel.client_end.source, j.tunnel.upstream_end.source
    total = 64 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = hashlib.sha256()

    async def send_all() -> None:
        for _ in range(total // len(block)):
            sender.write(block)
            sent.update(block)
            await sender.drain()

    sending = asyncio.get_running_loop().create_task(send_all())

    async def held_back() -> bool:
        return not reading_side.is_reading()

    await poll(held_back)
    await asyncio.sleep(0.2)
    assert not sending.done()  # the sender is blocked: nothing reads its bytes
    assert writing_side.get_write_buffer_size() <= 1024 * 1024  # not 64 MiB
    got = hashlib.sha256()
    received = 0
    while received < total:
        chunk = await asyncio.wait_for(receiver.read(1 << 20), 10)
        assert chunk
        got.update(chunk)
        received += len(chunk)
    await asyncio.wait_for(sending, 10)
    assert received == total and got.digest() == sent.digest()


async def test_half_close_is_passed_on(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    c_writer.write(b"last words")
    c_writer.write_eof()
    assert await asyncio.wait_for(u_reader.read(), 10) == b"last words"  # then EOF
    u_writer.write(b"an answer after the client's EOF")
    u_writer.close()
    assert await asyncio.wait_for(c_reader.read(), 10) == b"an answer after the client's EOF"
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", UPSTREAM_CLOSED): 1}


async def test_the_upstream_going_away_closes_the_client(
    join: Callable[..., Awaitable[Joined]],
) -> None:
    j = await join()
    (c_reader, _), (u_reader, u_writer) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    reset(u_writer)  # a crash: no FIN, a reset
    assert await asyncio.wait_for(c_reader.read(), 10) == b""  # closed, not left hanging
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", UPSTREAM_CLOSED): 1}
    assert not j.tunnels.open


async def test_the_client_going_away_closes_the_upstream(
    join: Callable[..., Awaitable[Joined]],
) -> None:
    j = await join()
    (c_reader, c_writer), (u_reader, _) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    reset(c_writer)
    assert await asyncio.wait_for(u_reader.read(), 10) == b""
    await until(lambda: not j.tunnels.open)
    assert j.metrics.tunnels_closed == {("v1", CLIENT_CLOSED): 1}


async def test_idle_tunnels_are_closed(join: Callable[..., Awaitable[Joined]]) -> None:
    j = await join(idle_timeout=30.0)
    (c_reader, c_writer), (u_reader, _) = j.client, j.upstream
    await read_exactly(c_reader, len(EARLY_DOWN))
    await read_exactly(u_reader, len(EARLY_UP))
    assert j.tunnels.check_idle(time.monotonic() + 29.0) == 0
    c_writer.write(b"still here")  # traffic either way counts
    await read_exactly(u_reader, 10)
    assert j.tunnels.check_idle(time.monotonic() + 29.0) == 0
    assert j.tunnels.check_idle(time.monotonic() + 31.0) == 1
    assert await asyncio.wait_for(c_reader.read(), 10) == b""
    assert await asyncio.wait_for(u_reader.read(), 10) == b""
    assert j.metrics.tunnels_closed == {("v1", IDLE_TIMEOUT): 1}


async def test_limit_and_drain(join: Callable[..., Awaitable[Joined]]) -> None:
    first = await join(max_open=2)
    tunnels = first.tunnels
    assert tunnels.has_room()
    second = await join(tunnels=tunnels)
    assert tunnels.open == {first.tunnel, second.tunnel}
    assert not tunnels.has_room()
    for j in (first, second):
        await read_exactly(j.client[0], len(EARLY_DOWN))
        await read_exactly(j.upstream[0], len(EARLY_UP))
    tunnels.close_all()
    assert not tunnels.open
    assert first.metrics.tunnels_closed == {("v1", DRAIN): 2}
    for j in (first, second):
        for reader in (j.client[0], j.upstream[0]):
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)
