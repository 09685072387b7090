"""Rules history: the state directory, the audit log, `grayroute history` and `rollback`.

The state directory of one router (one rule file):

    rules/DIGEST.yaml   the exact bytes of every rules version that took effect, named by
                        their sha256 (content-addressed: a version is stored once however
                        often it comes back)
    audit.jsonl         one JSON line per event, appended whole (O_APPEND, one write):
                        start, reload, rollback; who, when, which hash, the result
    supervisor.json     the running supervisor: pid, process start time, rule file; written
                        once its SIGHUP handler is in place, removed when it exits
    rollback.json       a rollback handed to the running router, until it takes effect

Where it is (`resolve_state_dir`): `--state-dir DIR` when given; else
`RULES_DIR/.grayroute-state/RULES_NAME/` next to the rule file when that can be
created; else (a read-only directory such as a Kubernetes ConfigMap mount)
`${XDG_STATE_HOME:-~/.local/state}/grayroute/RULES_NAME-HASH8/`, HASH8 naming the rule
file's absolute path. `serve`, `history` and `rollback` find the same directory from
the same rule file path, so a rollback works across restarts.

Rollback (`run_rollback`) never changes the rules in force by itself: it writes the
chosen version over the rule file (atomically, keeping the file's mode) and sends SIGHUP
to the running supervisor, which validates and reloads it exactly as it would any edit.
It then waits for the audit log to say how that reload went.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from router.errors import ConfigError, RulesError

__all__ = [
    "AUDIT_FILE",
    "INTENT_FILE",
    "PID_FILE",
    "RULES_DIR",
    "actor",
    "append_audit",
    "default_state_dirs",
    "kept_path",
    "read_audit",
    "resolve_state_dir",
    "run_history",
    "run_rollback",
    "take_intent",
    "write_atomic",
]

RULES_DIR = "rules"
AUDIT_FILE = "audit.jsonl"
PID_FILE = "supervisor.json"
INTENT_FILE = "rollback.json"
STATE_DIR_NAME = ".grayroute-state"
# A rollback the router did not take within this long is stale (the router was stopped
# between the file write and the SIGHUP, say); it is then ignored and removed.
INTENT_TTL = 600.0
# Results after which an audit entry's `digest` is the version in force (or, for
# "written", the version that will be in force when the router next starts).
IN_FORCE_RESULTS = frozenset({"success", "written"})


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
    rules = Path(os.path.abspath(rules_path))  # not resolved: a ConfigMap symlink moves
    tag = hashlib.sha256(str(rules).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
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


def append_audit(state_dir: str | Path, entry: dict[str, Any]) -> None:
    """Append one line; O_APPEND and one write(), so writers never interleave. OSError."""
    line = orjson.dumps(entry) + b"\n"
    fd = os.open(Path(state_dir) / AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_audit(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable entry, oldest first (a torn or foreign line is skipped)."""
    try:
        data = (Path(state_dir) / AUDIT_FILE).read_bytes()
    except FileNotFoundError:
        return []
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
    """The digests that were in force, oldest first, without immediate repeats."""
    out: list[str] = []
    for entry in entries:
        digest = entry.get("digest")
        in_force = entry.get("result") in IN_FORCE_RESULTS and isinstance(digest, str)
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
    if as_json:
        doc = {
            "state_dir": str(state),
            "in_force": current,
            "previous": previous,
            "kept": kept,
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
    return 0


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
    seen = len(entries)
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


def _await_result(
    state: Path,
    seen: int,
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
        for entry in read_audit(state)[seen:]:
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
