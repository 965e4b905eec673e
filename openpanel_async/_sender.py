"""The background delivery engine: a pool of worker tasks over one aiohttp session.

Each worker takes one event at a time and POSTs it, so the number of live workers is the
number of requests in flight. Workers are started when events wait and none is idle (up to
the concurrency limit, which ``_limit.ConcurrencyLimit`` adapts to the round trips) and exit
after sitting idle for a while, or when the limit falls below their number, so the pool
follows demand instead of holding idle connections. There is no per-event task.

Where an event can come from, in the order workers take them:
1. ``_owned``: events that may go now and already hold their profile's ordering slot (due
   retries, and the next event of a profile whose previous one just settled);
2. the accumulator's ``ready`` deque (new events);
3. the retry queue (``_retry_queue``), once an event's backoff is over (moved to ``_owned``
   by ``_kick``, which its timer calls).
Profile operations whose profile already has one event in progress are parked in ``_busy``
until it settles, so they reach the server in call order.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from . import _ratelimit
from ._accumulator import (
    DROP_BROKEN,
    DROP_CLOSED,
    DROP_UNAUTHORIZED,
    QUIET_DROPS,
    Accumulator,
    Item,
)
from ._http11 import Http11Transport
from ._limit import ConcurrencyLimit
from ._log import Throttle, logger
from ._outcome import Verdict, classify, server_message
from ._pacing import WindowBudget
from ._retry import RetryPolicy
from ._retry_queue import RetryQueue
from ._transport import AiohttpTransport, Transport
from .errors import (
    AuthenticationError,
    DeliveryError,
    DroppedByServerError,
    RejectedError,
    RetriesExhaustedError,
    ShutdownError,
)

# A 404 "Profile not found" on increment/decrement: the profile may still be in flight on
# the server, so a few spaced attempts are worth it, but not the whole retry budget.
_PROFILE_PENDING_ATTEMPTS = 4
_DROP_REPORT_INTERVAL = 10.0

ErrorCallback = Callable[[DeliveryError], Any]


class Sender:
    def __init__(
        self,
        accumulator: Accumulator,
        *,
        url: str,
        headers: Mapping[str, str],
        max_concurrency: int,
        request_timeout: float,
        adaptive_concurrency: bool = True,
        retry: RetryPolicy,
        on_error: ErrorCallback | None,
        idle_timeout: float,
        on_orphaned: Callable[[Sender], None] | None = None,
        transport: Transport | None = None,
        http_client: str = "aiohttp",
    ) -> None:
        self._acc = accumulator
        self._on_orphaned = on_orphaned
        self._url = url
        self._headers = dict(headers)
        self._limit = ConcurrencyLimit(
            max_concurrency,
            adaptive=adaptive_concurrency,
            awaited=accumulator.delivery_awaited,
            batches=self._answer_batches,
        )
        # Loop iterations (near enough) in which successful answers were handled: the
        # first answer of an iteration opens a batch, and a callback run by the next
        # iteration closes it. Many answers per batch: they waited for this loop.
        self._batch_count = 0
        self._batch_open = False
        self._request_timeout = request_timeout
        self._retry = retry
        self._on_error = on_error
        self._idle_timeout = idle_timeout

        self.state = "running"
        self.retries = 0
        self.rate_limited = 0
        self.in_flight = 0
        self._paused_until = 0.0  # loop.time(); nothing is sent before it
        # What the server's x-ratelimit-* headers allow until the window resets: requests
        # are paced to it instead of running into 429s.
        self._budget = WindowBudget(retry.max_retry_after)

        self._loop = asyncio.get_running_loop()
        self._thread_id = threading.get_ident()
        if transport is None:
            if http_client == "builtin":
                transport = Http11Transport(
                    max_connections=max_concurrency, request_timeout=request_timeout
                )
            else:
                transport = AiohttpTransport(
                    max_connections=max_concurrency,
                    request_timeout=request_timeout,
                    default_headers=self._headers,  # never changed: see _attempt
                )
        self._transport: Transport = transport
        self._transport_closed = False
        self._workers: set[asyncio.Task[None]] = set()
        self._current: dict[asyncio.Task[None], Item] = {}
        self._idle: list[asyncio.Future[None]] = []
        self._owned: deque[Item] = deque()
        self._busy: dict[str, deque[Item]] = {}
        self._retries = RetryQueue(self._loop, self._kick)
        self._kick_scheduled = False
        self._stopping = False
        self._log_throttle = Throttle()
        self._drops_reported = 0
        self._last_drop_report = -_DROP_REPORT_INTERVAL
        self._close_task: asyncio.Task[None] | None = None

        # Bound once: the hot path compares and calls these, and each ``self.method``
        # would make a new bound-method object.
        self._notify_callback = self.notify
        self._kick_callback = self._kick
        # The kick runs in an empty context of its own, not in a copy of the context of the
        # track() call that scheduled it: cheaper on the hot path, and see _kick's workers.
        self._kick_context = contextvars.Context()
        accumulator.notify = self._notify_callback
        accumulator.notify_wanted = True
        if accumulator.ready:
            self.notify()
        # Closes the session if the loop shuts down under us (asyncio.run() ending without
        # aclose()): asyncio cancels every task then, this one included.
        # In an empty context, like the workers: it lives as long as the sender, and would
        # otherwise keep the context of whoever started it (a request's) alive as long.
        self._guardian = self._loop.create_task(self._guard(), context=contextvars.Context())

    async def _guard(self) -> None:
        try:
            await self._loop.create_future()
        except asyncio.CancelledError:
            if self._close_task is None:
                self._orphan()
            await self._close_transport()
            raise

    def _orphan(self) -> None:
        """Our loop is ending: stop, keep the unsettled events for a successor sender."""
        self.state = "stopped"
        self._stopping = True
        for task in self._workers:
            task.cancel()
        self._retries.cancel_timer()
        if self._acc.notify is self._notify_callback:
            self._acc.notify_wanted = False
            self._acc.notify = None
        if self._on_orphaned is not None:
            self._on_orphaned(self)

    async def _close_transport(self) -> None:
        if self._transport_closed:
            return
        self._transport_closed = True
        try:
            async with asyncio.timeout(1.0):
                await self._transport.aclose()
        except TimeoutError:
            logger.warning("openpanel_async: closing the HTTP session timed out")
        except Exception:
            logger.exception("openpanel_async: closing the transport failed")

    # --- waking workers ---------------------------------------------------------------

    def notify(self) -> None:
        """Called after accepted events, from any thread: schedule one ``_kick``.

        Coalesces a burst of events into one wake-up per loop iteration: while a kick is
        scheduled the accumulator stops calling this at all, so the hot path pays for
        ``call_soon`` once per burst rather than once per event. Nor does it call while
        every worker is busy and no more may start (see ``_arm_notify``): a busy worker
        takes the next event by itself. This runs on the first track() after a loop turn,
        with the CPU caches cold from the loop's work, so it touches as little as it can:
        bound methods made once, and a closed loop noticed by call_soon's own error rather
        than asked about first.
        """
        if self._kick_scheduled or self._acc.notify is not self._notify_callback:
            return  # a kick is on its way; or we were replaced, and the flag is not ours
        self._kick_scheduled = True
        self._acc.notify_wanted = False
        try:
            if threading.get_ident() == self._thread_id:
                self._loop.call_soon(self._kick_callback, context=self._kick_context)
            else:
                self._loop.call_soon_threadsafe(self._kick_callback, context=self._kick_context)
        except RuntimeError:
            # The loop is closed: the event stays queued and counted as pending, and the
            # next loop to use the client sends it.
            self._kick_scheduled = False
            self._acc.notify_wanted = True

    def _arm_notify(self) -> None:
        """Have accepted events call ``notify`` only when a kick would find work to give.

        That is when a worker is idle, or another may start under the limit. Otherwise
        every worker is busy, and each takes the next event by itself when its request
        ends, so under load the hot path schedules no kick at all. Whatever makes a kick
        useful again re-arms it: a worker going idle (``_wait_for_work``) or exiting, and
        a kick, which every rise of the limit schedules (``answered`` and ``timed_out``
        say when the limit rose).
        """
        acc = self._acc
        if acc.notify is self._notify_callback and not self._kick_scheduled:
            acc.notify_wanted = bool(self._idle) or len(self._workers) < self._limit.value

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._acc.notify is self._notify_callback:
            # Before the backlog is counted: a put from another thread after the count
            # must schedule another kick (_arm_notify below may clear this again, but only
            # when every worker is busy at the limit and will take that event itself).
            self._acc.notify_wanted = True
        if self._stopping:
            return
        now = self._loop.time()
        self._retries.move_due(now, self._owned)
        backlog = len(self._owned) + len(self._acc.ready)
        idle = self._idle
        if backlog and idle:
            # Workers over a lowered limit exit when they wake: wake those first (they run
            # first, too), so that the ones woken for the backlog find room under it.
            excess = len(self._workers) - self._limit.value
            while excess > 0 and idle:
                waiter = idle.pop(0)  # the longest idle
                if not waiter.done():
                    waiter.set_result(None)
                    excess -= 1
        while backlog > 0 and idle:
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                backlog -= 1
        for _ in range(min(backlog, self._limit.value - len(self._workers))):
            # Each worker in a fresh, empty context: a task otherwise inherits the context
            # of whatever code started it, e.g. the request whose track() woke the sender,
            # and its context variables (tracing spans, request ids) would then follow
            # every request this long-lived worker sends for other requests.
            task = self._loop.create_task(self._worker(), context=contextvars.Context())
            self._workers.add(task)
        self._arm_notify()

    # --- workers ------------------------------------------------------------------------

    async def _worker(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._stopping and len(self._workers) <= self._limit.value:
                now = self._loop.time()
                pause = self._paused_until - now
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                budget = self._budget
                if budget.remaining is not None:
                    wait, whole_client = budget.wait(now, self.in_flight)
                    if wait > 0:
                        if whole_client:
                            self._pause(wait)
                        else:
                            await asyncio.sleep(wait)
                        continue
                item = self._take()
                if item is None:
                    if await self._wait_for_work():
                        continue
                    return
                if budget.remaining is not None:
                    budget.spend()
                self._current[task] = item
                await self._attempt(item)
                # Not in a finally: after a cancellation close() needs to find the item.
                del self._current[task]
                if self._acc.unexpected_drops != self._drops_reported:
                    self._report_drops()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._break(exc)
        finally:
            self._workers.discard(task)
            if not self._stopping and (self._owned or self._acc.ready):
                # Leaving work behind: a retry that fell due at once (a 429 whose wait is
                # already over) went to _owned for this worker to take, but the same 429
                # lowered the limit below the pool and it leaves. The others may be idle.
                self.notify()
            else:
                self._arm_notify()  # there may be room for a new worker now

    def _answer_batches(self) -> int:
        return self._batch_count

    def _close_batch(self) -> None:
        self._batch_open = False

    async def _wait_for_work(self) -> bool:
        """Sleep until woken (True) or idle for too long (False: the worker should exit)."""
        self._limit.backlog_gone()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._idle.append(waiter)
        self._arm_notify()
        if self._acc.ready:
            # Put by another thread after _take() found nothing but before the line above
            # armed notify, so that put did not call it (a put reads the flag after its
            # append, so any later one calls it, or finds a kick already on its way).
            self._idle.remove(waiter)
            return True
        try:
            async with asyncio.timeout(self._idle_timeout):
                await waiter
        except TimeoutError:
            if waiter in self._idle:
                self._idle.remove(waiter)
            # A wake-up may have raced the timeout; never leave work behind.
            return bool(self._owned or self._acc.ready)
        return True

    def _take(self) -> Item | None:
        if self._owned:
            return self._owned.popleft()
        if self._retries:
            due = self._retries.pop_due(self._loop.time())
            if due is not None:
                return due
        ready = self._acc.ready
        while ready:
            item = ready.popleft()
            key = item.order_key
            if key is None:
                return item
            parked = self._busy.get(key)
            if parked is None:
                self._busy[key] = deque()
                return item
            parked.append(item)
        return None

    async def _attempt(self, item: Item) -> None:
        loop = self._loop
        if item.first_attempt is None:
            item.first_attempt = loop.time()
        item.attempts += 1
        if item.client_ip is None and item.user_agent is None:
            headers = self._headers  # this very mapping: the aiohttp session's defaults
        else:
            headers = dict(self._headers)
            if item.user_agent is not None:
                headers["user-agent"] = item.user_agent
            if item.client_ip is not None:
                headers["x-client-ip"] = item.client_ip
        self.in_flight += 1
        in_flight = self.in_flight
        # Not loop.time(): uvloop's is in whole milliseconds, cached per loop iteration,
        # and a round trip on a near server is a fraction of one.
        sent_at = time.perf_counter()
        try:
            response = await self._transport.post(self._url, item.body, headers)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the sender is closing: close() finds the item in _current
            # Not ours: a transport (or a library in it) let a cancellation of its own
            # escape. Taken for the worker's, it would strand the event (and its profile's
            # ordering slot) until close(): it is a failed request like any other.
            self._retry_later(item, None, None, exc, 0)
            return
        except Exception as exc:
            # Timeouts, resets, refused connections, and anything else a misbehaving server
            # can provoke inside aiohttp: all retryable, none may kill the worker.
            if isinstance(exc, TimeoutError):
                now = time.perf_counter()
                if self._limit.timed_out(now - sent_at, in_flight, now):
                    self.notify()  # waiting events may use the new room at once
            self._retry_later(item, None, None, exc, 0)
            return
        finally:
            self.in_flight -= 1
        status = response.status
        response_headers = response.headers
        body = response.body

        if self._budget.remaining is not None or "x-ratelimit-remaining" in response_headers:
            self._budget.read(response_headers, loop.time(), time.time(), self.in_flight)
        if 200 <= status < 300:
            now = time.perf_counter()
            if not self._batch_open:
                self._batch_open = True
                self._batch_count += 1
                loop.call_soon(self._close_batch)
            wanted_more = bool(self._acc.ready or self._owned)
            if self._limit.answered(now - sent_at, in_flight, now, wanted_more=wanted_more):
                self.notify()  # waiting events may use the new room at once
            if status != 202:
                self._settle(item, delivered=True)
                return
        message = server_message(body)
        verdict = classify(status, message, item.event_type)
        if verdict is Verdict.RATE_LIMITED:
            self._rate_limited(item, response_headers, message)
        elif verdict is Verdict.RETRY:
            self._retry_later(item, status, message, None, 0)
        elif verdict is Verdict.PROFILE_PENDING:
            self._retry_later(item, status, message, None, _PROFILE_PENDING_ATTEMPTS)
        elif verdict is Verdict.UNAUTHORIZED:
            self._unauthorized(item, status, message)
        elif verdict is Verdict.BOT:
            self._fail(
                item,
                DroppedByServerError,
                "bot",
                f"the server dropped the {item.event_type} event as sent by a bot (202)",
                status=status,
                message=message,
            )
        else:
            self._fail(
                item,
                RejectedError,
                "rejected",
                _rejection(item.event_type, status, message),
                status=status,
                message=message,
            )
            held = self._log_throttle.allow(f"rejected-{status}")
            if held is not None:
                logger.warning(
                    "openpanel_async: the server rejected an event (%d): %s%s",
                    status,
                    message,
                    f" ({held} more rejections since the last report)" if held else "",
                )

    # --- outcomes -----------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        until = self._loop.time() + seconds
        if until > self._paused_until:
            self._paused_until = until

    def _pause_as_asked(self, requested: float) -> None:
        """Pause for a wait the server asked for, with jitter added once.

        Many answers (or workers) report the same window at about the same time; jittering
        each and keeping the longest would always land at the top of the jitter range.
        """
        requested = min(requested, self._retry.max_retry_after)
        if self._paused_until >= self._loop.time() + requested:
            return
        self._pause(self._retry.server_wait(requested))

    def _stop_intake(self, reason: str) -> None:
        """Refuse new events (counted as dropped for ``reason``) and release every send()
        waiting for room: it finds intake stopped and fails at once."""
        self._acc.refuse(reason)
        self._acc.wake_all_room_waiters()

    def _schedule_retry(self, item: Item, due: float) -> None:
        self.retries += 1
        self._retries.push(item, due)
        self._retries.move_due(self._loop.time(), self._owned)

    def _refuse_retry(self, item: Item) -> bool:
        """After a 401 nothing is sent again: an event that needs a retry fails instead."""
        if self.state != "unauthorized":
            return False
        self._fail(
            item,
            AuthenticationError,
            "unauthorized",
            "not retried: the server refused the credentials",
        )
        return True

    def _rate_limited(self, item: Item, headers: Mapping[str, str], message: str | None) -> None:
        self.rate_limited += 1
        if self._refuse_retry(item):
            return
        item.attempts -= 1  # waiting out a rate limit does not use up an attempt
        item.rate_limited += 1
        requested = _ratelimit.requested_wait(headers, time.time())
        if requested is None:
            wait = self._retry.backoff(item.rate_limited)
            self._pause(wait)
        else:
            wait = min(requested, self._retry.max_retry_after)
            self._pause_as_asked(wait)
        self._limit.rate_limited(self._loop.time(), self._paused_until)
        now = self._loop.time()
        if requested is not None and requested < self._retry.wait_initial:
            # A wait of (almost) nothing ("Retry-After: 0", or a date in the past from a
            # proxy whose clock is behind) would have the event sent again at once, for
            # as long as max_elapsed allows: the event's own backoff is the least it waits.
            # A real wait, however short, is honoured as asked.
            wait = max(wait, self._retry.backoff(item.rate_limited))
        due = max(self._paused_until, now + wait)
        assert item.first_attempt is not None
        if due - item.first_attempt > self._retry.max_elapsed:
            self._fail(
                item,
                RetriesExhaustedError,
                "retries_exhausted",
                f"the {item.event_type} event was still rate limited (429) after "
                f"{self._retry.max_elapsed:g}s",
                status=429,
                message=message,
            )
            return
        self._schedule_retry(item, due)

    def _retry_later(
        self,
        item: Item,
        status: int | None,
        message: str | None,
        cause: BaseException | None,
        attempt_cap: int,
    ) -> None:
        if self._refuse_retry(item):
            return
        retry = self._retry
        max_attempts = min(retry.max_attempts, attempt_cap) if attempt_cap else retry.max_attempts
        now = self._loop.time()
        if attempt_cap:
            # Spaced, not random: give the server time to store the profile.
            wait = min(retry.wait_max, retry.wait_initial * item.attempts)
        else:
            wait = retry.backoff(item.attempts)
        assert item.first_attempt is not None
        if item.attempts >= max_attempts or now + wait - item.first_attempt > retry.max_elapsed:
            what = f"{status} {message}" if status is not None else _describe_exception(cause)
            self._fail(
                item,
                RetriesExhaustedError,
                "retries_exhausted",
                f"the {item.event_type} event failed after {item.attempts + item.rate_limited} "
                f"attempts; last: {what}",
                status=status,
                message=message,
                cause=cause,
            )
            return
        self._schedule_retry(item, now + wait)

    def _unauthorized(self, item: Item, status: int, message: str | None) -> None:
        self._fail(
            item,
            AuthenticationError,
            "unauthorized",
            f"the server refused the credentials ({status}): {message}",
            status=status,
            message=message,
        )
        if self.state not in ("running", "closing"):
            return
        # Every further request would be refused too (also while draining at close):
        # stop, and say so once.
        self.state = "unauthorized"
        self._stop_intake(DROP_UNAUTHORIZED)
        failed = self._fail_waiting(
            AuthenticationError,
            "unauthorized",
            f"not sent: the server refused the credentials ({status}): {message}",
            status=status,
            message=message,
        )
        logger.error(
            "openpanel_async: the server refused the credentials (%d): %s. Sending stopped; "
            "%d events failed (and any still in flight will), new events are dropped.",
            status,
            message,
            failed + 1,
        )

    def _settle(self, item: Item, *, delivered: bool, reason: str | None = None) -> None:
        self._acc.settle(item, delivered, reason)
        key = item.order_key
        if key is None:
            return
        parked = self._busy.get(key)
        if parked is None:
            return
        if parked:
            self._owned.append(parked.popleft())
            self.notify()
        else:
            del self._busy[key]

    def _fail(
        self,
        item: Item,
        error_class: type[DeliveryError],
        reason: str,
        text: str,
        *,
        status: int | None = None,
        message: str | None = None,
        cause: BaseException | None = None,
        release_order: bool = True,
    ) -> None:
        if item.settled:
            return
        if release_order:
            self._settle(item, delivered=False, reason=reason)
        else:
            self._acc.settle(item, False, reason)
        if self._on_error is None:
            return
        error = error_class(
            text,
            event_type=item.event_type,
            body=item.body,
            reason=reason,
            attempts=item.attempts + item.rate_limited,
            status=status,
            server_message=message,
            cause=cause,
        )
        try:
            self._on_error(error)
        except Exception:
            held = self._log_throttle.allow("on_error")
            if held is not None:
                logger.exception("openpanel_async: the on_error callback raised")

    def _fail_waiting(
        self,
        error_class: type[DeliveryError],
        reason: str,
        text: str,
        *,
        status: int | None = None,
        message: str | None = None,
        include_in_flight: bool = False,
        say_attempts: bool = False,
    ) -> int:
        """Fail every event not yet on the wire (and, if asked, those on it); return the count.

        ``say_attempts``: the message says whether the event was ever sent, since one that
        was (and got no answer in time) may have been stored by the server.
        """
        items: list[Item] = list(self._owned)
        self._owned.clear()
        items.extend(self._retries.drain())
        for parked in self._busy.values():
            items.extend(parked)
        self._busy.clear()
        ready = self._acc.ready
        while ready:
            items.append(ready.popleft())
        if include_in_flight:
            items.extend(self._current.values())
        count = 0
        for item in items:
            if not item.settled:
                count += 1
                described = text
                if say_attempts:
                    tries = item.attempts + item.rate_limited
                    described = (
                        f"{text} after {tries} attempt{'s' if tries > 1 else ''}; the server "
                        "may have stored it"
                        if tries
                        else f"not sent: {text}"
                    )
                self._fail(
                    item,
                    error_class,
                    reason,
                    described,
                    status=status,
                    message=message,
                    release_order=False,
                )
        return count

    def _break(self, exc: BaseException) -> None:
        """A bug killed a worker: fail everything loudly rather than keep it silently."""
        if self.state == "broken":
            return
        self.state = "broken"
        self._stopping = True
        self._stop_intake(DROP_BROKEN)
        current = asyncio.current_task()
        for task in self._workers:
            if task is not current:
                task.cancel()
        failed = self._fail_waiting(
            DeliveryError,
            "internal",
            f"not sent: the delivery engine failed: {exc!r}",
            include_in_flight=True,
        )
        logger.error(
            "openpanel_async: the delivery engine failed; %d pending events failed and new "
            "events are dropped. This is a bug in openpanel-async: please report it.",
            failed,
            exc_info=exc,
        )

    def _report_drops(self) -> None:
        now = time.monotonic()
        if now - self._last_drop_report < _DROP_REPORT_INTERVAL:
            return
        *_, dropped, _failed = self._acc.snapshot()
        total = self._acc.unexpected_drops
        new = total - self._drops_reported
        self._drops_reported = total
        self._last_drop_report = now
        if new > 0:
            detail = ", ".join(
                f"{reason}: {n}"
                for reason, n in sorted(dropped.items())
                if reason not in QUIET_DROPS
            )
            logger.warning(
                "openpanel_async: %d events dropped since the last report (in total %s)",
                new,
                detail,
            )

    # --- introspection and shutdown ---------------------------------------------------------

    @property
    def concurrency(self) -> int:
        return self._limit.value

    @property
    def paused_for(self) -> float:
        if self._stopping:
            return 0.0  # nothing will be sent any more: there is no pause to wait out
        return max(0.0, self._paused_until - self._loop.time())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def thread_id(self) -> int:
        """The thread its loop runs on (the one that created it)."""
        return self._thread_id

    def detach_unsettled(self) -> list[Item]:
        """Everything accepted and unsettled outside the accumulator, oldest first.

        For handing over to a new sender when this one's loop is gone (interpreter exit).
        Items that were in flight are included: at-least-once beats losing them.
        """
        items = [item for item in self._current.values() if not item.settled]
        items.extend(self._owned)
        items.extend(self._retries.drain())
        for parked in self._busy.values():
            items.extend(parked)
        items.sort(key=lambda item: item.epoch)
        self._current.clear()
        self._owned.clear()
        self._busy.clear()
        self._stopping = True
        return items

    @property
    def orphaned(self) -> bool:
        return self.state == "stopped"

    async def close(self, timeout: float) -> None:
        """Stop accepting, drain for at most ``timeout`` seconds, then stop everything.

        Events still pending at the deadline are failed with ShutdownError. Cancellation of
        the caller is re-raised, after the same cleanup has been started.
        """
        if self._close_task is None:
            self._close_task = self._loop.create_task(self._close(timeout))
        # Shielded: a caller cancelled mid-close must not leave the session half closed.
        await asyncio.shield(self._close_task)

    async def _close(self, timeout: float) -> None:
        if self.state == "running":
            self.state = "closing"
        self._stop_intake(DROP_CLOSED)
        try:
            if self._acc.pending and not self._stopping:
                drained = self._acc.flush_waiter(self._loop)
                self._kick()
                try:
                    async with asyncio.timeout(timeout):
                        await drained
                except TimeoutError:
                    pass
        finally:
            self._stopping = True
            for task in self._workers:
                task.cancel()
            workers = list(self._workers)
            if workers:
                await asyncio.wait(workers, timeout=1.0)
            lost = self._fail_waiting(
                ShutdownError,
                "shutdown",
                f"the client closed before the event was delivered (shutdown_timeout={timeout:g}s)",
                include_in_flight=True,
                say_attempts=True,
            )
            self._current.clear()
            for waiter in self._idle:
                waiter.cancel()
            self._idle.clear()
            self._guardian.cancel()
            await self._close_transport()
            if self.state == "closing":
                self.state = "closed"
            self._report_close(lost)

    def _report_close(self, lost: int) -> None:
        accepted, delivered, failed, dropped, _ = self._acc.snapshot()
        level = logger.warning if lost or failed else logger.info
        level(
            "openpanel_async: closed: %d accepted, %d delivered, %d failed (%d at shutdown), "
            "%d dropped",
            accepted,
            delivered,
            failed,
            lost,
            sum(dropped.values()),
        )


def _rejection(event_type: str, status: int, message: str | None) -> str:
    text = f"the server rejected the {event_type} event ({status})"
    if 300 <= status < 400:
        # Typically http:// answered with a redirect to https://: never followed, since
        # the secret must not travel to another URL.
        text += "; redirects are not followed: check api_url"
    return f"{text}: {message}" if message else text


def _describe_exception(exc: BaseException | None) -> str:
    if exc is None:
        return "no response"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
