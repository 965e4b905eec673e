"""The wire schema: one frozen msgspec Struct per event type, validated on construction.

A Struct validates in ``__post_init__``, which msgspec runs both when user code builds an
event and when JSON is decoded into one, so the client, the local test server and the
importer all apply exactly the same rules. Field names are snake_case in Python and camelCase
on the wire; optional fields left UNSET are omitted from the JSON, never sent as null.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeAlias

import msgspec
from msgspec import UNSET, UnsetType

from . import _validation as v
from ._validation import valid_names as _valid_names
from .errors import InvalidEventError

__all__ = [
    "UNSET",
    "AssignGroup",
    "Decrement",
    "Event",
    "Group",
    "Identify",
    "Increment",
    "Track",
    "decode_event",
    "encode_event",
]

ProfileId: TypeAlias = str | int | float


class _Payload(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, rename="camel", eq=True
):
    wire_type: ClassVar[str]

    def order_key(self) -> str | None:
        """Profile operations for one profile must reach the server in call order; the
        delivery engine serialises events with the same key. None: no ordering constraint.
        """
        return None


class Track(_Payload, frozen=True):
    """A named event. ``properties["__timestamp"]`` is set by the client when missing."""

    wire_type: ClassVar[str] = "track"

    name: str
    properties: dict[str, Any] | UnsetType = UNSET
    profile_id: ProfileId | UnsetType = UNSET
    # null is the one optional the server takes: it means "no groups".
    groups: list[str] | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        # The hot path of every track() call: the common valid case costs a few type and
        # dict checks; the full (slower) checks run only when something looks unusual.
        name = self.name
        if type(name) is not str or name not in _valid_names:
            v.check_event_name(name, "track.name")
        properties = self.properties
        if properties is not UNSET:
            if type(properties) is not dict:
                v.check_properties(properties, "track.properties")  # a dict subclass, say
            if name == "revenue" or "__deviceId" in properties:
                v.check_reserved_properties(name, properties, "track.properties")
        profile_id = self.profile_id
        if profile_id is not UNSET and (type(profile_id) is not str or not profile_id):
            v.check_profile_id(profile_id, "track.profile_id")
        if self.groups is not UNSET and self.groups is not None:
            v.check_string_list(self.groups, "track.groups", allow_empty_list=True)


class Identify(_Payload, frozen=True):
    """Create or update a profile."""

    wire_type: ClassVar[str] = "identify"

    profile_id: ProfileId
    first_name: str | UnsetType = UNSET
    last_name: str | UnsetType = UNSET
    email: str | UnsetType = UNSET
    avatar: str | UnsetType = UNSET
    properties: dict[str, Any] | UnsetType = UNSET

    def __post_init__(self) -> None:
        v.check_profile_id(self.profile_id, "identify.profile_id")
        if self.first_name is not UNSET:
            v.check_optional_str(self.first_name, "identify.first_name")
        if self.last_name is not UNSET:
            v.check_optional_str(self.last_name, "identify.last_name")
        if self.email is not UNSET:
            v.check_email(self.email, "identify.email")
        if self.avatar is not UNSET:
            v.check_avatar(self.avatar, "identify.avatar")
        if self.properties is not UNSET:
            v.check_properties(self.properties, "identify.properties")

    def order_key(self) -> str | None:
        return _profile_key(self.profile_id)


class Increment(_Payload, frozen=True):
    """Add ``value`` (> 0) to a numeric profile property; dots in ``property`` mean nesting.

    Without ``value`` the field is left out and the server adds 1.
    """

    wire_type: ClassVar[str] = "increment"

    profile_id: ProfileId
    property: str
    value: int | float | UnsetType = UNSET

    def __post_init__(self) -> None:
        t = self.wire_type
        v.check_profile_id(self.profile_id, f"{t}.profile_id")
        v.check_nonempty_str(self.property, f"{t}.property")
        if self.value is not UNSET:
            v.check_positive_number(self.value, f"{t}.value")

    def order_key(self) -> str | None:
        return _profile_key(self.profile_id)


class Decrement(Increment, frozen=True):
    """Subtract ``value`` (> 0, sent as is) from a numeric profile property."""

    wire_type: ClassVar[str] = "decrement"


class Group(_Payload, frozen=True):
    """Create or update a group."""

    wire_type: ClassVar[str] = "group"

    id: str
    type: str
    name: str
    properties: dict[str, Any] | UnsetType = UNSET

    def __post_init__(self) -> None:
        v.check_nonempty_str(self.id, "group.id")
        v.check_nonempty_str(self.type, "group.type")
        v.check_nonempty_str(self.name, "group.name")
        if self.properties is not UNSET:
            v.check_properties(self.properties, "group.properties")


class AssignGroup(_Payload, frozen=True):
    """Link a profile (or, without one, the server's device id) to one or more groups."""

    wire_type: ClassVar[str] = "assign_group"

    group_ids: list[str]
    profile_id: ProfileId | UnsetType = UNSET

    def __post_init__(self) -> None:
        v.check_string_list(self.group_ids, "assign_group.group_ids", allow_empty_list=False)
        if self.profile_id is not UNSET:
            v.check_profile_id(self.profile_id, "assign_group.profile_id")

    def order_key(self) -> str | None:
        if self.profile_id is UNSET:
            return None
        return _profile_key(self.profile_id)


Event: TypeAlias = Track | Identify | Increment | Decrement | Group | AssignGroup

EVENT_TYPES: dict[str, type[Event]] = {
    cls.wire_type: cls for cls in (Track, Identify, Increment, Decrement, Group, AssignGroup)
}


def _profile_key(profile_id: ProfileId) -> str:
    # "1", 1 and 1.0 are the same profile on the server, which takes a number's text as
    # JavaScript writes it (String(1.0) is "1").
    if type(profile_id) is str:
        return profile_id
    if type(profile_id) is float and profile_id.is_integer() and abs(profile_id) < 1e21:
        return str(int(profile_id))
    return repr(profile_id)  # from 1e21 on, JavaScript writes an exponent too: "1e+21"


_encoder = msgspec.json.Encoder()
# A bound method: track()'s fast path calls it directly.
encode_payload = _encoder.encode
# The request body is this prefix, the encoded payload and "}". Concatenating also leaves
# the body in an exact-size bytes object: msgspec's own output keeps its growth slack
# (a third of a typical event), which every queued event would carry.
REQUEST_PREFIXES = {name: b'{"type":"' + name.encode() + b'","payload":' for name in EVENT_TYPES}
TRACK_PREFIX = REQUEST_PREFIXES["track"]


class TrackWire(msgspec.Struct, omit_defaults=True, rename="camel", gc=False):
    """Track's wire form without its checks, for track()'s fast path once they have passed.

    Same fields in the same order as :class:`Track` (bar groups, which the fast path never
    has), so both encode to the same bytes.
    """

    name: str
    properties: dict[str, Any] | UnsetType = UNSET
    profile_id: ProfileId | UnsetType = UNSET


# What msgspec raises for a value it cannot encode.
ENCODING_ERRORS = (TypeError, ValueError, OverflowError)


def encoding_error(wire_type: str, exc: Exception, payload: msgspec.Struct) -> InvalidEventError:
    """The error for a ``payload`` msgspec could not encode, naming the field that failed.

    Only on this error path is each field encoded again, to find it: a value that is no
    JSON in the properties, or a lone surrogate in any string.
    """
    return InvalidEventError(
        f"{wire_type}.{_unencodable(payload)}: cannot be encoded as JSON: {exc}"
    )


def _unencodable(payload: msgspec.Struct) -> str:
    for name in payload.__struct_fields__:
        value = getattr(payload, name)
        if value is UNSET:
            continue  # left out of the JSON (and not encodable on its own)
        try:
            _encoder.encode(value)
        except ENCODING_ERRORS:
            if isinstance(value, dict):
                for key, item in value.items():
                    try:
                        _encoder.encode({key: item})
                    except ENCODING_ERRORS:
                        plain = isinstance(key, str) and key.isprintable() and key.isascii()
                        return f"{name}.{key}" if plain else f"{name}[{key!r}]"
            return name
    return "properties"  # encodes now: changed by another thread since


def encode_event(event: Event) -> bytes:
    """The exact request body for ``event``; property values msgspec cannot encode are refused."""
    try:
        payload = _encoder.encode(event)
    except ENCODING_ERRORS as exc:
        raise encoding_error(event.wire_type, exc, event) from None
    return REQUEST_PREFIXES[event.wire_type] + payload + b"}"


class _Envelope(msgspec.Struct, frozen=True):
    type: str
    payload: msgspec.Raw
    # The server also takes credentials in the body, as an alternative to the headers.
    clientId: str | UnsetType = UNSET  # wire name
    clientSecret: str | UnsetType = UNSET  # wire name


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_payload_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def decode_envelope(body: bytes | str) -> tuple[Event, str | None, str | None]:
    """Decode a request body as the server does: (event, body client id, body secret).

    Raises InvalidEventError naming the JSON path and the rule that failed.
    """
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidEventError(f"body: {exc}") from None
    decoder = _payload_decoders.get(envelope.type)
    if decoder is None:
        raise InvalidEventError(
            f"body/type: must be one of {', '.join(sorted(EVENT_TYPES))}, got {envelope.type!r}"
        )
    try:
        event = decoder.decode(envelope.payload)
    except msgspec.ValidationError as exc:
        raise InvalidEventError(f"body/payload: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidEventError(f"body/payload: {exc}") from None
    client_id = None if envelope.clientId is UNSET else envelope.clientId
    secret = None if envelope.clientSecret is UNSET else envelope.clientSecret
    return event, client_id, secret


def decode_event(body: bytes | str) -> Event:
    """The event a request body carries (the inverse of :func:`encode_event`)."""
    return decode_envelope(body)[0]


# --- timestamps -------------------------------------------------------------------------

# The last formatted millisecond: (start, end) of it in time.time_ns(), and its text. One
# tuple, read once and replaced whole, so a reader on another thread never mixes the
# bounds of one millisecond with the text of another. The same for the current second and
# its "2026-11-26T08:00:00" prefix.
_stamp_cache: tuple[int, int, str] = (0, 0, "")
_second_cache: tuple[int, int, str] = (0, 0, "")
# ".000Z" to ".999Z": a new millisecond in a known second costs one concatenation.
_MILLIS_SUFFIX = tuple(f".{ms:03d}Z" for ms in range(1000))


def now_timestamp() -> str:
    """The current UTC time as the server wants it: ``2026-11-26T08:00:00.000Z``.

    Formatting costs more than the rest of track(); at high rates many events share a
    millisecond, so the hot path is one clock read and one range check. A new millisecond
    (always the case on the first track() after the loop ran, with cold CPU caches) is
    formatted here rather than in a further call, with integer steps only.
    """
    global _stamp_cache
    now = time.time_ns()
    start, end, stamp = _stamp_cache
    if start <= now < end:
        return stamp
    second_start, second_end, prefix = _second_cache
    if not second_start <= now < second_end:
        return _format_new_second(now)
    offset = (now - second_start) // 1_000_000
    stamp = prefix + _MILLIS_SUFFIX[offset]
    start = second_start + offset * 1_000_000
    _stamp_cache = (start, start + 1_000_000, stamp)
    return stamp


def _format_new_second(now: int) -> str:
    global _stamp_cache, _second_cache
    second_start = now - now % 1_000_000_000
    prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second_start // 1_000_000_000))
    _second_cache = (second_start, second_start + 1_000_000_000, prefix)
    offset = (now - second_start) // 1_000_000
    stamp = prefix + _MILLIS_SUFFIX[offset]
    start = second_start + offset * 1_000_000
    _stamp_cache = (start, start + 1_000_000, stamp)
    return stamp


def format_timestamp(moment: datetime, field: str = "timestamp") -> str:
    if not isinstance(moment, datetime):
        v.fail(field, f"must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        v.fail(field, "must be timezone-aware (a naive datetime's zone is ambiguous)")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def stamped_properties(properties: dict[str, Any] | UnsetType) -> dict[str, Any]:
    """A track event's properties with ``__timestamp`` set to now, unless they carry one."""
    if properties is UNSET:
        return {"__timestamp": now_timestamp()}
    if "__timestamp" in properties:
        return properties
    return {**properties, "__timestamp": now_timestamp()}


def stamp_track(event: Track) -> Track:
    """``event`` with ``properties.__timestamp`` set to now, unless it carries one already."""
    properties = event.properties
    if properties is not UNSET and "__timestamp" in properties:
        return event
    return msgspec.structs.replace(event, properties=stamped_properties(properties))
