"""Background tasks stop even when a call inside them swallowed the cancel."""

from __future__ import annotations

import asyncio

from promptcache.cache.tasks import raise_if_cancelled, stop_task


async def _swallows_one_cancel(stalled: asyncio.Event) -> None:
    """Like a task whose Redis write swallowed its cancel (Python 3.11's wait_for), then
    waits for work that never comes."""
    try:
        await asyncio.Event().wait()  # never set: waits until cancelled
    except asyncio.CancelledError:
        pass  # the swallow
    stalled.set()
    await asyncio.Event().wait()


async def test_stop_task_stops_a_task_that_swallowed_its_first_cancel() -> None:
    stalled = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancel(stalled))
    await asyncio.sleep(0)
    assert await stop_task(task, within=2.0)
    assert stalled.is_set() and task.cancelled()


async def test_stop_task_gives_up_on_a_task_that_never_stops_and_says_so() -> None:
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.Event().wait()  # never set: waits until cancelled
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert not await stop_task(task, within=0.2)
    assert not task.done()
    task.get_coro().close()  # type: ignore[union-attr]


async def test_raise_if_cancelled_honours_a_cancel_that_was_swallowed() -> None:
    reached = []

    async def loop_with_check() -> None:
        while True:
            try:
                await asyncio.Event().wait()  # never set: waits until cancelled
            except asyncio.CancelledError:
                pass  # swallowed by a call that "returned"
            reached.append(True)
            raise_if_cancelled()

    task = asyncio.create_task(loop_with_check())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=2.0)
    assert task.cancelled() and reached == [True]


async def test_stop_task_of_none_or_a_finished_task_is_immediate() -> None:
    assert await stop_task(None)

    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await stop_task(task)
