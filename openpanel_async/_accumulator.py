"""The bounded, thread-safe buffer between the callers of track() and the sender.

Producers (any thread) append under a lock; the sender (the event loop thread) pops without
it, which is safe because ``collections.deque`` appends and pops are atomic. The bound
covers every event accepted and not yet settled (queued, in flight, or waiting to be
retried), so memory stays bounded even while the server is down.

Counters are kept so that ``accepted == delivered + failed + pending`` holds at every
moment: pending is derived, never stored.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import Callable

import msgspec

DROP_QUEUE_FULL = "queue_full"
DROP_CLOSED = "closed"
DROP_UNAUTHORIZED = "unauthorized"
DROP_BROKEN = "broken"
DROP_DISABLED = "disabled"
DROP_FILTERED = "filtered"
DROP_HOOK_ERROR = "before_send_error"
# Drops the application asked for: counted, never reported as a problem.
QUIET_DROPS = frozenset({DROP_DISABLED, DROP_FILTERED})


# The send() waiter list is compacted when it reaches this size (or twice the live waiters).
_ROOM_COMPACT_MIN = 64
# A send() that found room this recently still counts as waiting for delivery (see
# delivery_awaited): long enough for a producer on another thread to come back.
SEND_WAIT_GRACE = 0.1


class Item(msgspec.Struct, gc=False):
    """One accepted event on its way to the server.

    A msgspec Struct rather than a Python class: built in C on the hot path, smaller, and,
    with ``gc=False``, invisible to the garbage collector, whose full passes would
    otherwise walk every queued event (it holds only bytes, str and numbers: no cycles).
    """

    body: bytes
    event_type: str
    order_key: str | None
    client_ip: str | None
    user_agent: str | None
    epoch: int = 0
    attempts: int = 0  # requests that count against RetryPolicy.max_attempts
    rate_limited: int = 0  # 429s received; they do not use up attempts
    first_attempt: float | None = None
    settled: bool = False


class Accumulator:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.ready: deque[Item] = deque()
        self.accepted = 0
        self.delivered = 0
        self.failed = 0
        self.dropped: dict[str, int] = {}
        self.unexpected_drops = 0  # drops not in QUIET_DROPS; the sender reports these
        self.failed_by_reason: dict[str, int] = {}
        # Set by the sender once it runs: put() calls notify (outside the lock) while
        # notify_wanted is set. The sender clears the flag while a wake-up is already on
        # its way, and while every worker is busy and no more may start, so a burst of
        # events costs one attribute check each, not one call. put() reads the flag after
        # its append: a worker that sets it and then finds the deque empty can sleep safely.
        self.notify: Callable[[], None] | None = None
        self.notify_wanted = False
        self._lock = threading.Lock()
        self._refusing: str | None = None  # drop reason once intake has stopped
        self._pending = 0  # accepted - delivered - failed, kept for a cheap bound check
        # flush() bookkeeping: events are stamped with the current epoch; a flush closes
        # the epoch and waits until no event of it, or of any earlier one, is unsettled.
        # The open epoch's unsettled count is derived when it closes (accepted since it
        # opened, less those of it settled), so the hot path only stamps the epoch; closed
        # epochs with unsettled events are in _outstanding, oldest first.
        self._epoch = 0
        self._epoch_opened_at = 0  # self.accepted when the open epoch began
        self._open_settled = 0
        self._outstanding: dict[int, int] = {}
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        self._room_compact_at = _ROOM_COMPACT_MIN
        # send() calls waiting for room, woken or not, and when the last wait ended
        # (time.perf_counter()); on the sender's loop only.
        self.senders_waiting = 0
        self.send_wait_ended = -math.inf

    # --- producers (any thread) ------------------------------------------------------

    def put(self, item: Item, count_drop: bool = True) -> bool:
        """Queue ``item``; False (and, unless told otherwise, a counted drop) when refused."""
        # acquire/release rather than "with": this runs once per event, and the context
        # manager protocol costs more than everything else done under the lock.
        lock = self._lock
        lock.acquire()
        try:
            if self._refusing is not None or self._pending >= self.max_size:
                if count_drop:
                    reason = self._refusing or DROP_QUEUE_FULL
                    self.dropped[reason] = self.dropped.get(reason, 0) + 1
                    self.unexpected_drops += 1
                return False
            self.accepted += 1
            self._pending += 1
            item.epoch = self._epoch
            self.ready.append(item)
        finally:
            lock.release()
        if self.notify_wanted:
            notify = self.notify
            if notify is not None:
                notify()
        return True

    def count_drop(self, reason: str) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            if reason not in QUIET_DROPS:
                self.unexpected_drops += 1

    @property
    def pending(self) -> int:
        return self._pending  # == accepted - delivered - failed, kept under the lock

    @property
    def refusing(self) -> str | None:
        return self._refusing

    def refuse(self, reason: str) -> None:
        """Stop accepting events; later puts are dropped and counted under ``reason``."""
        with self._lock:
            if self._refusing is None:
                self._refusing = reason

    def snapshot(self) -> tuple[int, int, int, dict[str, int], dict[str, int]]:
        with self._lock:
            return (
                self.accepted,
                self.delivered,
                self.failed,
                dict(self.dropped),
                dict(self.failed_by_reason),
            )

    # --- the sender (event loop thread) ------------------------------------------------

    def settle(self, item: Item, delivered: bool, reason: str | None = None) -> None:
        """Count ``item`` as delivered or finally failed; exactly once per item."""
        if item.settled:
            return
        item.settled = True
        epoch = item.epoch
        epoch_done = False
        lock = self._lock
        lock.acquire()  # not "with": once per event, see put()
        try:
            if delivered:
                self.delivered += 1
            else:
                self.failed += 1
                if reason is not None:
                    self.failed_by_reason[reason] = self.failed_by_reason.get(reason, 0) + 1
            self._pending -= 1
            if epoch == self._epoch:
                self._open_settled += 1
            else:
                left = self._outstanding[epoch] - 1
                if left:
                    self._outstanding[epoch] = left
                else:
                    del self._outstanding[epoch]
                    epoch_done = True
        finally:
            lock.release()
        if epoch_done and self._flush_waiters:
            self._wake_flushers()
        # One event settled, one slot free: wake one send() waiting for room (a producer
        # woken fills every slot freed by the time it runs, so this batches by itself).
        if self._room_waiters:
            self.wake_one_room_waiter()

    def flush_waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future that completes once every event accepted so far has settled."""
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            target = self._epoch
            unsettled = self.accepted - self._epoch_opened_at - self._open_settled
            if unsettled:
                self._outstanding[target] = unsettled
            self._epoch += 1
            self._epoch_opened_at = self.accepted
            self._open_settled = 0
        self._flush_waiters.append((target, future))
        self._wake_flushers()
        return future

    def _wake_flushers(self) -> None:
        # Epochs are inserted in increasing order, so the first key is the oldest unsettled.
        oldest = next(iter(self._outstanding), self._epoch)
        keep = []
        for target, future in self._flush_waiters:
            if target < oldest:
                if not future.done():
                    future.set_result(None)
            elif not future.done():
                keep.append((target, future))
        self._flush_waiters = keep

    def room_waiter(
        self, loop: asyncio.AbstractEventLoop, *, first: bool = False
    ) -> asyncio.Future[None]:
        """A future woken when an event settles, i.e. when room may have appeared.

        ``first``: ahead of the others, for a waiter that was woken but found the slot
        taken (by a track() call in between): it has waited longest.
        """
        future: asyncio.Future[None] = loop.create_future()
        waiters = self._room_waiters
        if first:
            waiters.appendleft(future)
        else:
            waiters.append(future)
        if len(waiters) >= self._room_compact_at:
            # A wait that timed out or was cancelled leaves its future here until a wake-up
            # reaches it; against a stalled server none may. Drop those now and then (the
            # list stays within twice the live waiters, at O(1) amortised per wait).
            live = [waiter for waiter in waiters if not waiter.done()]
            waiters.clear()
            waiters.extend(live)
            self._room_compact_at = max(_ROOM_COMPACT_MIN, 2 * len(live))
        return future

    def delivery_awaited(self, now: float) -> bool:
        """Whether a caller waits for delivery at ``now`` (``time.perf_counter()``): a
        send() for room, or a flush().

        On the sender's loop (where both kinds of waits run). A send() that found room
        within the last SEND_WAIT_GRACE seconds counts: with delivery="thread" a producer
        queues its next events on its own thread, and its next wait starts there. A flush()
        that timed out or was cancelled leaves a done future behind until the next wake-up:
        it does not count.
        """
        if self.senders_waiting or now - self.send_wait_ended < SEND_WAIT_GRACE:
            return True
        return any(not future.done() for _, future in self._flush_waiters)

    def wake_one_room_waiter(self) -> None:
        """Wake the longest-waiting send() still waiting (those timed out are skipped)."""
        waiters = self._room_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def wake_all_room_waiters(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
