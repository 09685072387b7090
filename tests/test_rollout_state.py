"""Rollout state on disk: saved whole and atomically, read back, unreadable files survived."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from router.rollout.state import STATE_FILE, FileStore

STATE = {"route": "orders", "key": "k", "phase": "Progressing", "step": 1, "weight": 5.0}


def test_save_load_remove(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert store.load() == {}
    store.save("orders", STATE)
    store.save("cart", {**STATE, "route": "cart"})
    data = orjson.loads((tmp_path / STATE_FILE).read_bytes())
    assert data["format"] == 1 and set(data["rollouts"]) == {"orders", "cart"}
    again = FileStore(tmp_path)
    assert again.load()["orders"] == STATE
    again.remove("cart")
    assert set(FileStore(tmp_path).load()) == {"orders"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_phase_change_is_flushed_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    store = FileStore(tmp_path)
    store.save("orders", STATE)
    first = len(synced)
    assert first >= 1
    store.save("orders", {**STATE, "analysis": [{"verdict": "PASS"}]})  # only the analysis
    assert len(synced) == first
    store.save("orders", {**STATE, "phase": "Failed", "weight": 0.0})
    assert len(synced) > first


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"rollouts": 3}'])
def test_unreadable_state_starts_afresh(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    assert FileStore(tmp_path).load() == {}


def test_unwritable_directory_is_a_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileStore(tmp_path / "missing")
    store.save("orders", STATE)
    assert "cannot save rollout state" in caplog.text
