"""The public API against the local server: payloads, headers, validation, queue, threads."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

import openpanel_async
from openpanel_async import (
    ClientClosedError,
    ConfigError,
    DeliveryError,
    Identify,
    InvalidEventError,
    OpenPanel,
    RetryPolicy,
    SendTimeoutError,
    Track,
    Transport,
    TransportResponse,
)
from openpanel_async._accumulator import Accumulator, Item
from openpanel_async._events import UNSET, encode_event
from openpanel_async._limit import ConcurrencyLimit
from openpanel_async._sender import Sender
from openpanel_async.testing import LocalOpenPanel, Reply

from .conftest import CLIENT_ID, CLIENT_SECRET, assert_accounted, make_client

pytestmark = pytest.mark.anyio

TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_public_surface_is_pinned() -> None:
    assert openpanel_async.__all__ == sorted(openpanel_async.__all__)
    assert set(openpanel_async.__all__) == {
        "AssignGroup", "AuthenticationError", "ClientClosedError", "ConfigError", "Decrement",
        "DeliveryError", "DroppedByServerError", "Event", "Group", "Identify", "Increment",
        "InvalidEventError", "OpenPanel", "OpenPanelError", "RejectedError",
        "RetriesExhaustedError", "RetryPolicy", "SendTimeoutError", "ShutdownError", "Stats",
        "Track", "__version__", "EventContext", "Transport", "TransportResponse",
        "event_context", "set_identity", "SyncOpenPanel",
    }  # fmt: skip
    assert issubclass(InvalidEventError, ValueError)
    assert issubclass(ConfigError, ValueError)


async def test_every_event_type_exact_payload_and_headers(server: LocalOpenPanel) -> None:
    server.profiles.add("1")  # a profile stored earlier (increment needs one)
    async with make_client(server, client_id=CLIENT_ID.upper()) as op:
        assert op.track("my_event", {"foo": "bar"}, profile_id="123", groups=["org_acme"])
        assert op.identify(
            "123",
            first_name="Joe",
            last_name="Doe",
            email="joe@doe.com",
            avatar=None,
            properties={"tier": "premium"},
        )
        assert op.increment("1", "visits", 1)
        assert op.decrement("1", "visits", 2)
        assert op.group("org_acme", "company", "Acme Inc", {"plan": "enterprise", "seats": 25})
        assert op.assign_group(["org_acme"], profile_id="user_123")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert stats.delivered == 6
    assert len(server.requests) == 6
    by_type = {r.type: r for r in server.requests}
    track = by_type["track"].payload
    assert track is not None
    stamp = track["properties"].pop("__timestamp")
    assert TIMESTAMP_RE.fullmatch(stamp)
    assert track == {
        "name": "my_event",
        "properties": {"foo": "bar"},
        "profileId": "123",
        "groups": ["org_acme"],
    }
    assert by_type["identify"].payload == {
        "profileId": "123",
        "firstName": "Joe",
        "lastName": "Doe",
        "email": "joe@doe.com",
        "properties": {"tier": "premium"},
    }
    assert by_type["increment"].payload == {"profileId": "1", "property": "visits", "value": 1}
    assert by_type["decrement"].payload == {"profileId": "1", "property": "visits", "value": 2}
    assert by_type["group"].payload == {
        "id": "org_acme",
        "type": "company",
        "name": "Acme Inc",
        "properties": {"plan": "enterprise", "seats": 25},
    }
    assert by_type["assign_group"].payload == {"groupIds": ["org_acme"], "profileId": "user_123"}
    for request in server.requests:
        assert request.path == "/track"
        headers = request.headers
        assert headers["content-type"] == "application/json"
        assert headers["openpanel-client-id"] == CLIENT_ID  # lower-cased
        assert headers["openpanel-client-secret"] == CLIENT_SECRET
        assert headers["openpanel-sdk-name"] == "openpanel-async"
        assert headers["openpanel-sdk-version"] == openpanel_async.__version__
        assert headers["user-agent"] == f"openpanel-async/{openpanel_async.__version__}"
        assert "x-client-ip" not in headers
        assert "content-encoding" not in headers


@pytest.mark.parametrize("http_client", ["aiohttp", "builtin"])
async def test_each_header_is_sent_once_and_per_event_ones_replace_the_static_ones(
    server: LocalOpenPanel, http_client: str
) -> None:
    # aiohttp gets the static headers as its session's defaults, and the per-event
    # user agent and IP on top of them: none may be sent twice, nor leak to the next event.
    async with make_client(server, http_client=http_client) as op:
        assert op.track("plain")
        with openpanel_async.event_context(user_agent="agent/1", client_ip="203.0.113.9"):
            assert op.track("from_a_request")
        assert op.track("plain_again")
        assert await op.flush(timeout=5)
    by_name = {r.payload["name"]: r for r in server.requests if r.payload is not None}
    assert sorted(by_name) == ["from_a_request", "plain", "plain_again"]
    for name, request in by_name.items():
        names = [header for header, _ in request.raw_headers]
        assert len(names) == len(set(names)), (name, names)
        assert request.headers["openpanel-client-secret"] == CLIENT_SECRET
    ours = f"openpanel-async/{openpanel_async.__version__}"
    for name in ("plain", "plain_again"):
        assert by_name[name].headers["user-agent"] == ours
        assert "x-client-ip" not in by_name[name].headers
    assert by_name["from_a_request"].headers["user-agent"] == "agent/1"
    assert by_name["from_a_request"].headers["x-client-ip"] == "203.0.113.9"


async def test_optionals_left_unset_are_omitted_not_null(server: LocalOpenPanel) -> None:
    async with make_client(server) as op:
        op.track("bare")
        op.identify("42")
        op.assign_group(["g1", "g2"])
        op.group("g1", "team", "One")
        assert await op.flush(timeout=5)
    bodies = {r.type: r.body for r in server.requests}
    assert b"null" not in b"".join(bodies.values())
    payloads = {r.type: r.payload for r in server.requests}
    assert payloads["identify"] == {"profileId": "42"}
    assert payloads["assign_group"] == {"groupIds": ["g1", "g2"]}
    assert payloads["group"] == {"id": "g1", "type": "team", "name": "One"}
    track = payloads["track"]
    assert track is not None
    assert set(track) == {"name", "properties"}
    assert set(track["properties"]) == {"__timestamp"}


async def test_timestamp_is_call_time_explicit_or_kept(server: LocalOpenPanel) -> None:
    own = {"a": 1}
    given = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    async with make_client(server) as op:
        before = datetime.now(UTC)
        op.track("now", own)
        after = datetime.now(UTC)
        op.track("given", {"b": 2}, timestamp=given)
        op.track("kept", {"__timestamp": "2025-05-05T05:05:05.005Z"})
        op.send_nowait(Track(name="struct"))
        assert await op.flush(timeout=5)
    assert own == {"a": 1}  # the caller's dict is not modified
    props = {r.payload["name"]: r.properties for r in server.requests if r.payload}
    stamp = datetime.strptime(props["now"]["__timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    stamp = stamp.replace(tzinfo=UTC)
    assert before - timedelta(milliseconds=1) <= stamp <= after + timedelta(milliseconds=1)
    assert props["given"] == {"b": 2, "__timestamp": "2026-01-02T01:04:05.678Z"}
    assert props["kept"] == {"__timestamp": "2025-05-05T05:05:05.005Z"}
    assert TIMESTAMP_RE.fullmatch(props["struct"]["__timestamp"])


async def test_timestamp_of_a_queued_event_is_when_it_was_tracked(server: LocalOpenPanel) -> None:
    server.script(Reply(status=503), Reply(status=503))
    async with make_client(server) as op:
        op.track("late")
        tracked = time.time()
        assert await op.flush(timeout=5)
    assert len(server.requests) == 3
    # Retries carry the original stamp: the body is encoded once.
    assert len({r.body for r in server.requests}) == 1
    stamp = datetime.strptime(
        server.requests[-1].properties["__timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ"
    )
    assert abs(stamp.replace(tzinfo=UTC).timestamp() - tracked) < 0.05


async def test_client_ip_and_user_agent_per_event(server: LocalOpenPanel) -> None:
    ua = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 Safari/605.1.15"
    async with make_client(server) as op:
        op.track("with", client_ip="203.0.113.9", user_agent=ua)
        op.identify("7", client_ip="2001:db8::1")
        op.send_nowait(Track(name="plain"))
        op.increment("7", "n", user_agent=ua)
        assert await op.flush(timeout=5)
    seen = {
        (r.payload or {}).get("name", r.type): (
            r.headers.get("x-client-ip"),
            r.headers["user-agent"],
        )
        for r in server.requests
    }
    default_ua = f"openpanel-async/{openpanel_async.__version__}"
    assert seen == {
        "with": ("203.0.113.9", ua),
        "identify": ("2001:db8::1", default_ua),
        "plain": (None, default_ua),
        "increment": (None, ua),
    }


class _Props(dict[str, Any]):
    """A dict subclass, as some frameworks hand out."""


async def test_track_sends_the_same_bytes_on_its_fast_and_full_paths(
    server: LocalOpenPanel,
) -> None:
    # track() encodes a known-valid event straight from its parts; everything unusual goes
    # through the Track struct and its checks. Both must put exactly the bytes on the wire
    # that encode_event(Track(...)) gives for the same event.
    cases: list[tuple[str, dict[str, Any] | None, Any, dict[str, Any]]] = [
        ("page_view", {"path": "/p", "n": 3, "f": 1.5, "l": [1, "a"], "d": {"x": None}}, "u1", {}),
        ("page_view", None, None, {}),
        ("page_view", {}, 42, {}),  # an int profile id: full path
        ("café ☕", {"ünï": "cødé 😀"}, "ü", {}),
        ("page_view", _Props(a=1, b="two"), "u2", {}),  # a dict subclass: full path
        ("page_view", {"a": 1}, "u3", {"groups": ["g1", "g2"]}),
        ("page_view", {"a": 1}, None, {"client_ip": "203.0.113.9", "user_agent": "ua/1"}),
        ("page_view", {"a": 1}, "u4", {"timestamp": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}),
        ("page_view", {"a": 1, "__timestamp": "2025-05-05T05:05:05.005Z"}, "u5", {}),
    ]
    async with make_client(server) as op:
        for name, props, profile_id, extra in cases:
            assert op.track(name, props, profile_id=profile_id, **extra)
        assert await op.flush(timeout=5)
    assert len(server.requests) == len(cases)
    for (name, props, profile_id, extra), request in zip(cases, server.requests, strict=True):
        sent = dict(props or {})
        sent["__timestamp"] = request.properties["__timestamp"]
        expected = encode_event(
            Track(
                name=name,
                properties=sent,
                profile_id=UNSET if profile_id is None else profile_id,
                groups=extra.get("groups", UNSET),
            )
        )
        if "timestamp" in extra:
            assert sent["__timestamp"] == "2026-01-02T03:04:05.000Z"
        assert request.body == expected, name
        assert request.headers.get("x-client-ip") == extra.get("client_ip")
    assert server.requests[-1].properties["__timestamp"] == "2025-05-05T05:05:05.005Z"
    assert server.requests[4].properties == {
        "a": 1,
        "b": "two",
        "__timestamp": server.requests[4].properties["__timestamp"],
    }


async def test_send_of_a_ready_made_track_sends_what_its_struct_encodes_to(
    server: LocalOpenPanel,
) -> None:
    # send() and send_nowait() take a plain Track (no groups, no hook, no global
    # properties) the way of track()'s fast path, without a stamped copy of the struct;
    # the rest through the struct. Both must send encode_event() of the stamped event.
    cases: list[tuple[Track, dict[str, Any]]] = [
        (Track(name="page_view", properties={"path": "/p", "l": [1, "a"]}, profile_id="u1"), {}),
        (Track(name="page_view"), {}),
        (Track(name="page_view", properties={}, profile_id=42), {}),
        (Track(name="page_view", profile_id=1.5), {}),
        (Track(name="café ☕", properties={"ünï": "cødé 😀"}), {}),
        (Track(name="page_view", properties=_Props(a=1, b="two")), {}),
        (Track(name="page_view", properties={"a": 1}, groups=["g1", "g2"]), {}),
        (Track(name="page_view", properties={"a": 1}, groups=None), {}),
        (Track(name="page_view"), {"client_ip": "203.0.113.9", "user_agent": "ua/1"}),
        (Track(name="page_view", properties={"a": 1, "__timestamp": "2025-05-05T05:05:05.005Z"}), {}),
    ]  # fmt: skip
    own = [dict(event.properties) if event.properties is not UNSET else None for event, _ in cases]
    async with make_client(server) as op:
        for i, (event, extra) in enumerate(cases):
            if i % 2:
                await op.send(event, **extra)
            else:
                assert op.send_nowait(event, **extra)
        with openpanel_async.event_context(client_ip="198.51.100.7", user_agent="ctx/1"):
            await op.send(Track(name="in_context"))
        assert await op.flush(timeout=5)
    assert len(server.requests) == len(cases) + 1
    for (event, extra), request in zip(cases, server.requests[:-1], strict=True):
        stamp = request.properties["__timestamp"]
        assert TIMESTAMP_RE.fullmatch(stamp)
        props = {} if event.properties is UNSET else dict(event.properties)
        props.setdefault("__timestamp", stamp)
        assert request.body == encode_event(msgspec.structs.replace(event, properties=props))
        assert request.headers.get("x-client-ip") == extra.get("client_ip")
    assert server.requests[-2].properties["__timestamp"] == "2025-05-05T05:05:05.005Z"
    assert server.requests[7].payload["groups"] is None
    assert server.requests[-1].headers["x-client-ip"] == "198.51.100.7"
    assert server.requests[-1].headers["user-agent"] == "ctx/1"
    # The events' own properties are left as they were.
    assert [dict(e.properties) if e.properties is not UNSET else None for e, _ in cases] == own


async def test_send_of_a_bad_ready_made_track_is_refused_and_nothing_else_is_lost(
    server: LocalOpenPanel,
) -> None:
    async with make_client(server, max_event_bytes=300) as op:
        await op.send(Track(name="before"))
        with pytest.raises(InvalidEventError, match="more than max_event_bytes=300"):
            await op.send(Track(name="big", properties={"s": "x" * 400}))
        with pytest.raises(InvalidEventError, match=r"track.properties.x: cannot be encoded"):
            op.send_nowait(Track(name="odd", properties={"x": object()}))
        with pytest.raises(InvalidEventError, match="client_ip:"):
            await op.send(Track(name="header"), client_ip="1.2.3.4\nx")
        with pytest.raises(InvalidEventError, match="user_agent:"):
            op.send_nowait(Track(name="header"), user_agent="ua\r\nx: y")
        # Properties changed after the Track was built are checked again where it matters.
        props: dict[str, Any] = {"amount": 1}
        revenue = Track(name="revenue", properties=props)
        props["__revenue"] = -5
        with pytest.raises(InvalidEventError, match=r"track.properties.__revenue"):
            await op.send(revenue)
        props = {"a": 1}
        device = Track(name="x", properties=props)
        props["__deviceId"] = 5
        with pytest.raises(InvalidEventError, match=r"track.properties.__deviceId"):
            op.send_nowait(device)
        # The same when the properties carry their own timestamp (nothing to stamp).
        props = {"amount": 1, "__timestamp": "2025-05-05T05:05:05.005Z"}
        stamped = Track(name="revenue", properties=props)
        props["__revenue"] = -5
        with pytest.raises(InvalidEventError, match=r"track.properties.__revenue"):
            await op.send(stamped)
        await op.send(Track(name="after"))
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert [r.payload["name"] for r in server.requests if r.payload] == ["before", "after"]
    assert stats.accepted == stats.delivered == 2
    assert stats.dropped == 0


async def test_send_of_a_ready_made_event_takes_what_it_leaves_out_from_the_context(
    server: LocalOpenPanel,
) -> None:
    # As track() and assign_group() do: the profile and groups of the current request.
    async with make_client(server) as op:
        with openpanel_async.event_context(
            profile_id="u9", groups=["g1"], client_ip="198.51.100.7", user_agent="ctx/1"
        ):
            await op.send(Track(name="a"))
            assert op.send_nowait(Track(name="b", profile_id="own", groups=[]))
            assert op.send_nowait(openpanel_async.AssignGroup(group_ids=["g2"]))
            assert op.send_nowait(Identify(profile_id="id1"))
        await op.send(Track(name="outside"))
        assert await op.flush(timeout=5)
    sent = [(r.type, r.payload, r.headers.get("x-client-ip")) for r in server.requests]
    assert [(t, p.get("profileId"), p.get("groups"), ip) for t, p, ip in sent] == [  # type: ignore[union-attr]
        ("track", "u9", ["g1"], "198.51.100.7"),
        ("track", "own", [], "198.51.100.7"),  # what the event says wins
        ("assign_group", "u9", None, "198.51.100.7"),
        ("identify", "id1", None, "198.51.100.7"),
        ("track", None, None, None),
    ]


def test_a_dict_subclass_as_track_properties_gets_every_check() -> None:
    with pytest.raises(InvalidEventError, match=r"track.properties.__revenue"):
        Track(name="revenue", properties=_Props(__revenue=-5))
    with pytest.raises(InvalidEventError, match=r"track.properties.__deviceId"):
        Track(name="x", properties=_Props(__deviceId=5))


async def test_track_with_global_properties_sends_what_the_struct_path_sends(
    server: LocalOpenPanel,
) -> None:
    async with make_client(server, global_properties={"app": "web", "a": 0}) as op:
        op.track("page_view", {"a": 1}, profile_id="u1")
        op.track("page_view")
        op.send_nowait(Track(name="page_view", properties={"a": 2}, profile_id="u1"))
        assert await op.flush(timeout=5)
    props = [r.properties for r in server.requests]
    stamps = [p.pop("__timestamp") for p in props]
    assert all(TIMESTAMP_RE.fullmatch(stamp) for stamp in stamps)
    # The event's own properties win over the global ones, on both paths.
    assert props == [{"app": "web", "a": 1}, {"app": "web", "a": 0}, {"app": "web", "a": 2}]
    # Same key order on the wire as well: globals first, then the event's, then the stamp.
    first = server.requests[0].body
    assert first.index(b'"app"') < first.index(b'"a"') < first.index(b'"__timestamp"')


async def test_fast_path_checks_what_it_skips(server: LocalOpenPanel) -> None:
    # A name seen before takes the fast path; these must still be refused by the full checks.
    async with make_client(server) as op:
        assert op.track("seen", {"a": 1}, profile_id="u")
        with pytest.raises(InvalidEventError, match=r"track.properties.__deviceId"):
            op.track("seen", {"__deviceId": 5})
        with pytest.raises(InvalidEventError, match=r"track.profile_id: must not be empty"):
            op.track("seen", profile_id="")
        with pytest.raises(InvalidEventError, match=r"track.profile_id"):
            op.track("seen", profile_id=True)  # type: ignore[arg-type]
        with pytest.raises(InvalidEventError, match=r"track.properties.x: cannot be encoded"):
            op.track("seen", {"x": object()})
        with pytest.raises(InvalidEventError, match="client_ip:"):
            op.track("seen", client_ip="1.2.3.4\nx")
        with pytest.raises(InvalidEventError, match=r"track.properties.__revenue"):
            op.track("revenue", {"__revenue": -1})
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert stats.accepted == stats.delivered == 1
    assert [r.payload["name"] for r in server.requests if r.payload] == ["seen"]


async def test_events_from_a_thread_wake_an_idle_sender_every_time(
    server: LocalOpenPanel,
) -> None:
    # Wake-ups are coalesced (one per loop iteration); each event a thread tracks into an
    # idle client must still be sent without anything else nudging the loop.
    async with make_client(server) as op:
        await op.flush(timeout=5)
        for i in range(5):
            await asyncio.to_thread(op.track, "from_thread", {"i": i})
            deadline = time.monotonic() + 5
            while len(server.requests) <= i:
                assert time.monotonic() < deadline, f"event {i} was never sent"
                await asyncio.sleep(0.001)
    assert [r.properties["i"] for r in server.requests] == [0, 1, 2, 3, 4]


BAD_CALLS: list[tuple[str, Callable[[OpenPanel], object], str]] = [
    ("empty name", lambda op: op.track(""), "track.name: must not be empty"),
    ("long name", lambda op: op.track("x" * 81), "track.name: must be at most 80"),
    ("newline", lambda op: op.track("a\nb"), "track.name: must not contain a newline"),
    ("reserved", lambda op: op.track("session_start"), "track.name: 'session_start' is reserved"),
    ("blocked", lambda op: op.track("x union select 1"), "track.name: contains 'union select'"),
    ("scan path", lambda op: op.track("/wp-login.php"), "track.name:"),
    ("name type", lambda op: op.track(3), "track.name: must be a str"),  # type: ignore[arg-type]
    ("props type", lambda op: op.track("a", [1]), "track.properties: must be a dict"),  # type: ignore[arg-type]
    ("unencodable", lambda op: op.track("a", {"x": object()}), "track.properties.x: cannot be encoded"),
    ("odd key", lambda op: op.track("a", {"k\ud800": 1}), "track.properties['k\\ud800']: cannot be encoded"),
    ("surrogate profile", lambda op: op.track("a", profile_id="u\ud800"), "track.profile_id: cannot be encoded"),
    ("surrogate group", lambda op: op.track("a", groups=["g\ud800"]), "track.groups: cannot be encoded"),
    ("surrogate name", lambda op: op.identify("u", first_name="\ud800"), "identify.first_name: cannot be encoded"),
    ("surrogate property", lambda op: op.increment("u", "p\ud800"), "increment.property: cannot be encoded"),
    ("empty profile", lambda op: op.track("a", profile_id=""), "track.profile_id: must not be empty"),
    ("empty group", lambda op: op.track("a", groups=[""]), "track.groups[0]: must not be empty"),
    ("naive ts", lambda op: op.track("a", timestamp=datetime(2026, 1, 1)), "timestamp: must be timezone-aware"),
    ("identify id", lambda op: op.identify(""), "identify.profile_id: must not be empty"),
    ("email", lambda op: op.identify("1", email="joe@"), "identify.email:"),
    ("avatar", lambda op: op.identify("1", avatar="not a url"), "identify.avatar:"),
    ("zero inc", lambda op: op.increment("1", "visits", 0), "increment.value: must be greater than 0"),
    ("neg dec", lambda op: op.decrement("1", "visits", -2), "decrement.value: must be greater than 0"),
    ("nan inc", lambda op: op.increment("1", "visits", float("nan")), "increment.value: must be a finite"),
    ("empty prop", lambda op: op.increment("1", ""), "increment.property: must not be empty"),
    ("group id", lambda op: op.group("", "company", "Acme"), "group.id: must not be empty"),
    ("group type", lambda op: op.group("g", "", "Acme"), "group.type: must not be empty"),
    ("group name", lambda op: op.group("g", "company", ""), "group.name: must not be empty"),
    ("no groups", lambda op: op.assign_group([]), "assign_group.group_ids: must hold at least one"),
    ("str groups", lambda op: op.assign_group("org"), "assign_group.group_ids: must be a list"),
    ("bad ip", lambda op: op.track("a", client_ip="1.2.3.4\r\nx: y"), "client_ip:"),
    ("bad ua", lambda op: op.track("a", user_agent=""), "user_agent:"),
    ("revenue", lambda op: op.track("revenue", {"__revenue": -5}), "track.properties.__revenue"),
    ("not an event", lambda op: op.send_nowait({"name": "x"}), "event: must be a Track"),  # type: ignore[arg-type]
]  # fmt: skip


@pytest.mark.parametrize(("case", "call", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
async def test_bad_input_raises_at_call_site_and_keeps_accepted_events(
    server: LocalOpenPanel, case: str, call: Callable[[OpenPanel], object], message: str
) -> None:
    async with make_client(server) as op:
        assert op.track("before")
        with pytest.raises(InvalidEventError) as info:
            call(op)
        assert str(info.value).startswith(message), str(info.value)
        assert op.track("after")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert stats.accepted == 2
    assert stats.delivered == 2
    assert [r.payload["name"] for r in server.requests if r.payload] == ["before", "after"]


@pytest.mark.parametrize("field", ["client_ip", "user_agent"])
async def test_a_header_value_with_a_lone_surrogate_is_refused(
    server: LocalOpenPanel, field: str
) -> None:
    # No HTTP client can send it: with http_client="builtin" every attempt failed.
    async with make_client(server) as op:
        with pytest.raises(InvalidEventError, match=f"{field}: must be valid Unicode"):
            op.track("x", **{field: "ua\udc80"})
        assert op.track("x", **{field: "ünïcode ok"})
        assert await op.flush(timeout=5)
    assert len(server.requests) == 1


async def test_before_send_never_edits_the_callers_own_properties(
    server: LocalOpenPanel,
) -> None:
    def scrub(event: Any) -> Any:
        if event.properties is not UNSET:
            event.properties.pop("email", None)
        return event

    own_track = {"email": "a@b.c", "__timestamp": "2025-05-05T05:05:05.005Z"}
    own_identify = {"email": "a@b.c"}
    own_group = {"email": "a@b.c"}
    sent_track = {"email": "a@b.c", "__timestamp": "2025-05-05T05:05:05.005Z"}
    sent_identify = {"email": "a@b.c"}
    async with make_client(server, before_send=scrub) as op:
        assert op.track("t", own_track)
        assert op.identify("p1", properties=own_identify)
        assert op.group("g1", "company", "Acme", own_group)
        await op.send(Track(name="t", properties=sent_track))
        assert op.send_nowait(Identify(profile_id="p2", properties=sent_identify))
        assert await op.flush(timeout=5)
    assert len(server.requests) == 5
    assert all("email" not in r.properties for r in server.requests)
    assert own_track == sent_track == {"email": "a@b.c", "__timestamp": "2025-05-05T05:05:05.005Z"}
    assert own_identify == own_group == sent_identify == {"email": "a@b.c"}


async def test_identify_merges_global_properties_under_a_dict_subclass(
    server: LocalOpenPanel,
) -> None:
    async with make_client(server, global_properties={"app_version": "1.2"}) as op:
        assert op.identify("u1", properties={"plan": "pro"})
        assert op.identify("u2", properties=_Props(plan="free"))
        assert await op.flush(timeout=5)
    assert [r.properties for r in server.requests] == [
        {"app_version": "1.2", "plan": "pro"},
        {"app_version": "1.2", "plan": "free"},
    ]


async def test_oversized_event_is_refused_at_call_site(server: LocalOpenPanel) -> None:
    async with make_client(server, max_event_bytes=200) as op:
        with pytest.raises(InvalidEventError, match="more than max_event_bytes=200"):
            op.track("big", {"blob": "x" * 300})
        assert op.track("small")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_id": "not-a-uuid"}, "client_id: must be a UUID"),
        ({"client_id": 5}, "client_id: must be a UUID"),
        ({"client_secret": ""}, "client_secret: must be a non-empty str"),
        ({"api_url": "ftp://x"}, "api_url:"),
        ({"api_url": "https://"}, "api_url:"),
        ({"api_url": "https://h/track?x=1"}, "api_url: must not carry a query"),
        # A password holding "/", "?" or "#" is masked whole ("s3cr3t-value" below).
        ({"api_url": "https://bob:s3cr3t-value/#?@h:99999"}, "api_url: 'https://***@h:99999'"),
        ({"api_url": "https://bob:s3cr3t-value\nx@h:99999"}, "api_url: 'https://***@h:99999'"),
        ({"api_url": "https:/bob:s3cr3t-value@h"}, "api_url: '***@h'"),  # no "//"
        ({"api_url": "bob:s3cr3t-value@h"}, "api_url: '***@h'"),
        ({"max_queue_size": 0}, "max_queue_size: must be an int >= 1"),
        ({"max_concurrency": True}, "max_concurrency: must be an int >= 1"),
        ({"request_timeout": 0}, "request_timeout: must be > 0"),
        ({"shutdown_timeout": -1}, "shutdown_timeout: must be >= 0"),
        ({"request_timeout": float("inf")}, "request_timeout: must be a finite"),
        ({"retry": {"max_attempts": 3}}, "retry: must be a RetryPolicy"),
        ({"on_error": 3}, "on_error: must be callable"),
        ({"http_client": "curl"}, "http_client: must be one of aiohttp, builtin"),
    ],
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"client_id": CLIENT_ID, "client_secret": "s3cr3t-value"}
    options.update(kwargs)
    with pytest.raises(ConfigError) as info:
        OpenPanel(**options)
    assert str(info.value).startswith(message)
    assert "s3cr3t-value" not in str(info.value)


def test_async_on_error_is_refused() -> None:
    async def handler(error: DeliveryError) -> None:
        pass

    with pytest.raises(ConfigError, match="on_error: must be a plain function"):
        OpenPanel(client_id=CLIENT_ID, on_error=handler)


async def test_secret_never_in_repr_or_logs(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[DeliveryError] = []
    op = make_client(server, client_secret="wrong-secret-xyz", on_error=errors.append)
    assert "wrong-secret-xyz" not in repr(op)
    async with op:
        op.track("a")
        await op.flush(timeout=5)
    assert errors
    assert "wrong-secret-xyz" not in repr(op)
    for error in errors:
        assert "wrong-secret-xyz" not in str(error) + repr(error)
    assert "wrong-secret-xyz" not in caplog.text
    assert CLIENT_SECRET not in caplog.text


async def test_queue_full_returns_false_and_counts(server: LocalOpenPanel) -> None:
    async with make_client(server, max_queue_size=3) as op:
        # No await between the calls: the sender cannot drain anything meanwhile.
        results = [op.track("e", {"i": i}) for i in range(5)]
        assert results == [True, True, True, False, False]
        stats = op.stats()
        assert (stats.accepted, stats.dropped, stats.pending) == (3, 2, 3)
        assert dict(stats.dropped_by_reason) == {"queue_full": 2}
        assert await op.flush(timeout=5)
        assert op.track("room again")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert stats.delivered == 4
    assert [r.properties.get("i") for r in server.requests] == [0, 1, 2, None]
    assert_accounted(stats, closed=True)


async def test_calls_after_close_are_dropped(server: LocalOpenPanel) -> None:
    op = make_client(server)
    async with op:
        op.track("a")
    assert op.track("late") is False
    assert op.identify("1") is False
    stats = op.stats()
    assert stats.state == "closed"
    assert dict(stats.dropped_by_reason) == {"closed": 1 + 1}
    with pytest.raises(ClientClosedError):
        await op.send(Track(name="x"))
    await op.aclose()  # idempotent
    assert len(server.requests) == 1


async def test_events_tracked_before_start_and_from_threads_before_start(
    server: LocalOpenPanel,
) -> None:
    op = make_client(server)

    def produce(tag: str) -> None:
        for i in range(200):
            assert op.track("threaded", {"t": tag, "i": i})

    threads = [threading.Thread(target=produce, args=(f"t{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert op.stats().state == "new"
    assert op.stats().pending == 600
    async with op:
        assert await op.flush(timeout=10)
    assert op.stats().delivered == 600
    seen = {(r.properties["t"], r.properties["i"]) for r in server.requests}
    assert len(seen) == 600


async def test_track_from_many_threads_while_running(server: LocalOpenPanel) -> None:
    async with make_client(server, max_queue_size=100_000) as op:
        errors: list[BaseException] = []

        def produce(tag: int) -> None:
            try:
                for i in range(500):
                    assert op.track("threaded", {"t": tag, "i": i}, profile_id=f"p{tag}")
                    if i % 100 == 0:
                        time.sleep(0.001)  # interleave with the loop
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            await asyncio.sleep(0.01)
        assert not errors
        assert await op.flush(timeout=20)
        stats = op.stats()
    assert stats.accepted == stats.delivered == 2000
    seen = {(r.properties["t"], r.properties["i"]) for r in server.requests}
    assert len(seen) == 2000 == len(server.requests)
    assert_accounted(op.stats(), closed=True)


async def test_lazy_start_inside_a_running_loop(server: LocalOpenPanel) -> None:
    op = make_client(server)
    assert op.stats().state == "new"
    op.track("lazy")
    assert op.stats().state == "running"
    assert await op.flush(timeout=5)
    await op.aclose()
    assert len(server.requests) == 1


async def test_send_waits_for_room_and_never_drops(server: LocalOpenPanel) -> None:
    server.response_delay = 0.002
    async with make_client(server, max_queue_size=10, max_concurrency=4) as op:
        for i in range(300):
            await op.send(Track(name="bp", properties={"i": i}))
        assert await op.flush(timeout=10)
        stats = op.stats()
    assert stats.dropped == 0
    assert stats.delivered == 300
    assert sorted(r.properties["i"] for r in server.requests) == list(range(300))


async def test_send_times_out_and_fails_when_closed(server: LocalOpenPanel) -> None:
    server.script(*[Reply(hang=True)] * 2)
    op = make_client(server, max_queue_size=1, shutdown_timeout=0.1)
    async with op:
        await op.send(Identify(profile_id="1"), client_ip="198.51.100.4")
        started = time.monotonic()
        with pytest.raises(SendTimeoutError, match="max_queue_size=1"):
            await op.send(Identify(profile_id="2"), timeout=0.05)
        assert 0.04 <= time.monotonic() - started < 1.0
        # A sender waiting for room is released, with an error, when the client closes.
        waiting = asyncio.ensure_future(op.send(Identify(profile_id="3")))
        await asyncio.sleep(0.01)
        assert not waiting.done()
    with pytest.raises(ClientClosedError):
        await waiting
    stats = op.stats()
    assert stats.accepted == 1
    assert stats.failed == 1
    assert_accounted(stats, closed=True)


def test_room_waiters_are_woken_one_per_settled_event_and_stay_bounded() -> None:
    """One waiter per freed slot, oldest first; abandoned waits do not pile up."""
    acc = Accumulator(4)
    items = [Item(b"{}", "track", None, None, None) for _ in range(4)]
    assert all(acc.put(item) for item in items)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first, second, third = (acc.room_waiter(loop) for _ in range(3))
        second.cancel()  # a send() that timed out: skipped, not woken
        acc.settle(items[0], True)
        assert first.done()
        assert not third.done()
        acc.settle(items[1], True)
        assert third.done()
        # Waits that timed out against a stalled queue: the list keeps within twice the
        # live waiters (or 64), however many there were.
        live = acc.room_waiter(loop)
        for _ in range(1000):
            acc.room_waiter(loop).cancel()
        assert len(acc._room_waiters) <= 64
        assert live in acc._room_waiters
        acc.settle(items[2], True)
        assert live.done()
        # A waiter woken for a slot that someone else took waits again at the front.
        assert acc.put(Item(b"{}", "track", None, None, None))
        later = acc.room_waiter(loop)
        again = acc.room_waiter(loop, first=True)
        acc.settle(items[3], True)
        assert again.done()
        assert not later.done()

    asyncio.run(scenario())


async def test_send_waiting_for_room_gets_the_first_freed_slot(server: LocalOpenPanel) -> None:
    # One of 32 requests is answered after 20 ms, the rest hang: the one slot it frees goes
    # to the waiting send() at once, not when the rest of the queue drains.
    server.script(Reply(delay=0.02), *[Reply(hang=True)] * 40)
    op = make_client(
        server,
        max_queue_size=32,
        max_concurrency=32,
        adaptive_concurrency=False,
        shutdown_timeout=0.1,
    )
    async with op:
        for i in range(32):
            await op.send(Track(name="fill", properties={"i": i}))
        started = time.monotonic()
        await op.send(Track(name="late"), timeout=5.0)
        assert time.monotonic() - started < 1.0
        assert op.stats().accepted == 33
        # Timed-out waits leave (almost) nothing behind, however many there are.
        for _ in range(200):
            with pytest.raises(SendTimeoutError):
                await op.send(Track(name="refused"), timeout=0.0001)
        assert len(op._acc._room_waiters) <= 64
    assert_accounted(op.stats(), closed=True)


class GatedTransport:
    """Holds every request until ``open()``; then answers 200, running ``on_answer`` first."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] | None = None
        self.on_answer: Callable[[], None] | None = None
        self.names: list[str] = []

    def open(self) -> None:
        assert self.gate is not None
        self.gate.set_result(None)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        if self.gate is None:
            self.gate = asyncio.get_running_loop().create_future()
        await self.gate
        self.names.append(msgspec.json.decode(body)["payload"]["name"])
        if self.on_answer is not None:
            self.on_answer()
            self.on_answer = None
        return TransportResponse(200, {}, b"{}")

    async def aclose(self) -> None:
        pass


async def one_slot_held(transport: GatedTransport) -> OpenPanel:
    """A started client whose one queue slot is taken by a request held at the gate."""
    op = OpenPanel(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, transport=transport, max_queue_size=1
    )
    await op.start()
    await op.send(Track(name="in_flight"))
    while transport.gate is None:
        await asyncio.sleep(0.001)
    return op


async def test_a_woken_send_cancelled_before_it_runs_passes_its_slot_on() -> None:
    transport = GatedTransport()
    async with await one_slot_held(transport) as op:
        first = asyncio.ensure_future(op.send(Track(name="first")))
        second = asyncio.ensure_future(op.send(Track(name="second")))
        await asyncio.sleep(0.01)
        # The answer frees the one slot and wakes `first`, which is cancelled (its request
        # handler went away, say) before it runs: `second` must get the slot.
        transport.on_answer = lambda: asyncio.get_running_loop().call_soon(first.cancel)
        transport.open()
        await asyncio.wait_for(second, timeout=2.0)
        assert first.cancelled()
        assert await op.flush(timeout=2.0)
        assert (op.stats().accepted, op.stats().delivered) == (2, 2)


async def test_a_woken_send_that_finds_its_slot_taken_stays_first_in_line() -> None:
    transport = GatedTransport()
    async with await one_slot_held(transport) as op:
        older = asyncio.ensure_future(op.send(Track(name="older")))
        await asyncio.sleep(0.01)
        newer = asyncio.ensure_future(op.send(Track(name="newer")))
        await asyncio.sleep(0.01)
        # The answer frees the slot and wakes `older`, but a track() takes the slot first.
        transport.on_answer = lambda: asyncio.get_running_loop().call_soon(op.track, "sneaked_in")
        transport.open()
        await asyncio.wait_for(asyncio.gather(older, newer), timeout=2.0)
        assert await op.flush(timeout=2.0)
    assert transport.names == ["in_flight", "sneaked_in", "older", "newer"]


async def test_refused_credentials_release_every_send_waiting_for_room(
    server: LocalOpenPanel,
) -> None:
    # 8 requests in flight; the first is answered 401, the others only after 1.5 s. Both
    # send() calls waiting for room fail at once, not when those answers come.
    server.script(Reply(status=401, delay=0.02), *[Reply(delay=1.5)] * 7)
    op = make_client(server, max_queue_size=8, max_concurrency=8, adaptive_concurrency=False)
    async with op:
        for i in range(8):
            await op.send(Track(name="fill", properties={"i": i}))
        started = time.monotonic()
        waiting = [asyncio.ensure_future(op.send(Track(name="late"))) for _ in range(2)]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert time.monotonic() - started < 1.0
        assert [type(r) for r in results] == [ClientClosedError, ClientClosedError]


async def test_flush_with_nothing_pending_and_before_start(server: LocalOpenPanel) -> None:
    op = make_client(server)
    assert await op.flush(timeout=1)
    await op.aclose()
    assert await op.flush(timeout=1)


async def test_api_url_with_path_prefix(server: LocalOpenPanel) -> None:
    async with LocalOpenPanel(path_prefix="/api") as prefixed:
        async with make_client(prefixed, api_url=prefixed.url + "/") as op:
            op.track("prefixed")
            assert await op.flush(timeout=5)
        assert [r.path for r in prefixed.requests] == ["/api/track"]
        assert prefixed.requests[0].status == 200


async def test_stats_snapshot_is_frozen(server: LocalOpenPanel) -> None:
    async with make_client(server) as op:
        stats = op.stats()
        with pytest.raises(AttributeError):
            stats.accepted = 5  # type: ignore[misc]
        with pytest.raises(TypeError):
            stats.dropped_by_reason["x"] = 1  # type: ignore[index]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``: never flush(), which wakes the sender.

    The deadline is long so that a stall of this shared machine cannot fail a test that
    passes within a few loop iterations; a stranded event waits far longer (each test
    sets an idle timeout beyond it, or has no worker left to time out).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def fixed_client(
    transport: Transport, *, max_concurrency: int = 16, idle_timeout: float = 60.0, **options: Any
) -> OpenPanel:
    """A client over ``transport`` whose concurrency limit does not adapt.

    The idle timeout is long by default: an event stranded with an idle worker then waits
    far beyond any test's deadline instead of being picked up when that worker times out.
    """
    return OpenPanel(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        transport=transport,
        max_concurrency=max_concurrency,
        adaptive_concurrency=False,
        idle_timeout=idle_timeout,
        **options,
    )


def started_sender(op: OpenPanel) -> Sender:
    sender = op._sender
    assert sender is not None
    return sender


async def test_no_wake_up_is_scheduled_while_every_worker_is_busy() -> None:
    # Under load the hot path schedules nothing: a busy worker takes the next event by
    # itself. Workers that go idle re-arm the wake-up, and the next event wakes one.
    transport = GatedTransport()
    async with fixed_client(transport, max_concurrency=2) as op:
        op.track("busy_1")
        op.track("busy_2")
        sender = started_sender(op)
        assert await until(lambda: len(sender._current) == 2)
        assert op._acc.notify_wanted is False
        for i in range(50):
            op.track(f"queued_{i}")
            assert op._acc.notify_wanted is False
        transport.open()
        assert await until(lambda: len(transport.names) == 52 and len(sender._idle) == 2)
        assert op._acc.notify_wanted is True
        op.track("after")
        assert await until(lambda: len(transport.names) == 53)
        assert transport.names[-1] == "after"


async def test_an_event_put_as_the_last_worker_goes_idle_is_not_stranded() -> None:
    # Another thread's put can land after a worker found the queue empty but before it
    # re-armed the wake-up, so that put schedules none: the worker must see the event
    # before it sleeps. The put is made on the loop thread inside _take(), right there;
    # which thread makes it does not matter, only that it finds the wake-up unarmed.
    transport = GatedTransport()
    async with fixed_client(transport, max_concurrency=1) as op:
        op.track("first")
        sender = started_sender(op)
        assert await until(lambda: bool(sender._current))
        take = sender._take
        raced: list[bool] = []

        def take_then_race() -> Item | None:
            item = take()
            if item is None and not raced:
                # The worker is busy-at-the-limit no more, but has not said so yet.
                assert op._acc.notify_wanted is False
                raced.append(op.track("raced"))
            return item

        sender._take = take_then_race  # type: ignore[method-assign]
        transport.open()
        assert await until(lambda: len(transport.names) == 2)
        assert raced == [True]
        assert transport.names == ["first", "raced"]


class RacingDeque(deque[Item]):
    """A queue that runs ``race`` once, right after ``Sender._kick`` has counted it."""

    race: Callable[[], None] | None = None

    def __len__(self) -> int:
        length = super().__len__()
        race, self.race = self.race, None
        if race is not None:
            # Counted anywhere else, the race would not be in the window under test.
            assert sys._getframe(1).f_code.co_name == "_kick"
            race()
        return length


async def test_an_event_put_while_a_kick_finds_nothing_to_do_is_not_stranded() -> None:
    # A kick (here the one flush() schedules, with nothing pending and no worker left)
    # counts the backlog. Another thread's put right after must schedule a kick of its
    # own: this one has counted no backlog and starts no worker.
    transport = GatedTransport()
    transport.gate = asyncio.get_running_loop().create_future()
    transport.open()  # answers at once
    async with fixed_client(transport, idle_timeout=0.05) as op:
        op.track("first")
        sender = started_sender(op)
        assert await until(lambda: transport.names == ["first"] and not sender._workers)
        queue = op._acc.ready = RacingDeque()
        raced: list[bool] = []

        def put_from_another_thread() -> None:
            thread = threading.Thread(target=lambda: raced.append(op.track("raced")))
            thread.start()
            thread.join()

        queue.race = put_from_another_thread
        assert await op.flush(timeout=5.0)  # nothing pending: it only wakes the sender
        assert await until(lambda: len(transport.names) == 2)
        assert raced == [True]
        assert transport.names == ["first", "raced"]


async def test_a_retry_left_behind_by_a_worker_over_the_limit_wakes_an_idle_one() -> None:
    # "a" is answered 429 "retry now" while "b"'s worker sits idle. The 429 halves the
    # limit to 1, so a's worker leaves the pool with a's retry due at once: it must wake
    # the idle worker (whose own idle timeout is far away) to send it.
    held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    names: list[str] = []

    class RetryNowTransport:
        async def post(
            self, url: str, body: bytes, headers: Mapping[str, str]
        ) -> TransportResponse:
            name = msgspec.json.decode(body)["payload"]["name"]
            names.append(name)
            if names == ["a"] or names == ["b", "a"]:
                await held
                return TransportResponse(429, {"retry-after": "0"}, b"{}")
            return TransportResponse(200, {}, b"{}")

        async def aclose(self) -> None:
            pass

    # No backoff at all: the least a 429's retry waits is the event's backoff.
    no_wait = RetryPolicy(wait_initial=0.0, wait_max=0.0)
    async with fixed_client(RetryNowTransport(), max_concurrency=2, retry=no_wait) as op:
        op.track("a")
        op.track("b")
        sender = started_sender(op)
        assert await until(lambda: op.stats().delivered == 1 and len(sender._idle) == 1)
        held.set_result(None)
        assert await until(lambda: op.stats().delivered == 2)
        assert sorted(names) == ["a", "a", "b"]
        assert op.stats().rate_limited == 1


async def test_a_cancellation_escaping_the_transport_is_a_failed_request() -> None:
    # A transport (or a library inside it) that lets a CancelledError of its own escape,
    # while the worker itself is not being cancelled: taken for the worker's cancellation,
    # it stranded the event, and the ordering slot of its profile, until close().
    calls: list[str] = []

    class CancelsOnce:
        async def post(
            self, url: str, body: bytes, headers: Mapping[str, str]
        ) -> TransportResponse:
            calls.append(msgspec.json.decode(body)["type"])
            if len(calls) == 1:
                raise asyncio.CancelledError
            return TransportResponse(200, {}, b"{}")

        async def aclose(self) -> None:
            pass

    fast = RetryPolicy(wait_initial=0.001, wait_max=0.002)
    async with fixed_client(CancelsOnce(), retry=fast) as op:
        op.identify("p1", first_name="A")
        op.increment("p1", "visits")
        assert await op.flush(timeout=2)
        stats = op.stats()
    assert (stats.delivered, stats.failed, stats.retries) == (2, 0, 1)
    assert calls == ["identify", "identify", "increment"]  # still in order


async def test_a_timeout_that_raises_the_limit_starts_more_requests_at_once() -> None:
    # ConcurrencyLimit.timed_out() says when it raised the limit (its own test shows
    # when); the sender must then wake up, as it does after answered() says so.
    class GrowsOnTimeout(ConcurrencyLimit):
        __slots__ = ()

        def timed_out(self, waited: float, in_flight: int, now: float) -> bool:
            super().timed_out(waited, in_flight, now)
            return True

    class TimesOutOnce:
        calls = 0

        async def post(
            self, url: str, body: bytes, headers: Mapping[str, str]
        ) -> TransportResponse:
            self.calls += 1
            if self.calls == 1:
                raise TimeoutError
            return TransportResponse(200, {}, b"{}")

        async def aclose(self) -> None:
            pass

    async with fixed_client(
        TimesOutOnce(), retry=RetryPolicy(wait_initial=0.001, wait_max=0.001)
    ) as op:
        sender = started_sender(op)
        sender._limit.__class__ = GrowsOnTimeout
        woken: list[str] = []
        notify = sender.notify
        sender.notify = lambda: (woken.append("notify"), notify())[1]  # type: ignore[method-assign]
        op.track("times_out_once")
        assert await until(lambda: op.stats().delivered == 1)
        assert woken == ["notify"]
