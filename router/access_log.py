"""The access log: one JSON line per answered request, buffered, in one file for all workers.

    {"time": "2026-01-05T10:00:00.123Z", "client": "10.0.0.7", "method": "GET",
     "path": "/orders?userId=42", "host": "api.example.com", "status": 200,
     "duration_ms": 1.234, "route": "orders", "upstream": "orders-v1", "user_id": "42",
     "user_id_source": "query:userId",
     "reason": "split by user ID -> orders-v1 (weights orders-v1=95, orders-v1.1=5)",
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}

`path` is the request target as received (with the query string, like nginx's
$request_uri); `host` is the Host header as sent; `client` is the peer address of the
connection. `route`, `upstream`, `user_id`, `user_id_source` and `reason` are null when
the request was not routed (no route matched: 404; rejected before routing: 400, 408,
...). `grayroute diff --access-log` reads these lines back.

`trace_id` is the trace the request belongs to, so that a log search leads to its trace:
the trace-id of a W3C `traceparent` header (32 hex digits), else the trace ID of a
SkyWalking `sw8` header (its second field, base64-decoded); null without either, or
when the header is malformed. Both headers are forwarded upstream as they came either
way. The proxy only keeps the header values it meets (router.proxy); they are parsed
here, for a request that has one.

Cost on the hot path (`log`, called by router.proxy once per answered request): one dict
and one orjson.dumps appended to a bytearray (~1.5 us all told; keeping each line as its
own bytes object instead costs several times that in allocation); the time prefix is
formatted once a second. The buffer is written with ONE write() per flush: every
`flush_interval` seconds, whenever `max_lines` lines are waiting, and when the worker
exits after draining.

All workers append to the same file, opened with O_APPEND: the kernel puts each write()
at the end of the file as one piece, so the lines of different workers never interleave
within a line. Rotation needs no signal: before each timed flush the path is stat()ed,
and when it names another file (logrotate's `create`) or none, it is opened again;
`copytruncate` works as is (O_APPEND writes follow the truncation).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from router.rules import Decision

__all__ = ["AccessLogWriter", "check_writable", "trace_id"]

log = logging.getLogger("grayroute.access_log")

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
# User IDs and client addresses are personal data: not world-readable.
_MODE = 0o640
_NEWLINE = orjson.OPT_APPEND_NEWLINE

# W3C Trace Context: version-trace_id-parent_id-flags, lower-case hex; a later version
# may add fields after the four (https://www.w3.org/TR/trace-context/#traceparent-header)
_TRACEPARENT = re.compile(
    rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[^ \t]*)?[ \t]*"
)
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16
# SkyWalking cross-process propagation (sw8): sample-traceId-segmentId-spanId-service-
# instance-endpoint-target, the strings base64-encoded
_SW8_FIELDS = 8


def trace_id(traceparent: bytes | None, sw8: bytes | None) -> str | None:
    """The trace ID of a request: traceparent's trace-id, else sw8's; None if neither
    header is there or valid."""
    if traceparent is not None:
        found = _w3c_trace_id(traceparent)
        if found is not None:
            return found
    if sw8 is not None:
        return _sw8_trace_id(sw8)
    return None


def _w3c_trace_id(value: bytes) -> str | None:
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace, parent, more = m.groups()
    # ff is forbidden; version 00 has exactly four fields; all-zero IDs are invalid
    if version == b"ff" or (version == b"00" and more) or trace == _ZERO_TRACE:
        return None
    if parent == _ZERO_PARENT:
        return None
    return trace.decode("ascii")


def _sw8_trace_id(value: bytes) -> str | None:
    fields = value.strip().split(b"-")
    if len(fields) != _SW8_FIELDS or fields[0] not in (b"0", b"1") or not fields[1]:
        return None
    try:
        found = base64.b64decode(fields[1], validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # not base64, or not UTF-8 text
        return None
    return found if found.isprintable() and found else None


def check_writable(path: str) -> None:
    """Open (creating) `path` for appending once; ConfigError with one line if impossible."""
    from router.errors import ConfigError

    try:
        os.close(os.open(path, _FLAGS, _MODE))
    except OSError as exc:
        raise ConfigError(f"--access-log: cannot write {path}: {exc.strerror or exc}") from exc


class AccessLogWriter:
    """router.proxy.AccessLog: buffered JSON lines appended to one shared file."""

    __slots__ = (
        "_buffer",
        "_dropped",
        "_fd",
        "_file_id",
        "_last_error",
        "_lines",
        "_prefix",
        "_second",
        "flush_interval",
        "max_lines",
        "path",
    )

    def __init__(self, path: str, flush_interval: float = 1.0, max_lines: int = 1024) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.max_lines = max_lines
        self._buffer = bytearray()
        self._lines = 0  # lines in the buffer
        self._second = -1
        self._prefix = ""
        self._dropped = 0
        self._last_error = -float("inf")
        self._fd = -1
        self._file_id: tuple[int, int] = (0, 0)
        self._open()  # OSError: the worker reports it and does not start

    # -- the hot path ----------------------------------------------------------------------
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
    ) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        record: dict[str, Any] = {
            "time": f"{self._prefix}.{int((now - second) * 1000):03d}Z",
            "client": client_ip,
            # latin-1: every byte maps to one character, and back (the parser lets only
            # ASCII into a request target, so for it this is also the rules' UTF-8 text)
            "method": method.decode("latin-1"),
            "path": target.decode("latin-1"),
            "host": host.decode("latin-1") if host is not None else None,
            "status": status,
            "duration_ms": round(seconds * 1000.0, 3),
            "route": route or None,
        }
        if decision is not None:
            record["upstream"] = decision.upstream
            record["user_id"] = decision.user_id
            record["user_id_source"] = decision.user_id_source
            record["reason"] = decision.reason
        else:
            record["upstream"] = record["user_id"] = record["user_id_source"] = None
            record["reason"] = None
        if traceparent is None and sw8 is None:
            record["trace_id"] = None
        else:
            record["trace_id"] = trace_id(traceparent, sw8)
        try:
            line = orjson.dumps(record, option=_NEWLINE)
        except TypeError:  # a lone surrogate in a user ID from a JSON body: not UTF-8
            uid = record.get("user_id")
            if isinstance(uid, str):
                record["user_id"] = uid.encode("utf-8", "backslashreplace").decode("ascii")
            line = orjson.dumps(record, option=_NEWLINE, default=str)
        self._buffer += line
        self._lines += 1
        if self._lines >= self.max_lines:
            self.flush()

    # -- writing ---------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every waiting line with one write(); never raises (errors are logged)."""
        lines = self._lines
        if not lines:
            return
        data = self._buffer
        self._buffer = bytearray()
        self._lines = 0
        try:
            if self._fd < 0:
                self._open()
            view = memoryview(data)
            while view:  # a short write (disk full, a signal) is finished, not dropped
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._dropped += lines
            now = time.monotonic()
            if now - self._last_error > 60.0:  # one line a minute, not one per flush
                self._last_error = now
                log.error(
                    "access log %s: %s; %d lines dropped so far",
                    self.path,
                    exc.strerror or exc,
                    self._dropped,
                )

    def reopen_if_moved(self) -> None:
        """Open the path again when it is no longer the file we write (rotated away)."""
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._file_id
        except OSError:
            moved = True
        if moved:
            try:
                self._open()
            except OSError as exc:
                log.error("access log %s: cannot reopen: %s", self.path, exc.strerror or exc)

    def _open(self) -> None:
        fd = os.open(self.path, _FLAGS, _MODE)
        st = os.fstat(fd)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = fd
        self._file_id = (st.st_dev, st.st_ino)

    async def run(self) -> None:
        """Flush every `flush_interval` seconds until cancelled (then `close()` flushes)."""
        while True:
            await asyncio.sleep(self.flush_interval)
            self.reopen_if_moved()
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    @property
    def dropped(self) -> int:
        return self._dropped
