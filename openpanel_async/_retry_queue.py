"""Events waiting out a backoff: earliest due first, with one loop timer for the earliest.

The sender pushes an event with the loop time at which it may go again. One timer covers
the whole queue: it is set for the earliest due time and moved only when that changes,
so a thousand events backing off cost one timer, not a thousand. When it fires, the
sender's callback moves the events that are due to the front of its work.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable

from ._accumulator import Item

__all__ = ["RetryQueue"]


class RetryQueue:
    """A min-heap of (due, arrival, item); the arrival number keeps equal due times in order."""

    __slots__ = ("_heap", "_loop", "_on_due", "_seq", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_due: Callable[[], None]) -> None:
        self._loop = loop
        self._on_due = on_due
        self._heap: list[tuple[float, int, Item]] = []
        self._seq = itertools.count()
        self._timer: asyncio.Handle | None = None
        # When it fires: kept here because uvloop's timer handles have no when().
        self._timer_at = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, item: Item, due: float) -> None:
        """Queue ``item`` until the loop time ``due``; call :meth:`move_due` to arm the timer."""
        heapq.heappush(self._heap, (due, next(self._seq), item))

    def pop_due(self, now: float) -> Item | None:
        """The earliest event if it is due at ``now``, else None."""
        heap = self._heap
        if heap and heap[0][0] <= now:
            return heapq.heappop(heap)[2]
        return None

    def move_due(self, now: float, into: deque[Item]) -> None:
        """Append every event due at ``now`` to ``into``, then time the next one."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            into.append(heapq.heappop(heap)[2])
        timer, when = self._timer, self._timer_at
        if timer is not None and (when <= now or not heap or when > heap[0][0]):
            timer.cancel()
            timer = self._timer = None
        if heap and timer is None:
            self._timer_at = heap[0][0]
            self._timer = self._loop.call_at(heap[0][0], self._fired)

    def drain(self) -> list[Item]:
        """Every queued event, earliest due first; the queue is left empty, the timer off."""
        items = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        self.cancel_timer()
        return items

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fired(self) -> None:
        # Forget the timer before the callback, so that move_due() sets a new one if the
        # earliest event is not due yet after all (uvloop's millisecond timers may fire a
        # little early).
        self._timer = None
        self._on_due()
