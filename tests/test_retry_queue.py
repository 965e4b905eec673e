"""RetryQueue: events backing off, due in order, with one loop timer for the earliest."""

from __future__ import annotations

import asyncio
from collections import deque

from openpanel_async._accumulator import Item
from openpanel_async._retry_queue import RetryQueue


def _item(name: str) -> Item:
    return Item(name.encode(), "track", None, None, None)


def _bodies(items: list[Item] | deque[Item]) -> list[bytes]:
    return [item.body for item in items]


def test_due_order_ties_and_drain() -> None:
    async def scenario() -> None:
        queue = RetryQueue(asyncio.get_running_loop(), lambda: None)
        for name, due in [("c", 3.0), ("a", 1.0), ("b1", 2.0), ("b2", 2.0)]:
            queue.push(_item(name), due)
        assert len(queue) == 4
        assert queue.pop_due(0.5) is None
        first = queue.pop_due(1.0)
        assert first is not None
        assert first.body == b"a"
        ready: deque[Item] = deque()
        queue.move_due(2.5, ready)
        assert _bodies(ready) == [b"b1", b"b2"]  # equal due times keep their arrival order
        queue.push(_item("d"), 0.0)
        assert _bodies(queue.drain()) == [b"d", b"c"]
        assert len(queue) == 0

    asyncio.run(scenario())


def test_one_timer_for_the_earliest_moved_when_it_changes() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        queue = RetryQueue(loop, lambda: fired.append(loop.time()))
        ready: deque[Item] = deque()
        now = loop.time()
        queue.push(_item("late"), now + 10.0)
        queue.move_due(now, ready)
        queue.push(_item("soon"), now + 0.02)  # earlier than the timer: it moves
        queue.move_due(loop.time(), ready)
        await asyncio.sleep(0.1)
        assert len(fired) == 1
        assert fired[0] >= now + 0.019
        queue.move_due(loop.time(), ready)
        assert _bodies(ready) == [b"soon"]
        # The timer now waits for "late"; draining turns it off.
        assert _bodies(queue.drain()) == [b"late"]
        await asyncio.sleep(0.05)
        assert len(fired) == 1

    asyncio.run(scenario())


def test_a_timer_that_fires_early_is_set_again() -> None:
    """uvloop's millisecond timers may fire a little before the due time."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ready: deque[Item] = deque()
        calls: list[int] = []
        queue: RetryQueue

        def on_due() -> None:
            calls.append(len(ready))
            early = 0.005 if len(calls) == 1 else 0.0  # the first firing comes 5 ms early
            queue.move_due(loop.time() - early, ready)

        queue = RetryQueue(loop, on_due)
        queue.push(_item("x"), loop.time() + 0.01)
        queue.move_due(loop.time(), ready)
        await asyncio.sleep(0.1)
        assert _bodies(ready) == [b"x"]
        assert len(calls) == 2  # fired early, was set again, then fired on time

    asyncio.run(scenario())
