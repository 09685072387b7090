"""`grayroute push`, `history` and `rollback` on an etcd key, through the real command line
against a real etcd: compare-and-swap, the loser's message, audit entries, revisions."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import orjson
import pytest

from router.cli import main
from router.fleet.etcd import EtcdClient
from router.fleet.revisions import EXIT_LOST_RACE, audit_key

from conftest import EtcdServer

RULES = """\
format: 1
upstreams:
  v1: {{endpoints: ["127.0.0.1:9"]}}
  v2: {{endpoints: ["127.0.0.1:9"]}}
routes:
  - name: all
    split: {{v1: {w1}, v2: {w2}}}
"""
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def write(tmp_path: Path, name: str, w1: int, w2: int) -> Path:
    path = tmp_path / name
    path.write_text(RULES.format(w1=w1, w2=w2))
    return path


def etcd_get(etcd: EtcdServer, key: str, revision: int = 0) -> tuple[bytes | None, int]:
    async def get() -> tuple[bytes | None, int]:
        async with EtcdClient([etcd.endpoint]) as client:
            kv, _ = await client.get(key.encode(), revision)
            return (kv.value, kv.mod_revision) if kv else (None, 0)

    return asyncio.run(get())


def etcd_put(etcd: EtcdServer, key: str, value: bytes) -> int:
    async def put() -> int:
        async with EtcdClient([etcd.endpoint]) as client:
            return await client.put(key.encode(), value)

    return asyncio.run(put())


def test_push_validates_writes_and_audits(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("LOGNAME", "alice")
    url = etcd.url(etcd_key)
    bad = tmp_path / "bad.yaml"
    bad.write_text(RULES.format(w1=90, w2=10).replace("v2: 10", "v9: 10"))
    assert main(["push", str(bad), url]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7:21:" in err and "v9: unknown upstream" in err and "nothing was written" in err
    assert etcd_get(etcd, etcd_key) == (None, 0)

    good = write(tmp_path, "rules.yaml", 90, 10)
    assert main(["push", str(good), url]) == 0
    value, revision = etcd_get(etcd, etcd_key)
    assert value == good.read_bytes()  # byte for byte
    out = capsys.readouterr().out
    assert f"revision {revision} (was 0)" in out
    entry = orjson.loads(etcd_get(etcd, audit_key(etcd_key, revision).decode())[0] or b"")
    assert entry["user"] == "alice" and entry["action"] == "push"
    assert entry["revision"] == revision and entry["previous_revision"] == 0
    assert entry["digest"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert re.fullmatch(ISO, entry["at"])

    assert main(["push", str(good), url]) == 0  # the same bytes: nothing to write
    assert "nothing written" in capsys.readouterr().out
    assert etcd_get(etcd, etcd_key)[1] == revision


def test_a_lost_compare_names_the_winner_and_is_not_retried(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    url = etcd.url(etcd_key)
    first = write(tmp_path, "a.yaml", 90, 10)
    monkeypatch.setenv("LOGNAME", "alice")
    assert main(["push", str(first), url]) == 0
    _, base = etcd_get(etcd, etcd_key)
    # Bob and Carol both start from `base`; Bob writes first.
    monkeypatch.setenv("LOGNAME", "bob")
    bobs = write(tmp_path, "b.yaml", 80, 20)
    assert main(["push", str(bobs), url, "--expect-revision", str(base)]) == 0
    _, bob_revision = etcd_get(etcd, etcd_key)
    capsys.readouterr()
    monkeypatch.setenv("LOGNAME", "carol")
    carols = write(tmp_path, "c.yaml", 70, 30)
    assert main(["push", str(carols), url, "--expect-revision", str(base)]) == EXIT_LOST_RACE
    err = capsys.readouterr().err
    assert f"expected revision {base}, but it is at revision {bob_revision}" in err
    assert re.search(rf"made by bob \(on [^)]+\) at {ISO}", err), err
    assert f"--expect-revision {bob_revision}" in err
    assert etcd_get(etcd, etcd_key) == (bobs.read_bytes(), bob_revision)  # Bob's stands

    # A writer that left no audit entry (etcdctl put) is named as unknown, after a wait.
    other = etcd_put(etcd, etcd_key, first.read_bytes())
    assert main(["push", str(carols), url, "--expect-revision", str(bob_revision)]) == (
        EXIT_LOST_RACE
    )
    err = capsys.readouterr().err
    assert f"revision {other} has no audit entry" in err


def test_history_and_rollback(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("LOGNAME", "alice")
    url = etcd.url(etcd_key)
    files = [write(tmp_path, f"r{i}.yaml", 100 - 10 * i, 10 * i) for i in range(1, 4)]
    revisions = []
    for path in files:
        assert main(["push", str(path), url]) == 0
        revisions.append(etcd_get(etcd, etcd_key)[1])
    capsys.readouterr()

    assert main(["history", url, "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert [r["revision"] for r in doc["revisions"]] == revisions[::-1]
    assert {r["user"] for r in doc["revisions"]} == {"alice"}
    assert doc["end"] == "created"
    assert main(["history", url]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"{revisions[2]}\s+{ISO}\s+push\s+alice@\S+\s+\w{{12}}\s+in force", text)
    assert re.search(rf"{revisions[1]}\s+.*previous", text)

    # rollback: the previous version, as a new revision; a second one toggles back.
    assert main(["rollback", url]) == 0
    value, now = etcd_get(etcd, etcd_key)
    assert value == files[1].read_bytes() and now > revisions[2]
    assert main(["rollback", url]) == 0
    assert etcd_get(etcd, etcd_key)[0] == files[2].read_bytes()
    # --to a revision, --to a hash prefix, --print changes nothing
    assert main(["rollback", url, "--to", str(revisions[0])]) == 0
    assert etcd_get(etcd, etcd_key)[0] == files[0].read_bytes()
    digest = hashlib.sha256(files[1].read_bytes()).hexdigest()
    assert main(["rollback", url, "--to", digest[:10]]) == 0
    assert etcd_get(etcd, etcd_key)[0] == files[1].read_bytes()
    capsys.readouterr()
    before = etcd_get(etcd, etcd_key)
    assert main(["rollback", url, "--to", str(revisions[2]), "--print"]) == 0
    assert capsys.readouterr().out == files[2].read_text()
    assert etcd_get(etcd, etcd_key) == before
    assert main(["history", url, "--json"]) == 0
    listed = orjson.loads(capsys.readouterr().out)["revisions"]
    rolled = listed[0]
    # The newest revision holding those rules is named (here: the first rollback's).
    source = next(r for r in listed if r["revision"] == rolled["rolled_back_to"])
    assert rolled["action"] == "rollback" and rolled["source"] == f"{etcd_key}@{source['revision']}"
    assert source["digest"] == rolled["digest"] == digest

    # An old value that is not valid today is refused; an unknown revision is explained.
    broken = etcd_put(etcd, etcd_key, b"format: 1\nroutes: [{name: x, to: nowhere}]\n")
    etcd_put(etcd, etcd_key, files[0].read_bytes())
    assert main(["rollback", url, "--to", str(broken)]) == 1
    err = capsys.readouterr().err
    assert f"{etcd_key}@{broken}:1:1: upstreams: missing" in err and "not valid now" in err
    assert main(["rollback", url, "--to", str(revisions[0] + 1)]) == 1  # its audit entry
    assert f"revision {revisions[0] + 1} did not write {etcd_key}" in capsys.readouterr().err
    assert main(["rollback", url, "--to", str(broken + 100)]) == 1
    assert "was last written at revision" in capsys.readouterr().err


def test_history_stops_at_a_compaction(
    etcd: EtcdServer, etcd_key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = etcd.url(etcd_key)
    for i in range(1, 4):
        assert main(["push", str(write(tmp_path, f"r{i}.yaml", 100 - i, i)), url]) == 0
    _, newest = etcd_get(etcd, etcd_key)

    async def compact() -> None:
        async with EtcdClient([etcd.endpoint]) as client:
            await client.compact(newest)

    asyncio.run(compact())
    capsys.readouterr()
    assert main(["history", url, "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert [r["revision"] for r in doc["revisions"]] == [newest]
    assert doc["end"] == "compacted"
    assert main(["rollback", url]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
