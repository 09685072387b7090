"""Rules history: the state directory, the audit log, `grayroute history` and `rollback`.

The state directory of one router (one rule file):

    rules/DIGEST.yaml   the exact bytes of every rules version that took effect, named by
                        their sha256 (content-addressed: a version is stored once however
                        often it comes back; its mtime is the last time it took effect)
    audit.jsonl         one JSON line per event, appended whole (O_APPEND, one write):
                        start, reload, rollback, rollout transitions; who, when, which
                        hash, the result
    audit.jsonl.1, .2   the audit log's older parts, once rotated (AuditLog)
    audit.lock          flock: taken by every writer of the audit log for one append,
                        shared by readers
    supervisor.json     the running supervisor: pid, process start time, rule file; written
                        once its SIGHUP handler is in place, removed when it exits
    rollback.json       a rollback handed to the running router, until it takes effect

Where it is (`resolve_state_dir`): `--state-dir DIR` when given; else
`RULES_DIR/.grayroute-state/RULES_NAME/` next to the rule file when that can be
created; else (a read-only directory such as a Kubernetes ConfigMap mount)
`${XDG_STATE_HOME:-~/.local/state}/grayroute/RULES_NAME-HASH8/`, HASH8 naming the rule
file's absolute path. `serve`, `history` and `rollback` find the same directory from
the same rule file path, so a rollback works across restarts. Rules in etcd
(`etcd://.../KEY`) have no file to live beside: `${XDG_STATE_HOME:-~/.local/state}/
grayroute/etcd-NAME-HASH8/`, HASH8 naming the key (their history is in etcd itself,
see router.fleet.revisions; the state directory holds the cached last good rules).

Both are bounded (`HistoryBounds`, from `grayroute serve --audit-max-bytes,
--history-max-age, --history-max-versions`): the router's `AuditLog` rotates the log as
it appends, and `prune_versions` deletes the versions no longer wanted after each
reload, never the one in force or the previous one. Without a running router nothing is
dropped (a rollback's one line waits for the next start).

Rollback (`run_rollback`) never changes the rules in force by itself: it writes the
chosen version over the rule file (atomically, keeping the file's mode) and sends SIGHUP
to the running supervisor, which validates and reloads it exactly as it would any edit.
It then waits for the audit log to say how that reload went.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import getpass
import hashlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

import orjson

from router.errors import ConfigError, RulesError

__all__ = [
    "AUDIT_FILE",
    "INTENT_FILE",
    "PID_FILE",
    "RULES_DIR",
    "AuditLog",
    "HistoryBounds",
    "actor",
    "append_audit",
    "default_state_dirs",
    "kept_path",
    "prune_versions",
    "read_audit",
    "resolve_state_dir",
    "run_history",
    "run_rollback",
    "take_intent",
    "write_atomic",
]

RULES_DIR = "rules"
AUDIT_FILE = "audit.jsonl"
AUDIT_PARTS = 3  # audit.jsonl, and audit.jsonl.1 and .2 once rotated (AuditLog)
LOCK_FILE = "audit.lock"
_MAX_LINE_READ = 64 * 1024  # bytes read to find the first or last entry of a file
PID_FILE = "supervisor.json"
INTENT_FILE = "rollback.json"
STATE_DIR_NAME = ".grayroute-state"
# A rollback the router did not take within this long is stale (the router was stopped
# between the file write and the SIGHUP, say); it is then ignored and removed.
INTENT_TTL = 600.0
# Results after which an audit entry's `digest` is the version in force (or, for
# "written", the version that will be in force when the router next starts).
IN_FORCE_RESULTS = frozenset({"success", "written"})
# The actions of entries about the rule file; other writers use actions of their own.
RULES_ACTIONS = frozenset({"start", "reload", "rollback"})

# How much history the router keeps by default: at one reload every 10 s the audit log
# grows about 4 MB a day, so the size bound is what holds it then; at a few reloads a
# day, the age does.
DEFAULT_AUDIT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_HISTORY_MAX_AGE = 90 * 86400.0
DEFAULT_HISTORY_MAX_VERSIONS = 200


@dataclass(frozen=True, slots=True)
class HistoryBounds:
    """How much history a state directory keeps; 0 means no bound of that kind."""

    audit_max_bytes: int = DEFAULT_AUDIT_MAX_BYTES
    max_age: float = DEFAULT_HISTORY_MAX_AGE  # seconds: audit entries and kept versions
    max_versions: int = DEFAULT_HISTORY_MAX_VERSIONS  # kept rules versions


UNBOUNDED = HistoryBounds(0, 0.0, 0)


def now_iso() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-01-05T10:00:00.123Z."""
    return iso_utc(time.time())


def iso_utc(unix: float) -> str:
    """A Unix time as now_iso() writes it."""
    when = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def actor() -> dict[str, Any]:
    """Who is acting: the login name (LOGNAME/USER/... or the uid's name), host and pid."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers): the number
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid()}


def file_owner(path: str) -> str | None:
    """The owner of `path` (following symlinks) by name, or uid; None if it cannot be read."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return None
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


# -- where the state lives ---------------------------------------------------------------


def default_state_dirs(rules_path: str) -> list[Path]:
    """The default state directories of a rule file, in the order they are tried."""
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    from router.fleet import EtcdLocation, is_etcd_url

    if is_etcd_url(rules_path):  # no file to live beside: the key names the directory
        return [Path(xdg) / "grayroute" / EtcdLocation.parse(rules_path).state_dir_name()]
    rules = Path(os.path.abspath(rules_path))  # not resolved: a ConfigMap symlink moves
    tag = hashlib.sha256(str(rules).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return [
        rules.parent / STATE_DIR_NAME / rules.name,
        Path(xdg) / "grayroute" / f"{rules.name}-{tag}",
    ]


def resolve_state_dir(rules_path: str, given: str = "", *, create: bool = True) -> Path:
    """The state directory for `rules_path`; ConfigError when there is none.

    create=True (serve): the first default that exists or can be created and written.
    create=False (history, rollback): the first default that holds an audit log.
    """
    if given:
        path = Path(given)
        if create:
            try:
                (path / RULES_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--state-dir: cannot create {path}: {exc.strerror}") from exc
        return path
    candidates = default_state_dirs(rules_path)
    if not create:
        for path in candidates:
            if (path / AUDIT_FILE).is_file():
                return path
        raise ConfigError(
            f"no router history for {rules_path} (looked in "
            f"{' and '.join(str(p) for p in candidates)}); give --state-dir DIR as "
            "`grayroute serve` was given it"
        )
    problems = []
    for path in candidates:
        try:
            (path / RULES_DIR).mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK | os.X_OK):
                return path
            problems.append(f"{path}: not writable")
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
    raise ConfigError(f"no usable state directory ({'; '.join(problems)}); give --state-dir DIR")


def kept_path(state_dir: str | Path, digest: str) -> Path:
    return Path(state_dir) / RULES_DIR / f"{digest}.yaml"


# -- the audit log -------------------------------------------------------------------------


class AuditLog:
    """The audit log of one state directory, kept within `bounds` as entries go in.

    Every writer in the router appends through the supervisor's one AuditLog (reloads,
    rollbacks, rollout transitions), so they all share the bound. An append is one
    write() with O_APPEND under an exclusive lock on `audit.lock` (readers take it
    shared). The log is AUDIT_PARTS files, rotated the way logrotate does it, so a log
    shipper following audit.jsonl by name sees each line once: before an append, when
    audit.jsonl would pass 1/AUDIT_PARTS of `audit_max_bytes`, or its oldest entry is
    older than half of `max_age`, audit.jsonl.1 becomes audit.jsonl.2 (dropping the
    oldest part), audit.jsonl becomes audit.jsonl.1, and a new audit.jsonl starts. An
    older part is also dropped once its newest entry is older than `max_age`. So the log
    holds at most `audit_max_bytes` (at least two thirds of it, once that much was
    written), and an entry stays at least `max_age` and at most one and a half times
    that.
    """

    def __init__(
        self,
        state_dir: str | Path,
        bounds: HistoryBounds = UNBOUNDED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.parts = audit_parts(state_dir)  # newest first
        self.path = self.parts[0]
        self.lock_path = Path(state_dir) / LOCK_FILE
        self.bounds = bounds
        self.clock = clock  # Unix time, compared with the entries' `at`

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry, rotating first when a bound says so; OSError."""
        line = orjson.dumps(entry) + b"\n"
        with _locked(self.lock_path, fcntl.LOCK_EX):
            now = self.clock()
            if self._rotation_due(len(line), now):
                for newer, older in reversed(list(pairwise(self.parts))):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(newer, older)
            if self.bounds.max_age:
                for part in self.parts[1:]:
                    newest = _newest_time(part)
                    if newest is not None and newest < now - self.bounds.max_age:
                        part.unlink()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def _rotation_due(self, adding: int, now: float) -> bool:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        if not size:
            return False
        bounds = self.bounds
        if bounds.audit_max_bytes and size + adding > bounds.audit_max_bytes // AUDIT_PARTS:
            return True
        if bounds.max_age:
            with open(self.path, "rb") as f:
                oldest = _entry_time(f.readline(_MAX_LINE_READ))
            return oldest is not None and oldest < now - bounds.max_age / 2
        return False


def audit_parts(state_dir: str | Path) -> list[Path]:
    """The files of the audit log, newest first: audit.jsonl, audit.jsonl.1, ..."""
    base = Path(state_dir) / AUDIT_FILE
    return [base, *(base.with_name(f"{AUDIT_FILE}.{i}") for i in range(1, AUDIT_PARTS))]


@contextlib.contextmanager
def _locked(path: Path, how: int) -> Iterator[None]:
    """Hold `path` locked (flock) for a write or, shared, for a read. Opened read-only
    (flock needs no more), so that whoever made it, every writer can take it. A reader
    that does not find it reads unlocked: no router has bounded this log yet."""
    flags = os.O_RDONLY | (os.O_CREAT if how == fcntl.LOCK_EX else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # releases the lock


def _newest_time(path: Path) -> float | None:
    """The time of the last entry of an audit file; None when there is none."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _MAX_LINE_READ))
            tail = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        at = _entry_time(line)
        if at is not None:
            return at
    return None


def _entry_time(line: bytes) -> float | None:
    """The Unix time of an audit line's `at`, None when it has none that parses."""
    try:
        at = orjson.loads(line).get("at")
        return datetime.datetime.fromisoformat(str(at)).timestamp()
    except (orjson.JSONDecodeError, AttributeError, ValueError):
        return None


def append_audit(state_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append one line, trimming nothing (the router does: see AuditLog). OSError."""
    AuditLog(state_dir).append(entry)


def prune_versions(
    state_dir: str | Path, bounds: HistoryBounds, keep: set[str], now: float | None = None
) -> list[str]:
    """Delete kept rules versions beyond `bounds`: older than max_age (by the last time
    they took effect, their mtime), then the least recent beyond max_versions. Never one
    in `keep` (the version in force and the previous one). The digests deleted."""
    now = time.time() if now is None else now
    versions: list[tuple[float, str, Path]] = []
    for path in (Path(state_dir) / RULES_DIR).glob("*.yaml"):
        try:
            versions.append((path.stat().st_mtime, path.stem, path))
        except OSError:
            continue
    versions.sort(reverse=True)  # most recent first
    doomed = []
    kept = 0
    for mtime, digest, path in versions:
        if digest in keep:
            kept += 1
            continue
        too_old = bounds.max_age and mtime < now - bounds.max_age
        too_many = bounds.max_versions and kept >= bounds.max_versions
        if too_old or too_many:
            doomed.append((digest, path))
        else:
            kept += 1
    for _, path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return [digest for digest, _ in doomed]


def read_audit(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable entry, oldest first (a torn or foreign line is skipped)."""
    pieces = []
    with _locked(Path(state_dir) / LOCK_FILE, fcntl.LOCK_SH):  # no rotation meanwhile
        for part in reversed(audit_parts(state_dir)):
            with contextlib.suppress(FileNotFoundError):
                pieces.append(part.read_bytes())
    data = b"".join(pieces)
    entries = []
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def versions_in_force(entries: list[dict[str, Any]]) -> list[str]:
    """The digests that were in force, oldest first, without immediate repeats. Only
    entries about the rule file count (other writers' entries, e.g. a rollout's, may
    name a digest too)."""
    out: list[str] = []
    for entry in entries:
        digest = entry.get("digest")
        in_force = (
            entry.get("action") in RULES_ACTIONS
            and entry.get("result") in IN_FORCE_RESULTS
            and isinstance(digest, str)
        )
        if in_force and digest and (not out or out[-1] != digest):
            out.append(digest)
    return out


# -- the running supervisor ---------------------------------------------------------------


def _process_start_time(pid: int) -> int | None:
    """Clock ticks after boot when `pid` started (Linux /proc), to detect pid reuse."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return None


def write_pidfile(state_dir: str | Path, rules_path: str) -> None:
    pid = os.getpid()
    data = {
        "pid": pid,
        "start_time": _process_start_time(pid),
        "rules": os.path.abspath(rules_path),
        "at": now_iso(),
    }
    write_atomic(Path(state_dir) / PID_FILE, orjson.dumps(data))


def remove_pidfile(state_dir: str | Path) -> None:
    """Remove the pid file if it is still this process's (another router may have taken over)."""
    path = Path(state_dir) / PID_FILE
    with contextlib.suppress(OSError, orjson.JSONDecodeError, AttributeError):
        if orjson.loads(path.read_bytes()).get("pid") == os.getpid():
            path.unlink()


def running_supervisor(state_dir: str | Path) -> dict[str, Any] | None:
    """The pid file's record when that supervisor is still running, else None."""
    try:
        info = orjson.loads((Path(state_dir) / PID_FILE).read_bytes())
        pid = int(info["pid"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but another user's: signalling it will fail with a clear message
    recorded = info.get("start_time")
    if recorded is not None and _process_start_time(pid) not in (None, recorded):
        return None  # the pid was reused by another process after a crash
    return dict(info)


# -- rollback intents -----------------------------------------------------------------------


def write_intent(state_dir: str | Path, record: dict[str, Any]) -> None:
    write_atomic(Path(state_dir) / INTENT_FILE, orjson.dumps(record))


def take_intent(state_dir: str | Path, digest: str) -> dict[str, Any] | None:
    """The pending rollback to `digest`, removed once taken; None if there is none."""
    path = Path(state_dir) / INTENT_FILE
    try:
        intent = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(intent, dict):
        intent = {}
    stale = time.time() - float(intent.get("at_unix", 0) or 0) > INTENT_TTL
    if intent.get("digest") == digest or stale:
        with contextlib.suppress(OSError):
            path.unlink()
    return intent if intent.get("digest") == digest and not stale else None


# -- files ----------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` by a rename in the same directory (readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is not None:
            os.chmod(tmp, mode)  # the umask applied at open
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _replace_rules_file(rules_path: str, data: bytes) -> Path:
    """Put `data` in the rule file atomically; through symlinks, at the file they lead to."""
    target = Path(os.path.realpath(rules_path))
    try:
        mode: int | None = target.stat().st_mode & 0o7777
    except OSError:
        mode = None
    write_atomic(target, data, mode)
    return target


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


# -- `grayroute history` --------------------------------------------------------------------


def run_history(rules_path: str, state_dir: str, as_json: bool, out: IO[str]) -> int:
    state = resolve_state_dir(rules_path, state_dir, create=False)
    entries = read_audit(state)
    versions = versions_in_force(entries)
    current = versions[-1] if versions else None
    previous = _previous(versions)
    kept = sorted(
        (p.stem for p in (state / RULES_DIR).glob("*.yaml")),
        key=lambda d: (versions[::-1].index(d) if d in versions else len(versions), d),
    )
    routes = {digest: version_routes(kept_path(state, digest), rules_path) for digest in kept}
    if as_json:
        doc = {
            "state_dir": str(state),
            "in_force": current,
            "previous": previous,
            "kept": kept,
            "versions": routes,
            "events": entries,
        }
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    print(f"state directory: {state}", file=out)
    for e in entries:
        who = f"{e.get('user', '?')}@{e.get('host', '?')}"
        line = (
            f"{e.get('at', '?'):<24}  {e.get('action', '?'):<8}  {e.get('result', '?'):<7}  "
            f"{str(e.get('digest') or '-')[:12]:<12}  {e.get('trigger', '')!s:<6}  {who}"
        )
        if e.get("result") == "failure":
            line += f"  (tried {str(e.get('attempted') or '?')[:12]}: kept the rules in force)"
        print(line, file=out)
    print("kept versions (most recently in force first):", file=out)
    for digest in kept:
        note = (
            "in force"
            if digest == current
            else "previous"
            if digest == previous
            else ""
            if digest in versions
            else "(never in force: a rejected file, or edits a rollback replaced)"
        )
        print(f"  {digest}  {note}".rstrip(), file=out)
        for line in _route_lines(routes[digest]):
            print(f"      {line}", file=out)
    return 0


def version_routes(path: Path, rules_path: str) -> dict[str, Any]:
    """What each route of a kept version does: {"routes": {name: {"split": {upstream:
    weight}} | {"to": upstream} | {"split_clients": {...}} | {"lua": file}}}, or
    {"error": the first problem} when it cannot be read as rules any more.

    The version is read as if it were the rule file (`rules_path`), so that what it names
    relative to it (Lua scripts) is found where the router would find it.
    """
    from router.rules.load import decode_rules_bytes, load_text
    from router.rules.validate import validate

    try:
        root, problems = load_text(decode_rules_bytes(path.read_bytes(), rules_path), rules_path)
        ruleset, found = validate(root, rules_path)
    except OSError as exc:
        return {"error": f"{path}: {exc.strerror}"}
    except RulesError as exc:
        problems, ruleset, found = exc.problems, None, []
    if ruleset is None:
        errors = [p for p in [*problems, *found] if p.severity == "error"]
        return {"error": str(errors[0]) if errors else "not valid"}
    routes: dict[str, Any] = {}
    for route in ruleset.routes:
        if route.split is not None:
            split: dict[str, Any] = {"split": dict(route.split.weights)}
            if route.split.replicas:
                split["replicas"] = True
            routes[route.name] = split
        elif route.to is not None:
            routes[route.name] = {"to": route.to}
        elif route.split_clients is not None:
            routes[route.name] = {"split_clients": dict(route.split_clients.buckets)}
        elif route.lua is not None:
            routes[route.name] = {"lua": route.lua.file}
    return {"routes": routes}


def _route_lines(version: dict[str, Any]) -> list[str]:
    """`grayroute history`'s lines for one kept version: each route's weights."""
    if "error" in version:
        return [f"(cannot be read as rules now: {version['error']})"]
    lines = []
    width = max((len(name) for name in version["routes"]), default=0)
    for name, does in version["routes"].items():
        if "split" in does:
            weights = ", ".join(f"{u} {_weight(w)}" for u, w in does["split"].items())
            what = f"{weights}{' (replicas)' if does.get('replicas') else ''}"
        elif "to" in does:
            what = f"to {does['to']}"
        elif "split_clients" in does:
            what = "split_clients " + ", ".join(
                f"{u} {pct}" for pct, u in does["split_clients"].items()
            )
        else:
            what = f"lua {does['lua']}"
        lines.append(f"{name:<{width}}  {what}")
    return lines


def _weight(weight: float) -> str:
    return str(int(weight)) if weight == int(weight) else f"{weight:g}"


def previous_version(state_dir: str | Path) -> str | None:
    """The version in force before the current one, by the audit log."""
    return _previous(versions_in_force(read_audit(state_dir)))


def _previous(versions: list[str]) -> str | None:
    """The version in force before the current one (a second rollback toggles back)."""
    if not versions:
        return None
    current = versions[-1]
    for digest in reversed(versions[:-1]):
        if digest != current:
            return digest
    return None


# -- `grayroute rollback` -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    digest: str
    data: bytes


def _choose(state: Path, versions: list[str], to: str) -> _Target:
    if to:
        want = to.lower()
        matches = sorted(p.stem for p in (state / RULES_DIR).glob(f"{want}*.yaml"))
        if not matches:
            raise ConfigError(
                f"--to {to}: no kept version starts with that (see `grayroute history`)"
            )
        if len(matches) > 1:
            raise ConfigError(
                f"--to {to}: {len(matches)} kept versions start with that "
                f"({', '.join(m[:16] for m in matches)}); give more digits"
            )
        digest = matches[0]
    else:
        previous = _previous(versions)
        if previous is None:
            raise ConfigError(
                "nothing to roll back to: only one version has been in force "
                "(see `grayroute history`)"
            )
        digest = previous
    path = kept_path(state, digest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the kept version: {exc.strerror}") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise ConfigError(f"{path}: the kept copy does not match its hash; it was altered")
    return _Target(digest, data)


def _validate(data: bytes, name: str) -> None:
    """The same checks the router makes; RulesError with every problem."""
    from router.rules import load_snapshot_text
    from router.rules.load import decode_rules_bytes

    load_snapshot_text(decode_rules_bytes(data, name), name)


def run_rollback(
    rules_path: str,
    to: str,
    state_dir: str,
    *,
    print_only: bool = False,
    wait: float = 10.0,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """0: the version is in force (or written for the next start); 1: it was refused."""
    state = resolve_state_dir(rules_path, state_dir, create=False)
    entries = read_audit(state)
    versions = versions_in_force(entries)
    current = versions[-1] if versions else None
    target = _choose(state, versions, to)
    try:
        _validate(target.data, str(kept_path(state, target.digest)))
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        print(f"grayroute rollback: version {target.digest[:12]} is not valid now", file=err)
        return 1
    if print_only:
        out.write(target.data.decode("utf-8", "surrogateescape"))
        return 0

    on_disk = Path(rules_path)
    disk_digest = _sha256_file(on_disk)
    if disk_digest is not None and disk_digest not in (current, target.digest):
        # Edited but never in force (or rejected): keep it, so the rollback loses nothing.
        kept = kept_path(state, disk_digest)
        if not kept.exists():
            write_atomic(kept, on_disk.read_bytes())
        print(
            f"grayroute rollback: {rules_path} held changes that were not in force; kept as {kept}",
            file=err,
        )
    who = actor()
    supervisor = running_supervisor(state)
    if supervisor is not None and supervisor.get("rules") != os.path.abspath(rules_path):
        print(
            f"grayroute rollback: the router running from {state} serves "
            f"{supervisor.get('rules')}, not {os.path.abspath(rules_path)}; not signalling it",
            file=err,
        )
        supervisor = None
    if supervisor is not None:
        write_intent(
            state,
            {**who, "digest": target.digest, "previous": current, "at": now_iso(),
             "at_unix": time.time()},
        )  # fmt: skip
    seen = _Mark(entries[-1] if entries else None, now_iso())
    try:
        written = _replace_rules_file(rules_path, target.data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            (state / INTENT_FILE).unlink()
        print(
            f"grayroute rollback: cannot write {rules_path}: {exc.strerror or exc} (for a "
            "read-only mount such as a ConfigMap, use --print and update its source)",
            file=err,
        )
        return 1
    if supervisor is None:
        append_audit(
            state,
            {"at": now_iso(), "action": "rollback", "trigger": "cli", "result": "written",
             "digest": target.digest, "previous": current, "source": rules_path, **who,
             "problems": []},
        )  # fmt: skip
        print(
            f"rolled back {rules_path} to {target.digest[:12]} (was {str(current)[:12]}); "
            "no router is running: it takes effect when the router starts",
            file=out,
        )
        return 0
    pid = int(supervisor["pid"])
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(
            f"grayroute rollback: wrote {written}, but cannot signal the router (pid {pid}): "
            f"{exc.strerror}; it takes effect when the router sees the file change",
            file=err,
        )
        return 1
    return _await_result(state, seen, target.digest, pid, current, rules_path, wait, out, err)


@dataclass(frozen=True, slots=True)
class _Mark:
    """Where the audit log stood: its last entry, and the time (it may be trimmed away)."""

    last: dict[str, Any] | None
    at: str

    def after(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The entries appended since."""
        if self.last is not None:
            for i in range(len(entries) - 1, -1, -1):
                if entries[i] == self.last:
                    return entries[i + 1 :]
        return [e for e in entries if str(e.get("at", "")) >= self.at]


def _await_result(
    state: Path,
    seen: _Mark,
    digest: str,
    pid: int,
    current: str | None,
    rules_path: str,
    wait: float,
    out: IO[str],
    err: IO[str],
) -> int:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        for entry in seen.after(read_audit(state)):
            if entry.get("router_pid") != pid or entry.get("action") not in ("reload", "rollback"):
                continue
            if entry.get("result") == "success" and entry.get("digest") == digest:
                print(
                    f"rolled back {rules_path} to {digest[:12]} (was {str(current)[:12]}): "
                    f"in force in the router (pid {pid})",
                    file=out,
                )
                return 0
            if entry.get("result") == "failure" and entry.get("attempted") in (digest, None):
                for problem in entry.get("problems") or ():
                    print(problem, file=err)
                print("grayroute rollback: the router refused the version", file=err)
                return 1
        time.sleep(0.05)
    print(
        f"grayroute rollback: wrote {rules_path}, but the router (pid {pid}) did not report "
        f"the reload within {wait:g} s; check `grayroute history` and its log",
        file=err,
    )
    return 1
