"""Notifications: a JSON POST to each `notify` URL on every phase change of a rollout.

`Notifier.send()` only queues (the controller never waits on a webhook); `run()`, a
task the controller keeps, delivers with httpx: a timeout per attempt, a few attempts
with growing pauses, at most a few deliveries at once so that one slow receiver does not
hold up the others. A full queue (a receiver down for long) drops the oldest message,
with a warning: a notification is news, the audit log is the record. When the task is
cancelled (the router stops or restarts), what is queued or on its way still goes out
for up to `drain` seconds: a rollback is announced just when people restart things.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = ["Notifier"]

log = logging.getLogger("grayroute.rollout")


class Notifier:
    def __init__(
        self,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 1.0,
        queue_size: int = 256,
        concurrency: int = 4,
        drain: float = 3.0,
    ) -> None:
        self.timeout = timeout
        self.drain = drain
        self.attempts = attempts
        self.backoff = backoff
        self.concurrency = concurrency
        self._queue: deque[tuple[str, Mapping[str, Any]]] = deque(maxlen=queue_size)
        self._ready: asyncio.Event | None = None
        self.delivered = 0
        self.dropped = 0

    def send(self, url: str, payload: Mapping[str, Any]) -> None:
        """Queue one POST of `payload` to `url`; never blocks."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
            log.warning("notification queue full: the oldest notification is dropped")
        self._queue.append((url, payload))
        if self._ready is not None:
            self._ready.set()

    async def run(self) -> None:
        """Deliver queued notifications until cancelled."""
        self._ready = asyncio.Event()
        running: set[asyncio.Task[None]] = set()
        limit = asyncio.Semaphore(self.concurrency)
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            try:
                while True:
                    while self._queue:
                        await limit.acquire()  # before taking one: a stop may come here
                        url, payload = self._queue.popleft()
                        task = loop.create_task(self._deliver(client, url, payload))
                        running.add(task)
                        task.add_done_callback(running.discard)
                        task.add_done_callback(lambda _: limit.release())
                    self._ready.clear()
                    if not self._queue:
                        await self._ready.wait()
            finally:
                # Cancelled: deliver the rest (all at once now), bounded by `drain`.
                while self._queue:
                    url, payload = self._queue.popleft()
                    running.add(loop.create_task(self._deliver(client, url, payload)))
                if running:
                    _, left = await asyncio.wait(running, timeout=self.drain)
                    if left:
                        self.dropped += len(left)
                        log.warning(
                            "stopping: %d rollout notifications not delivered within %.1f s",
                            len(left), self.drain,
                        )  # fmt: skip
                        for task in left:
                            task.cancel()
                        await asyncio.gather(*left, return_exceptions=True)

    async def _deliver(
        self, client: httpx.AsyncClient, url: str, payload: Mapping[str, Any]
    ) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                response = await client.post(url, json=dict(payload))
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self.delivered += 1
                    return
                problem = f"HTTP {response.status_code}"
            if attempt < self.attempts:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        log.warning(
            "rollout %s: notifying %s failed after %d attempts (%s)",
            payload.get("route"), url, self.attempts, problem,
        )  # fmt: skip
