"""The wire schema: validation rules, exact request bodies, decoding and timestamps.

Every table below is written from ``openpanel-wire-contract.md`` ("Validation details",
"Payload per type"), not from the library's own constants, so that a drift between the two
shows up as a failure.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any

import pytest

from openpanel_async import (
    AssignGroup,
    Decrement,
    Event,
    Group,
    Identify,
    Increment,
    InvalidEventError,
    Track,
    _events,
)
from openpanel_async._events import (
    UNSET,
    decode_envelope,
    decode_event,
    encode_event,
    format_timestamp,
    now_timestamp,
    stamp_track,
)

Factory = Callable[..., Event]
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
EMOJI = "\U0001f600"  # outside the BMP: two UTF-16 code units


def refusal(factory: Factory, kwargs: dict[str, Any]) -> str:
    """Build the event, expect InvalidEventError, return its message."""
    with pytest.raises(InvalidEventError) as info:
        factory(**kwargs)
    return str(info.value)


def assert_refused(factory: Factory, kwargs: dict[str, Any], prefix: str) -> str:
    message = refusal(factory, kwargs)
    assert message.startswith(prefix), message
    return message


# --- track.name ------------------------------------------------------------------------

NAMES_OK = [
    "a",
    "a" * 80,
    EMOJI * 40,  # 80 UTF-16 units
    "a" * 78 + EMOJI,  # 80 units
    "\u00e9" * 80,  # BMP: one unit each
    "Session_Start",
    "SESSION_END",
    "session_start_x",
    " session_end",
    "page_view",
    "signed up",
    "/",
    "/pricing",
    "/blog/post-1",
    "/api/users.json",  # the extension rule is for one path segment
    "/.1",  # "/." must be followed by a letter
    "/wp",
    "x/wp-admin",  # the path rules only apply to names starting with "/"
    "checkout/completed",
    "user's choice",
    "50% off",
    "a.b",
]

NAMES_REFUSED = [
    # (name, a word of the rule the message must mention)
    ("", "empty"),
    ("a" * 81, "UTF-16"),
    (EMOJI * 41, "UTF-16"),
    ("a" * 79 + EMOJI, "UTF-16"),
    ("\u00e9" * 81, "UTF-16"),
    ("a\nb", "newline"),
    ("a\rb", "newline"),
    ("\n", "newline"),
    ("page_view\r\n", "newline"),
    ("session_start", "reserved"),
    ("session_end", "reserved"),
]


@pytest.mark.parametrize("name", NAMES_OK)
def test_track_name_accepted(name: str) -> None:
    assert Track(name=name).name == name


@pytest.mark.parametrize(("name", "rule"), NAMES_REFUSED)
def test_track_name_refused(name: str, rule: str) -> None:
    message = assert_refused(Track, {"name": name}, "track.name: ")
    assert rule in message


def test_track_name_length_is_reported_in_utf16_units() -> None:
    message = refusal(Track, {"name": EMOJI * 41})
    assert message == "track.name: must be at most 80 UTF-16 code units long, got 82"


@pytest.mark.parametrize("name", [None, 123, b"page_view", ["a"]])
def test_track_name_must_be_a_str(name: object) -> None:
    message = assert_refused(Track, {"name": name}, "track.name: ")
    assert "must be a str" in message


# The contract's list, verbatim.
BLOCKED_FRAGMENTS = [
    "../", "..\\", "%2e%2e", "%u002e%u002e", "/etc/passwd", "/etc/shadow", "win.ini",
    "system.ini", "${", "%{", "union select", "pg_sleep", "waitfor delay",
    "xp_dirtree", "load_file(", "extractvalue(", "dbms_pipe.receive_message",
    "exec master.dbo", "declare @", "' and '", "' or '", "') or ", "')and ", "nslookup ",
    "/bin/sleep", "/bin/bash", "cmd.exe", "wget+http", "wget http", "chmod+777", "chmod 777",
    "processbuilder", "runtime.getruntime", "java.lang.processbuilder", "oastify.com",
    "burpcollaborator", "interact.sh", "oast.me", "<!doctype", "<!entity", "<xi:include",
    "xsi:schemalocation", "bcc:", "eval-stdin.php", "phpinfo.php", "wp-config.php",
    ".git/config", ".env.backup", ".env.bak", "/vendor/phpunit/", "/setup.cgi?", "/cgi-bin/",
    "mozi.m", "#<article:0x", "#<video:0x", "#<brand:0x",
]  # fmt: skip


def _blocked_cases() -> list[Any]:
    cases: list[Any] = []
    for fragment in BLOCKED_FRAGMENTS:
        cases.append(pytest.param(fragment, id=f"bare:{fragment}"))
        cases.append(pytest.param(f"event {fragment} tail", id=f"embedded:{fragment}"))
        if fragment.upper() != fragment:
            upper = f"Event {fragment.upper()} Tail"
            cases.append(pytest.param(upper, id=f"upper:{fragment}"))
    return cases


def test_blocked_fragment_table_matches_the_contract() -> None:
    assert len(BLOCKED_FRAGMENTS) == 56
    assert len(set(BLOCKED_FRAGMENTS)) == 56


@pytest.mark.parametrize("name", _blocked_cases())
def test_track_name_blocked_content(name: str) -> None:
    message = assert_refused(Track, {"name": name}, "track.name: ")
    assert "blocked content" in message


SCAN_PATHS = [
    "/wp-admin",
    "/wp-login.php",
    "/WP-content/uploads",
    "/WordPress",
    "/wordpress/",
    "/phpmyadmin",
    "/PhpMyAdmin/index",
    "/.env",
    "/.git",
    "/.well-known/security.txt",
    "/.Htaccess",
    "/config.php",
    "/admin.env",
    "/x.PHP",
    "/a_b-c.yml",
    "/site.YAML",
    "/package.json",
    "/sitemap.xml",
    "/web.config",
    "/php.ini",
    "/db.bak",
    "/dump.sql",
    "/error.log",
    "/deep/path/index.php",
    "/1.php",
]


@pytest.mark.parametrize("name", SCAN_PATHS)
def test_track_name_scanned_url_path(name: str) -> None:
    message = assert_refused(Track, {"name": name}, "track.name: ")
    assert "scanned URL path" in message


# --- profile ids -------------------------------------------------------------------------

PROFILE_FACTORIES: list[tuple[str, Factory, dict[str, Any]]] = [
    ("track", Track, {"name": "e"}),
    ("identify", Identify, {}),
    ("increment", Increment, {"property": "visits"}),
    ("decrement", Decrement, {"property": "visits"}),
    ("assign_group", AssignGroup, {"group_ids": ["g"]}),
]
# A float is a double already: only an int beyond 2**53 would be rounded on the wire.
PROFILE_IDS_OK: list[object] = [0, 123, -7, 1.5, 2**53, float(2**60), "1", "user_123", EMOJI]
PROFILE_IDS_REFUSED: list[object] = [
    "",
    True,
    False,
    math.nan,
    math.inf,
    -math.inf,
    2**60,
    -(2**60),
    None,
    [],
    b"1",
]


@pytest.mark.parametrize(("wire", "factory", "base"), PROFILE_FACTORIES)
@pytest.mark.parametrize("profile_id", PROFILE_IDS_OK, ids=repr)
def test_profile_id_accepted(
    wire: str, factory: Factory, base: dict[str, Any], profile_id: object
) -> None:
    event = factory(**base, profile_id=profile_id)
    assert event.wire_type == wire
    assert getattr(event, "profile_id") == profile_id  # noqa: B009 - not on every type


@pytest.mark.parametrize(("wire", "factory", "base"), PROFILE_FACTORIES)
@pytest.mark.parametrize("profile_id", PROFILE_IDS_REFUSED, ids=repr)
def test_profile_id_refused(
    wire: str, factory: Factory, base: dict[str, Any], profile_id: object
) -> None:
    assert_refused(factory, {**base, "profile_id": profile_id}, f"{wire}.profile_id: ")


# --- increment / decrement ---------------------------------------------------------------

VALUES_REFUSED: list[object] = [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, True, "1", None]


@pytest.mark.parametrize(("wire", "factory"), [("increment", Increment), ("decrement", Decrement)])
@pytest.mark.parametrize("value", [1, 2.5, 0.001, 1000])
def test_value_accepted(wire: str, factory: Factory, value: float) -> None:
    event = factory(profile_id="1", property="visits", value=value)
    assert event.wire_type == wire
    assert getattr(event, "value") == value  # noqa: B009 - not on every type


@pytest.mark.parametrize(("wire", "factory"), [("increment", Increment), ("decrement", Decrement)])
@pytest.mark.parametrize("value", VALUES_REFUSED, ids=repr)
def test_value_refused(wire: str, factory: Factory, value: object) -> None:
    kwargs = {"profile_id": "1", "property": "visits", "value": value}
    assert_refused(factory, kwargs, f"{wire}.value: ")


@pytest.mark.parametrize(("wire", "factory"), [("increment", Increment), ("decrement", Decrement)])
@pytest.mark.parametrize("prop", ["", None, 5])
def test_property_refused(wire: str, factory: Factory, prop: object) -> None:
    assert_refused(factory, {"profile_id": "1", "property": prop}, f"{wire}.property: ")


# --- group / assign_group / track groups ------------------------------------------------

GROUP_OK = {"id": "g1", "type": "company", "name": "Acme"}


def test_group_accepted() -> None:
    group = Group(id="g1", type="company", name="Acme", properties={"seats": 3})
    assert (group.id, group.type, group.name) == ("g1", "company", "Acme")


@pytest.mark.parametrize("field", ["id", "type", "name"])
@pytest.mark.parametrize("value", ["", None, 1])
def test_group_field_refused(field: str, value: object) -> None:
    assert_refused(Group, {**GROUP_OK, field: value}, f"group.{field}: ")


@pytest.mark.parametrize("group_ids", [["a"], ["a", "b"]])
def test_assign_group_accepted(group_ids: list[str]) -> None:
    assert AssignGroup(group_ids=group_ids).group_ids == group_ids


@pytest.mark.parametrize(
    ("group_ids", "prefix"),
    [
        ([], "assign_group.group_ids: "),
        ([""], "assign_group.group_ids[0]: "),
        (["a", ""], "assign_group.group_ids[1]: "),
        ([1], "assign_group.group_ids[0]: "),
        ("a", "assign_group.group_ids: "),
        (None, "assign_group.group_ids: "),
        ({"a": 1}, "assign_group.group_ids: "),
    ],
)
def test_assign_group_refused(group_ids: object, prefix: str) -> None:
    assert_refused(AssignGroup, {"group_ids": group_ids}, prefix)


@pytest.mark.parametrize("groups", [[], ["a"], ["a", "b"], None])
def test_track_groups_accepted(groups: list[str] | None) -> None:
    assert Track(name="e", groups=groups).groups == groups


@pytest.mark.parametrize(
    ("groups", "prefix"),
    [
        ([""], "track.groups[0]: "),
        (["a", ""], "track.groups[1]: "),
        ([None], "track.groups[0]: "),
        ([1], "track.groups[0]: "),
        ("a", "track.groups: "),
    ],
)
def test_track_groups_refused(groups: object, prefix: str) -> None:
    assert_refused(Track, {"name": "e", "groups": groups}, prefix)


# --- properties ---------------------------------------------------------------------------

PROPERTY_FACTORIES: list[tuple[str, Factory, dict[str, Any]]] = [
    ("track", Track, {"name": "e"}),
    ("identify", Identify, {"profile_id": "1"}),
    ("group", Group, GROUP_OK),
]


@pytest.mark.parametrize(("wire", "factory", "base"), PROPERTY_FACTORIES)
@pytest.mark.parametrize("properties", [[], "x", None, [("a", 1)], 1])
def test_properties_must_be_a_dict(
    wire: str, factory: Factory, base: dict[str, Any], properties: object
) -> None:
    assert_refused(factory, {**base, "properties": properties}, f"{wire}.properties: ")


@pytest.mark.parametrize(("wire", "factory", "base"), PROPERTY_FACTORIES)
def test_properties_dict_accepted(wire: str, factory: Factory, base: dict[str, Any]) -> None:
    event = factory(**base, properties={"a": 1, "nested": {"b": [1, "x"]}})
    assert event.wire_type == wire


@pytest.mark.parametrize("revenue", [1, 1.0, 0, 0.0, None, 10**6])
def test_revenue_accepted(revenue: object) -> None:
    Track(name="revenue", properties={"__revenue": revenue})


@pytest.mark.parametrize("revenue", [-1, -1.0, 1.5, "1", True, math.nan, math.inf, [1]], ids=repr)
def test_revenue_refused(revenue: object) -> None:
    kwargs = {"name": "revenue", "properties": {"__revenue": revenue}}
    assert_refused(Track, kwargs, "track.properties.__revenue: ")


@pytest.mark.parametrize("name", ["purchase", "Revenue", "revenue_total"])
@pytest.mark.parametrize("revenue", [-1, 1.5, "1", True, math.nan], ids=repr)
def test_revenue_unchecked_on_other_names(name: str, revenue: object) -> None:
    Track(name=name, properties={"__revenue": revenue})


@pytest.mark.parametrize("device_id", ["a" * 64, EMOJI * 32, "d"])
def test_device_id_accepted(device_id: str) -> None:
    Track(name="e", properties={"__deviceId": device_id})


@pytest.mark.parametrize("device_id", ["a" * 65, EMOJI * 33, 5])
def test_device_id_refused(device_id: object) -> None:
    kwargs = {"name": "e", "properties": {"__deviceId": device_id}}
    assert_refused(Track, kwargs, "track.properties.__deviceId: ")


# --- identify: names, email, avatar ------------------------------------------------------


@pytest.mark.parametrize("field", ["first_name", "last_name"])
@pytest.mark.parametrize("value", [None, 5, ["Joe"]])
def test_identify_names_must_be_str(field: str, value: object) -> None:
    assert_refused(Identify, {"profile_id": "1", field: value}, f"identify.{field}: ")


EMAILS_OK = ["joe@doe.com", "a.b+c@x-y.co", "o'neil@x.io", "A_B-9@Sub.Example.ORG", "1@2x.io"]
EMAILS_REFUSED: list[object] = [
    "joedoe.com",
    "a@b@c.com",
    ".a@x.com",
    "a.@x.com",
    "a'@x.com",
    "a..b@x.com",
    "joe@doe..com",
    "x@y",
    "x@y.c1",
    "x@y.c",
    "x@-y.com",
    "x@y_z.com",
    "j\u00f6e@doe.com",
    "joe@d\u00f6e.com",
    "joe@doe.com\n",
    " joe@doe.com",
    "joe @doe.com",
    "joe@doe.com.",
    "@doe.com",
    "joe@",
    "",
    5,
    None,
]


@pytest.mark.parametrize("email", EMAILS_OK)
def test_email_accepted(email: str) -> None:
    assert Identify(profile_id="1", email=email).email == email


@pytest.mark.parametrize("email", EMAILS_REFUSED, ids=repr)
def test_email_refused(email: object) -> None:
    assert_refused(Identify, {"profile_id": "1", "email": email}, "identify.email: ")


AVATARS_OK = [
    "https://x.com/a.png",
    "http://x.com",
    "https://cdn.example.org:8443/u/1.png?size=64#x",
    "  https://x.com/a.png  ",  # trimmed, as the server does
    "http://[::1]/a.png",
]
AVATARS_REFUSED: list[object] = [
    "ftp://x",
    "not a url",
    "https://",
    "https://exa mple.com",
    "javascript:alert(1)",
    "x.com/a.png",
    "https://x.com:99999/a.png",
    "https://x.com/a\nb.png",
    # A last label of 0x and hex digits is a number to a WHATWG parser (an IPv4 address).
    "https://example.0x10/a.png",
    "https://b.0x/a.png",
    "https://a.0X1F/a.png",
    "",
    None,
    5,
]


@pytest.mark.parametrize("avatar", AVATARS_OK)
def test_avatar_accepted(avatar: str) -> None:
    assert Identify(profile_id="1", avatar=avatar).avatar == avatar


@pytest.mark.parametrize("avatar", AVATARS_REFUSED, ids=repr)
def test_avatar_refused(avatar: object) -> None:
    assert_refused(Identify, {"profile_id": "1", "avatar": avatar}, "identify.avatar: ")


@pytest.mark.parametrize(
    "avatar",
    [
        "https://x.123/a.png",
        "https://256.256.256.256/a.png",
        "https://1.2.3.4.5/a.png",
        "http://[v1.x]/a.png",
        "https://xn--a.com/a.png",
    ],
)
def test_avatar_refused_when_whatwg_refuses(avatar: str) -> None:
    assert_refused(Identify, {"profile_id": "1", "avatar": avatar}, "identify.avatar: ")


@pytest.mark.parametrize(
    ("kwargs", "prefix"),
    [
        ({"name": "a\ud800b"}, "track.name: "),
        ({"name": "e", "properties": {"__deviceId": "\udc00"}}, "track.properties.__deviceId: "),
    ],
)
def test_lone_surrogate_is_an_invalid_event(kwargs: dict[str, Any], prefix: str) -> None:
    assert_refused(Track, kwargs, prefix)


# --- encoding ---------------------------------------------------------------------------

ENCODED: list[tuple[Event, bytes]] = [
    (Track(name="x"), b'{"type":"track","payload":{"name":"x"}}'),
    (
        Track(name="signed_up", properties={"plan": "pro", "n": 1}, profile_id=42, groups=["g1"]),
        b'{"type":"track","payload":{"name":"signed_up","properties":{"plan":"pro","n":1},'
        b'"profileId":42,"groups":["g1"]}}',
    ),
    (
        Track(name="caf\u00e9", properties={}),
        b'{"type":"track","payload":{"name":"caf\xc3\xa9","properties":{}}}',
    ),
    (Identify(profile_id="u1"), b'{"type":"identify","payload":{"profileId":"u1"}}'),
    (
        Identify(
            profile_id="u1",
            first_name="Joe",
            last_name="Doe",
            email="joe@doe.com",
            avatar="https://x.com/a.png",
            properties={"plan": "pro"},
        ),
        b'{"type":"identify","payload":{"profileId":"u1","firstName":"Joe","lastName":"Doe",'
        b'"email":"joe@doe.com","avatar":"https://x.com/a.png","properties":{"plan":"pro"}}}',
    ),
    (
        Increment(profile_id="1", property="visits", value=3),
        b'{"type":"increment","payload":{"profileId":"1","property":"visits","value":3}}',
    ),
    (
        Increment(profile_id="1", property="visits", value=1),
        b'{"type":"increment","payload":{"profileId":"1","property":"visits","value":1}}',
    ),
    (
        Increment(profile_id=7, property="a.b", value=2.5),
        b'{"type":"increment","payload":{"profileId":7,"property":"a.b","value":2.5}}',
    ),
    (
        Decrement(profile_id="1", property="credits", value=2),
        b'{"type":"decrement","payload":{"profileId":"1","property":"credits","value":2}}',
    ),
    (
        Group(id="g1", type="company", name="Acme"),
        b'{"type":"group","payload":{"id":"g1","type":"company","name":"Acme"}}',
    ),
    (
        Group(id="g1", type="company", name="Acme", properties={"seats": 3}),
        b'{"type":"group","payload":{"id":"g1","type":"company","name":"Acme",'
        b'"properties":{"seats":3}}}',
    ),
    (AssignGroup(group_ids=["a"]), b'{"type":"assign_group","payload":{"groupIds":["a"]}}'),
    (
        AssignGroup(group_ids=["a", "b"], profile_id="u1"),
        b'{"type":"assign_group","payload":{"groupIds":["a","b"],"profileId":"u1"}}',
    ),
]


@pytest.mark.parametrize(("event", "body"), ENCODED, ids=repr)
def test_encode_event_exact_bytes(event: Event, body: bytes) -> None:
    encoded = encode_event(event)
    assert encoded == body
    assert b"null" not in encoded


@pytest.mark.parametrize(
    ("event", "body"),
    [
        (
            Increment(profile_id="1", property="visits"),
            b'{"type":"increment","payload":{"profileId":"1","property":"visits"}}',
        ),
        (
            Decrement(profile_id="1", property="visits"),
            b'{"type":"decrement","payload":{"profileId":"1","property":"visits"}}',
        ),
    ],
    ids=["increment-default", "decrement-default"],
)
def test_encode_event_leaves_unset_value_to_the_server_default(event: Event, body: bytes) -> None:
    # Decided: a Struct built without value omits it (the server adds 1); the client's
    # increment()/decrement() methods always send the value explicitly.
    assert encode_event(event) == body


class _Opaque:
    pass


UNENCODABLE: list[object] = [object(), {"k": 1}.keys(), {"k": 1}.items(), 1 + 2j, _Opaque()]


@pytest.mark.parametrize(("wire", "factory", "base"), PROPERTY_FACTORIES)
@pytest.mark.parametrize("value", UNENCODABLE, ids=lambda v: type(v).__name__)
def test_encode_event_unencodable_property(
    wire: str, factory: Factory, base: dict[str, Any], value: object
) -> None:
    # The error names the top-level key that holds the value.
    for properties, key in (
        ({"bad": value}, "bad"),
        ({"ok": 1, "nested": {"bad": [value]}}, "nested"),
    ):
        event = factory(**base, properties=properties)
        with pytest.raises(InvalidEventError) as info:
            encode_event(event)
        assert str(info.value).startswith(
            f"{wire}.properties.{key}: cannot be encoded as JSON: "
        ), str(info.value)


# --- decoding --------------------------------------------------------------------------

ROUND_TRIP: list[Event] = [event for event, _ in ENCODED] + [
    Increment(profile_id="1", property="visits"),
    Decrement(profile_id=5, property="visits", value=0.5),
    AssignGroup(group_ids=["a"], profile_id=3),
]


@pytest.mark.parametrize("event", ROUND_TRIP, ids=repr)
def test_decode_envelope_round_trips(event: Event) -> None:
    decoded, client_id, secret = decode_envelope(encode_event(event))
    assert type(decoded) is type(event)
    assert decoded == event
    assert (client_id, secret) == (None, None)
    assert decode_event(encode_event(event)) == event


def test_decode_envelope_returns_body_credentials() -> None:
    body = '{"type":"track","payload":{"name":"x"},"clientId":"abc","clientSecret":"s3"}'
    assert decode_envelope(body) == (Track(name="x"), "abc", "s3")


def test_decode_envelope_drops_unknown_keys() -> None:
    body = b'{"type":"track","payload":{"name":"x","foo":1},"extra":true}'
    assert decode_envelope(body) == (Track(name="x"), None, None)


DECODE_REFUSED: list[tuple[bytes, str]] = [
    (b'{"type":"track","payload":{"name":"x","profileId":null}}', "body/payload: "),
    (b'{"type":"track","payload":{"name":"x","properties":null}}', "body/payload: "),
    (b'{"type":"track","payload":{"name":null}}', "body/payload: "),
    (b'{"type":"track","payload":{}}', "body/payload: "),
    (b'{"type":"identify","payload":{"profileId":"1","firstName":null}}', "body/payload: "),
    (b'{"type":"identify","payload":{"profileId":"1","email":null}}', "body/payload: "),
    (b'{"type":"identify","payload":{"profileId":"1","avatar":null}}', "body/payload: "),
    (b'{"type":"increment","payload":{"profileId":"1","property":"v","value":null}}',
     "body/payload: "),
    (b'{"type":"assign_group","payload":{"groupIds":["a"],"profileId":null}}', "body/payload: "),
    (b'{"type":"group","payload":{"id":"g","type":"t","name":"n","properties":null}}',
     "body/payload: "),
    (b'{"type":"track","payload":{"name":"session_start"}}', "body/payload: "),
    (b'{"type":"increment","payload":{"profileId":"1","property":"v","value":0}}',
     "body/payload: "),
    (b'{"type":"identify","payload":{"profileId":"1","email":"nope"}}', "body/payload: "),
    (b'{"type":"track","payload":"x"}', "body/payload: "),
    (b'{"type":"alias","payload":{"profileId":"1","alias":"a"}}', "body/type: "),
    (b'{"type":"replay","payload":{}}', "body/type: "),
    (b'{"type":"TRACK","payload":{"name":"x"}}', "body/type: "),
    (b'{"type":"","payload":{}}', "body/type: "),
    (b"", "body: "),
    (b"not json", "body: "),
    (b'{"type":', "body: "),
    (b'{"type":"track","payload":{"name":"x"}', "body: "),
    (b"[]", "body: "),
    (b"null", "body: "),
    (b'{"payload":{"name":"x"}}', "body: "),
    (b'{"type":"track"}', "body: "),
    (b'{"type":null,"payload":{}}', "body: "),
    (b'{"type":"track","payload":{"name":"x"},"clientId":123}', "body: "),
    (b'{"type":"track","payload":{"name":"x"},"clientSecret":null}', "body: "),
]  # fmt: skip


@pytest.mark.parametrize(("body", "prefix"), DECODE_REFUSED, ids=repr)
def test_decode_envelope_refused(body: bytes, prefix: str) -> None:
    with pytest.raises(InvalidEventError) as info:
        decode_envelope(body)
    assert str(info.value).startswith(prefix), str(info.value)


def test_decode_envelope_accepts_null_groups() -> None:
    event = decode_event(b'{"type":"track","payload":{"name":"x","groups":null}}')
    assert isinstance(event, Track)
    assert event.name == "x"


# --- timestamps -------------------------------------------------------------------------


def _parse(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def test_now_timestamp_format_and_clock() -> None:
    for _ in range(50):
        before = datetime.now(UTC)
        stamp = now_timestamp()
        after = datetime.now(UTC)
        assert TIMESTAMP_RE.match(stamp), stamp
        moment = _parse(stamp)
        # Truncated to the millisecond, so at most 1 ms before `before`; 1 us of slack for
        # the float clock reading.
        slack = timedelta(microseconds=1)
        assert before - timedelta(milliseconds=1) - slack <= moment <= after + slack
        assert abs((moment - datetime.now(UTC)).total_seconds()) < 1.0


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 26, 8, 0, 0, tzinfo=UTC),
        datetime(2026, 11, 26, 8, 0, 0, 7_000, tzinfo=UTC),
        datetime(2026, 11, 26, 8, 0, 0, 999_999, tzinfo=UTC),
        datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC),
    ],
)
def test_now_timestamp_formatting_of_a_given_instant(
    moment: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    def expected(at: datetime) -> str:
        return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"

    clock = [int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000]
    monkeypatch.setattr(time, "time_ns", lambda: clock[0])
    monkeypatch.setattr(_events, "_stamp_cache", (0, 0, ""))
    monkeypatch.setattr(_events, "_second_cache", (0, 0, ""))
    assert now_timestamp() == expected(moment)  # a new second
    # Every instant of that millisecond has the same text (truncated, not rounded).
    clock[0] += 999_999 - clock[0] % 1_000_000
    assert now_timestamp() == expected(moment)
    # The next millisecond: in the same second, or the first of the next one.
    clock[0] += 1
    later = moment.replace(microsecond=moment.microsecond // 1000 * 1000) + timedelta(
        milliseconds=1
    )
    assert now_timestamp() == expected(later)
    # 250 ms on (a known second, unless that crosses into the next).
    clock[0] += 250_000_000
    assert now_timestamp() == expected(later + timedelta(milliseconds=250))
    # The wall clock stepped back 2 s (an NTP correction): the stamp follows it.
    clock[0] -= 2_000_000_000
    assert now_timestamp() == expected(later + timedelta(milliseconds=250) - timedelta(seconds=2))


def test_now_timestamp_moves_with_the_clock() -> None:
    stamps = [now_timestamp()]
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        stamp = now_timestamp()
        if stamp != stamps[-1]:
            stamps.append(stamp)
    assert all(TIMESTAMP_RE.match(s) for s in stamps)
    assert stamps == sorted(stamps)
    assert len(stamps) >= 10  # a new millisecond is noticed, not served from a stale cache


class _NoOffset(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


FORMATTED = [
    (datetime(2026, 11, 26, 8, 0, tzinfo=UTC), "2026-11-26T08:00:00.000Z"),
    (datetime(2026, 11, 26, 8, 0, 0, 999_999, tzinfo=UTC), "2026-11-26T08:00:00.999Z"),
    (datetime(2026, 11, 26, 8, 0, 0, 1_500, tzinfo=UTC), "2026-11-26T08:00:00.001Z"),
    (
        datetime(2026, 11, 26, 9, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=1))),
        "2026-11-26T08:00:00.123Z",
    ),
    (
        datetime(2026, 12, 31, 23, 30, 5, tzinfo=timezone(timedelta(hours=-2))),
        "2027-01-01T01:30:05.000Z",
    ),
    (
        datetime(2026, 3, 1, 0, 15, tzinfo=timezone(timedelta(hours=5, minutes=45))),
        "2026-02-28T18:30:00.000Z",
    ),
]


@pytest.mark.parametrize(("moment", "expected"), FORMATTED, ids=repr)
def test_format_timestamp(moment: datetime, expected: str) -> None:
    assert format_timestamp(moment) == expected


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 26, 8, 0),
        datetime(2026, 11, 26, 8, 0, tzinfo=_NoOffset()),
        date(2026, 11, 26),
        "2026-11-26T08:00:00.000Z",
        1_700_000_000,
    ],
    ids=repr,
)
def test_format_timestamp_refused(moment: object) -> None:
    with pytest.raises(InvalidEventError) as info:
        format_timestamp(moment)  # type: ignore[arg-type]
    assert str(info.value).startswith("timestamp: ")
    with pytest.raises(InvalidEventError) as named:
        format_timestamp(moment, "track.timestamp")  # type: ignore[arg-type]
    assert str(named.value).startswith("track.timestamp: ")


def test_stamp_track_adds_timestamp() -> None:
    event = Track(name="e", profile_id="u1", groups=["g"])
    stamped = stamp_track(event)
    assert event.properties is UNSET
    assert isinstance(stamped.properties, dict)
    assert list(stamped.properties) == ["__timestamp"]
    stamp = stamped.properties["__timestamp"]
    assert isinstance(stamp, str)
    assert TIMESTAMP_RE.match(stamp)
    assert abs((_parse(stamp) - datetime.now(UTC)).total_seconds()) < 1.0
    assert (stamped.name, stamped.profile_id, stamped.groups) == ("e", "u1", ["g"])


def test_stamp_track_does_not_mutate_callers_dict() -> None:
    properties: dict[str, Any] = {"plan": "pro"}
    event = Track(name="e", properties=properties)
    stamped = stamp_track(event)
    assert properties == {"plan": "pro"}
    assert event.properties == {"plan": "pro"}
    assert isinstance(stamped.properties, dict)
    assert stamped.properties is not properties
    assert stamped.properties["plan"] == "pro"
    assert set(stamped.properties) == {"plan", "__timestamp"}


def test_stamp_track_keeps_existing_timestamp() -> None:
    properties: dict[str, Any] = {"__timestamp": "2026-11-26T08:00:00.000Z", "a": 1}
    event = Track(name="e", properties=properties)
    stamped = stamp_track(event)
    assert stamped == event
    assert stamped.properties == {"__timestamp": "2026-11-26T08:00:00.000Z", "a": 1}
    assert properties == {"__timestamp": "2026-11-26T08:00:00.000Z", "a": 1}


def test_a_whole_float_profile_id_orders_with_its_int_and_str_forms() -> None:
    # The server takes a number's text as JavaScript writes it: 1.0 is profile "1".
    keys = {
        Identify(profile_id=1.0).order_key(),
        Increment(profile_id=1, property="n").order_key(),
        Identify(profile_id="1").order_key(),
    }
    assert keys == {"1"}
    assert Identify(profile_id=1.5).order_key() == "1.5"
    # From 1e21 on, JavaScript writes an exponent as Python does: "1e+21".
    assert Identify(profile_id=1e21).order_key() == "1e+21"
    assert Identify(profile_id=1e20).order_key() == "100000000000000000000"


def test_a_large_float_value_is_a_double_already() -> None:
    assert Increment(profile_id="u", property="n", value=1e16).value == 1e16
    with pytest.raises(InvalidEventError, match=r"increment.value: is an int too large"):
        Increment(profile_id="u", property="n", value=2**60)
