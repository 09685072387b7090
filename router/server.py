"""Process life of `grayroute serve`: supervisor, workers, sockets, signals, reloads.

    supervisor (this module, run_serve)           worker (python -m router.server --worker)
    ─────────────────────────────────────         ─────────────────────────────────────────
    load + validate the rules once                 load the rules (the digest it is told)
    reserve the listen port (SO_REUSEPORT,         bind its own SO_REUSEPORT listening
      bound, never listening)                        socket on that port, Router(...)
    start N workers, restart any that dies   ─►    serve on uvloop
    admin app: /metrics /healthz /readyz /rules    every metrics_interval: send totals
    SIGHUP or a changed file (RulesWatcher):       reload, router.install(snapshot)
      reload, then tell workers              ─►
    SIGTERM/SIGINT: tell workers to drain    ─►    stop accepting, router.drain(), flush, exit

Workers are separate interpreters started with fork+exec (subprocess), not bare forks of
the supervisor: the supervisor runs an event loop, an aiohttp app and a thread pool, and
none of that may leak into a worker. A worker costs one interpreter start (~0.3 s), paid
only at start and on a restart.

Channels, one pair of pipes per worker:
    worker stdin   supervisor -> worker, JSON lines: {"cmd": "reload", "digest": D},
                   {"cmd": "drain"}. End of file (the supervisor is gone) means drain.
    worker stdout  worker -> supervisor, JSON lines: {"ev": "ready"}, {"ev": "metrics",
                   "data": ...}, {"ev": "reloaded", ...}, {"ev": "draining"}, {"ev": "bye"}.
                   The worker moves its fd 1 aside at start, so a stray print() lands on
                   stderr instead of corrupting the channel.
    worker stderr  inherited: worker logs go where the supervisor's go.
Workers run in their own session, so a Ctrl-C in a terminal reaches only the supervisor,
which then drains them in order. A worker also obeys SIGTERM/SIGINT (drain) and SIGHUP
(reload from the file) sent to it directly.

Consistency of rules across workers: the supervisor keeps a copy of every rule file it
accepted under STATE_DIR/rules/DIGEST.yaml and gives each worker the digest in force. A
worker that finds a different file on disk (edited but not yet reloaded, or now invalid)
starts with that copy instead, so a restarted worker never routes differently from its
siblings and a broken edit cannot put workers into a restart loop.

Reload triggers all take one path (`Supervisor._request_reload`): SIGHUP, the rule file
changing on disk (`RulesWatcher`: polls os.stat through symlinks, waits until the file
has been still for a moment, compares content hashes), and `grayroute rollback`, which
writes a kept version over the file and sends SIGHUP. Every start and reload is appended
to STATE_DIR/audit.jsonl (see router.history).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import uvloop

from router.config import Settings, parse_hostport
from router.errors import ConfigError, RulesError
from router.metrics import WorkerMetrics

if TYPE_CHECKING:
    from router.access_log import AccessLogWriter
    from router.metrics import SupervisorMetrics
    from router.rules import Snapshot

log = logging.getLogger("grayroute.server")

WORKER_ENV = "GRAYROUTE_WORKER"  # JSON: settings, slot, digest in force
EXIT_WORKER_SETUP = 3  # a worker could not start (rules unreadable, port not bindable)
STARTUP_TIMEOUT = 60.0  # seconds for every worker to report ready at start
_BACKLOG = 4096  # pending connections per worker socket
_MAX_LINE = 16 * 1024 * 1024  # a metrics line grows with routes x upstreams x statuses
_LOG_FORMAT = "%(asctime)s %(levelname)s grayroute %(role)s[%(process)d]: %(message)s"


# ---------------------------------------------------------------------------------------
# Shared by both sides
# ---------------------------------------------------------------------------------------


def setup_logging(level: str, role: str) -> None:
    """One line per event on stderr, tagged with the role (supervisor, worker N) and pid."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.addFilter(_RoleFilter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not listening) TCP socket with SO_REUSEPORT; raises OSError."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rules_copy_path(state_dir: str, digest: str) -> Path:
    return Path(state_dir) / "rules" / f"{digest}.yaml"


def _load_snapshot(path: str) -> Snapshot:
    from router.rules import load_snapshot

    return load_snapshot(path)


def _read_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def load_rules_stable(path: str) -> tuple[Snapshot, bytes | None]:
    """Load the rules and the exact bytes they came from (None if the file kept changing).

    Reading the bytes before and after parsing catches an editor writing the file while
    we read it; the bytes are what the supervisor saves for workers that start later.
    """
    for _ in range(3):
        before = _read_bytes(path)
        snapshot = _load_snapshot(path)
        if before is not None and _read_bytes(path) == before:
            return snapshot, before
    return snapshot, None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------


def run_serve(settings: Settings) -> int:
    """Run `grayroute serve` until SIGTERM/SIGINT; the process exit code."""
    setup_logging(settings.log_level, "supervisor")
    try:
        snapshot, raw = load_rules_stable(settings.rules_path)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if not exc.problems:
            print(f"{settings.rules_path}: {exc}", file=sys.stderr)
        return 1
    for warning in snapshot.warnings:
        log.warning("%s", warning)

    from router.history import resolve_state_dir

    try:
        state_dir = str(resolve_state_dir(settings.rules_path, settings.state_dir))
        log.info("state directory: %s", state_dir)
        if settings.access_log:
            from router.access_log import check_writable

            check_writable(settings.access_log)  # one clear line now, not N worker failures
        host, port = settings.listen_addr
        try:
            # Held for the supervisor's whole life: for `:0` this is what picks the port
            # every worker then binds; it never listens, so the kernel never hands it a
            # connection (only listening sockets join the SO_REUSEPORT group).
            reserved = reuseport_socket(host, port)
        except OSError as exc:
            print(f"grayroute: --listen {settings.listen}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        with reserved:
            supervisor = Supervisor(settings, snapshot, raw, reserved.getsockname()[1], state_dir)
            return uvloop.run(supervisor.run())
    except ConfigError as exc:
        print(f"grayroute: {exc}", file=sys.stderr)
        return 1


@dataclasses.dataclass(eq=False)
class _Worker:
    slot: int
    wid: str  # unique for the supervisor's life; the metrics key
    proc: asyncio.subprocess.Process
    ready: bool = False
    digest: str = ""


class Supervisor:
    """Owns the workers, the admin app, and the rules the admin app reports."""

    def __init__(
        self,
        settings: Settings,
        snapshot: Snapshot,
        raw: bytes | None,
        listen_port: int,
        state_dir: str,
    ) -> None:
        from router.metrics import SupervisorMetrics

        self.settings = settings
        self.listen_host = settings.listen_addr[0]
        self.listen_port = listen_port
        self.state_dir = state_dir
        self.metrics: SupervisorMetrics = SupervisorMetrics(self._ready_count)
        self.exit_code = 0
        self.workers: dict[int, _Worker] = {}
        self._spawned = 0
        self._announced = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again: str | None = None  # the trigger of a reload asked for meanwhile
        self.last_reload: dict[str, Any] | None = None
        self.watcher: RulesWatcher | None = None
        self._stop = asyncio.Event()  # SIGTERM/SIGINT, or a fatal start-up failure
        self._all_ready = asyncio.Event()
        self._accept(snapshot, raw)

    # -- state the admin app reads (router.admin.AdminSource) ---------------------------

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def readiness(self) -> tuple[bool, str]:
        up = self._ready_count()
        wanted = self.settings.workers
        if self._stop.is_set():
            return False, f"draining ({up}/{wanted} workers up)"
        return up == wanted, f"{up}/{wanted} workers up"

    def rules_info(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "source": str(snap.source),
            "digest": snap.digest,
            "loaded_at": self.loaded_at,
            "upstreams": describe_upstreams(snap, self.settings),
            "routes": describe_routes(snap),
            "last_reload": self.last_reload,
            "state_dir": self.state_dir,
            "watch_interval": self.settings.watch_interval,
            "workers": {
                str(w.slot): {"pid": w.proc.pid, "ready": w.ready, "digest": w.digest}
                for w in sorted(self.workers.values(), key=lambda w: w.slot)
            },
        }

    def rules_history(self, limit: int) -> dict[str, Any]:
        from router.history import read_audit

        return {"state_dir": self.state_dir, "events": read_audit(self.state_dir)[-limit:]}

    def _ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.ready)

    # -- life ---------------------------------------------------------------------------

    async def run(self) -> int:
        from router.admin import AdminServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload, "sighup")

        admin_host, admin_port = self.settings.admin_addr
        admin = AdminServer(self, admin_host, admin_port, self.settings.admin_token)
        try:
            admin_port = await admin.start()
        except OSError as exc:
            print(
                f"grayroute: --admin {self.settings.admin}: {exc.strerror or exc}", file=sys.stderr
            )
            return 1
        try:
            # Only once SIGHUP is handled may `grayroute rollback` find us (its default
            # action would end the process).
            self._write_pidfile()
            slots = [self._keep(self._slot_loop(slot)) for slot in range(self.settings.workers)]
            if self.settings.watch_interval > 0:
                self.watcher = RulesWatcher(
                    self.settings.rules_path,
                    lambda: self.snapshot.digest,
                    lambda: self._request_reload("watch"),
                    self.settings.watch_interval,
                )
                self._keep(self.watcher.run())
            if await self._wait_ready():
                self._announce(admin_host, admin_port)
            await self._stop.wait()
            await self._shutdown(slots)
        finally:
            from router.history import remove_pidfile

            remove_pidfile(self.state_dir)
            await admin.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("stopped")
        return self.exit_code

    def _keep(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_ready(self) -> bool:
        ready = self._keep(self._all_ready.wait())
        stop = self._keep(self._stop.wait())
        done, _ = await asyncio.wait(
            {ready, stop}, timeout=STARTUP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        stop.cancel()
        if self._all_ready.is_set() and not self._stop.is_set():
            return True
        if not done:
            log.error("workers did not become ready within %.0f s; stopping", STARTUP_TIMEOUT)
            self.exit_code = 1
            self._stop.set()
        return False

    def _announce(self, admin_host: str, admin_port: int) -> None:
        self._announced = True
        # Recorded once traffic is served: the audit log lists versions that took effect.
        digest = self.snapshot.digest
        self._audit("start", "start", "success", previous=None, attempted=digest)
        line = {
            "event": "ready",
            "listen": format_hostport(self.listen_host, self.listen_port),
            "admin": format_hostport(admin_host, admin_port),
            "workers": self.settings.workers,
            "pid": os.getpid(),
            "rules": self.snapshot.digest,
        }
        try:
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
        except OSError as exc:  # nobody reads stdout (closed pipe): the log still says it
            log.warning("cannot print the ready line: %s", exc)
        log.info(
            "ready: listening on %s, admin on %s, %d workers, rules %s",
            line["listen"], line["admin"], self.settings.workers, self.snapshot.digest[:12],
        )  # fmt: skip

    def _request_stop(self, sig: int) -> None:
        if not self._stop.is_set():
            log.info(
                "%s: draining workers (up to %.1f s)",
                signal.Signals(sig).name,
                self.settings.drain_timeout,
            )
            self._stop.set()

    async def _shutdown(self, slots: list[asyncio.Task[Any]]) -> None:
        for worker in list(self.workers.values()):
            self._send(worker, {"cmd": "drain"})
        # Workers bound their own drain by drain_timeout; the margin covers interpreter
        # exit. A worker that is still there after that is killed.
        grace = self.settings.drain_timeout + 5.0
        _, pending = await asyncio.wait(slots, timeout=grace)
        if pending:
            for worker in list(self.workers.values()):
                log.warning(
                    "worker %d (pid %d) did not exit in %.1f s; killing it",
                    worker.slot,
                    worker.proc.pid,
                    grace,
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
            await asyncio.wait(pending, timeout=5.0)

    # -- workers --------------------------------------------------------------------------

    async def _slot_loop(self, slot: int) -> None:
        """Keep one worker running in `slot` until the supervisor stops."""
        loop = asyncio.get_running_loop()
        quick_failures = 0
        while not self._stop.is_set():
            started = loop.time()
            try:
                worker = await self._spawn(slot)
            except OSError as exc:
                log.error("worker %d: cannot start: %s", slot, exc)
                rc: int | None = None
            else:
                rc = await self._watch(worker)
                del self.workers[slot]
                self.metrics.aggregator.retire(worker.wid)
                self._all_ready.clear()
            if self._stop.is_set():
                return
            if not self._announced:
                log.error(
                    "worker %d exited (%s) before it was ready; stopping", slot, _describe_exit(rc)
                )
                self.exit_code = 1
                self._stop.set()
                return
            self.metrics.worker_restarts += 1
            # A worker that keeps dying right after start is restarted ever more slowly
            # (up to 5 s) instead of in a tight fork loop.
            quick_failures = quick_failures + 1 if loop.time() - started < 5.0 else 0
            delay = 0.0 if quick_failures <= 1 else min(0.25 * 2 ** (quick_failures - 2), 5.0)
            log.warning(
                "worker %d exited (%s); restarting%s",
                slot,
                _describe_exit(rc),
                f" in {delay:.2f} s" if delay else "",
            )
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)

    async def _spawn(self, slot: int) -> _Worker:
        self._spawned += 1
        settings = dataclasses.asdict(self.settings)
        settings["listen"] = format_hostport(self.listen_host, self.listen_port)
        settings["state_dir"] = self.state_dir
        if self.settings.access_log:
            settings["access_log"] = os.path.abspath(self.settings.access_log)
        settings["admin_token"] = ""  # workers never need it; keep it out of their env
        env = dict(os.environ)
        env[WORKER_ENV] = orjson.dumps(
            {"settings": settings, "slot": slot, "digest": self.snapshot.digest}
        ).decode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.server", "--worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=_MAX_LINE,
        )  # fmt: skip
        worker = _Worker(slot=slot, wid=f"{slot}.{self._spawned}.{proc.pid}", proc=proc)
        self.workers[slot] = worker
        log.debug("worker %d: started pid %d", slot, proc.pid)
        return worker

    async def _watch(self, worker: _Worker) -> int:
        """Read the worker's reports until it exits; its exit code."""
        stdout = worker.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # a line over _MAX_LINE: skipped, the next one counts
                log.warning("worker %d: oversized report skipped", worker.slot)
                continue
            if not line:
                break
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("worker %d: unreadable report %.80r", worker.slot, line)
                continue
            if isinstance(message, dict):
                self._on_report(worker, message)
        worker.ready = False
        return await worker.proc.wait()

    def _on_report(self, worker: _Worker, message: Mapping[str, Any]) -> None:
        event = message.get("ev")
        if event == "metrics":
            data = message.get("data")
            if isinstance(data, dict):
                self.metrics.aggregator.update(worker.wid, data)
        elif event == "ready":
            worker.ready = True
            worker.digest = str(message.get("digest", ""))
            log.info(
                "worker %d (pid %d) accepting, rules %s",
                worker.slot,
                worker.proc.pid,
                worker.digest[:12],
            )
            if self._ready_count() == self.settings.workers:
                self._all_ready.set()
        elif event == "reloaded":
            if message.get("ok"):
                worker.digest = str(message.get("digest", ""))
                if worker.digest != self.snapshot.digest:
                    log.warning(
                        "worker %d runs rules %s, not %s",
                        worker.slot,
                        worker.digest[:12],
                        self.snapshot.digest[:12],
                    )
            else:
                log.error("worker %d kept its rules: reload failed", worker.slot)
        elif event == "draining":
            worker.ready = False
            self._all_ready.clear()

    def _send(self, worker: _Worker, command: Mapping[str, Any]) -> None:
        stdin = worker.proc.stdin
        if stdin is None or stdin.is_closing() or worker.proc.returncode is not None:
            return
        # A worker that is exiting: its slot loop restarts or retires it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(orjson.dumps(command) + b"\n")

    # -- rules ----------------------------------------------------------------------------

    def _accept(self, snapshot: Snapshot, raw: bytes | None) -> None:
        """Make `snapshot` the rules in force (at start and after a successful reload)."""
        self.snapshot = snapshot
        self.loaded_at = _now_iso()
        self.metrics.rules_digest = snapshot.digest
        self.metrics.rules_source = str(snapshot.source)
        self.metrics.rules_loaded_at = time.time()
        if raw is not None:
            _write_atomic(rules_copy_path(self.state_dir, snapshot.digest), raw)

    def _request_reload(self, trigger: str) -> None:
        """Reload the rule file (trigger: "sighup" or "watch"); merged while one runs."""
        if self._stop.is_set():
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = trigger  # requests during a reload coalesce into one more
            return
        self._reload_task = self._keep(self._reload(trigger))

    async def _reload(self, trigger: str) -> None:
        while True:
            self._reload_again = None
            await self._reload_once(trigger)
            if self._reload_again is None or self._stop.is_set():
                return
            trigger = self._reload_again

    async def _reload_once(self, trigger: str) -> None:
        path = self.settings.rules_path
        loop = asyncio.get_running_loop()
        log.info("%s: reloading %s", "SIGHUP" if trigger == "sighup" else "file changed", path)
        old = self.snapshot.digest
        try:
            snapshot, raw = await loop.run_in_executor(None, load_rules_stable, path)
        except RulesError as exc:
            problems = [str(p) for p in exc.problems] or [str(exc)]
            errors = sum(1 for p in exc.problems if p.severity != "warning") or 1
            log.error(
                "reload failed; keeping rules %s (%d error%s)",
                old[:12],
                errors,
                "" if errors == 1 else "s",
            )
            _log_problems(exc)
            self._reload_failed(trigger, problems, _digest_of_file(path))
            return
        except Exception as exc:  # a bug, not a bad file: keep the traceback
            log.exception("reload crashed; keeping rules %s", old[:12])
            self._reload_failed(trigger, [f"internal error: {exc!r}"], _digest_of_file(path))
            return
        for warning in snapshot.warnings:
            log.warning("%s", warning)
        self._accept(snapshot, raw)
        self.metrics.reloads["success"] += 1
        self.metrics.last_reload_ok = True
        self.last_reload = {
            "result": "success",
            "at": self.loaded_at,
            "trigger": trigger,
            "problems": [],
            "previous_digest": old,
        }
        from router.history import take_intent

        intent = take_intent(self.state_dir, snapshot.digest)
        if intent is not None:
            log.info(
                "rollback by %s@%s: rules %s -> %s",
                intent.get("user"),
                intent.get("host"),
                old[:12],
                snapshot.digest[:12],
            )
            who = {k: intent.get(k) for k in ("user", "host", "pid")}
            self._audit("rollback", trigger, "success", old, snapshot.digest, who=who)
        else:
            log.info("reload ok: rules %s -> %s", old[:12], snapshot.digest[:12])
            self._audit("reload", trigger, "success", old, snapshot.digest)
        for worker in list(self.workers.values()):
            self._send(worker, {"cmd": "reload", "digest": snapshot.digest})

    def _reload_failed(self, trigger: str, problems: list[str], attempted: str | None) -> None:
        self.metrics.reloads["failure"] += 1
        self.metrics.last_reload_ok = False
        self.last_reload = {
            "result": "failure",
            "at": _now_iso(),
            "trigger": trigger,
            "problems": problems,
            "attempted_digest": attempted,
        }
        from router.history import take_intent

        # A refused rollback is recorded as one, with who asked for it.
        intent = take_intent(self.state_dir, attempted) if attempted else None
        action, who = "reload", None
        if intent is not None:
            action, who = "rollback", {k: intent.get(k) for k in ("user", "host", "pid")}
        digest = self.snapshot.digest
        self._audit(action, trigger, "failure", digest, attempted, problems=problems, who=who)

    def _audit(
        self,
        action: str,
        trigger: str,
        result: str,
        previous: str | None,
        attempted: str | None,
        problems: list[str] | None = None,
        who: dict[str, Any] | None = None,
    ) -> None:
        """One line in STATE_DIR/audit.jsonl; `who` defaults to this process."""
        from router.history import actor, append_audit, file_owner, now_iso

        path = self.settings.rules_path
        entry = {
            "at": now_iso(),
            "action": action,
            "trigger": trigger,
            "result": result,
            "digest": self.snapshot.digest,  # in force after the event
            "previous": previous,
            "attempted": attempted,
            "source": path,
            **(who or actor()),
            "router_pid": os.getpid(),
            "file_owner": file_owner(path),
            "problems": problems or [],
        }
        try:
            append_audit(self.state_dir, entry)
        except OSError as exc:
            log.warning("cannot append to the audit log in %s: %s", self.state_dir, exc)

    def _write_pidfile(self) -> None:
        from router.history import write_pidfile

        try:
            write_pidfile(self.state_dir, self.settings.rules_path)
        except OSError as exc:
            log.warning("cannot write the pid file (rollback cannot signal us): %s", exc)


def _digest_of_file(path: str) -> str | None:
    """sha256 of the file as it is now (what a failed reload tried), None if unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class RulesWatcher:
    """Polls the rule file and asks for a reload when its content has changed and settled.

    Each tick stats the path *through* symlinks: (realpath, device, inode, size, mtime,
    ctime). Any change restarts the wait; once that signature has stayed the same for
    `settle` seconds the file is read and hashed, and a reload is asked for only when the
    content differs from the rules in force and from the last content tried. This covers:

      editors         that truncate and write in pieces, or write a backup and rename:
                      nothing is read until the file has been still for `settle`
      atomic rename   (mv new rules.yaml): a new inode
      ConfigMap swap  (rules.yaml -> ..data/rules.yaml, ..data -> ..2024_01_05_10_00):
                      the realpath and the inode change when kubelet swaps `..data`
      missing file    (between an editor's delete and create): waited out, logged once

    A bad file is tried once: it is not read again until it changes again. Every
    `recheck` seconds the content is hashed even without a stat change, for the rare edit
    that keeps size and timestamps. Costs one stat() per tick.
    """

    def __init__(
        self,
        path: str,
        in_force: Callable[[], str],
        on_change: Callable[[], None],
        interval: float,
        settle: float = 0.2,
        recheck: float = 5.0,
    ) -> None:
        self.path = path
        self.in_force = in_force
        self.on_change = on_change
        self.interval = interval
        self.settle = settle
        self.recheck = recheck
        self.tried = in_force()  # content hash last acted on
        self._signature: tuple[Any, ...] | None = None
        self._changed_at = -math.inf
        self._pending = True  # compare the content once at start: it may predate us
        self._missing_logged = False

    def signature(self) -> tuple[Any, ...] | None:
        try:
            st = os.stat(self.path)  # follows symlinks
        except OSError:
            return None
        real = os.path.realpath(self.path)
        return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def tick(self, now: float) -> bool:
        """One poll; True when it asked for a reload."""
        signature = self.signature()
        if signature != self._signature:
            self._signature = signature
            self._changed_at = now
            self._pending = True
            return False
        if signature is None:
            if not self._missing_logged:
                log.warning("%s is missing; keeping the rules in force", self.path)
                self._missing_logged = True
            return False
        self._missing_logged = False
        if not self._pending and now - self._changed_at < self.recheck:
            return False
        if self._pending and now - self._changed_at < self.settle:
            return False
        self._pending = False
        self._changed_at = now  # the next recheck is `recheck` from now
        try:
            digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        except OSError:
            return False
        if digest == self.tried or digest == self.in_force():
            self.tried = digest
            return False
        self.tried = digest
        self.on_change()
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.tick(loop.time())
            except Exception:  # never let a surprise stop watching
                log.exception("watching %s failed; trying again", self.path)
            await asyncio.sleep(self.interval)


def _log_problems(exc: RulesError) -> None:
    """Each problem on its own line: errors as errors, warnings as warnings."""
    for problem in exc.problems:
        level = logging.WARNING if problem.severity == "warning" else logging.ERROR
        log.log(level, "  %s", problem)
    if not exc.problems:
        log.error("  %s", exc)


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "not started"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def describe_upstreams(snapshot: Snapshot, settings: Settings) -> dict[str, Any]:
    """Upstreams for /rules, with the timeouts in force (the server's when not set)."""
    out: dict[str, Any] = {}
    for name, spec in snapshot.upstreams.items():
        connect = spec.connect_timeout
        read = spec.read_timeout
        out[name] = {
            "endpoints": [format_hostport(host, port) for host, port in spec.endpoints],
            "connect_timeout": settings.connect_timeout if connect is None else connect,
            "read_timeout": settings.read_timeout if read is None else read,
            "health_check": dataclasses.asdict(spec.health_check) if spec.health_check else None,
        }
    return out


def describe_routes(snapshot: Snapshot) -> list[dict[str, Any]]:
    """One short summary per route, in file order, for /rules."""
    ruleset = snapshot.ruleset
    out: list[dict[str, Any]] = []
    for compiled in snapshot.routes:
        route = compiled.model
        match = route.match
        summary: dict[str, Any] = {
            "name": route.name,
            "match": {
                k: v
                for k, v in (
                    ("hosts", match.hosts),
                    ("path_prefix", match.path_prefix),
                    ("methods", match.methods),
                )
                if v is not None
            },
            "user_id": [src.label for src in ruleset.sources_of(route)],
            "pins": [{"to": pin.to, "when": list(pin.conditions)} for pin in route.pins],
        }
        if route.to is not None:
            summary["to"] = route.to
        if route.split is not None:
            summary["split"] = dict(route.split.weights)
            summary["salt"] = route.salt
        out.append(summary)
    return out


# ---------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------


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

    def __init__(self, settings: Settings, slot: int, digest: str, report_fd: int) -> None:
        self.settings = settings
        self.slot = slot
        self.expected_digest = digest
        self.report_fd = report_fd
        self.metrics = WorkerMetrics()
        self.access_log: AccessLogWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._keep(self._reload(None)))

        _, self.report = await loop.connect_write_pipe(
            _ReportPipe, os.fdopen(self.report_fd, "wb", buffering=0)
        )
        try:
            snapshot = await self._load(self.expected_digest)
        except RulesError as exc:
            _log_problems(exc)
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
        self.router = Router(self.settings, snapshot, self.metrics, access_log=access_log)
        self.digest = snapshot.digest
        host, port = parse_hostport(self.settings.listen, "--listen")
        try:
            sock = reuseport_socket(host, port)
            sock.setblocking(False)
        except OSError as exc:
            log.error("cannot listen on %s: %s", self.settings.listen, exc.strerror or exc)
            await self.report.close(2.0)
            return EXIT_WORKER_SETUP
        # The backlog is given here: create_server calls listen() again with its own
        # (default 100, too short for bursts of new connections); the kernel caps it at
        # net.core.somaxconn.
        server = await loop.create_server(self.router.protocol_factory, sock=sock, backlog=_BACKLOG)

        self._keep(self._read_commands())
        self._keep(self._flush_metrics())
        if self.access_log is not None:
            self._keep(self.access_log.run())
        self.report.send({"ev": "ready", "pid": os.getpid(), "digest": self.digest})
        log.debug("accepting on %s", self.settings.listen)

        await self._stop.wait()

        self.report.send({"ev": "draining"})
        server.close()  # stop accepting; the other workers' sockets keep the port open
        log.info(
            "draining %d client connections (up to %.1f s)",
            len(self.router.connections),
            self.settings.drain_timeout,
        )
        try:
            await asyncio.wait_for(
                self.router.drain(self.settings.drain_timeout), self.settings.drain_timeout + 2.0
            )
        except TimeoutError:
            log.warning("drain did not finish in time; exiting anyway")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.access_log is not None:
            self.access_log.close()  # the last lines, after every request has finished
        self.report.send({"ev": "metrics", "data": self.metrics.snapshot()})
        self.report.send({"ev": "bye"})
        await self.report.close(2.0)
        return 0

    def _keep(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_metrics(self) -> None:
        last = b""
        while True:
            await asyncio.sleep(self.settings.metrics_interval)
            encoded = orjson.dumps(self.metrics.snapshot())
            # An idle worker sends nothing new; `last` moves only when a report went out,
            # so totals skipped on a backed-up pipe are sent on the next tick.
            if encoded != last and self.report.send_line(
                b'{"ev":"metrics","data":' + encoded + b"}\n", droppable=True
            ):
                last = encoded

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

    async def _load(self, expected: str | None) -> Snapshot:
        """Load the rule file; when it is not the `expected` digest, the saved copy of it."""
        loop = asyncio.get_running_loop()
        path = self.settings.rules_path
        snapshot: Snapshot | None = None
        error: RulesError | None = None
        try:
            snapshot = await loop.run_in_executor(None, _load_snapshot, path)
        except RulesError as exc:
            error = exc
        if snapshot is not None and (not expected or snapshot.digest == expected):
            return snapshot
        if expected:
            copy = rules_copy_path(self.settings.state_dir, expected)
            try:
                saved = await loop.run_in_executor(None, _load_snapshot, str(copy))
            except (RulesError, OSError):
                saved = None
            if saved is not None and saved.digest == expected:
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
            _log_problems(exc)
            self.report.send({"ev": "reloaded", "ok": False, "problems": problems})
            return
        if snapshot.digest != self.digest:
            try:
                self.router.install(snapshot)
            except Exception as exc:  # a bug in the data plane; the old rules stay in force
                log.exception("installing rules %s failed", snapshot.digest[:12])
                self.report.send({"ev": "reloaded", "ok": False, "problems": [repr(exc)]})
                return
            log.info("rules %s -> %s", self.digest[:12], snapshot.digest[:12])
            self.digest = snapshot.digest
        self.report.send({"ev": "reloaded", "ok": True, "digest": self.digest})


def worker_main() -> int:
    """Entry point of a worker process (`python -m router.server --worker`)."""
    config = orjson.loads(os.environ.pop(WORKER_ENV))
    settings = Settings(**config["settings"])
    slot = int(config["slot"])
    setup_logging(settings.log_level, f"worker {slot}")
    # fd 1 is the report pipe: keep it under another number and point fd 1 at stderr,
    # so nothing printed by accident can corrupt the channel.
    report_fd = os.dup(1)
    os.dup2(2, 1)
    worker = Worker(settings, slot, str(config["digest"]), report_fd)
    try:
        return uvloop.run(worker.run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        from router.server import worker_main as _main  # the module, not this __main__ copy

        sys.exit(_main())
    print("usage: python -m router.server --worker (started by `grayroute serve`)", file=sys.stderr)
    sys.exit(2)
