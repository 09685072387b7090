"""Notifications: JSON POSTs to a real receiver, retried, never blocking the sender."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from router.rollout.notify import Notifier

from conftest import poll


async def run_notifier(notifier: Notifier) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(notifier.run())
    await asyncio.sleep(0)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_posts_json_and_retries(webhooks: Callable[[], Any]) -> None:
    rec = await webhooks()
    rec.fail_first = 2
    notifier = Notifier(timeout=2.0, attempts=3, backoff=0.05)
    task = await run_notifier(notifier)
    try:
        notifier.send(rec.url, {"route": "orders", "phase": "Failed"})
        await poll(lambda: asyncio.sleep(0, rec.got))
        assert rec.got == [{"route": "orders", "phase": "Failed"}]
        assert notifier.delivered == 1
    finally:
        await stop(task)


async def test_gives_up_after_the_attempts(
    webhooks: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    rec = await webhooks()
    rec.fail_first = 10
    notifier = Notifier(timeout=2.0, attempts=2, backoff=0.01)
    task = await run_notifier(notifier)
    try:
        notifier.send(rec.url, {"route": "orders", "phase": "Failed"})
        await poll(lambda: asyncio.sleep(0, "failed after 2 attempts" in caplog.text))
        assert rec.got == [] and rec.fail_first == 8
    finally:
        await stop(task)


async def test_send_never_blocks_and_a_slow_receiver_holds_up_no_other(
    webhooks: Callable[[], Any],
) -> None:
    slow, fast = await webhooks(), await webhooks()
    slow.delay = 1.0
    notifier = Notifier(timeout=5.0, concurrency=4)
    task = await run_notifier(notifier)
    try:
        began = time.monotonic()
        notifier.send(slow.url, {"n": 1})
        notifier.send(fast.url, {"n": 2})
        assert time.monotonic() - began < 0.05
        await poll(lambda: asyncio.sleep(0, fast.got))
        assert slow.got == []  # still sleeping: the fast one did not wait for it
        await poll(lambda: asyncio.sleep(0, slow.got))
    finally:
        await stop(task)


async def test_unreachable_receiver_times_out(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(timeout=0.5, attempts=1)
    task = await run_notifier(notifier)
    try:
        notifier.send("http://127.0.0.1:9/hook", {"route": "orders"})
        await poll(
            lambda: asyncio.sleep(0, "notifying http://127.0.0.1:9/hook failed" in caplog.text)
        )
    finally:
        await stop(task)


def test_a_full_queue_drops_the_oldest() -> None:
    notifier = Notifier(queue_size=2)
    for n in range(3):
        notifier.send("http://h/x", {"n": n})
    assert notifier.dropped == 1
    assert [p["n"] for _, p in notifier._queue] == [1, 2]


async def test_stopping_delivers_what_is_queued_and_on_its_way(
    webhooks: Callable[[], Any],
) -> None:
    rec = await webhooks()
    rec.delay = 0.2
    notifier = Notifier(timeout=2.0, concurrency=1, drain=3.0)
    task = await run_notifier(notifier)
    for n in range(3):
        notifier.send(rec.url, {"route": "orders", "n": n})
    await asyncio.sleep(0.05)  # the first is on its way, two wait for the one slot
    await stop(task)
    assert sorted(m["n"] for m in rec.got) == [0, 1, 2]
    assert notifier.delivered == 3 and notifier.dropped == 0


async def test_stopping_waits_for_a_slow_receiver_no_longer_than_the_drain(
    webhooks: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    rec = await webhooks()
    rec.delay = 2.0
    notifier = Notifier(timeout=10.0, drain=0.3)
    task = await run_notifier(notifier)
    notifier.send(rec.url, {"route": "orders"})
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await stop(task)
    assert time.monotonic() - began < 2.0
    assert notifier.dropped == 1 and rec.got == []
    assert "1 rollout notifications not delivered within 0.3 s" in caplog.text
