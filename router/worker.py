"""A worker process of `grayroute serve`: the data plane (router.proxy) on a
SO_REUSEPORT socket, driven by the supervisor over its stdin/stdout (router.server).

Started as `python -m router.worker` by the supervisor; never by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import orjson
import uvloop

from router.config import Settings, parse_hostport
from router.errors import ConfigError, Problem, RulesError
from router.fleet import is_etcd_url
from router.metrics import WorkerMetrics
from router.rules.effective import Effective, apply_effective
from router.server import (
    EXIT_WORKER_SETUP,
    WORKER_ENV,
    load_snapshot_file,
    log_problems,
    reuseport_socket,
    rules_copy_path,
    setup_logging,
)

if TYPE_CHECKING:
    from router.access_log import AccessLogWriter
    from router.rules import Snapshot
    from router.tls import TlsTerminator

log = logging.getLogger("grayroute.worker")
_BACKLOG = 4096  # pending connections per worker socket
# gc thresholds while tuned: the young generation collected every 7,000 net allocations
# instead of 700, so that fewer objects of requests in flight are promoted to the old
# generations, whose collections are the ones that stall every connection at once.
_GC_THRESHOLDS = (7_000, 10, 10)


def tune_gc() -> None:
    """Take everything that exists after start-up (modules, rules, the router) out of
    the collector's reach, and collect the young generation less often.

    A full collection walks every tracked object; a worker holds ~20,000 of them after
    start-up that never become garbage, and walking them took milliseconds per full
    collection, on every connection of the worker at once (tens of ms on a busy
    machine). Frozen objects are still freed by reference counting; only cycles among
    them would be kept, and start-up leaves none worth collecting.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


class GcPauses:
    """Times every garbage collection of this process into the worker's metrics
    (grayroute_gc_pause_seconds): a collection holds the event loop, so its duration is
    a stall of every connection of the worker, which is what the tuning above is for."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.metrics.gc_pause(
                _GENERATIONS[info["generation"]], time.perf_counter() - self.started
            )


_GENERATIONS = ("0", "1", "2")


class _ReportPipe(asyncio.Protocol):
    """The worker's end of the report channel (its original stdout)."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's pipe transport is not a subclass of asyncio.WriteTransport, but has its API.
        self.transport = cast(asyncio.WriteTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, message: Mapping[str, Any]) -> bool:
        return self.send_line(orjson.dumps(message) + b"\n")

    def send_line(self, line: bytes, *, droppable: bool = False) -> bool:
        """Queue one encoded line; False when it was not sent (channel gone, or dropped)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        # Metrics are cumulative: when the pipe is backed up, skipping one costs nothing
        # (the next supersedes it) and keeps the worker's memory bounded.
        if droppable and transport.get_write_buffer_size() > 0:
            return False
        transport.write(line)
        return True

    async def close(self, timeout: float) -> None:
        if self.transport is not None:
            self.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)


class Worker:
    """One worker process: a Router on a SO_REUSEPORT socket, driven by the supervisor."""

    def __init__(
        self,
        settings: Settings,
        slot: int,
        digest: str,
        report_fd: int,
        effective: Effective | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.expected_digest = digest
        # The control plane's changes on top of the file (rollout weights, endpoints from
        # DNS), applied to every snapshot this worker installs.
        self.effective = effective or Effective()
        self.report_fd = report_fd
        self.metrics = WorkerMetrics()
        self.access_log: AccessLogWriter | None = None
        self.tls: TlsTerminator | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

        _, self.report = await loop.connect_write_pipe(
            _ReportPipe, os.fdopen(self.report_fd, "wb", buffering=0)
        )
        try:
            snapshot = await self._load(self.expected_digest)
        except RulesError as exc:
            log_problems(exc)
            log.error("cannot start: the rules do not load")
            await self.report.close(2.0)
            return EXIT_WORKER_SETUP

        from router.proxy import Router

        access_log = None
        if self.settings.access_log:
            from router.access_log import AccessLogWriter

            try:
                access_log = AccessLogWriter(self.settings.access_log)
            except OSError as exc:
                log.error("cannot open the access log %s: %s", self.settings.access_log, exc)
                await self.report.close(2.0)
                return EXIT_WORKER_SETUP
        self.access_log = access_log
        self.base = snapshot  # the rules as the file has them
        self.router = Router(
            self.settings,
            apply_effective(snapshot, self.effective),
            self.metrics,
            access_log=access_log,
        )
        self.digest = snapshot.digest
        try:
            servers = await self._listen()
        except (OSError, ConfigError) as exc:
            log.error("%s", exc)
            await self.report.close(2.0)
            return EXIT_WORKER_SETUP

        if self.settings.gc_tuning:
            tune_gc()
        gc.callbacks.append(GcPauses(self.metrics))  # for the life of this process
        self._keep(self._read_commands())
        self._keep(self._flush_metrics())
        if self.access_log is not None:
            self._keep(self.access_log.run())
        self.report.send({"ev": "ready", "pid": os.getpid(), "digest": self.digest})
        log.debug("accepting on %s", self.settings.listen)

        await self._stop.wait()

        self.report.send({"ev": "draining"})
        for server in servers:
            server.close()  # stop accepting; the other workers' sockets keep the port open
        log.info(
            "draining %d client connections and %d WebSocket tunnels (up to %.1f s)",
            len(self.router.connections),
            len(self.router.tunnels.open),
            self.settings.drain_timeout,
        )
        try:
            await asyncio.wait_for(
                self.router.drain(self.settings.drain_timeout), self.settings.drain_timeout + 2.0
            )
        except TimeoutError:
            log.warning("drain did not finish in time; exiting anyway")
        if self.tls is not None:
            self.tls.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.access_log is not None:
            self.access_log.close()  # the last lines, after every request has finished
        self.report.send({"ev": "metrics", "data": self.metrics.snapshot()})
        self.report.send({"ev": "bye"})
        await self.report.close(2.0)
        return 0

    async def _listen(self) -> list[asyncio.AbstractServer]:
        """A listening socket on each address, SO_REUSEPORT beside the other workers'.

        Raises OSError (an address that cannot be bound) or ConfigError (certificates
        that do not load), each with a message that names the flag.
        """
        loop = asyncio.get_running_loop()
        settings = self.settings
        listeners = [(settings.listen, "--listen")]
        listeners += [(address, "--listen-tls") for address in settings.listen_tls]
        if settings.listen_tls:
            from router.tls import TlsTerminator, load_certificates

            pairs = settings.tls_pairs
            certificates = await loop.run_in_executor(None, load_certificates, pairs)
            self.tls = TlsTerminator(certificates, pairs, self.metrics, settings.header_timeout)
        servers: list[asyncio.AbstractServer] = []
        for address, flag in listeners:
            host, port = parse_hostport(address, flag)
            try:
                sock = reuseport_socket(host, port)
                sock.setblocking(False)
            except OSError as exc:
                raise OSError(f"cannot listen on {flag} {address}: {exc.strerror or exc}") from exc
            # The backlog is given here: create_server calls listen() again with its own
            # (default 100, too short for bursts of new connections); the kernel caps it
            # at net.core.somaxconn.
            server: asyncio.AbstractServer
            if flag == "--listen":
                server = await loop.create_server(
                    self.router.protocol_factory, sock=sock, backlog=_BACKLOG
                )
            else:
                assert self.tls is not None
                server = await self.tls.serve(sock, self.router.https_protocol_factory, _BACKLOG)
            servers.append(server)
        return servers

    def _keep(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_metrics(self) -> None:
        from router.health import report_token, worker_report

        last = b""
        last_health: object = None
        while True:
            await asyncio.sleep(self.settings.metrics_interval)
            encoded = orjson.dumps(self.metrics.snapshot())
            # An idle worker sends nothing new; `last` moves only when a report went out,
            # so totals skipped on a backed-up pipe are sent on the next tick.
            if encoded != last and self.report.send_line(
                b'{"ev":"metrics","data":' + encoded + b"}\n", droppable=True
            ):
                last = encoded
            # Endpoint states, sent the same way (each report is the whole state now), and
            # built only when a state may have changed: a few integers per pool otherwise.
            pools = self.router.pools
            token = report_token(pools, time.monotonic())
            if token != last_health and self.report.send_line(
                b'{"ev":"health","data":' + orjson.dumps(worker_report(pools)) + b"}\n",
                droppable=True,
            ):
                last_health = token

    async def _read_commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
        )
        while True:
            line = await reader.readline()
            if not line:
                log.info("supervisor gone; draining")
                self._stop.set()
                return
            try:
                command = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(command, dict):
                continue
            if command.get("cmd") == "drain":
                self._stop.set()
            elif command.get("cmd") == "reload":
                digest = command.get("digest")
                self._keep(self._reload(str(digest) if digest else None))
            elif command.get("cmd") == "effective":
                self._apply_effective(command)
            elif command.get("cmd") == "tls_reload" and self.tls is not None:
                self._keep(self.tls.reload())

    def _on_sighup(self) -> None:
        """SIGHUP sent to this worker alone: the rules and the certificates from the files."""
        self._keep(self._reload(None))
        if self.tls is not None:
            self._keep(self.tls.reload())

    async def _load(self, expected: str | None) -> Snapshot:
        """Load the rule file; when it is not the `expected` digest, the saved copy of it.

        Rules in etcd have no file here: only the supervisor talks to etcd, and a worker
        always loads the copy of the digest it is told (SIGHUP to a worker: its own)."""
        loop = asyncio.get_running_loop()
        path = self.settings.rules_path
        snapshot: Snapshot | None = None
        error: RulesError | None = None
        if is_etcd_url(path):
            expected = expected or getattr(self, "digest", None)
            where = rules_copy_path(self.settings.state_dir, expected or "DIGEST")
            error = RulesError(
                [Problem(str(where), 1, 1, "rules", "the supervisor's copy cannot be loaded", "")]
            )
        else:
            try:
                snapshot = await loop.run_in_executor(None, load_snapshot_file, path)
            except RulesError as exc:
                error = exc
        if snapshot is not None and (not expected or snapshot.digest == expected):
            return snapshot
        if expected:
            copy = rules_copy_path(self.settings.state_dir, expected)
            try:
                saved = await loop.run_in_executor(None, load_snapshot_file, str(copy))
            except (RulesError, OSError):
                saved = None
            if saved is not None and saved.digest == expected:
                if is_etcd_url(path):
                    return saved
                log.warning(
                    "%s is not the rules in force (%s); using the saved copy %s",
                    path,
                    expected[:12],
                    copy,
                )
                return saved
        if snapshot is not None:
            log.warning(
                "%s has digest %s, expected %s; using it",
                path,
                snapshot.digest[:12],
                (expected or "")[:12],
            )
            return snapshot
        assert error is not None
        raise error

    async def _reload(self, expected: str | None) -> None:
        try:
            snapshot = await self._load(expected)
        except Exception as exc:
            if not isinstance(exc, RulesError):  # a bug, not a bad file
                log.exception("reload crashed; keeping rules %s", self.digest[:12])
                self.report.send({"ev": "reloaded", "ok": False, "problems": [repr(exc)]})
                return
            problems = [str(p) for p in exc.problems] or [str(exc)]
            log.error("reload failed; keeping rules %s", self.digest[:12])
            log_problems(exc)
            self.report.send({"ev": "reloaded", "ok": False, "problems": problems})
            return
        if snapshot.digest != self.digest:
            try:
                self.router.install(apply_effective(snapshot, self.effective))
            except Exception as exc:  # a bug in the data plane; the old rules stay in force
                log.exception("installing rules %s failed", snapshot.digest[:12])
                self.report.send({"ev": "reloaded", "ok": False, "problems": [repr(exc)]})
                return
            log.info("rules %s -> %s", self.digest[:12], snapshot.digest[:12])
            self.base = snapshot
            self.digest = snapshot.digest
        self.report.send({"ev": "reloaded", "ok": True, "digest": self.digest})

    def _apply_effective(self, command: Mapping[str, Any]) -> None:
        """{"cmd": "effective", "seq": N, "state": {...}}: install the rules in force with
        the new state; answered with {"ev": "effective", "seq": N, "ok": ...}."""
        seq = command.get("seq")
        try:
            effective = Effective.from_json(command.get("state"))
            self.router.install(apply_effective(self.base, effective))
        except Exception as exc:  # keep what is in force; the supervisor logs it
            log.exception("applying the effective state failed")
            self.report.send({"ev": "effective", "seq": seq, "ok": False, "error": repr(exc)})
            return
        self.effective = effective
        self.report.send({"ev": "effective", "seq": seq, "ok": True})


def worker_main() -> int:
    """Entry point of a worker process (`python -m router.worker`)."""
    config = orjson.loads(os.environ.pop(WORKER_ENV))
    settings = Settings(**config["settings"])
    slot = int(config["slot"])
    setup_logging(settings.log_level, f"worker {slot}")
    # fd 1 is the report pipe: keep it under another number and point fd 1 at stderr,
    # so nothing printed by accident can corrupt the channel.
    report_fd = os.dup(1)
    os.dup2(2, 1)
    effective = Effective.from_json(config.get("effective"))
    worker = Worker(settings, slot, str(config["digest"]), report_fd, effective)
    try:
        return uvloop.run(worker.run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    from router.worker import worker_main as _main  # the module, not this __main__ copy

    sys.exit(_main())
