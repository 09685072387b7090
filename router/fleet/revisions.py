"""`grayroute push`, and `grayroute history` / `rollback` on an etcd key: a fleet's rules
history is the key's own revisions in etcd, the same for every router.

    grayroute push RULES etcd://.../KEY [--expect-revision N] [--strict]
    grayroute history etcd://.../KEY [--json] [--limit N]
    grayroute rollback etcd://.../KEY [--to REVISION|HASH] [--print]

A push validates the file as `grayroute check` does and refuses errors; then it writes
the file's bytes with one compare-and-swap transaction: only if the key's mod_revision
is still N (`--expect-revision`), else the revision it read just before writing. A lost
compare is never retried: the push exits EXIT_LOST_RACE naming who made the winning
change and when, from the audit entry that change left. Each push (and rollback, which
is a push of an older value) then writes its audit entry at KEY/audit/REV, REV the
revision the push created:

    {"at": "2026-01-05T10:00:00.123Z", "action": "push", "revision": 57,
     "previous_revision": 42, "digest": "9f2c...", "previous_digest": "0a1b...",
     "user": "alice", "host": "ops-1", "pid": 4711, "source": "rules.yaml"}

`history` walks the key's revisions back from the newest (each value is read at its
predecessor's revision - 1) until the key's creation, a compaction, or `--limit`.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import orjson

from router.errors import ConfigError, RulesError
from router.fleet import EtcdLocation
from router.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    mod_revision_is,
    put_op,
    range_op,
)

if TYPE_CHECKING:
    from router.config import Settings

__all__ = [
    "EXIT_LOST_RACE",
    "LostRace",
    "Pushed",
    "audit_key",
    "key_revisions",
    "push_value",
    "run_etcd_history",
    "run_etcd_rollback",
    "run_push",
]

EXIT_LOST_RACE = 3  # the key changed since the revision the push expected; nothing written
AUDIT_WAIT = 2.0  # seconds to wait for the winner's audit entry (written just after it)


def audit_key(key: str, revision: int) -> bytes:
    return f"{key.rstrip('/')}/audit/{revision}".encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Pushed:
    revision: int  # the revision the push created (or found, when unchanged)
    previous_revision: int
    digest: str
    unchanged: bool = False
    audit_error: str | None = None


class LostRace(Exception):
    """The key was not at the expected revision; nothing was written."""

    def __init__(self, expected: int, current: KeyValue | None, audit: dict[str, Any] | None):
        self.expected = expected
        self.current = current
        self.audit = audit
        super().__init__(self.describe())

    def describe(self) -> str:
        current = self.current
        if current is None:
            what = "the key was deleted"
        else:
            what = f"it is at revision {current.mod_revision}"
        line = f"expected revision {self.expected}, but {what}"
        audit = self.audit
        if current is None:
            return line
        if audit:
            by = audit.get("user", "?")
            host = audit.get("host")
            line += (
                f": revision {current.mod_revision} was made by {by}"
                f"{f' (on {host})' if host else ''} at {audit.get('at', '?')}"
                f" with grayroute {audit.get('action', 'push')}"
            )
        else:
            line += (
                f": revision {current.mod_revision} has no audit entry (written without "
                "grayroute push, e.g. by etcdctl), so who made it and when is unknown"
            )
        return line


async def _read_audit(client: EtcdClient, key: str, revision: int) -> dict[str, Any] | None:
    kv, _ = await client.get(audit_key(key, revision))
    if kv is None:
        return None
    try:
        entry = orjson.loads(kv.value)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


async def push_value(
    client: EtcdClient,
    key: str,
    data: bytes,
    *,
    expect_revision: int | None,
    audit: dict[str, Any],
) -> Pushed:
    """Write `data` at `key` if its mod_revision is `expect_revision` (None: as read now).

    Raises LostRace (nothing written), EtcdError. The audit entry is written after the
    value; when that fails the push still stands (`audit_error` says why).
    """
    key_b = key.encode()
    current, _ = await client.get(key_b)
    read_revision = current.mod_revision if current is not None else 0
    expected = read_revision if expect_revision is None else expect_revision
    digest = _sha(data)
    if current is not None and expected == read_revision and current.value == data:
        return Pushed(read_revision, read_revision, digest, unchanged=True)
    result = await client.txn(
        [mod_revision_is(key_b, expected)], [put_op(key_b, data)], [range_op(key_b)]
    )
    if not result.succeeded:
        kvs = result.range_kvs(0)
        winner = kvs[0] if kvs else None
        entry = None
        if winner is not None:
            # The winner writes its audit entry right after its value: give it a moment.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + AUDIT_WAIT
            while True:
                entry = await _read_audit(client, key, winner.mod_revision)
                if entry is not None or loop.time() >= deadline:
                    break
                await asyncio.sleep(0.1)
        raise LostRace(expected, winner, entry)
    previous_digest = _sha(current.value) if current is not None else None
    if current is not None and current.mod_revision != expected:
        previous_digest = None  # expected an older revision that still matched: unknown
    entry = {
        "at": _now_iso(),
        **audit,
        "revision": result.revision,
        "previous_revision": expected,
        "digest": digest,
        "previous_digest": previous_digest,
    }
    try:
        await client.put(audit_key(key, result.revision), orjson.dumps(entry))
    except EtcdError as exc:
        return Pushed(result.revision, expected, digest, audit_error=str(exc))
    return Pushed(result.revision, expected, digest)


def _now_iso() -> str:
    from router.history import now_iso

    return now_iso()


def _who(source: str, action: str) -> dict[str, Any]:
    from router.history import actor

    return {"action": action, **actor(), "source": source}


def _validate(data: bytes, name: str, strict: bool, err: IO[str]) -> bool:
    """Check as `grayroute check` does: print every problem; False when refused."""
    from router.rules import load_snapshot_bytes

    try:
        snapshot = load_snapshot_bytes(data, name)
    except RulesError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return False
    for warning in snapshot.warnings:
        print(warning, file=err)
    return not (strict and snapshot.warnings)


def _run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    return asyncio.run(main())


def _client(url: str, settings: Settings) -> tuple[EtcdLocation, EtcdClient]:
    from router.fleet.source import etcd_client

    location = EtcdLocation.parse(url)
    return location, etcd_client(location, settings)


# -- grayroute push ------------------------------------------------------------------------


def run_push(
    rules_path: str,
    url: str,
    settings: Settings,
    *,
    expect_revision: int | None = None,
    strict: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """0: pushed (or already there); 1: refused (invalid, etcd error); EXIT_LOST_RACE."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        with open(rules_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{rules_path}: cannot read: {exc.strerror or exc}") from exc
    if not _validate(data, rules_path, strict, err):
        print(f"grayroute push: {rules_path} is not valid; nothing was written", file=err)
        return 1
    location, client = _client(url, settings)

    async def main() -> int:
        async with client:
            try:
                pushed = await push_value(
                    client,
                    location.key,
                    data,
                    expect_revision=expect_revision,
                    audit=_who(rules_path, "push"),
                )
            except LostRace as exc:
                print(
                    f"grayroute push: refused: {location.key} changed: {exc.describe()}.", file=err
                )
                print(
                    "Nothing was written. Look at the change (grayroute history "
                    f"{location.url}), then push again"
                    + (
                        f" with --expect-revision {exc.current.mod_revision}"
                        if exc.current is not None
                        else ""
                    )
                    + ".",
                    file=err,
                )
                return EXIT_LOST_RACE
            except EtcdError as exc:
                print(f"grayroute push: {exc}; nothing was written", file=err)
                return 1
        _report_push(pushed, rules_path, location, out, err)
        return 0

    return _run(main)


def _report_push(
    pushed: Pushed, what: str, location: EtcdLocation, out: IO[str], err: IO[str]
) -> None:
    if pushed.unchanged:
        print(
            f"{location.key} already holds {what} (rules {pushed.digest[:12]}) at revision "
            f"{pushed.revision}; nothing written",
            file=out,
        )
        return
    print(
        f"pushed {what} to {location.url}: revision {pushed.revision} "
        f"(was {pushed.previous_revision}), rules {pushed.digest[:12]}",
        file=out,
    )
    if pushed.audit_error:
        print(
            f"grayroute push: the push stands, but its audit entry was not written: "
            f"{pushed.audit_error}",
            file=err,
        )


# -- grayroute history ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revisions:
    kvs: list[KeyValue]  # newest first
    end: str  # why the walk stopped: "created", "compacted", "limit", "absent"
    audit: dict[int, dict[str, Any]]


async def key_revisions(client: EtcdClient, key: str, limit: int = 50) -> Revisions:
    """The key's values, newest first, as far back as etcd still has them."""
    key_b = key.encode()
    kv, _ = await client.get(key_b)
    kvs: list[KeyValue] = []
    end = "absent" if kv is None else "limit"
    while kv is not None:
        kvs.append(kv)
        if kv.version <= 1:
            end = "created"
            break
        if len(kvs) >= limit:
            end = "limit"
            break
        try:
            kv, _ = await client.get(key_b, revision=kv.mod_revision - 1)
        except EtcdCompacted:
            end = "compacted"
            break
        if kv is None:  # deleted and created again in between
            end = "created"
    audit: dict[int, dict[str, Any]] = {}
    prefix = audit_key(key, 0)[:-1]
    listing = await client.range(prefix, prefix=True)
    for entry_kv in listing.kvs:
        tail = entry_kv.key[len(prefix) :]
        if not tail.isdigit():
            continue
        try:
            entry = orjson.loads(entry_kv.value)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            audit[int(tail)] = entry
    return Revisions(kvs, end, audit)


_END_NOTES = {
    "created": "the key was created at the oldest revision shown",
    "compacted": "older revisions were compacted by etcd",
    "limit": "older revisions not shown (--limit)",
    "absent": "the key does not exist",
}


def run_etcd_history(
    url: str, settings: Settings, *, as_json: bool, limit: int = 50, out: IO[str] | None = None
) -> int:
    out = out or sys.stdout
    location, client = _client(url, settings)

    async def main() -> int:
        async with client:
            try:
                revs = await key_revisions(client, location.key, limit)
            except EtcdError as exc:
                print(f"grayroute history: {exc}", file=sys.stderr)
                return 1
        rows: list[dict[str, Any]] = []
        for kv in revs.kvs:
            entry = revs.audit.get(kv.mod_revision, {})
            rows.append(
                {
                    "revision": kv.mod_revision,
                    "digest": _sha(kv.value),
                    "at": entry.get("at"),
                    "action": entry.get("action"),
                    "user": entry.get("user"),
                    "host": entry.get("host"),
                    "source": entry.get("source"),
                    "previous_revision": entry.get("previous_revision"),
                    "rolled_back_to": entry.get("rolled_back_to"),
                }
            )
        if as_json:
            doc = {"url": location.url, "key": location.key, "revisions": rows, "end": revs.end}
            out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        print(f"{location.key} at {','.join(location.endpoints)} (newest first):", file=out)
        previous = _previous_index(revs.kvs)
        for index, row in enumerate(rows):
            who = f"{row['user']}@{row['host']}" if row["user"] else "-"
            note = "in force" if index == 0 else "previous" if index == previous else ""
            if not row["action"]:
                note = (note + " " if note else "") + "(no audit entry: not written by grayroute)"
            print(
                f"  {row['revision']:>8}  {row['at'] or '-':<24}  {row['action'] or '-':<8}  "
                f"{who:<20}  {row['digest'][:12]}  {note}".rstrip(),
                file=out,
            )
        print(f"({_END_NOTES[revs.end]})", file=out)
        return 0

    return _run(main)


def _previous_index(kvs: list[KeyValue]) -> int | None:
    """The newest revision whose value differs from the one in force."""
    if not kvs:
        return None
    current = kvs[0].value
    for index, kv in enumerate(kvs[1:], start=1):
        if kv.value != current:
            return index
    return None


# -- grayroute rollback -------------------------------------------------------------------


async def _choose(client: EtcdClient, key: str, to: str) -> tuple[KeyValue, KeyValue]:
    """(the value in force, the value to go back to); ConfigError when there is none."""
    revs = await key_revisions(client, key, limit=1000)
    if not revs.kvs:
        raise ConfigError(f"{key} does not exist in etcd: nothing to roll back")
    current = revs.kvs[0]
    if not to:
        index = _previous_index(revs.kvs)
        if index is None:
            raise ConfigError(
                f"nothing to roll back to: {key} has held one version only "
                f"({_END_NOTES[revs.end]}; see `grayroute history`)"
            )
        return current, revs.kvs[index]
    if to.isdigit():
        revision = int(to)
        if revision > current.mod_revision:
            raise ConfigError(
                f"--to {to}: {key} was last written at revision {current.mod_revision}"
            )
        for kv in revs.kvs:
            if kv.mod_revision == revision:
                return current, kv
        try:
            kv_at, _ = await client.get(key.encode(), revision=revision)
        except EtcdCompacted:
            raise ConfigError(f"--to {to}: etcd has compacted that revision") from None
        if kv_at is None:
            raise ConfigError(f"--to {to}: {key} did not exist at revision {revision}")
        raise ConfigError(
            f"--to {to}: revision {revision} did not write {key} (the value then was "
            f"written at revision {kv_at.mod_revision}: give that)"
        )
    want = to.lower()
    found = {_sha(kv.value): kv for kv in reversed(revs.kvs)}  # newest of each digest
    matches = sorted(d for d in found if d.startswith(want))
    if not matches:
        raise ConfigError(f"--to {to}: no revision of {key} has rules starting with that hash")
    if len(matches) > 1:
        raise ConfigError(
            f"--to {to}: {len(matches)} versions start with that "
            f"({', '.join(m[:16] for m in matches)}); give more digits"
        )
    return current, found[matches[0]]


def run_etcd_rollback(
    url: str,
    settings: Settings,
    *,
    to: str = "",
    print_only: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Push an older value of the key again (compare-and-swap on the value in force)."""
    out, err = out or sys.stdout, err or sys.stderr
    location, client = _client(url, settings)

    async def main() -> int:
        async with client:
            try:
                current, target = await _choose(client, location.key, to)
            except EtcdError as exc:
                print(f"grayroute rollback: {exc}", file=err)
                return 1
            name = f"{location.key}@{target.mod_revision}"
            if not _validate(target.value, name, False, err):
                print(
                    f"grayroute rollback: revision {target.mod_revision} is not valid now; "
                    "nothing was written",
                    file=err,
                )
                return 1
            if print_only:
                out.write(target.value.decode("utf-8", "surrogateescape"))
                return 0
            audit = _who(f"{location.key}@{target.mod_revision}", "rollback")
            audit["rolled_back_to"] = target.mod_revision
            try:
                pushed = await push_value(
                    client,
                    location.key,
                    target.value,
                    expect_revision=current.mod_revision,
                    audit=audit,
                )
            except LostRace as exc:
                print(
                    f"grayroute rollback: refused: {exc.describe()}; nothing was written", file=err
                )
                return EXIT_LOST_RACE
            except EtcdError as exc:
                print(f"grayroute rollback: {exc}; nothing was written", file=err)
                return 1
        if pushed.unchanged:
            print(f"{location.key} already holds revision {target.mod_revision}'s rules", file=out)
            return 0
        print(
            f"rolled back {location.key} to revision {target.mod_revision} "
            f"(rules {pushed.digest[:12]}) as revision {pushed.revision} "
            f"(was {current.mod_revision}); every router watching it applies it",
            file=out,
        )
        if pushed.audit_error:
            print(f"grayroute rollback: audit entry not written: {pushed.audit_error}", file=err)
        return 0

    return _run(main)
