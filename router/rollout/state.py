"""What survives a restart: each rollout's state (phase, step, weight, recent analysis).

    StateStore    the interface the controller uses: load everything once at start,
                  save or remove one route's state; a fleet keeps it in etcd instead
    FileStore     STATE_DIR/rollouts.json, next to the rules history (router.history):
                  {"format": 1, "rollouts": {ROUTE: STATE, ...}}, rewritten whole and
                  atomically (a temporary file renamed over it), flushed to disk when a
                  phase or weight changes, so a Failed rollout is still at weight 0 after
                  a crash

A saved state carries its rollout's identity (controller.identity): the router resumes
it only when the rules still describe the same rollout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

__all__ = ["STATE_FILE", "FileStore", "StateStore"]

log = logging.getLogger("grayroute.rollout")

STATE_FILE = "rollouts.json"
_FORMAT = 1


class StateStore(Protocol):
    def load(self) -> Mapping[str, Mapping[str, Any]]:
        """Every saved state by route (unreadable ones are left out, with a warning)."""
        ...

    def save(self, route: str, state: Mapping[str, Any]) -> None: ...

    def remove(self, route: str) -> None: ...


class FileStore:
    """The rollouts of one router in STATE_DIR/rollouts.json."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self._states: dict[str, dict[str, Any]] = {}
        self._durable: dict[str, tuple[Any, ...]] = {}  # what was last flushed to disk

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("cannot read %s (%s): every rollout starts afresh", self.path, exc)
            return {}
        rollouts = data.get("rollouts") if isinstance(data, dict) else None
        if not isinstance(rollouts, dict):
            log.warning("%s is not a rollout state file: every rollout starts afresh", self.path)
            return {}
        self._states = {str(r): s for r, s in rollouts.items() if isinstance(s, dict)}
        self._durable = {r: _essential(s) for r, s in self._states.items()}
        return dict(self._states)

    def save(self, route: str, state: Mapping[str, Any]) -> None:
        self._states[route] = dict(state)
        essential = _essential(state)
        durable = self._durable.get(route) != essential
        if self._write(durable) and durable:
            self._durable[route] = essential

    def remove(self, route: str) -> None:
        if self._states.pop(route, None) is not None:
            self._durable.pop(route, None)
            self._write(True)

    def _write(self, durable: bool) -> bool:
        data = orjson.dumps({"format": _FORMAT, "rollouts": self._states})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if durable:  # the rename itself, too
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("cannot save rollout state to %s: %s", self.path, exc)
            return False
        return True


def _essential(state: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must not be lost in a crash: the rollout, its phase, step and weight."""
    return (state.get("key"), state.get("phase"), state.get("step"), state.get("weight"))
