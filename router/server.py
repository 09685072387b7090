"""What both process roles of `grayroute serve` share: logging, the listening socket,
loading the rules, the channel between supervisor and workers.

    supervisor (router.supervisor, run_serve)     worker (python -m router.worker)
    ─────────────────────────────────────────     ─────────────────────────────────────────
    load + validate the rules once                 load the rules (the digest it is told)
    reserve the listen port (SO_REUSEPORT,         bind its own SO_REUSEPORT listening
      bound, never listening)                        socket on that port, Router(...)
    start N workers, restart any that dies   ─►    serve on uvloop
    admin app: /metrics /healthz /readyz /rules    every metrics_interval: send totals
    SIGHUP or a changed file (router.watch):       reload, router.install(snapshot)
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
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from router.errors import RulesError

if TYPE_CHECKING:
    from router.rules import Snapshot

log = logging.getLogger("grayroute.server")

WORKER_ENV = "GRAYROUTE_WORKER"  # JSON: settings, slot, digest in force
EXIT_WORKER_SETUP = 3  # a worker could not start (rules unreadable, port not bindable)
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


def load_snapshot_file(path: str) -> Snapshot:
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
        snapshot = load_snapshot_file(path)
        if before is not None and _read_bytes(path) == before:
            return snapshot, before
    return snapshot, None


def log_problems(exc: RulesError) -> None:
    """Each problem on its own line: errors as errors, warnings as warnings."""
    for problem in exc.problems:
        level = logging.WARNING if problem.severity == "warning" else logging.ERROR
        log.log(level, "  %s", problem)
    if not exc.problems:
        log.error("  %s", exc)
