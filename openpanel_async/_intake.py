"""The event methods of the client: build each event, check it, encode it once, queue it.

``track()`` and the other event methods are the hot path: synchronous, no awaits, no I/O,
no logging per event. ``send()`` is the one that may wait, for room in the queue. This is
a mixin so that the public client stays one class: ``OpenPanel`` (in ``_client``) sets the
attributes declared here and owns the lifecycle (starting the sender on the caller's loop
or on the delivery thread, flushing, closing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec
from msgspec import UnsetType

from . import _config, _validation
from ._accumulator import (
    DROP_CLOSED,
    DROP_DISABLED,
    DROP_FILTERED,
    DROP_HOOK_ERROR,
    Accumulator,
    Item,
)
from ._config import check_header_value
from ._context import EventContext
from ._context import _current as _current_context
from ._events import (
    ENCODING_ERRORS,
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
    stamped_properties,
)
from ._log import logger
from ._sender import Sender
from ._thread import DeliveryThread, ThreadStopped
from ._validation import valid_names as _valid_names
from .errors import ClientClosedError, InvalidEventError, SendTimeoutError

_EVENT_CLASSES = frozenset({Track, Identify, Increment, Decrement, Group, AssignGroup})


class EventIntake:
    """track(), identify(), ..., send(): everything that takes events in."""

    # Set by OpenPanel.__init__.
    _acc: Accumulator
    _before_send: Callable[[Event], Event | None] | None
    _closed: bool
    _disabled: bool
    _global_properties: dict[str, Any] | None
    _hook_error_logged: bool
    _max_event_bytes: int
    # No before_send and not disabled: track() may take its fast path.
    _plain: bool
    _runner: DeliveryThread | None
    _sender: Sender | None

    if TYPE_CHECKING:
        # Provided by OpenPanel: start delivery if it can start from here (a running
        # loop, or the delivery thread), and start it on the running loop.

        def _start_if_on_a_loop(self) -> None: ...

        def _start_on_running_loop(self) -> Sender: ...

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
        woken = False
        # Counted for as long as it waits, woken or not: a producer woken for a slot has
        # not run yet while the other answers of the same loop iteration are handled, and
        # the concurrency limit must still see it waiting (see ConcurrencyLimit).
        acc.senders_waiting += 1
        try:
            while not acc.put(item, count_drop=False):
                if acc.refusing is not None:
                    acc.count_drop(acc.refusing)
                    raise ClientClosedError(f"the client is not accepting events ({acc.refusing})")
                waiter = acc.room_waiter(loop, first=woken)
                try:
                    async with asyncio.timeout_at(deadline):
                        await waiter
                    woken = True
                except TimeoutError:
                    # A slot may have come free as the deadline passed (its wake-up may
                    # even have been this waiter's, lost to the timeout): it still counts.
                    if acc.put(item, count_drop=False):
                        return
                    raise SendTimeoutError(
                        f"no room in the queue (max_queue_size={acc.max_size}) within {timeout:g}s"
                    ) from None
                except BaseException:
                    # Cancelled after a settled event woke this waiter, before it could
                    # run: that wake-up stands for a free slot and must go to the next.
                    if waiter.done() and not waiter.cancelled():
                        acc.wake_one_room_waiter()
                    raise
        finally:
            acc.senders_waiting -= 1
            acc.send_wait_ended = time.perf_counter()

    def _prepare(self, event: Event, client_ip: str | None, user_agent: str | None) -> Item | None:
        """send()/send_nowait(): a ready-made event gets what the event methods add."""
        event_class = type(event)
        if event_class not in _EVENT_CLASSES:
            raise InvalidEventError(
                "event: must be a Track, Identify, Increment, Decrement, Group or AssignGroup, "
                f"not {event_class.__name__}"
            )
        # As for the event methods: what the call leaves out comes from the context.
        context = _current_context.get()
        client_ip, user_agent = _with_context(context, client_ip, user_agent)
        if context is not None and (event_class is Track or event_class is AssignGroup):
            event = _with_identity(event, context)  # type: ignore[arg-type]
        glob = self._global_properties
        if (
            type(event) is Track
            and self._plain
            and not glob
            and event.groups is UNSET
            and event.name != "revenue"
            and (event.properties is UNSET or "__deviceId" not in event.properties)
        ):
            # A ready-made Track passed its checks when it was built: it only needs its
            # timestamp, and takes track()'s fast path, without a stamped copy of the
            # struct (and a second run of its checks). Unless its properties, which may
            # have changed since, hold what a check would look at.
            return self._plain_track_item(
                event.name,
                stamped_properties(event.properties),
                event.profile_id,
                client_ip,
                user_agent,
            )
        if glob and (event_class is Track or event_class is Identify):
            own = event.properties  # type: ignore[union-attr]
            merged = dict(glob) if own is UNSET else {**glob, **own}
            event = msgspec.structs.replace(event, properties=merged)
        if event_class is Track:
            track: Track = event  # type: ignore[assignment]
            props = track.properties
            if props is not UNSET and (track.name == "revenue" or "__deviceId" in props):
                # Checked when the Track was built, but its dict may have changed since
                # (stamp_track() rebuilds, and so re-checks, only an event it stamps).
                _validation.check_reserved_properties(track.name, props, "track.properties")
            event = stamp_track(track)
        return self._submit(event, event.order_key(), client_ip, user_agent)

    def _submit(
        self,
        event: Event,
        order_key: str | None,
        client_ip: str | None,
        user_agent: str | None,
        *,
        own_properties: bool = False,
    ) -> Item | None:
        """Hook, encode once, check and wrap for the queue: what every event goes through.

        None: the event goes nowhere (filtered by before_send, or the client is disabled);
        the drop is counted here. ``own_properties``: the event's properties dict was made
        by the client (track() makes one per call), so a hook may edit it as it is.
        """
        if self._before_send is not None:
            hooked = self._run_before_send(event, own_properties)
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

    def _run_before_send(self, event: Event, own_properties: bool) -> Event | None:
        assert self._before_send is not None
        properties = getattr(event, "properties", UNSET)
        if not own_properties and isinstance(properties, dict):
            # The hook may edit the properties in place: never the caller's own dict (a
            # shallow copy, made only when there is a hook).
            event = msgspec.structs.replace(event, properties=dict(properties))
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
            # as encode_event(Track(...)) would give. This is _plain_track_item() inlined:
            # one call less is 1-3% of a track() call, measured A/B in one process.
            try:
                payload = encode_payload(
                    TrackWire(name, props, UNSET if profile_id is None else profile_id)
                )
            except ENCODING_ERRORS as exc:
                wire = TrackWire(name, props, UNSET if profile_id is None else profile_id)
                raise encoding_error("track", exc, wire) from None
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
            submitted = self._submit(event, None, client_ip, user_agent, own_properties=True)
            if submitted is None:
                return self._disabled
            item = submitted
        if self._sender is None:
            self._start_if_on_a_loop()
        return self._acc.put(item)

    def _plain_track_item(
        self,
        name: str,
        properties: dict[str, Any],
        profile_id: ProfileId | UnsetType,
        client_ip: str | None,
        user_agent: str | None,
    ) -> Item:
        """A track event known to be valid, encoded straight from its parts.

        The bytes are the same as ``encode_event(Track(...))`` would give; no before_send
        hook, no groups, and the client is not disabled.
        """
        wire = TrackWire(name, properties, profile_id)
        try:
            payload = encode_payload(wire)
        except ENCODING_ERRORS as exc:
            raise encoding_error("track", exc, wire) from None
        body = TRACK_PREFIX + payload + b"}"
        if len(body) > self._max_event_bytes:
            self._refuse_size("track", body)
        if client_ip is not None:
            check_header_value(client_ip, "client_ip")
        if user_agent is not None:
            check_header_value(user_agent, "user_agent")
        return Item(body, "track", None, client_ip, user_agent)

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
            if glob:
                return {**glob, **properties}
            # The caller's own dict: as it is, unless a before_send hook may edit it.
            return properties if self._before_send is None else properties.copy()
        if glob:
            return {**glob, **properties, "__timestamp": stamp}
        return {**properties, "__timestamp": stamp}

    def _enqueue_in_context(
        self, event: Event, client_ip: str | None, user_agent: str | None
    ) -> bool:
        """Queue a profile or group event with the IP and user agent of the current context."""
        client_ip, user_agent = _with_context(_current_context.get(), client_ip, user_agent)
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
        if glob and (properties is None or isinstance(properties, dict)):
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


def _with_identity(event: Track | AssignGroup, context: EventContext) -> Track | AssignGroup:
    """``event`` with the context's profile (and, for a Track, groups) where it has none."""
    changes: dict[str, Any] = {}
    if event.profile_id is UNSET and context.profile_id is not None:
        changes["profile_id"] = context.profile_id
    if type(event) is Track and event.groups is UNSET and context.groups is not None:
        changes["groups"] = context.groups
    return msgspec.structs.replace(event, **changes) if changes else event


def _with_context(
    context: EventContext | None, client_ip: str | None, user_agent: str | None
) -> tuple[str | None, str | None]:
    """The end user's IP and user agent: the arguments, else the event context's."""
    if context is None:
        return client_ip, user_agent
    return (
        context.client_ip if client_ip is None else client_ip,
        context.user_agent if user_agent is None else user_agent,
    )
