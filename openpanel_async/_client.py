"""The public client: validates and encodes on the caller's side, delivers in the background."""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType, TracebackType
from typing import Any, NoReturn, Self

import msgspec

from . import _config, _lifecycle, _validation
from ._accumulator import (
    DROP_CLOSED,
    DROP_DISABLED,
    DROP_FILTERED,
    DROP_HOOK_ERROR,
    Accumulator,
    Item,
)
from ._config import check_header_value
from ._context import _current as _current_context
from ._events import (
    TRACK_PREFIX,
    UNSET,
    AssignGroup,
    Decrement,
    Event,
    Group,
    Identify,
    Increment,
    ProfileId,
    Track,
    TrackWire,
    encode_event,
    encode_payload,
    encoding_error,
    format_timestamp,
    now_timestamp,
    stamp_track,
)
from ._log import logger
from ._retry import RetryPolicy
from ._sender import ErrorCallback, Sender
from ._stats import Stats
from ._thread import GRACE as THREAD_GRACE
from ._thread import DeliveryThread, ThreadStopped
from ._transport import Transport
from ._validation import valid_names as _valid_names
from ._version import __version__
from .errors import ClientClosedError, ConfigError, InvalidEventError, SendTimeoutError

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

_EVENT_CLASSES = frozenset({Track, Identify, Increment, Decrement, Group, AssignGroup})


class OpenPanel:
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

    def _last_chance(self) -> None:
        """At interpreter exit: one bounded attempt to deliver what a forgotten client holds."""
        if self._runner is not None:
            self._last_chance_on_runner(self._runner)
            return
        if self._closed or self._acc.pending == 0:
            return
        old = self._sender
        if old is not None:
            if old.loop.is_running():
                return  # its loop lives on in another thread, which owns the shutdown
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

    # --- sending --------------------------------------------------------------------------

    def send_nowait(
        self, event: Event, *, client_ip: str | None = None, user_agent: str | None = None
    ) -> bool:
        """Queue a validated event. Never blocks.

        Returns False (and counts the event as dropped) when the queue is full, the client
        is closed, or ``before_send`` filtered it. Raises InvalidEventError for an event the
        server would refuse.
        """
        item = self._prepare(event, client_ip, user_agent)
        if item is None:
            return self._disabled
        if self._sender is None:
            self._start_if_on_a_loop()
        return self._acc.put(item)

    async def send(
        self,
        event: Event,
        *,
        timeout: float | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """Queue an event, waiting for room in the queue instead of dropping it.

        Raises SendTimeoutError when no room appeared within ``timeout`` seconds, and
        ClientClosedError when the client is closed (or closes while waiting).
        """
        item = self._prepare(event, client_ip, user_agent)
        if item is None:
            return
        runner = self._runner
        if runner is not None:
            if not self._put_at_once(item):
                try:
                    await runner.run(self._put_when_room(item, timeout))
                except ThreadStopped:
                    self._acc.count_drop(DROP_CLOSED)  # closed before it could wait
                    raise
            return
        if self._closed and self._sender is None:
            self._acc.count_drop(DROP_CLOSED)
            raise ClientClosedError("the client is closed")
        self._start_on_running_loop()
        # Room now (the usual case): queue without making the waiting coroutine at all.
        if not self._acc.put(item, count_drop=False):
            await self._put_when_room(item, timeout)

    def _put_at_once(self, item: Item) -> bool:
        """delivery="thread": queue ``item`` from the calling thread if there is room now.

        False: the caller must wait for room, on the delivery thread. Raises
        ClientClosedError (and counts the drop) once the client is closed.
        """
        if self._sender is None:
            self._start_if_on_a_loop()
        if self._acc.put(item, count_drop=False):
            return True
        if self._closed:
            self._acc.count_drop(DROP_CLOSED)
            raise ClientClosedError("the client is closed")
        return False

    async def _put_when_room(self, item: Item, timeout: float | None) -> None:
        """send()'s wait for room, on the loop the sender runs on."""
        acc = self._acc
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not acc.put(item, count_drop=False):
            if acc.refusing is not None:
                acc.count_drop(acc.refusing)
                raise ClientClosedError(f"the client is not accepting events ({acc.refusing})")
            waiter = acc.room_waiter(loop)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                # Waiters are woken only once a stretch of the queue is free: a slot or
                # two that came free since still count as room within the timeout.
                if acc.put(item, count_drop=False):
                    return
                raise SendTimeoutError(
                    f"no room in the queue (max_queue_size={acc.max_size}) within {timeout:g}s"
                ) from None
            finally:
                if waiter.cancelled():  # timed out or cancelled: not left behind in the queue
                    acc.forget_room_waiter(waiter)

    def _prepare(self, event: Event, client_ip: str | None, user_agent: str | None) -> Item | None:
        """send()/send_nowait(): a ready-made event gets what the event methods add."""
        event_class = type(event)
        if event_class not in _EVENT_CLASSES:
            raise InvalidEventError(
                "event: must be a Track, Identify, Increment, Decrement, Group or AssignGroup, "
                f"not {event_class.__name__}"
            )
        glob = self._global_properties
        if glob and (event_class is Track or event_class is Identify):
            own = event.properties  # type: ignore[union-attr]
            merged = dict(glob) if own is UNSET else {**glob, **own}
            event = msgspec.structs.replace(event, properties=merged)
        if event_class is Track:
            event = stamp_track(event)  # type: ignore[arg-type]
        client_ip, user_agent = _with_context(client_ip, user_agent)
        return self._submit(event, event.order_key(), client_ip, user_agent)

    def _submit(
        self, event: Event, order_key: str | None, client_ip: str | None, user_agent: str | None
    ) -> Item | None:
        """Hook, encode once, check and wrap for the queue: what every event goes through.

        None: the event goes nowhere (filtered by before_send, or the client is disabled);
        the drop is counted here.
        """
        if self._before_send is not None:
            hooked = self._run_before_send(event)
            if hooked is None:
                return None
            if hooked is not event:
                event = hooked
                order_key = event.order_key()
        body = encode_event(event)
        if len(body) > self._max_event_bytes:
            self._refuse_size(event.wire_type, body)
        if client_ip is not None:
            check_header_value(client_ip, "client_ip")
        if user_agent is not None:
            check_header_value(user_agent, "user_agent")
        if self._disabled:
            self._acc.count_drop(DROP_DISABLED)
            return None
        return Item(body, event.wire_type, order_key, client_ip, user_agent)

    def _refuse_size(self, wire_type: str, body: bytes) -> NoReturn:
        raise InvalidEventError(
            f"{wire_type}: the encoded event is {len(body)} bytes, more than "
            f"max_event_bytes={self._max_event_bytes}"
        )

    def _enqueue(
        self, event: Event, order_key: str | None, client_ip: str | None, user_agent: str | None
    ) -> bool:
        item = self._submit(event, order_key, client_ip, user_agent)
        if item is None:
            return self._disabled
        if self._sender is None:
            self._start_if_on_a_loop()
        return self._acc.put(item)

    def _run_before_send(self, event: Event) -> Event | None:
        assert self._before_send is not None
        try:
            result = self._before_send(event)
        except Exception:
            self._acc.count_drop(DROP_HOOK_ERROR)
            if not self._hook_error_logged:
                self._hook_error_logged = True
                logger.exception(
                    "openpanel_async: before_send raised; the event was dropped (later "
                    "failures are counted in stats().dropped_by_reason, not logged)"
                )
            return None
        if result is None:
            self._acc.count_drop(DROP_FILTERED)
            return None
        result_class = type(result)
        if result_class not in _EVENT_CLASSES:
            self._acc.count_drop(DROP_HOOK_ERROR)
            if not self._hook_error_logged:
                self._hook_error_logged = True
                logger.error(
                    "openpanel_async: before_send must return an event or None, not %s; "
                    "the event was dropped",
                    result_class.__name__,
                )
            return None
        if result_class is Track:
            result = stamp_track(result)  # type: ignore[arg-type]
        return result

    def set_global_properties(self, properties: Mapping[str, Any] | None) -> None:
        """Replace the properties merged into every ``track`` and ``identify`` event.

        An event's own properties win over these. Safe to call from any thread.
        """
        self._global_properties = _config.checked_global_properties(properties)

    @property
    def global_properties(self) -> Mapping[str, Any]:
        return MappingProxyType(self._global_properties or {})

    def track(
        self,
        name: str,
        properties: dict[str, Any] | None = None,
        *,
        profile_id: ProfileId | None = None,
        groups: Sequence[str] | None = None,
        timestamp: datetime | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Track a named event. Never blocks; False when the event was dropped.

        ``properties["__timestamp"]`` is set to ``timestamp`` (default: now) unless the
        properties already carry one and no ``timestamp`` is given. Global properties are
        merged under the event's own; profile, groups, IP and user agent not given here
        come from the current :func:`event_context`, if any.
        """
        props: dict[str, Any]
        if (
            type(properties) is dict
            and timestamp is None
            and self._global_properties is None
            and "__timestamp" not in properties
        ):
            props = properties.copy()
            props["__timestamp"] = now_timestamp()
        else:
            props = self._track_properties(properties, timestamp)
        context = _current_context.get()
        if context is not None:
            if profile_id is None:
                profile_id = context.profile_id
            if groups is None:
                groups = context.groups
            if client_ip is None:
                client_ip = context.client_ip
            if user_agent is None:
                user_agent = context.user_agent
        if (
            groups is None
            and self._plain
            and type(name) is str
            and name in _valid_names
            and name != "revenue"
            and "__deviceId" not in props
            and (profile_id is None or (type(profile_id) is str and profile_id))
        ):
            # The hottest path: the event is known valid (its name passed the full checks
            # before, and nothing else needs one), so its payload is encoded straight from
            # its parts, skipping the Track struct and its checks; the bytes are the same
            # as encode_event(Track(...)) would give.
            try:
                payload = encode_payload(
                    TrackWire(name, props, UNSET if profile_id is None else profile_id)
                )
            except (TypeError, ValueError, OverflowError) as exc:
                raise encoding_error("track", exc) from None
            body = TRACK_PREFIX + payload + b"}"
            if len(body) > self._max_event_bytes:
                self._refuse_size("track", body)
            if client_ip is not None:
                check_header_value(client_ip, "client_ip")
            if user_agent is not None:
                check_header_value(user_agent, "user_agent")
            item = Item(body, "track", None, client_ip, user_agent)
        else:
            event = Track(
                name=name,
                properties=props,
                profile_id=UNSET if profile_id is None else profile_id,
                groups=UNSET if groups is None else groups,  # type: ignore[arg-type]
            )
            submitted = self._submit(event, None, client_ip, user_agent)
            if submitted is None:
                return self._disabled
            item = submitted
        if self._sender is None:
            self._start_if_on_a_loop()
        return self._acc.put(item)

    def _track_properties(
        self, properties: dict[str, Any] | None, timestamp: datetime | None
    ) -> dict[str, Any]:
        """The properties a track() call sends: global ones, the event's, the timestamp."""
        stamp = now_timestamp() if timestamp is None else format_timestamp(timestamp)
        glob = self._global_properties
        if properties is None:
            return {**glob, "__timestamp": stamp} if glob else {"__timestamp": stamp}
        if type(properties) is not dict:
            _validation.check_properties(properties, "track.properties")
            properties = dict(properties)  # a dict subclass: send its items as a plain dict
        if timestamp is None and "__timestamp" in properties:
            return {**glob, **properties} if glob else properties
        if glob:
            return {**glob, **properties, "__timestamp": stamp}
        return {**properties, "__timestamp": stamp}

    def _enqueue_in_context(
        self, event: Event, client_ip: str | None, user_agent: str | None
    ) -> bool:
        """Queue a profile or group event with the IP and user agent of the current context."""
        client_ip, user_agent = _with_context(client_ip, user_agent)
        return self._enqueue(event, event.order_key(), client_ip, user_agent)

    def identify(
        self,
        profile_id: ProfileId,
        *,
        first_name: str | None = None,
        last_name: str | None = None,
        email: str | None = None,
        avatar: str | None = None,
        properties: dict[str, Any] | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Create or update a profile. Arguments left as None are not sent."""
        glob = self._global_properties
        if glob and (properties is None or type(properties) is dict):
            properties = {**glob, **properties} if properties else dict(glob)
        event = Identify(
            profile_id=profile_id,
            first_name=UNSET if first_name is None else first_name,
            last_name=UNSET if last_name is None else last_name,
            email=UNSET if email is None else email,
            avatar=UNSET if avatar is None else avatar,
            properties=UNSET if properties is None else properties,
        )
        return self._enqueue_in_context(event, client_ip, user_agent)

    def increment(
        self,
        profile_id: ProfileId,
        property: str,
        value: int | float = 1,
        *,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Add ``value`` (> 0) to a numeric property of a profile."""
        event = Increment(profile_id=profile_id, property=property, value=value)
        return self._enqueue_in_context(event, client_ip, user_agent)

    def decrement(
        self,
        profile_id: ProfileId,
        property: str,
        value: int | float = 1,
        *,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Subtract ``value`` (> 0) from a numeric property of a profile."""
        event = Decrement(profile_id=profile_id, property=property, value=value)
        return self._enqueue_in_context(event, client_ip, user_agent)

    def group(
        self,
        id: str,
        type: str,
        name: str,
        properties: dict[str, Any] | None = None,
        *,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Create or update a group (``id``, ``type`` such as "company", display ``name``)."""
        event = Group(
            id=id, type=type, name=name, properties=UNSET if properties is None else properties
        )
        return self._enqueue_in_context(event, client_ip, user_agent)

    def assign_group(
        self,
        group_ids: Sequence[str],
        *,
        profile_id: ProfileId | None = None,
        client_ip: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """Link a profile to one or more groups.

        Without ``profile_id`` (here or in the current event context) the server links its
        own device id.
        """
        if profile_id is None:
            context = _current_context.get()
            if context is not None:
                profile_id = context.profile_id
        event = AssignGroup(
            group_ids=group_ids,  # type: ignore[arg-type]
            profile_id=UNSET if profile_id is None else profile_id,
        )
        return self._enqueue_in_context(event, client_ip, user_agent)

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


def _with_context(client_ip: str | None, user_agent: str | None) -> tuple[str | None, str | None]:
    """The end user's IP and user agent: the arguments, else the current event context's."""
    context = _current_context.get()
    if context is None:
        return client_ip, user_agent
    return (
        context.client_ip if client_ip is None else client_ip,
        context.user_agent if user_agent is None else user_agent,
    )
