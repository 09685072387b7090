"""The supervisor of `grayroute serve`: it owns the workers, the admin app, reloads and
the audit log (the channel it speaks with workers is described in router.server).

Where the rules come from is a `router.fleet.source.RulesSource`: a file (or a ConfigMap
volume) or an etcd key. Reload triggers all take one path (`Supervisor._request_reload`):
SIGHUP, the source's news (the rule file changing on disk, router.watch.FilesWatcher; a
new value of the etcd key), and `grayroute rollback`, which writes a kept version over the
file and sends SIGHUP. Every start and reload is appended to STATE_DIR/audit.jsonl through
`Supervisor.audit` (router.history.AuditLog), which keeps it within the
--audit-max-bytes/--history-max-age bounds; kept versions are pruned after each one that
takes effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import uvloop

from router.config import Settings, parse_hostport
from router.errors import ConfigError, RulesError
from router.native import build_info
from router.rules.effective import Effective, apply_effective
from router.server import (
    WORKER_ENV,
    format_hostport,
    log_problems,
    reuseport_socket,
    rules_copy_path,
    setup_logging,
)

if TYPE_CHECKING:
    from router.console import Console
    from router.fleet.dns import EndpointDiscovery
    from router.fleet.source import Loaded, RulesSource
    from router.health import HealthBoard
    from router.metrics import SupervisorMetrics
    from router.rollout.controller import RolloutController
    from router.rules import Snapshot
    from router.tls import CertificateSet, CertificateWatch


log = logging.getLogger("grayroute.supervisor")
_MAX_LINE = 16 * 1024 * 1024  # a metrics line grows with routes x upstreams x statuses
STARTUP_TIMEOUT = 60.0  # seconds for every worker to report ready at start
# Seconds the first DNS lookups may hold back the workers at start (router/fleet/dns.py).
DNS_STARTUP_WAIT = 5.0
# Seconds the first read of a fleet's rollout states may hold back the workers at start.
FLEET_STARTUP_WAIT = 2.0
# Seconds past --drain-timeout a draining worker gets to exit before it is killed (the
# interpreter's own exit); a pod's terminationGracePeriodSeconds must cover both.
WORKER_EXIT_MARGIN = 5.0


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def run_serve(settings: Settings) -> int:
    """Run `grayroute serve` until SIGTERM/SIGINT; the process exit code."""
    setup_logging(settings.log_level, "supervisor")
    from router.fleet.source import open_source

    try:
        return uvloop.run(_serve(settings, open_source(settings)))
    except ConfigError as exc:
        print(f"grayroute: {exc}", file=sys.stderr)
        return 1


async def _serve(settings: Settings, source: RulesSource) -> int:
    try:
        return await _serve_from(settings, source)
    finally:
        await source.aclose()


async def _serve_from(settings: Settings, source: RulesSource) -> int:
    try:
        loaded = await source.initial()
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if not exc.problems:
            print(f"{settings.rules_path}: {exc}", file=sys.stderr)
        return 1
    for warning in loaded.snapshot.warnings:
        log.warning("%s", warning)

    from router.history import resolve_state_dir

    try:
        state_dir = str(resolve_state_dir(settings.rules_path, settings.state_dir))
        log.info("state directory: %s", state_dir)
        if settings.access_log:
            from router.access_log import check_writable

            check_writable(settings.access_log)  # one clear line now, not N worker failures
        certificates = None
        if settings.listen_tls:
            from router.tls import load_certificates

            # Checked here once: a bad file is one line and exit 1, not N dying workers.
            certificates = load_certificates(settings.tls_pairs)
        with contextlib.ExitStack() as reserved:
            try:
                # Held for the supervisor's whole life: for `:0` this is what picks the
                # port every worker then binds; it never listens, so the kernel never
                # hands it a connection (only listening sockets join the SO_REUSEPORT group).
                flag, address = "--listen", settings.listen
                host, port = settings.listen_addr
                listen_port = reserved.enter_context(reuseport_socket(host, port)).getsockname()[1]
                tls_listen = []
                for address in settings.listen_tls:
                    flag = "--listen-tls"
                    host, port = parse_hostport(address, flag)
                    sock = reserved.enter_context(reuseport_socket(host, port))
                    tls_listen.append(format_hostport(host, sock.getsockname()[1]))
            except OSError as exc:
                print(f"grayroute: {flag} {address}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            supervisor = Supervisor(
                settings, loaded, listen_port, state_dir, source, tls_listen, certificates
            )
            return await supervisor.run()
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
    effective_seq: int = 0  # the last effective state this worker applied


class Supervisor:
    """Owns the workers, the admin app, and the rules the admin app reports."""

    def __init__(
        self,
        settings: Settings,
        loaded: Loaded,
        listen_port: int,
        state_dir: str,
        source: RulesSource,
        tls_listen: list[str] | None = None,
        certificates: CertificateSet | None = None,
    ) -> None:
        from router.metrics import SupervisorMetrics

        self.settings = settings
        self.source = source
        self.listen_host = settings.listen_addr[0]
        self.listen_port = listen_port
        self.tls_listen = tls_listen or []  # the TLS addresses, ports chosen
        self.certificates = certificates
        self.certificate_watch: CertificateWatch | None = None
        self.state_dir = state_dir
        from router.history import AuditLog

        # Every audit entry of this router goes through it (rollout transitions too),
        # so they all share one bound.
        self.audit = AuditLog(state_dir, settings.history_bounds)
        self.metrics: SupervisorMetrics = SupervisorMetrics(self._ready_count)
        self.metrics.rules_source_kinds = source.kinds
        self.exit_code = 0
        self.workers: dict[int, _Worker] = {}
        self._spawned = 0
        self._announced = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again: str | None = None  # the trigger of a reload asked for meanwhile
        self.last_reload: dict[str, Any] | None = None
        self._previous_digest: str | None = None  # in force before the current rules
        self._stop = asyncio.Event()  # SIGTERM/SIGINT, or a fatal start-up failure
        self._all_ready = asyncio.Event()
        # Run-time changes on top of the file (rollout weights, endpoints from DNS); every
        # worker applies them, and a worker started later gets them at start.
        self.effective = Effective()
        self.effective_seq = 0
        self.discovery: EndpointDiscovery | None = None  # endpoints from DNS, once running
        from router.fleet import default_router_id

        self.router_id = settings.router_id or default_router_id(self.listen_host, listen_port)
        self.metrics.upstream_endpoints = self._endpoint_counts
        from router.rollout.plane import build_controller

        # Progressive rollouts: weights put in force through the effective state, so they
        # are there before the first worker starts (a Failed canary stays at 0).
        self.rollouts = build_controller(self)
        self._accept(loaded)
        problems = source.start_problems()
        if problems:  # started from the cache: the source's value is reported as a failure
            self._reload_failed("start", problems, source.attempted_digest())
        from router.console import Console

        self._console = Console(self)  # the release console's samples (router.console)

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
            "source": self.source.location,
            "source_status": self.source.status(),
            "digest": snap.digest,
            "loaded_at": self.loaded_at,
            "upstreams": self._describe_upstreams(),
            "routes": describe_routes(snap, self.effective_snapshot),
            "last_reload": self.last_reload,
            "state_dir": self.state_dir,
            "watch_interval": self.settings.watch_interval,
            "workers": {
                str(w.slot): {"pid": w.proc.pid, "ready": w.ready, "digest": w.digest}
                for w in sorted(self.workers.values(), key=lambda w: w.slot)
            },
        }

    def console(self) -> Console:
        return self._console

    def rollout_control(self) -> RolloutController:
        return self.rollouts

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
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

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
            self._keep(self._console.run())
            await self._start_discovery()
            self._keep(self.rollouts.run())
            # A fleet's rollout states come from etcd: in force before traffic, when it answers.
            await self.rollouts.first_states(FLEET_STARTUP_WAIT)
            slots = [self._keep(self._slot_loop(slot)) for slot in range(self.settings.workers)]
            self._keep(self.source.watch(lambda: self.snapshot.digest, self._request_reload))
            if self.certificates is not None:
                from router.tls import CertificateWatch

                self.certificate_watch = CertificateWatch(
                    self.settings.tls_pairs,
                    self.certificates,
                    self._tell_workers_tls_reload,
                    self.metrics,
                    self.settings.watch_interval,
                )
                self._keep(self.certificate_watch.run())
            if await self._wait_ready():
                self._announce(admin_host, admin_port)
            await self._stop.wait()
            await self._shutdown(slots)
        finally:
            from router.history import remove_pidfile

            remove_pidfile(self.state_dir)
            await admin.close()
            if self.discovery is not None:
                await self.discovery.close()
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
        from router.history import previous_version

        self._previous_digest = previous_version(self.state_dir)
        self._prune_history()
        build = build_info()
        line = {
            "event": "ready",
            "listen": format_hostport(self.listen_host, self.listen_port),
            "listen_tls": self.tls_listen,
            "admin": format_hostport(admin_host, admin_port),
            "workers": self.settings.workers,
            "pid": os.getpid(),
            "rules": self.snapshot.digest,
            "build": build.kind,
            "build_detail": build.detail,
        }
        try:
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
        except OSError as exc:  # nobody reads stdout (closed pipe): the log still says it
            log.warning("cannot print the ready line: %s", exc)
        log.info(
            "ready: listening on %s, admin on %s, %d workers, rules %s, %s",
            ", ".join([str(line["listen"]), *(f"{a} (TLS)" for a in self.tls_listen)]),
            line["admin"], self.settings.workers, self.snapshot.digest[:12], build,
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
        grace = self.settings.drain_timeout + WORKER_EXIT_MARGIN
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
                self.metrics.health.retire(worker.wid)
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
                    async with asyncio.timeout(delay):
                        await self._stop.wait()

    async def _spawn(self, slot: int) -> _Worker:
        self._spawned += 1
        settings = dataclasses.asdict(self.settings)
        settings["listen"] = format_hostport(self.listen_host, self.listen_port)
        settings["listen_tls"] = self.tls_listen
        settings["state_dir"] = self.state_dir
        if self.settings.access_log:
            settings["access_log"] = os.path.abspath(self.settings.access_log)
        settings["admin_token"] = ""  # workers never need it; keep it out of their env
        settings["etcd_password"] = ""
        env = dict(os.environ)
        for secret in ("GRAYROUTE_ADMIN_TOKEN", "GRAYROUTE_ETCD_PASSWORD"):
            env.pop(secret, None)  # workers need neither; /proc/PID/environ would show them
        env[WORKER_ENV] = orjson.dumps(
            {
                "settings": settings,
                "slot": slot,
                "digest": self.snapshot.digest,
                "effective": self.effective.to_json(),
            }
        ).decode()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=_MAX_LINE,
        )  # fmt: skip
        worker = _Worker(
            slot=slot,
            wid=f"{slot}.{self._spawned}.{proc.pid}",
            proc=proc,
            effective_seq=self.effective_seq,
        )
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
        elif event == "health":
            data = message.get("data")
            if isinstance(data, dict):
                self.metrics.health.update(worker.wid, data)
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
        elif event == "effective":
            seq = message.get("seq")
            if message.get("ok") and isinstance(seq, int):
                worker.effective_seq = max(worker.effective_seq, seq)
            elif not message.get("ok"):
                log.error(
                    "worker %d kept its effective state: %s", worker.slot, message.get("error")
                )
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

    # -- the effective state ----------------------------------------------------------------

    def set_effective(self, effective: Effective) -> None:
        """Put `effective` in force in every worker (as a reload does, without the file)."""
        if effective == self.effective:
            return
        self.effective = effective
        self.effective_seq += 1
        command = {"cmd": "effective", "seq": self.effective_seq, "state": effective.to_json()}
        for worker in list(self.workers.values()):
            self._send(worker, command)

    def effective_applied(self) -> bool:
        """True when every running worker has applied the latest effective state."""
        return all(w.effective_seq == self.effective_seq for w in self.workers.values())

    def _set_endpoints(self, upstream: str, endpoints: tuple[tuple[str, int], ...] | None) -> None:
        # From the state in force, so a rollout's weights set meanwhile stay as they are.
        self.set_effective(self.effective.with_endpoints(upstream, endpoints))

    def _endpoint_counts(self) -> dict[str, int]:
        """Addresses in use now, per upstream (the metric grayroute_upstream_endpoints)."""
        found = self.effective.endpoints
        return {
            name: len(found.get(name, spec.endpoints))
            for name, spec in self.snapshot.upstreams.items()
        }

    def _describe_upstreams(self) -> dict[str, Any]:
        """For /rules: the endpoints in use (DNS's, not the file's empty list), and for DNS
        upstreams the name and the last lookup."""
        effective = self.effective_snapshot
        upstreams = describe_upstreams(
            effective, self.settings, effective.fallbacks, self.metrics.health
        )
        if self.discovery is not None:
            for name, dns in self.discovery.describe().items():
                if name in upstreams:
                    upstreams[name]["dns"] = dns
        return upstreams

    async def _start_discovery(self) -> None:
        """Follow the DNS upstreams; before any worker takes traffic, wait (a bounded
        time) for their first lookups, so a fresh router does not start with none."""
        from router.fleet.dns import EndpointDiscovery

        self.discovery = EndpointDiscovery(
            self._set_endpoints, self.metrics.dns_lookups, self.settings.resolver_addrs
        )
        self.discovery.follow(self.snapshot.upstreams)
        pending = await self.discovery.settle(DNS_STARTUP_WAIT)
        if pending:
            log.warning(
                "no DNS answer within %.0f s for %s; starting without their endpoints",
                DNS_STARTUP_WAIT,
                ", ".join(pending),
            )

    @property
    def effective_snapshot(self) -> Snapshot:
        """The rules as the workers route now: the file's, with the effective state."""
        return apply_effective(self.snapshot, self.effective)

    # -- rules ----------------------------------------------------------------------------

    def _accept(self, loaded: Loaded) -> None:
        """Make `loaded` the rules in force (at start and after a successful reload)."""
        snapshot = self.snapshot = loaded.snapshot
        self.loaded_at = _now_iso()
        self.metrics.rules_digest = snapshot.digest
        self.metrics.rules_source = self.source.location
        self.metrics.rules_loaded_at = time.time()
        self.metrics.shadowed_routes = snapshot.ruleset.shadowed_by
        if loaded.raw is not None:
            # Before the source caches it: a cache never points at a missing copy.
            _write_atomic(rules_copy_path(self.state_dir, snapshot.digest), loaded.raw)
        if self.discovery is not None:  # at start: followed once running (_start_discovery)
            self.discovery.follow(snapshot.upstreams)
        self.rollouts.sync(snapshot)
        self.source.accepted(loaded)

    def _on_sighup(self) -> None:
        """SIGHUP: the rule file, and the certificates when they changed (as nginx does)."""
        self._request_reload("sighup")
        if self.certificate_watch is not None and not self._stop.is_set():
            self.certificate_watch.request("sighup")

    def _tell_workers_tls_reload(self) -> None:
        for worker in list(self.workers.values()):
            self._send(worker, {"cmd": "tls_reload"})

    def _request_reload(self, trigger: str) -> None:
        """Reload the rules (trigger: "sighup", "watch", "etcd"); merged while one runs."""
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
        source = self.source
        log.info("%s: reloading %s", source.describe(trigger), source.location)
        old = self.snapshot.digest
        try:
            loaded = await source.load(trigger)
        except RulesError as exc:
            problems = [str(p) for p in exc.problems] or [str(exc)]
            errors = sum(1 for p in exc.problems if p.severity != "warning") or 1
            log.error(
                "reload failed; keeping rules %s (%d error%s)",
                old[:12],
                errors,
                "" if errors == 1 else "s",
            )
            log_problems(exc)
            self._reload_failed(trigger, problems, source.attempted_digest())
            return
        except Exception as exc:  # a bug, not a bad file: keep the traceback
            log.exception("reload crashed; keeping rules %s", old[:12])
            self._reload_failed(trigger, [f"internal error: {exc!r}"], source.attempted_digest())
            return
        snapshot = loaded.snapshot
        for warning in snapshot.warnings:
            log.warning("%s", warning)
        self._accept(loaded)
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
        if old != snapshot.digest:
            self._previous_digest = old
        self._prune_history()
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
        from router.history import actor, file_owner, now_iso

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
            **self.source.audit_fields(),
        }
        try:
            self.audit.append(entry)
        except OSError as exc:
            log.warning("cannot append to the audit log in %s: %s", self.state_dir, exc)

    def _prune_history(self) -> None:
        """Drop kept rules versions beyond the bounds; never the one in force or the one
        before it (what `grayroute rollback` goes back to)."""
        from router.history import prune_versions

        previous = self._previous_digest
        keep = {self.snapshot.digest} | ({previous} if previous else set())
        try:
            dropped = prune_versions(self.state_dir, self.settings.history_bounds, keep)
        except OSError as exc:
            log.warning("cannot prune the rules history in %s: %s", self.state_dir, exc)
            return
        if dropped:
            log.info("rules history: dropped %d old version(s)", len(dropped))

    def _write_pidfile(self) -> None:
        from router.history import write_pidfile

        try:
            write_pidfile(self.state_dir, self.settings.rules_path)
        except OSError as exc:
            log.warning("cannot write the pid file (rollback cannot signal us): %s", exc)


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


def describe_upstreams(
    snapshot: Snapshot,
    settings: Settings,
    fallbacks: Mapping[str, tuple[str, ...]],
    health: HealthBoard,
) -> dict[str, Any]:
    """Upstreams for /rules, with the timeouts in force (the server's when not set), the
    fallback in force (the file's, or the control plane's default) and the workers'
    view of each endpoint (router.health)."""
    out: dict[str, Any] = {}
    for name, spec in snapshot.upstreams.items():
        connect = spec.connect_timeout
        read = spec.read_timeout
        endpoints = [format_hostport(host, port) for host, port in spec.endpoints]
        states = health.describe(name, endpoints)
        out[name] = {
            "endpoints": endpoints,
            "connect_timeout": settings.connect_timeout if connect is None else connect,
            "read_timeout": settings.read_timeout if read is None else read,
            "health_check": dataclasses.asdict(spec.health_check) if spec.health_check else None,
            "fallback": fallbacks.get(name, (None,))[0],
            "max_fails": 1 if spec.max_fails is None else spec.max_fails,
            "fail_timeout": spec.fail_timeout or settings.fail_timeout,
            "health": states,
            "healthy_endpoints": sum(1 for e in states.values() if e["state"] == "up"),
        }
    return out


def describe_routes(snapshot: Snapshot, effective: Snapshot | None = None) -> list[dict[str, Any]]:
    """One short summary per route, in file order, for /rules; with `effective` (the
    rules as the workers route now), each split's weights in force beside the file's."""
    ruleset = snapshot.ruleset
    shadowed = dict(ruleset.shadowed_by)
    out: list[dict[str, Any]] = []
    for i, compiled in enumerate(snapshot.routes):
        route = compiled.model
        match = route.match
        summary: dict[str, Any] = {
            "name": route.name,
            "match": match.written(),
            "user_id": [src.label for src in ruleset.sources_of(route)],
            "pins": [{"to": pin.to, "when": list(pin.conditions)} for pin in route.pins],
        }
        if route.to is not None:
            summary["to"] = route.to
        if route.split is not None:
            summary["split"] = dict(route.split.weights)
            table = effective.routes[i].split if effective is not None else None
            if table is not None:  # the control plane's weights (a rollout, replicas)
                in_force = dict(zip(table.names, table.weights, strict=True))
                summary["effective_split"] = {n: in_force.get(n, 0.0) for n in summary["split"]}
            summary["salt"] = route.salt
        if route.direct_response is not None:
            summary["direct_response"] = {"status": route.direct_response.status}
        if route.redirect is not None:
            summary["redirect"] = {"status": route.redirect.status}
        # An earlier route matches every request this one matches: it gets nothing.
        summary["shadowed_by"] = shadowed.get(route.name)
        out.append(summary)
    return out
