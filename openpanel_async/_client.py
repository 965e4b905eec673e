"""The public client: validates and encodes on the caller's side, delivers in the background."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Self

from . import _config, _lifecycle
from ._accumulator import (
    DROP_CLOSED,
    Accumulator,
)
from ._events import (
    Event,
)
from ._http11 import parse_url
from ._intake import EventIntake
from ._log import logger
from ._retry import RetryPolicy
from ._sender import ErrorCallback, Sender
from ._stats import Stats
from ._thread import GRACE as THREAD_GRACE
from ._thread import DeliveryThread
from ._transport import Transport
from ._version import __version__
from .errors import ClientClosedError, ConfigError

# At exit, beyond shutdown_timeout: for a live loop in another thread to run the drain at all.
_EXIT_GRACE = 0.5


def _is_daemon(thread_id: int) -> bool:
    thread = next((t for t in threading.enumerate() if t.ident == thread_id), None)
    return thread is not None and thread.daemon


DEFAULT_API_URL = "https://api.openpanel.dev"
DEFAULT_MAX_QUEUE_SIZE = 10_000
# Over a 50 ms round trip, one event per request needs ~100 in flight for 2,000 events/s
# (Little's law). The pool only grows to this under backlog, while requests do not queue
# (see _limit), and shrinks when idle.
DEFAULT_MAX_CONCURRENCY = 256
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# A worker with nothing to send for this long exits, so the pool shrinks with demand.
DEFAULT_IDLE_TIMEOUT = 2.0
SDK_NAME = "openpanel-async"
# "aiohttp": one pooled aiohttp session (the default; general-purpose and battle-tested).
# "builtin": our lean HTTP/1.1 transport, a third of aiohttp's CPU per event (no proxies).
HTTP_CLIENTS = ("aiohttp", "builtin")
# "loop": the sender runs as tasks on the caller's event loop (the default).
# "thread": it runs on a private thread with its own loop; the caller's loop only queues.
DELIVERY_MODES = ("loop", "thread")


class OpenPanel(EventIntake):
    """An asyncio client for the OpenPanel ingestion API.

    ``track()`` and the other event methods never block, never await and never do I/O:
    they validate the event, encode it once, and put it on a bounded queue that a pool of
    background tasks delivers concurrently over one aiohttp session. Use the client as an
    async context manager (or call :meth:`start` and :meth:`aclose`) so that what is queued
    is delivered before your program exits.

    Events may be tracked before the client starts, and from any thread; they wait in the
    queue until the client runs on its event loop.

    With ``delivery="thread"`` the background tasks run on a private thread with its own
    event loop instead of yours: your loop then only pays for ``track()``, which keeps its
    latency flat at high event rates. ``flush()``, ``send()`` and ``aclose()`` are awaited
    the same way; ``on_error`` is then called on the delivery thread.

    Up to ``max_concurrency`` requests are in flight at once. With ``adaptive_concurrency``
    (the default) fewer are while more would only wait in a queue (round trips well over
    the unloaded one): that keeps each event-loop iteration short and spares a slow server.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str | None = None,
        api_url: str = DEFAULT_API_URL,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        adaptive_concurrency: bool = True,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        retry: RetryPolicy | None = None,
        on_error: ErrorCallback | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        global_properties: Mapping[str, Any] | None = None,
        before_send: Callable[[Event], Event | None] | None = None,
        disabled: bool = False,
        transport: Transport | None = None,
        http_client: str = "aiohttp",
        delivery: str = "loop",
    ) -> None:
        self._client_id = _config.check_client_id(client_id)
        _config.check_client_secret(client_secret)
        self._url = _config.check_api_url(api_url) + "/track"
        self._api_url = self._url[: -len("/track")]
        _config.check_int("max_queue_size", max_queue_size)
        _config.check_int("max_concurrency", max_concurrency)
        _config.check_bool("adaptive_concurrency", adaptive_concurrency)
        _config.check_int("max_event_bytes", max_event_bytes)
        _config.check_seconds("request_timeout", request_timeout, allow_zero=False)
        _config.check_seconds("shutdown_timeout", shutdown_timeout, allow_zero=True)
        _config.check_seconds("idle_timeout", idle_timeout, allow_zero=False)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError("retry: must be a RetryPolicy")
        if on_error is not None:
            if not callable(on_error):
                raise ConfigError("on_error: must be callable")
            if inspect.iscoroutinefunction(on_error):
                raise ConfigError(
                    "on_error: must be a plain function; it runs on the event loop and must "
                    "not block (schedule async work yourself if you need it)"
                )
        if before_send is not None and not callable(before_send):
            raise ConfigError("before_send: must be callable")
        if transport is not None and not isinstance(transport, Transport):
            raise ConfigError("transport: must have async post(url, body, headers) and aclose()")
        self._global_properties = _config.checked_global_properties(global_properties)
        self._before_send = before_send
        self._hook_error_logged = False
        self._disabled = bool(disabled)
        # No hook and not disabled: track() may take its inlined fast path.
        self._plain = before_send is None and not self._disabled
        if http_client not in HTTP_CLIENTS:
            raise ConfigError(f"http_client: must be one of {', '.join(HTTP_CLIENTS)}")
        if http_client == "builtin" and transport is None:
            try:
                parse_url(self._url)
            except ValueError as exc:
                # Found now, not as a "network error" retried on every event.
                raise ConfigError(f"api_url: {exc} (http_client='builtin')") from None
        if delivery not in DELIVERY_MODES:
            raise ConfigError(f"delivery: must be one of {', '.join(DELIVERY_MODES)}")
        # Where the sender runs with delivery="thread"; None: on the caller's loop.
        self._runner = DeliveryThread() if delivery == "thread" else None
        self._transport = transport
        self._http_client = http_client
        self._max_concurrency = max_concurrency
        self._adaptive_concurrency = adaptive_concurrency
        self._request_timeout = float(request_timeout)
        self._shutdown_timeout = float(shutdown_timeout)
        self._idle_timeout = float(idle_timeout)
        self._retry = retry if retry is not None else RetryPolicy()
        self._on_error = on_error
        self._max_event_bytes = max_event_bytes
        self._headers: dict[str, str] = {
            "content-type": "application/json",
            "openpanel-client-id": self._client_id,
            "openpanel-sdk-name": SDK_NAME,
            "openpanel-sdk-version": __version__,
            "user-agent": f"{SDK_NAME}/{__version__}",
        }
        if client_secret is not None:
            self._headers["openpanel-client-secret"] = client_secret
        self._acc = Accumulator(max_queue_size)
        self._sender: Sender | None = None
        # A sender whose event loop ended without aclose(); its events are re-queued when
        # the client next runs on a loop (or at interpreter exit).
        self._orphan: Sender | None = None
        self._closed = False
        _lifecycle.register(self)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        acc = getattr(self, "_acc", None)  # absent when __init__ raised
        if acc is None or getattr(self, "_closed", True):
            return
        pending = acc.pending
        if pending:
            _warn(
                f"unclosed OpenPanel client with {pending} pending events; use 'async with' "
                "or 'await client.aclose()' so that they are delivered",
                ResourceWarning,
                source=self,
            )

    def __repr__(self) -> str:
        # The secret is deliberately left out.
        return (
            f"<OpenPanel client_id={self._client_id!r} api_url={self._api_url!r} "
            f"state={self._state()!r} pending={self._acc.pending}>"
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start background delivery on the running event loop (or its thread). Idempotent."""
        if self._runner is not None:
            self._start_on_runner()
        else:
            self._start_on_running_loop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start_on_running_loop(self) -> Sender:
        sender = self._sender
        if sender is not None:
            if sender.loop is asyncio.get_running_loop():
                return sender
            if not sender.loop.is_closed():
                raise RuntimeError(
                    "this OpenPanel client runs on another event loop; create one client "
                    "per event loop"
                )
            self._adopt(sender)  # its loop is gone without aclose(): take its events over
        if self._orphan is not None:
            self._adopt(self._orphan)
        if self._closed:
            raise ClientClosedError("the client is closed")
        sender = Sender(
            self._acc,
            url=self._url,
            headers=self._headers,
            max_concurrency=self._max_concurrency,
            adaptive_concurrency=self._adaptive_concurrency,
            request_timeout=self._request_timeout,
            retry=self._retry,
            on_error=self._on_error,
            idle_timeout=self._idle_timeout,
            on_orphaned=self._orphaned,
            transport=self._transport,
            http_client=self._http_client,
        )
        self._sender = sender
        return sender

    def _start_on_runner(self) -> Sender:
        """delivery="thread": start the private thread and the sender on its loop."""
        assert self._runner is not None
        if self._closed:
            raise ClientClosedError("the client is closed")
        return self._runner.call(self._start_on_running_loop)

    def _start_on_runner_quietly(self) -> None:
        """On the delivery thread: the lazy start asked for by an event."""
        if self._sender is None and not self._closed:
            try:
                self._start_on_running_loop()
            except ClientClosedError:
                pass  # closed meanwhile: the events were refused or are drained by aclose()

    def _orphaned(self, sender: Sender) -> None:
        """The sender's loop is shutting down: the next loop to use us takes its events."""
        if self._sender is sender:
            self._sender = None
            self._orphan = sender

    def _adopt(self, old: Sender) -> None:
        self._acc.ready.extendleft(reversed(old.detach_unsettled()))
        if self._sender is old:
            self._sender = None
        if self._orphan is old:
            self._orphan = None

    def _start_if_on_a_loop(self) -> None:
        """Lazy start: the first event tracked inside a running loop starts the client.

        With delivery="thread", the first event from anywhere starts the delivery thread.
        """
        if self._closed:
            return
        if self._runner is not None:
            # Without waiting for it: the event goes on the queue now, and the sender
            # takes what is queued when it starts.
            try:
                loop = self._runner.ensure_started()
                loop.call_soon_threadsafe(self._start_on_runner_quietly)
            except (ClientClosedError, RuntimeError):
                pass  # closed meanwhile: the put that follows counts the drop
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread without a loop: the event waits for the client to start
        if self._orphan is not None and self._orphan.loop is loop:
            return  # this loop is shutting down: the event waits for the next one
        self._start_on_running_loop()

    async def aclose(self) -> None:
        """Stop accepting events, deliver what is pending within ``shutdown_timeout``, close.

        Events still pending at the deadline are failed (reported to ``on_error`` with a
        ShutdownError and counted in ``stats().failed``). Never takes much longer than
        ``shutdown_timeout``. Idempotent; safe to call from a cancelled task (the
        cancellation is re-raised once the shutdown has been started).
        """
        if self._runner is not None:
            await self._aclose_on_runner(self._runner)
        else:
            await self._aclose_here()

    async def _aclose_on_runner(self, runner: DeliveryThread) -> None:
        if runner.stopped:
            return  # closed before
        if not runner.started and self._close_unstarted(runner):
            return
        if runner.on_own_thread():
            await self._aclose_here()
            runner.stop()
            return
        try:
            closing = runner.submit(self._aclose_here())
        except ClientClosedError:
            return  # another aclose() stopped the thread meanwhile
        # The thread stops once the drain is over, even if our caller is cancelled first
        # (and even if the caller's loop is shutting down: the wait is detached).
        closing.add_done_callback(lambda _: runner.stop())
        try:
            await runner.wait(closing, detached=True)
        except ClientClosedError:
            pass  # another aclose() stopped the thread before this one ran: closed all the same
        runner.stop()
        if not await runner.join(THREAD_GRACE):
            logger.warning("openpanel_async: the delivery thread did not stop in time")

    def _close_unstarted(self, runner: DeliveryThread) -> bool:
        """Close a thread-delivery client whose thread never started: nothing was queued
        (the first event starts the thread). False: it started meanwhile; drain it.
        """
        # Refuse first: an event racing this either starts the thread before it is
        # stopped (and is then drained) or is refused (and counted as dropped).
        self._acc.refuse(DROP_CLOSED)
        if not runner.stop_if_unstarted():
            return False
        self._closed = True
        return True

    async def _aclose_here(self) -> None:
        """aclose() on the loop the sender runs on."""
        sender = self._sender
        if sender is not None and sender.loop.is_closed() and not self._closed:
            self._start_on_running_loop()  # its loop was closed under it: adopt its events
        if self._sender is None:
            if self._acc.pending and not self._closed:
                # Events were tracked before the client ever started: deliver them now.
                self._start_on_running_loop()
            else:
                self._closed = True
                self._acc.refuse(DROP_CLOSED)
                return
        self._closed = True
        assert self._sender is not None
        await self._sender.close(self._shutdown_timeout)

    # --- process events (see _lifecycle) ---------------------------------------------------

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's loop, connections and queue.

        The parent's sender is kept referenced, never used or closed: closing it would
        touch connections and a loop that belong to the parent. The child starts its own
        sender on first use (and its own delivery thread), with an empty queue and fresh
        counters.
        """
        if self._runner is not None:
            self._runner.reset_after_fork()
        _abandoned_in_child.extend(s for s in (self._sender, self._orphan) if s is not None)
        self._sender = self._orphan = None
        self._acc = Accumulator(self._acc.max_size)

    def _last_chance(self, *, late: bool = False) -> None:
        """At interpreter exit: one bounded attempt to deliver what a forgotten client holds.

        ``late``: the second look, after the threads that are not daemons have ended.
        """
        if self._runner is not None:
            self._last_chance_on_runner(self._runner)
            return
        if self._closed or self._acc.pending == 0:
            return
        old = self._sender
        if old is not None:
            if old.loop.is_running():
                # Its loop runs on in another thread. Exit hooks run before the threads
                # that are not daemons are joined: such a thread owns its shutdown. A
                # daemon thread dies with the interpreter: deliver what is pending there.
                if _is_daemon(old.thread_id):
                    self._last_chance_on_loop(old.loop)
                elif late:
                    logger.error(
                        "openpanel_async: %d events pending at exit were lost: their event "
                        "loop was still running",
                        self._acc.pending,
                    )
                else:
                    _lifecycle.look_again_at_exit(self)
                return
            self._adopt(old)
        if self._orphan is not None:
            self._adopt(self._orphan)
        pending = self._acc.pending
        logger.warning(
            "openpanel_async: client not closed at exit; delivering %d pending events "
            "(at most %gs)",
            pending,
            self._shutdown_timeout,
        )
        try:
            asyncio.run(self.aclose())
        except Exception:
            logger.exception("openpanel_async: delivery at exit failed")

    def _last_chance_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """At exit, for a client whose loop runs in a daemon thread: flush it there.

        A flush, not a close: threads that are not daemons may still run, and use the
        client, until they are joined after this hook.
        """
        logger.warning(
            "openpanel_async: client not closed at exit; delivering %d pending events "
            "on its event loop's thread (at most %gs)",
            self._acc.pending,
            self._shutdown_timeout,
        )
        try:
            done = asyncio.run_coroutine_threadsafe(self.flush(self._shutdown_timeout), loop)
        except RuntimeError:  # that loop closed meanwhile
            logger.error(
                "openpanel_async: %d events pending at exit were lost: their event loop closed",
                self._acc.pending,
            )
            return
        try:
            delivered = done.result(self._shutdown_timeout + _EXIT_GRACE)
        except concurrent.futures.TimeoutError:
            done.cancel()  # that loop is stuck (blocked by its own code)
            delivered = False
        except Exception:
            logger.exception("openpanel_async: delivery at exit failed")
            return
        if not delivered:
            logger.error(
                "openpanel_async: %d events pending at exit were lost: their event loop "
                "did not deliver them within %gs",
                self._acc.pending,
                self._shutdown_timeout + _EXIT_GRACE,
            )
            return
        stats = self.stats()
        logger.info(
            "openpanel_async: at exit: %d accepted, %d delivered, %d failed, %d dropped",
            stats.accepted,
            stats.delivered,
            stats.failed,
            stats.dropped,
        )

    def _last_chance_on_runner(self, runner: DeliveryThread) -> None:
        # Daemon threads still run while exit hooks do: drain on the thread, blocking.
        if not runner.started or runner.on_own_thread():
            return
        if self._closed:
            # An aclose() whose caller was cancelled (its loop ended) may still be
            # draining on the thread: give it its time.
            runner.join_blocking(self._shutdown_timeout + 2 * THREAD_GRACE)
            return
        if self._acc.pending == 0:
            return
        logger.warning(
            "openpanel_async: client not closed at exit; delivering %d pending events "
            "(at most %gs)",
            self._acc.pending,
            self._shutdown_timeout,
        )
        try:
            runner.run_blocking(self.aclose(), self._shutdown_timeout + THREAD_GRACE)
        except Exception:
            logger.exception("openpanel_async: delivery at exit failed")
        finally:
            runner.stop()

    # --- waiting and observing ------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event accepted before this call is delivered or finally failed.

        Returns False if that did not happen within ``timeout`` seconds.
        """
        runner = self._runner
        if runner is None:
            return await self._flush_here(timeout)
        if not self._acc.pending:
            return True
        try:
            if self._sender is None and not self._closed:
                self._start_on_runner()
            return await runner.run(self._flush_here(timeout))
        except ClientClosedError:
            return self._acc.pending == 0  # the delivery thread has stopped: all is settled

    async def _flush_here(self, timeout: float | None) -> bool:
        """flush() on the loop the sender runs on."""
        sender = self._sender
        if not self._closed and (sender is None or sender.loop.is_closed()):
            self._start_on_running_loop()  # starts, or adopts a sender whose loop is gone
        sender = self._sender
        if sender is None:
            return self._acc.pending == 0
        loop = asyncio.get_running_loop()
        if sender.loop is not loop:
            raise RuntimeError("flush() must be awaited on the client's event loop")
        done = self._acc.flush_waiter(loop)
        sender.notify()
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            return False
        return True

    def stats(self) -> Stats:
        """A frozen snapshot of the counters; safe to call from any thread."""
        accepted, delivered, failed, dropped, failed_by_reason = self._acc.snapshot()
        sender = self._sender
        return Stats(
            accepted=accepted,
            delivered=delivered,
            failed=failed,
            dropped=sum(dropped.values()),
            retries=sender.retries if sender else 0,
            rate_limited=sender.rate_limited if sender else 0,
            pending=accepted - delivered - failed,
            in_flight=sender.in_flight if sender else 0,
            concurrency=sender.concurrency if sender else 0,
            paused_for=sender.paused_for if sender else 0.0,
            state=self._state(),
            dropped_by_reason=MappingProxyType(dropped),
            failed_by_reason=MappingProxyType(failed_by_reason),
        )

    def _state(self) -> str:
        if self._sender is not None:
            return self._sender.state
        if self._closed:
            return "closed"
        return "stopped" if self._orphan is not None else "new"


# Senders a forked child inherited from its parent; see OpenPanel._reset_after_fork.
_abandoned_in_child: list[Sender] = []
