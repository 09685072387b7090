"""Where the rules come from: a file (a Kubernetes ConfigMap volume is a file) or one etcd
key. The supervisor speaks to one `RulesSource` and never knows which:

    source = open_source(settings)        FileSource or EtcdSource
    loaded = await source.initial()       the first rules to serve (RulesError, ConfigError)
    task   = source.watch(in_force, reload)   calls reload(trigger) when there is news
    loaded = await source.load(trigger)   the rules as the source has them now, validated;
                                          RulesError (with every problem) when invalid
    source.accepted(loaded)               they are in force now (etcd: cache them)

Rules in etcd follow etcd's watch semantics (as APISIX's config_etcd does): read the key,
remember the store revision of that read, watch from revision + 1 so no change between
the read and the watch is missed; when etcd answers that revision was compacted, read
the key whole again and watch from there. A broken connection is retried with backoff
from 0.1 s doubling to 2 s, each wait ±20 % at random so a fleet does not reconnect in
step; while the watch is quiet a cheap read every PROBE_INTERVAL seconds checks that
etcd is still there (a watch on a dead peer can stay silent forever).

The cache: each value the supervisor accepts is kept as STATE_DIR/rules/DIGEST.yaml (as
for a file) and STATE_DIR/etcd-cache.json points at it (key, revision, digest). A router
that starts while etcd cannot be reached, or whose key holds an invalid value, serves
that copy, checked again (sha256 and validation), with a warning; it never starts with
no rules, and never serves rules it did not validate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from router.errors import Problem, RulesError
from router.fleet import EtcdLocation, is_etcd_url
from router.fleet.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    TLSConfig,
    WatchBatch,
)

if TYPE_CHECKING:
    from router.config import Settings
    from router.rules import Snapshot

__all__ = [
    "CACHE_FILE",
    "EtcdSource",
    "FileSource",
    "Loaded",
    "RulesSource",
    "backoff_delays",
    "etcd_client",
    "open_source",
]

log = logging.getLogger("grayroute.source")

CACHE_FILE = "etcd-cache.json"
BACKOFF_FIRST = 0.1  # seconds before the first retry
BACKOFF_MAX = 2.0
BACKOFF_JITTER = 0.2  # each wait is its nominal value ±20 %
PROBE_INTERVAL = 3.0  # seconds between liveness reads while a watch is quiet
START_WAIT_WITH_CACHE = 2.0  # seconds a start tries etcd before serving the cache
START_WAIT_NO_CACHE = 10.0  # ... and with no cache, before giving up (exit 1)


@dataclass(frozen=True, slots=True)
class Loaded:
    """Validated rules and where they came from."""

    snapshot: Snapshot
    raw: bytes | None  # the exact bytes (None: a file that kept changing while read)
    origin: str  # "file", "etcd" or "cache"
    revision: int | None = None  # the etcd key's mod_revision


class RulesSource(ABC):
    kind: str  # "file" or "etcd"
    location: str  # what /rules and grayroute_rules_info name as the source

    @abstractmethod
    async def initial(self) -> Loaded:
        """The rules to start with; RulesError when there are none that are valid."""

    @abstractmethod
    async def load(self, trigger: str) -> Loaded:
        """The rules as the source has them now, validated; RulesError when invalid."""

    @abstractmethod
    def attempted_digest(self) -> str | None:
        """sha256 of what the last `load` tried (None: nothing readable)."""

    @abstractmethod
    async def watch(self, in_force: Callable[[], str], reload: Callable[[str], None]) -> None:
        """Run until cancelled, calling reload(trigger) when the rules may have changed."""

    def accepted(self, loaded: Loaded) -> None:  # noqa: B027 (most sources keep nothing)
        """`loaded` is in force now."""

    def start_problems(self) -> list[str]:
        """Problems of the source's value at start when the router started from its cache."""
        return []

    def kinds(self) -> dict[str, int]:
        """grayroute_rules_source: 1 for where the rules in force came from, 0 for the rest."""
        return {self.kind: 1}

    def status(self) -> dict[str, Any]:
        """What /rules shows about the source."""
        return {"kind": self.kind}

    def audit_fields(self) -> dict[str, Any]:
        """Extra fields for the state directory's audit log."""
        return {}

    def describe(self, trigger: str) -> str:
        """The log's words for a reload trigger."""
        return {"sighup": "SIGHUP", "watch": "file changed"}.get(trigger, trigger)

    async def aclose(self) -> None:
        return None


def _validate(data: bytes, name: str) -> Snapshot:
    from router.rules import load_snapshot_bytes

    return load_snapshot_bytes(data, name)


# -- a file ---------------------------------------------------------------------------------


class FileSource(RulesSource):
    """A rule file on disk, watched by router.watch.FilesWatcher (or only SIGHUP)."""

    kind = "file"

    def __init__(self, path: str, watch_interval: float) -> None:
        self.location = path
        self.path = path
        self.watch_interval = watch_interval

    async def initial(self) -> Loaded:
        return await self.load("start")

    async def load(self, trigger: str) -> Loaded:
        from router.server import load_rules_stable

        loop = asyncio.get_running_loop()
        snapshot, raw = await loop.run_in_executor(None, load_rules_stable, self.path)
        return Loaded(snapshot, raw, "file")

    def attempted_digest(self) -> str | None:
        try:
            return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        except OSError:
            return None

    async def watch(self, in_force: Callable[[], str], reload: Callable[[str], None]) -> None:
        if self.watch_interval <= 0:
            return
        from router.watch import FilesWatcher

        watcher = FilesWatcher(self.path, in_force, lambda: reload("watch"), self.watch_interval)
        await watcher.run()


# -- an etcd key --------------------------------------------------------------------------


def backoff_delays(rng: random.Random | None = None) -> Iterator[float]:
    """Waits between reconnection attempts: 0.1 s doubling to 2 s, each ±20 %."""
    rand = rng or random.Random()
    nominal = BACKOFF_FIRST
    while True:
        yield nominal * (1 + rand.uniform(-BACKOFF_JITTER, BACKOFF_JITTER))
        nominal = min(nominal * 2, BACKOFF_MAX)


def etcd_client(location: EtcdLocation, settings: Settings) -> EtcdClient:
    """A client for `location` with the TLS and credentials `settings` carry."""
    tls = None
    if settings.etcd_cacert or settings.etcd_cert:
        tls = TLSConfig(
            cacert=settings.etcd_cacert or None,
            cert=settings.etcd_cert or None,
            key=settings.etcd_key or None,
        )
    return EtcdClient(
        location.endpoints,
        tls=tls,
        username=settings.etcd_user,
        password=settings.etcd_password,
    )


class EtcdSource(RulesSource):
    """One etcd key whose value is a rule file, byte for byte."""

    kind = "etcd"

    def __init__(
        self,
        location: EtcdLocation,
        client: EtcdClient,
        state_dir: str,
        *,
        start_wait: float = START_WAIT_WITH_CACHE,
        start_wait_no_cache: float = START_WAIT_NO_CACHE,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.where = location
        self.location = location.url
        self.client = client
        self.state_dir = state_dir
        self.start_wait = start_wait
        self.start_wait_no_cache = start_wait_no_cache
        self.probe_interval = probe_interval
        self.origin = "etcd"  # or "cache": where the rules in force came from
        self.connected = False
        self.last_error: str | None = None
        self.revision_in_force: int | None = None
        # The newest value seen (valid or not) and whether the key exists at all.
        self._latest: KeyValue | None = None
        self._seen = False
        self._watch_from = 0  # 0: read the key whole before watching
        self._attempted: str | None = None
        self._tried: str | None = None  # digest of the last value handed to reload
        self._start_problems: list[str] = []

    # -- start -----------------------------------------------------------------------------

    async def initial(self) -> Loaded:
        loop = asyncio.get_running_loop()
        started = loop.time()
        delays = backoff_delays()
        has_cache = self._cache_pointer() is not None
        wait = self.start_wait if has_cache else self.start_wait_no_cache
        error: EtcdError | None = None
        while True:
            try:
                kv, revision = await self.client.get(self.where.key_bytes)
            except EtcdError as exc:
                error = exc
                left = wait - (loop.time() - started)
                if left <= 0:
                    break
                await asyncio.sleep(min(next(delays), left))
                continue
            self._observe(kv, revision)
            self.connected = True
            try:
                loaded = await self.load("start")
            except RulesError as exc:
                return self._from_cache(exc, None)
            self._tried = loaded.snapshot.digest
            return loaded
        self.last_error = str(error)
        return self._from_cache(None, error)

    def _from_cache(self, invalid: RulesError | None, unreachable: EtcdError | None) -> Loaded:
        """The cached rules, when the key is invalid (or absent) or etcd unreachable."""
        why = (
            f"etcd is unreachable ({unreachable})"
            if unreachable is not None
            else f"{self.where.key} in etcd is not valid"
        )
        try:
            loaded = self._load_cache()
        except (OSError, ValueError, KeyError, RulesError) as exc:
            problems = invalid.problems if invalid is not None else []
            detail = (
                "; ".join(str(p) for p in exc.problems) if isinstance(exc, RulesError) else str(exc)
            )
            raise RulesError(
                [
                    *problems,
                    Problem(
                        self.where.key,
                        1,
                        1,
                        "etcd",
                        f"{why}, and there are no usable cached rules in {self.state_dir} "
                        f"({detail})",
                        "start the router once while etcd holds valid rules "
                        "(`grayroute push RULES " + self.location + "`), so it can cache them",
                    ),
                ]
            ) from None
        if invalid is not None:
            self._start_problems = [str(p) for p in invalid.problems]
            self._tried = self._attempted
        log.warning(
            "%s: serving the cached rules %s (revision %s of %s, cached in %s)",
            why,
            loaded.snapshot.digest[:12],
            loaded.revision,
            self.where.key,
            self.state_dir,
        )
        self.origin = "cache"
        return loaded

    def _cache_pointer(self) -> dict[str, Any] | None:
        try:
            pointer = orjson.loads((Path(self.state_dir) / CACHE_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(pointer, dict) or pointer.get("key") != self.where.key:
            return None
        return pointer

    def _load_cache(self) -> Loaded:
        from router.history import kept_path

        pointer = self._cache_pointer()
        if pointer is None:
            raise ValueError(f"no {CACHE_FILE} for {self.where.key}")
        digest = str(pointer["digest"])
        data = kept_path(self.state_dir, digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"the cached copy {digest[:12]} does not match its hash")
        revision = int(pointer["revision"])
        snapshot = _validate(data, self.where.key)
        return Loaded(snapshot, data, "cache", revision)

    def _write_cache(self, loaded: Loaded) -> None:
        from router.history import now_iso, write_atomic

        pointer = {
            "key": self.where.key,
            "url": self.location,
            "revision": loaded.revision,
            "digest": loaded.snapshot.digest,
            "at": now_iso(),
        }
        try:
            write_atomic(Path(self.state_dir) / CACHE_FILE, orjson.dumps(pointer))
        except OSError as exc:
            log.warning("cannot cache the rules in %s: %s", self.state_dir, exc)

    # -- loading ---------------------------------------------------------------------------

    def _observe(self, kv: KeyValue | None, revision: int) -> None:
        self._latest = kv
        self._seen = True
        self._watch_from = max(self._watch_from, revision + 1)

    async def load(self, trigger: str) -> Loaded:
        if trigger == "sighup":
            # SIGHUP reads the key afresh; when etcd is away the newest value seen is it.
            try:
                kv, revision = await self.client.get(self.where.key_bytes)
                self._observe(kv, revision)
            except EtcdError as exc:
                log.warning(
                    "SIGHUP: cannot read %s (%s); using revision seen last", self.where.key, exc
                )
        kv = self._latest
        if kv is None:
            self._attempted = None
            if not self._seen:
                raise RulesError(
                    [Problem(self.where.key, 1, 1, "etcd", "etcd has not been read yet", "")]
                )
            raise RulesError(
                [
                    Problem(
                        self.where.key,
                        1,
                        1,
                        "etcd",
                        f"the key does not exist in etcd ({self.location})",
                        f"put rules there with `grayroute push RULES {self.location}`",
                    )
                ]
            )
        self._attempted = hashlib.sha256(kv.value).hexdigest()
        loop = asyncio.get_running_loop()
        snapshot = await loop.run_in_executor(None, _validate, kv.value, self.where.key)
        return Loaded(snapshot, kv.value, "etcd", kv.mod_revision)

    def attempted_digest(self) -> str | None:
        return self._attempted

    def accepted(self, loaded: Loaded) -> None:
        if loaded.origin != "etcd":
            return
        self.revision_in_force = loaded.revision
        self.origin = "etcd"
        self._write_cache(loaded)

    def start_problems(self) -> list[str]:
        return self._start_problems

    def kinds(self) -> dict[str, int]:
        return {"etcd": int(self.origin == "etcd"), "cache": int(self.origin == "cache")}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "etcd",
            "origin": self.origin,
            "key": self.where.key,
            "endpoints": list(self.where.endpoints),
            "revision": self.revision_in_force,
            "connected": self.connected,
            "endpoint": self.client.endpoint,
            "watching_from": self._watch_from or None,
            "last_error": self.last_error,
        }

    def audit_fields(self) -> dict[str, Any]:
        return {"revision": self.revision_in_force}

    def describe(self, trigger: str) -> str:
        return {"sighup": "SIGHUP", "etcd": f"etcd {self.where.key} changed"}.get(trigger, trigger)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- watching --------------------------------------------------------------------------

    def _news(self, in_force: Callable[[], str]) -> bool:
        """Whether the newest value seen should be handed to a reload."""
        kv = self._latest
        if kv is None:
            token = "absent"
        else:
            token = hashlib.sha256(kv.value).hexdigest()
            if token == in_force():
                if self.origin == "cache":
                    log.info(
                        "etcd is back: the cached rules in force are revision %d of %s",
                        kv.mod_revision,
                        self.where.key,
                    )
                    self.origin = "etcd"
                self.revision_in_force = kv.mod_revision
                self._tried = token
                return False
        if token == self._tried:
            return False  # an invalid value is reported once, not on every reconnect
        self._tried = token
        return True

    async def watch(self, in_force: Callable[[], str], reload: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        self._delays = backoff_delays()
        self._down_since: float | None = loop.time() if self.origin == "cache" else None
        while True:
            try:
                if self._watch_from == 0:
                    kv, revision = await self.client.get(self.where.key_bytes)
                    self._observe(kv, revision)
                    self._connected()
                    if self._news(in_force):
                        reload("etcd")
                await self._watch_once(in_force, reload)
            except EtcdCompacted as exc:
                # Changes in between are gone from etcd: read the value whole again.
                log.warning("%s; reading %s again", exc, self.where.key)
                self._watch_from = 0
            except EtcdError as exc:
                self.connected = False
                self.last_error = str(exc)
                if self._down_since is None:
                    self._down_since = loop.time()
                    log.warning("etcd: %s; keeping rules %s, retrying", exc, in_force()[:12])
                await asyncio.sleep(next(self._delays))

    def _connected(self) -> None:
        self.connected = True
        self.last_error = None
        self._delays = backoff_delays()
        if self._down_since is not None:
            elapsed = asyncio.get_running_loop().time() - self._down_since
            log.info("etcd reachable again (%s) after %.1f s", self.client.endpoint, elapsed)
            self._down_since = None

    async def _watch_once(self, in_force: Callable[[], str], reload: Callable[[str], None]) -> None:
        """One watch stream, until it breaks (an EtcdError) or the probe finds etcd gone."""
        async with self.client.watch(self.where.key_bytes, self._watch_from) as batches:
            consume = asyncio.ensure_future(self._consume(batches, in_force, reload))
            probe = asyncio.ensure_future(self._probe())
            try:
                done, _ = await asyncio.wait({consume, probe}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (consume, probe):
                    task.cancel()
                await asyncio.gather(consume, probe, return_exceptions=True)
            for task in done:
                task.result()  # the EtcdError that ended it

    async def _consume(
        self,
        batches: AsyncIterator[WatchBatch],
        in_force: Callable[[], str],
        reload: Callable[[str], None],
    ) -> None:
        async for batch in batches:
            if batch.created:
                self._connected()
                continue
            for event in batch.events:
                self._latest = event.kv if event.type == "put" else None
                self._watch_from = max(self._watch_from, event.kv.mod_revision + 1)
            if batch.events and self._news(in_force):
                reload("etcd")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.client.range(self.where.key_bytes, keys_only=True)


# -- choosing --------------------------------------------------------------------------


def open_source(settings: Settings, state_dir: str | None = None) -> RulesSource:
    """The source `settings.rules_path` names; ConfigError for a bad etcd URL."""
    if not is_etcd_url(settings.rules_path):
        return FileSource(settings.rules_path, settings.watch_interval)
    location = EtcdLocation.parse(settings.rules_path)
    if state_dir is None:
        from router.history import resolve_state_dir

        state_dir = str(resolve_state_dir(settings.rules_path, settings.state_dir))
    return EtcdSource(location, etcd_client(location, settings), state_dir)
