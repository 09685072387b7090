"""Fast Python upstreams: each answers every request with its version name.

    python -m benchmarks.backends v1=127.0.0.1:18101 v1.1=127.0.0.1:18102 v2=127.0.0.1:18103

prints one JSON line ``{"event": "ready", "backends": {...}}`` when all listen, and runs
until SIGTERM/SIGINT. Every response is ``200``, body = the version name, header
``X-Version: NAME``; keep-alive and pipelining are honoured, request bodies are read and
discarded.

`make bench` uses nginx for its upstreams by default (``--backends nginx``: C, one
worker, no Python on that side at all); this server is the fallback when nginx is not
installed and what the tests and the locust smoke run use. It is a bare
``asyncio.Protocol`` on uvloop with httptools, with the response bytes built once per
version, so one core serves several tens of thousands of requests a second: the runner
measures it directly in the same run to show it is not the bottleneck.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
from typing import cast

import httptools
import uvloop


def response_bytes(version: str) -> bytes:
    """The whole canned response for one version, built once."""
    body = version.encode()
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"X-Version: " + body + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


class VersionProtocol(asyncio.Protocol):
    """One client connection: parse requests, answer each with the canned response."""

    __slots__ = ("_close_after", "_parser", "_response", "_transport")

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    # httptools callbacks
    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(self._response)
        if not self._parser.should_keep_alive():
            transport.close()


async def serve(addrs: dict[str, tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for version, (host, port) in addrs.items():
        factory = functools.partial(VersionProtocol, response_bytes(version))
        servers.append(
            await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
        )
    bound = {
        version: "{}:{}".format(*srv.sockets[0].getsockname()[:2])
        for version, srv in zip(addrs, servers, strict=True)
    }
    print(json.dumps({"event": "ready", "backends": bound}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for srv in servers:
        srv.close()
        await srv.wait_closed()


def parse_args(argv: list[str]) -> dict[str, tuple[str, int]]:
    addrs: dict[str, tuple[str, int]] = {}
    for arg in argv:
        version, sep, addr = arg.partition("=")
        host, sep2, port = addr.rpartition(":")
        if not sep or not sep2 or not port.isdigit():
            raise SystemExit(f"backends: {arg!r} is not VERSION=HOST:PORT (e.g. v1=127.0.0.1:0)")
        addrs[version] = (host, int(port))
    if not addrs:
        raise SystemExit("backends: give at least one VERSION=HOST:PORT")
    return addrs


def main(argv: list[str] | None = None) -> int:
    addrs = parse_args(sys.argv[1:] if argv is None else argv)
    uvloop.run(serve(addrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
