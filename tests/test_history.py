"""Rules history: the state directory, the audit log, `grayroute history` and `rollback`.

Pure parts run on files in tmp_path; rollback runs end to end against a real
`grayroute serve` and checks that the decisions for a sample of users come back exactly.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router.demo import DemoUpstream, RouterProcess
from router.errors import ConfigError
from router.history import (
    AuditLog,
    HistoryBounds,
    append_audit,
    default_state_dirs,
    iso_utc,
    prune_versions,
    read_audit,
    resolve_state_dir,
    run_history,
    run_rollback,
    running_supervisor,
    take_intent,
    versions_in_force,
    write_intent,
    write_pidfile,
)

from conftest import poll

ROOT = Path(__file__).resolve().parent.parent

RULES = """\
format: 1
upstreams:
  v1:
    endpoints: ["{v1}"]
  v2:
    endpoints: ["{v2}"]
user_id:
  - header: X-User-Id
routes:
  - name: all
    split:
      v1: {w1}
      v2: {w2}
"""


def rules_text(w1: int, w2: int, v1: str = "127.0.0.1:9", v2: str = "127.0.0.1:9") -> bytes:
    return RULES.format(v1=v1, v2=v2, w1=w1, w2=w2).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the state directory -----------------------------------------------------------------


def test_state_dir_defaults_next_to_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "etc" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_bytes(b"x")
    state = resolve_state_dir(str(rules))
    assert state == tmp_path / "etc" / ".grayroute-state" / "rules.yaml"
    assert (state / "rules").is_dir()
    assert resolve_state_dir(str(rules), str(tmp_path / "given")) == tmp_path / "given"
    # history/rollback look for the one with an audit log
    with pytest.raises(ConfigError, match="--state-dir"):
        resolve_state_dir(str(rules), create=False)
    append_audit(state, {"action": "start"})
    assert resolve_state_dir(str(rules), create=False) == state


def test_state_dir_falls_back_when_the_rules_directory_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    rules = tmp_path / "cm" / "rules.yaml"
    rules.parent.mkdir()
    rules.write_bytes(b"x")
    (rules.parent / ".grayroute-state").write_bytes(b"")  # cannot become a directory
    state = resolve_state_dir(str(rules))
    assert state.parent == tmp_path / "xdg" / "grayroute"
    assert state.name.startswith("rules.yaml-") and state == default_state_dirs(str(rules))[1]
    append_audit(state, {"action": "start"})
    assert resolve_state_dir(str(rules), create=False) == state


# -- the audit log and intents -------------------------------------------------------------


def test_audit_log_and_versions_in_force(tmp_path: Path) -> None:
    for entry in (
        {"action": "start", "result": "success", "digest": "a"},
        {"action": "reload", "result": "failure", "digest": "a"},
        {"action": "reload", "result": "success", "digest": "b"},
        {"action": "reload", "result": "success", "digest": "b"},
        {"action": "rollback", "result": "success", "digest": "a"},
        {"action": "rollout", "result": "success", "digest": "c", "route": "r"},  # not rules
    ):
        append_audit(tmp_path, entry)
    with open(tmp_path / "audit.jsonl", "ab") as f:
        f.write(b'{"torn": \n')  # a crash mid-line never breaks reading
    entries = read_audit(tmp_path)
    assert len(entries) == 6
    assert versions_in_force(entries) == ["a", "b", "a"]


def audit_size(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("audit.jsonl*"))


def test_audit_log_is_kept_under_its_size_bound(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, HistoryBounds(audit_max_bytes=3000, max_age=0, max_versions=0))
    sizes = []
    for i in range(100):
        audit.append({"at": iso_utc(time.time()), "action": "reload", "n": i, "pad": "x" * 40})
        sizes.append(audit_size(tmp_path))
        assert (tmp_path / "audit.jsonl").stat().st_size <= 1000
    assert max(sizes) <= 3000
    # Rotated, not rewritten: the older parts are whole earlier files.
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*")) == [
        "audit.jsonl",
        "audit.jsonl.1",
        "audit.jsonl.2",
    ]
    assert (tmp_path / "audit.jsonl.2").stat().st_size > 900
    numbers = [e["n"] for e in read_audit(tmp_path)]
    assert numbers == list(range(100 - len(numbers), 100))  # the newest, in order
    assert sizes[-1] > 2000
    # An entry larger than the whole bound is still written.
    audit.append({"action": "huge", "pad": "y" * 4000})
    assert read_audit(tmp_path)[-1]["action"] == "huge"


def test_audit_log_keeps_entries_at_least_max_age_and_at_most_half_as_long_again(
    tmp_path: Path,
) -> None:
    day = 86400.0
    now = [1.7e9]
    audit = AuditLog(tmp_path, HistoryBounds(0, 10 * day, 0), clock=lambda: now[0])
    written: list[float] = []
    for _ in range(80):  # one entry every 0.7 days for eight weeks
        audit.append({"at": iso_utc(now[0]), "action": "reload"})
        written.append(now[0])
        kept = [_unix(e["at"]) for e in read_audit(tmp_path)]
        assert min(kept) >= now[0] - 15 * day - 1  # at most 1.5 x max_age
        assert kept == [t for t in written if t >= min(kept)]  # nothing missing since
        assert all(t in kept for t in written if t >= now[0] - 10 * day)  # at least max_age
        now[0] += 0.7 * day


def _unix(at: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(at).timestamp()


def test_appends_from_many_writers_while_trimming_lose_no_recent_line(tmp_path: Path) -> None:
    bounds = HistoryBounds(audit_max_bytes=6000, max_age=0, max_versions=0)

    def writer(name: str) -> None:
        audit = AuditLog(tmp_path, bounds)  # each with its own descriptors, as processes
        for i in range(150):
            audit.append({"w": name, "n": i, "pad": "z" * 30})

    threads = [threading.Thread(target=writer, args=(str(w),)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit_size(tmp_path) <= 6000
    data = b"".join(
        (tmp_path / name).read_bytes() for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl")
    )
    entries = [orjson.loads(line) for line in data.splitlines()]  # none torn
    assert len(entries) > 40 and entries[-1]["n"] == 149  # the very last append is there
    for w in "0123":
        # A line written while another writer trimmed would be missing from the middle:
        # each writer's kept lines run without a gap.
        mine = [e["n"] for e in entries if e["w"] == w]
        if mine:
            assert mine == list(range(mine[0], mine[0] + len(mine)))


def test_kept_versions_are_pruned_by_count_and_age_never_the_ones_in_use(
    tmp_path: Path,
) -> None:
    now = time.time()
    for i in range(10):
        path = tmp_path / "rules" / f"v{i}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (now - (10 - i) * 3600, now - (10 - i) * 3600))  # v9 newest

    def left() -> list[str]:
        return sorted(p.stem for p in (tmp_path / "rules").glob("*.yaml"))

    dropped = prune_versions(tmp_path, HistoryBounds(0, 0.0, 0), keep=set())
    assert dropped == [] and len(left()) == 10
    dropped = prune_versions(tmp_path, HistoryBounds(0, 5.5 * 3600, 0), keep={"v0"}, now=now)
    assert sorted(dropped) == ["v1", "v2", "v3", "v4"]
    assert left() == ["v0", "v5", "v6", "v7", "v8", "v9"]
    dropped = prune_versions(tmp_path, HistoryBounds(0, 0.0, 3), keep={"v0", "v5"}, now=now)
    assert sorted(dropped) == ["v6"]  # v9, v8, v7 are the three newest; v0 and v5 in use
    assert left() == ["v0", "v5", "v7", "v8", "v9"]


def test_intents_are_taken_once_and_expire(tmp_path: Path) -> None:
    write_intent(tmp_path, {"digest": "d1", "user": "ann", "at_unix": 1e12})
    assert take_intent(tmp_path, "other") is None
    assert (tmp_path / "rollback.json").exists()  # not ours: left for its reload
    taken = take_intent(tmp_path, "d1")
    assert taken is not None and taken["user"] == "ann"
    assert take_intent(tmp_path, "d1") is None
    write_intent(tmp_path, {"digest": "d2", "at_unix": 1.0})  # long ago
    assert take_intent(tmp_path, "d2") is None
    assert not (tmp_path / "rollback.json").exists()


def test_pid_file_of_a_dead_or_reused_pid_is_ignored(tmp_path: Path) -> None:
    write_pidfile(tmp_path, "rules.yaml")
    info = running_supervisor(tmp_path)
    assert info is not None and info["pid"] == os.getpid()
    # another process now has the pid: its start time differs
    info["start_time"] = (info["start_time"] or 0) + 12345
    (tmp_path / "supervisor.json").write_bytes(orjson.dumps(info))
    assert running_supervisor(tmp_path) is None
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True)  # fmt: skip
    dead = int(proc.stdout)
    (tmp_path / "supervisor.json").write_bytes(orjson.dumps({"pid": dead}))
    assert running_supervisor(tmp_path) is None


# -- rollback without a running router -----------------------------------------------------


def make_history(tmp_path: Path, *versions: bytes) -> tuple[Path, Path]:
    """A rule file and a state directory as a router that ran `versions` in turn leaves them."""
    rules = tmp_path / "rules.yaml"
    state = tmp_path / "state"
    (state / "rules").mkdir(parents=True)
    previous = None
    for i, data in enumerate(versions):
        (state / "rules" / f"{sha(data)}.yaml").write_bytes(data)
        append_audit(
            state,
            {"action": "start" if i == 0 else "reload", "result": "success",
             "digest": sha(data), "previous": previous, "user": "ci", "host": "h", "pid": 1},
        )  # fmt: skip
        previous = sha(data)
    rules.write_bytes(versions[-1])
    os.chmod(rules, 0o640)
    return rules, state


def rollback(rules: Path, state: Path, to: str = "", **kw: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run_rollback(str(rules), to, str(state), out=out, err=err, **kw)
    return rc, out.getvalue(), err.getvalue()


def test_rollback_writes_the_previous_version_and_toggles(tmp_path: Path) -> None:
    a, b, c = rules_text(90, 10), rules_text(50, 50), rules_text(10, 90)
    rules, state = make_history(tmp_path, a, b, c)
    rc, out, err = rollback(rules, state)
    assert rc == 0, err
    assert "no router is running" in out
    assert rules.read_bytes() == b
    assert rules.stat().st_mode & 0o777 == 0o640  # the file keeps its mode
    last = read_audit(state)[-1]
    assert (last["action"], last["result"], last["digest"], last["previous"]) == (
        "rollback", "written", sha(b), sha(c),
    )  # fmt: skip
    assert last["user"] and last["host"] and last["pid"] == os.getpid()
    # a second rollback goes back to where the first came from (like `cd -`)
    assert rollback(rules, state)[0] == 0
    assert rules.read_bytes() == c
    # --to any kept version, by a prefix of its hash
    assert rollback(rules, state, to=sha(a)[:8])[0] == 0
    assert rules.read_bytes() == a


def test_rollback_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    a, b = rules_text(90, 10), rules_text(50, 50)
    rules, state = make_history(tmp_path, a)
    with pytest.raises(ConfigError, match="nothing to roll back to"):
        rollback(rules, state)
    rules, state = make_history(tmp_path / "2", a, b)
    with pytest.raises(ConfigError, match="no kept version"):
        rollback(rules, state, to="ffff")
    (state / "rules" / f"{sha(a)[:4]}{'0' * 60}.yaml").write_bytes(b"x")
    with pytest.raises(ConfigError, match="give more digits"):
        rollback(rules, state, to=sha(a)[:4])
    (state / "rules" / f"{sha(a)[:4]}{'0' * 60}.yaml").unlink()
    # a kept copy that was altered is never put back
    (state / "rules" / f"{sha(a)}.yaml").write_bytes(a + b"# edited\n")
    with pytest.raises(ConfigError, match="altered"):
        rollback(rules, state)
    # a kept version that is not valid (any more) is refused, with its problems
    bad = b"format: 1\nupstreams: {}\nroutes: []\n"
    (state / "rules" / f"{sha(bad)}.yaml").write_bytes(bad)
    rc, _, err = rollback(rules, state, to=sha(bad))
    assert rc == 1 and "is not valid now" in err
    assert re.search(rf"{sha(bad)}\.yaml:\d+:\d+: ", err), err
    assert rules.read_bytes() == b


def test_rollback_print_and_unapplied_edits(tmp_path: Path) -> None:
    a, b = rules_text(90, 10), rules_text(50, 50)
    rules, state = make_history(tmp_path, a, b)
    rc, out, _ = rollback(rules, state, print_only=True)
    assert (rc, out.encode()) == (0, a)
    assert rules.read_bytes() == b  # --print changes nothing
    edited = b + b"# not reloaded yet\n"
    rules.write_bytes(edited)
    rc, _, err = rollback(rules, state)
    assert rc == 0 and "not in force" in err
    assert (state / "rules" / f"{sha(edited)}.yaml").read_bytes() == edited  # nothing lost


def test_history_lists_events_and_kept_versions(tmp_path: Path) -> None:
    a, b = rules_text(90, 10), rules_text(50, 50)
    rules, state = make_history(tmp_path, a, b)
    broken = b"format: 1\nupstreams: {}\nroutes: []\n"
    (state / "rules" / f"{sha(broken)}.yaml").write_bytes(broken)
    out = io.StringIO()
    assert run_history(str(rules), str(state), False, out) == 0
    text = out.getvalue()
    # Each kept version with its weights per route, to pick what to roll back to.
    assert (
        f"  {sha(b)}  in force\n      all  v1 50, v2 50\n"
        f"  {sha(a)}  previous\n      all  v1 90, v2 10\n"
    ) in text
    assert f"  {sha(broken)}  (never in force" in text
    assert "(cannot be read as rules now: " in text and "upstreams: no upstreams" in text
    out = io.StringIO()
    run_history(str(rules), str(state), True, out)
    doc = orjson.loads(out.getvalue())
    assert (doc["in_force"], doc["previous"]) == (sha(b), sha(a))
    assert doc["kept"] == [sha(b), sha(a), sha(broken)] and len(doc["events"]) == 2
    assert doc["versions"][sha(a)] == {"routes": {"all": {"split": {"v1": 90.0, "v2": 10.0}}}}
    assert "error" in doc["versions"][sha(broken)]


def test_history_shows_what_each_kind_of_route_does(tmp_path: Path) -> None:
    data = b"""\
format: 1
upstreams:
  v1: {endpoints: ["127.0.0.1:1", "127.0.0.1:2"]}
  v2: {endpoints: ["127.0.0.1:3"]}
routes:
  - {name: fixed, match: {path_prefix: /f}, to: v2}
  - {name: buckets, match: {path_prefix: /b}, split_clients: {key: "$remote_addr",
     buckets: [{"10%": v2}, {"*": v1}]}}
  - {name: rest, split: replicas}
"""
    rules, state = make_history(tmp_path, data)
    out = io.StringIO()
    run_history(str(rules), str(state), False, out)
    assert (
        "      fixed    to v2\n"
        "      buckets  split_clients v2 10%, v1 *\n"
        "      rest     v1 2, v2 1 (replicas)\n"
    ) in out.getvalue()


# -- rollback end to end -----------------------------------------------------------------------


USERS = [str(u) for u in range(0, 3000, 15)]  # 200 users


async def decisions(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    out = {}
    for user in USERS:
        resp = await client.get(f"{url}/r", headers={"X-User-Id": user})
        assert resp.status_code == 200
        out[user] = resp.json()["version"]
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


async def test_rollback_restores_the_exact_previous_decisions(
    upstreams: dict[str, DemoUpstream], tmp_path: Path
) -> None:
    eps = {"v1": upstreams["v1"].endpoint, "v2": upstreams["v2"].endpoint}
    a, b = rules_text(70, 30, **eps), rules_text(20, 80, **eps)
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(a)
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(rules, workers=2, stderr=log)
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            before = await decisions(client, router.url)
            rules.write_bytes(b)  # a rollout: watched, reloaded

            async def in_force(digest: str) -> bool:
                info = (await client.get(f"{router.admin_url}/rules")).json()
                return {w["digest"] for w in info["workers"].values()} == {digest}

            await poll(lambda: in_force(sha(b)))
            during = await decisions(client, router.url)
            assert during != before

            done = await asyncio.to_thread(cli, "rollback", str(rules))
            assert done.returncode == 0, done.stderr
            assert "in force in the router" in done.stdout
            # every worker applies it within moments of the supervisor's audit line
            await poll(lambda: in_force(sha(a)), timeout=2.0)
            assert await decisions(client, router.url) == before
            assert rules.read_bytes() == a

            # and forward again, to a version chosen by hash
            done = await asyncio.to_thread(cli, "rollback", str(rules), "--to", sha(b)[:10])
            assert done.returncode == 0, done.stderr
            await poll(lambda: in_force(sha(b)), timeout=2.0)
            assert await decisions(client, router.url) == during

            history = (await client.get(f"{router.admin_url}/rules/history")).json()
    finally:
        assert await router.stop() == 0
    events = [(e["action"], e["result"], e["digest"]) for e in history["events"]]
    assert events == [
        ("start", "success", sha(a)),
        ("reload", "success", sha(b)),
        ("rollback", "success", sha(a)),
        ("rollback", "success", sha(b)),
    ]
    rolled = history["events"][2]
    assert rolled["previous"] == sha(b) and rolled["trigger"] == "sighup"
    assert rolled["user"] and rolled["pid"] != router.pid  # who asked: the CLI's process
    assert history["events"][1]["trigger"] == "watch"
    # the pid file is gone with the router
    assert not (Path(history["state_dir"]) / "supervisor.json").exists()
    done = await asyncio.to_thread(cli, "history", str(rules), "--json")
    assert orjson.loads(done.stdout)["in_force"] == sha(b)


async def test_a_router_keeps_its_history_within_bounds_and_rollback_still_works(
    upstreams: dict[str, DemoUpstream], tmp_path: Path
) -> None:
    eps = {"v1": upstreams["v1"].endpoint, "v2": upstreams["v2"].endpoint}
    versions = [rules_text(100 - 10 * i, 10 * i, **eps) for i in range(6)]
    rules = tmp_path / "rules.yaml"
    state = tmp_path / "state"
    rules.write_bytes(versions[0])
    args = (
        *("--state-dir", str(state), "--watch-interval", "0"),
        *("--audit-max-bytes", "2500", "--history-max-versions", "2"),
    )
    with open(tmp_path / "router.log", "wb") as log:
        router = await RouterProcess.start(rules, workers=1, args=args, stderr=log)
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:

            async def in_force(digest: str) -> bool:
                info = (await client.get(f"{router.admin_url}/rules")).json()
                return bool(info["digest"] == digest)

            for data in versions[1:]:
                rules.write_bytes(data)
                router.signal(signal.SIGHUP)
                await poll(lambda: in_force(sha(data)))  # noqa: B023 - awaited at once
            assert audit_size(state) <= 2500 and (state / "audit.jsonl.2").exists()
            # The version in force and the one before it; the older ones are gone.
            kept = sorted(p.stem for p in (state / "rules").glob("*.yaml"))
            assert kept == sorted([sha(versions[-1]), sha(versions[-2])])
            done = await asyncio.to_thread(cli, "rollback", str(rules), "--state-dir", str(state))
            assert done.returncode == 0, done.stderr
            assert "in force in the router" in done.stdout
            assert await in_force(sha(versions[-2]))
            assert audit_size(state) <= 2500
            assert read_audit(state)[-1]["action"] == "rollback"
    finally:
        assert await router.stop() == 0
    done = await asyncio.to_thread(cli, "history", str(rules), "--state-dir", str(state))
    assert f"{sha(versions[-2])}  in force\n      all  v1 60, v2 40\n" in done.stdout


def test_rollback_reports_a_router_that_refuses_or_does_not_answer(tmp_path: Path) -> None:
    """The signalling half of rollback, against a stand-in process that ignores SIGHUP."""
    from router.history import _process_start_time

    a, b = rules_text(90, 10), rules_text(50, 50)
    rules, state = make_history(tmp_path, a, b)
    stand_in = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); time.sleep(60)"],
    )  # fmt: skip
    try:
        time.sleep(0.2)  # let it install the handler
        pidfile = {"pid": stand_in.pid, "start_time": _process_start_time(stand_in.pid),
                   "rules": str(rules)}  # fmt: skip
        (state / "supervisor.json").write_bytes(orjson.dumps(pidfile))
        rc, _, err = rollback(rules, state, wait=0.3)
        assert rc == 1 and "did not report the reload" in err
        assert rules.read_bytes() == a  # the file was written all the same
        assert orjson.loads((state / "rollback.json").read_bytes())["digest"] == sha(a)

        # now the "router" refuses it: a failure line for that digest
        rules.write_bytes(b)

        def refuse() -> None:
            time.sleep(0.2)
            append_audit(state, {"action": "rollback", "result": "failure", "digest": sha(b),
                                 "attempted": sha(a), "router_pid": stand_in.pid,
                                 "problems": ["rules.yaml:3:1: something"]})  # fmt: skip

        threading.Thread(target=refuse).start()
        rc, _, err = rollback(rules, state, wait=5.0)
        assert rc == 1 and "refused" in err and "rules.yaml:3:1: something" in err
    finally:
        stand_in.kill()
        stand_in.wait()
