"""Watching files for changes: the rule file (the supervisor's reload trigger besides
SIGHUP) and the TLS certificates (router.tls)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("grayroute.watch")


def files_digest(paths: Sequence[str]) -> str:
    """sha256 of the files' bytes, one after the other (for one file: its own sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class FilesWatcher:
    """Polls files and asks for a reload when their content has changed and settled.

    Each tick stats every path *through* symlinks: (realpath, device, inode, size, mtime,
    ctime). Any change restarts the wait; once that signature has stayed the same for
    `settle` seconds the files are read and hashed, and a reload is asked for only when
    the content differs from what is in force and from the last content tried. This
    covers:

      editors         that truncate and write in pieces, or write a backup and rename:
                      nothing is read until the file has been still for `settle`
      atomic rename   (mv new rules.yaml): a new inode
      ConfigMap swap  (rules.yaml -> ..data/rules.yaml, ..data -> ..2024_01_05_10_00):
                      the realpath and the inode change when kubelet swaps `..data`;
                      a Secret (tls.crt, tls.key) is swapped the same way, both at once
      missing file    (between an editor's delete and create): waited out, logged once

    A bad file is tried once: it is not read again until it changes again. Every
    `recheck` seconds the content is hashed even without a stat change, for the rare edit
    that keeps size and timestamps. Costs one stat() per file per tick.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        in_force: Callable[[], str],
        on_change: Callable[[], None],
        interval: float,
        settle: float = 0.2,
        recheck: float = 5.0,
    ) -> None:
        self.paths = (paths,) if isinstance(paths, str) else tuple(paths)
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
        """The files' identities and times; None while one of them is missing."""
        signature: list[Any] = []
        for path in self.paths:
            try:
                st = os.stat(path)  # follows symlinks
            except OSError:
                return None
            real = os.path.realpath(path)
            signature += (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return tuple(signature)

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
                log.warning("%s: missing; keeping what is in force", ", ".join(self.paths))
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
            digest = files_digest(self.paths)
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
                log.exception("watching %s failed; trying again", ", ".join(self.paths))
            await asyncio.sleep(self.interval)


# The supervisor's reload trigger: one path, whose digest is the rules' digest.
RulesWatcher = FilesWatcher
