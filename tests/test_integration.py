"""Fitting into applications: event context, global properties, hooks, disabled, sync client."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
from typing import Any

import msgspec
import pytest

from openpanel_async import (
    ClientClosedError,
    ConfigError,
    DeliveryError,
    Event,
    Identify,
    InvalidEventError,
    OpenPanel,
    SyncOpenPanel,
    Track,
    event_context,
    set_identity,
)
from openpanel_async._context import current_context
from openpanel_async.testing import EventRecorder, LocalOpenPanel

from .conftest import CLIENT_ID, CLIENT_SECRET, FAST_RETRY, assert_accounted, make_client

pytestmark = pytest.mark.anyio


def recording_client(**kwargs: Any) -> tuple[OpenPanel, EventRecorder]:
    recorder = EventRecorder()
    return OpenPanel(client_id=CLIENT_ID, transport=recorder, **kwargs), recorder


async def test_event_context_fills_what_calls_leave_out() -> None:
    op, recorder = recording_client()
    async with op:
        with event_context(client_ip="198.51.100.7", user_agent="UA/1", profile_id="u1"):
            op.track("ctx")
            op.track("explicit", profile_id="u2", client_ip="203.0.113.1", user_agent="UA/2")
            op.increment("u9", "n")
            with event_context(groups=["org_a"], user_agent="UA/inner"):
                op.track("nested")
                op.assign_group(["org_b"])
            op.track("after_nested")
        op.track("outside")
        assert await op.flush(timeout=5)
    seen = {
        (r.payload.get("name") or r.type): (
            r.headers.get("x-client-ip"),
            r.headers["user-agent"],
            r.payload.get("profileId"),
            r.payload.get("groups"),
        )
        for r in recorder.requests
    }
    default_ua = recorder.requests[-1].headers["user-agent"]
    assert default_ua.startswith("openpanel-async/")
    assert seen == {
        "ctx": ("198.51.100.7", "UA/1", "u1", None),
        "explicit": ("203.0.113.1", "UA/2", "u2", None),
        "increment": ("198.51.100.7", "UA/1", "u9", None),
        "nested": ("198.51.100.7", "UA/inner", "u1", ["org_a"]),
        "assign_group": ("198.51.100.7", "UA/inner", "u1", None),
        "after_nested": ("198.51.100.7", "UA/1", "u1", None),
        "outside": (None, default_ua, None, None),
    }
    assert recorder.payloads("assign_group") == [{"groupIds": ["org_b"], "profileId": "u1"}]


async def test_event_context_validates_its_arguments() -> None:
    with (
        pytest.raises(InvalidEventError, match="profile_id: must not be empty"),
        event_context(profile_id=""),
    ):
        pass  # pragma: no cover
    with pytest.raises(InvalidEventError, match=r"groups\[0\]"):
        set_identity("u", groups=[""])


async def test_concurrent_tasks_never_see_each_others_identity() -> None:
    op, recorder = recording_client(max_queue_size=100_000)

    async def request(n: int) -> None:
        with event_context(client_ip=f"203.0.113.{n % 250}", user_agent=f"UA/{n}"):
            set_identity(f"user_{n}", groups=[f"org_{n}"])
            for step in range(3):
                await asyncio.sleep(0)  # interleave with the other "requests"
                op.track("step", {"n": n, "step": step})

    async with op:
        await asyncio.gather(*(request(n) for n in range(300)))
        assert await op.flush(timeout=10)
    assert len(recorder.requests) == 900
    for r in recorder.requests:
        n = r.payload["properties"]["n"]
        assert r.payload["profileId"] == f"user_{n}"
        assert r.payload["groups"] == [f"org_{n}"]
        assert r.headers["user-agent"] == f"UA/{n}"
        assert r.headers["x-client-ip"] == f"203.0.113.{n % 250}"
    assert current_context() is None


async def test_set_identity_outside_a_request_stays_in_the_current_task() -> None:
    op, recorder = recording_client()
    async with op:
        with event_context(profile_id="parent"):

            async def child() -> None:
                set_identity("child")
                op.track("in_child")

            await asyncio.create_task(child())
            op.track("in_parent")
        assert await op.flush(timeout=5)
    assert {r.payload["name"]: r.payload["profileId"] for r in recorder.requests} == {
        "in_child": "child",
        "in_parent": "parent",
    }


async def test_global_properties_merge_under_event_properties() -> None:
    op, recorder = recording_client(global_properties={"app": "shop", "env": "prod"})
    async with op:
        op.track("a", {"env": "staging", "x": 1})
        op.track("b")
        op.identify("u1", properties={"app": "own"})
        op.identify("u2")
        op.send_nowait(Track(name="c", properties={"y": 2}))
        op.send_nowait(Identify(profile_id="u3"))
        op.group("g", "team", "G")  # not merged: only track and identify
        op.set_global_properties({"version": 2})
        op.track("d")
        op.set_global_properties(None)
        op.track("e")
        assert await op.flush(timeout=5)
    props = {
        r.payload.get("name") or r.payload.get("profileId") or r.type: {
            k: v for k, v in r.payload.get("properties", {}).items() if k != "__timestamp"
        }
        for r in recorder.requests
    }
    assert props == {
        "a": {"app": "shop", "env": "staging", "x": 1},
        "b": {"app": "shop", "env": "prod"},
        "u1": {"app": "own", "env": "prod"},
        "u2": {"app": "shop", "env": "prod"},
        "c": {"app": "shop", "env": "prod", "y": 2},
        "u3": {"app": "shop", "env": "prod"},
        "G": {},  # the group event, keyed by its name; not merged
        "d": {"version": 2},
        "e": {},
    }
    assert dict(op.global_properties) == {}


def test_global_properties_are_checked() -> None:
    with pytest.raises(ConfigError, match="global_properties: must be a dict"):
        OpenPanel(client_id=CLIENT_ID, global_properties=[1])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="global_properties: cannot be encoded"):
        OpenPanel(client_id=CLIENT_ID, global_properties={"x": object()})
    op = OpenPanel(client_id=CLIENT_ID)
    with pytest.raises(ConfigError, match="global_properties"):
        op.set_global_properties({"x": {1, 2}.__iter__()})


async def test_before_send_changes_drops_and_survives_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def hook(event: Event) -> Event | None:
        if isinstance(event, Track):
            if event.name == "drop_me":
                return None
            if event.name == "explode":
                raise RuntimeError("hook bug")
            if event.name == "wrong":
                return "not an event"  # type: ignore[return-value]
            props = dict(event.properties or {})
            props.pop("email", None)  # scrub PII
            return msgspec.structs.replace(event, properties=props)
        return event

    op, recorder = recording_client(before_send=hook)
    async with op:
        assert op.track("keep", {"email": "a@b.co", "plan": "pro"})
        assert op.track("drop_me") is False
        assert op.track("explode") is False
        assert op.track("explode") is False
        assert op.track("wrong") is False
        assert op.identify("u1")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert [r.payload.get("name") or r.type for r in recorder.requests] == ["keep", "identify"]
    keep = recorder.requests[0].payload["properties"]
    assert "email" not in keep
    assert keep["plan"] == "pro"
    assert "__timestamp" in keep
    assert dict(stats.dropped_by_reason) == {"filtered": 1, "before_send_error": 3}
    assert stats.accepted == 2
    hook_logs = [r for r in caplog.records if "before_send raised" in r.getMessage()]
    assert len(hook_logs) == 1  # logged once, then only counted
    assert hook_logs[0].exc_info is not None


async def test_before_send_result_is_validated() -> None:
    def hook(event: Event) -> Event | None:
        return Track(name="session_start")  # never reached: construction validates

    op, _ = recording_client(before_send=hook)
    async with op:
        assert op.track("x") is False
    assert dict(op.stats().dropped_by_reason) == {"before_send_error": 1}


async def test_disabled_validates_and_sends_nothing(server: LocalOpenPanel) -> None:
    async with make_client(server, disabled=True) as op:
        assert op.track("fine", {"a": 1}) is True
        assert op.identify("u1") is True
        with pytest.raises(InvalidEventError):
            op.track("session_end")
        assert await op.flush(timeout=1)
        stats = op.stats()
    assert server.requests == []
    assert stats.accepted == 0
    assert dict(stats.dropped_by_reason) == {"disabled": 2}
    assert_accounted(stats, closed=True)


async def test_recorder_sees_exact_bodies_and_headers() -> None:
    recorder = EventRecorder()
    async with OpenPanel(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, transport=recorder
    ) as op:
        op.track("signed_up", {"plan": "pro"}, profile_id="u1")
        op.decrement("u1", "credits", 3)
    assert recorder.closed
    assert recorder.names() == ["signed_up"]
    assert recorder.payloads("decrement") == [
        {"profileId": "u1", "property": "credits", "value": 3}
    ]
    first = recorder.requests[0]
    assert first.url == "https://api.openpanel.dev/track"
    assert first.headers["openpanel-client-secret"] == CLIENT_SECRET
    assert isinstance(first.event, Track)
    assert first.event.profile_id == "u1"


async def test_recorder_status_drives_client_outcomes() -> None:
    recorder = EventRecorder(status=400)
    errors: list[Any] = []
    async with OpenPanel(client_id=CLIENT_ID, transport=recorder, on_error=errors.append) as op:
        op.track("refused")
    assert op.stats().failed == 1
    assert errors[0].status == 400


def test_bad_transport_and_hook_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="transport"):
        OpenPanel(client_id=CLIENT_ID, transport=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="before_send"):
        OpenPanel(client_id=CLIENT_ID, before_send=3)  # type: ignore[arg-type]


# --- the synchronous client ------------------------------------------------------------------


def test_sync_client_from_many_threads() -> None:
    recorder = EventRecorder()
    op = SyncOpenPanel(client_id=CLIENT_ID, transport=recorder, max_queue_size=50_000)
    assert op.stats().state == "new"

    def produce(tag: int) -> None:
        for i in range(250):
            assert op.track("threaded", {"t": tag, "i": i})

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert op.flush(timeout=10)
    stats = op.stats()
    assert (stats.accepted, stats.delivered) == (1000, 1000)
    op.close()
    op.close()  # idempotent
    assert op.stats().state == "closed"
    assert recorder.closed
    assert {
        (r.payload["properties"]["t"], r.payload["properties"]["i"]) for r in recorder.requests
    } == {(t, i) for t in range(4) for i in range(250)}
    assert op.track("late") is False


def test_sync_client_send_blocks_for_room_and_context_manager() -> None:
    recorder = EventRecorder()
    with SyncOpenPanel(client_id=CLIENT_ID, transport=recorder, max_queue_size=2) as op:
        for i in range(50):
            op.send(Track(name="bp", properties={"i": i}), timeout=5)
        assert op.flush(timeout=5)
    assert sorted(r.payload["properties"]["i"] for r in recorder.requests) == list(range(50))


def test_sync_client_close_from_on_error_is_refused_and_leaves_the_client_usable() -> None:
    # on_error runs on the delivery thread: a close() there would wait for itself. It is
    # refused before anything stops, and the client goes on delivering.
    refused: list[BaseException] = []
    recorder = EventRecorder(status=400)

    def on_error(error: DeliveryError) -> None:
        try:
            op.close()
        except RuntimeError as exc:
            refused.append(exc)

    op = SyncOpenPanel(client_id=CLIENT_ID, transport=recorder, on_error=on_error)
    assert op.track("rejected")
    assert op.flush(timeout=5)
    assert len(refused) == 1
    assert "delivery thread" in str(refused[0])
    recorder.status = 200
    assert op.track("later")
    assert op.flush(timeout=5)
    op.close()
    stats = op.stats()
    assert (stats.delivered, stats.failed, stats.state) == (1, 1, "closed")


def test_sync_client_send_uses_the_callers_event_context() -> None:
    # send() prepares the event on the calling thread: the caller's context applies, even
    # when the event then waits for room on the delivery thread.
    recorder = EventRecorder()
    with SyncOpenPanel(client_id=CLIENT_ID, transport=recorder, max_queue_size=1) as op:
        with event_context(client_ip="203.0.113.7", user_agent="ua/2", profile_id="p9"):
            for i in range(5):
                op.send(Track(name="ctx", properties={"i": i}), timeout=5)
        op.send(Track(name="bare"), timeout=5)
        assert op.flush(timeout=5)
    seen = [
        (r.payload["name"], r.headers.get("x-client-ip"), r.headers["user-agent"])
        for r in recorder.requests
    ]
    default_ua = recorder.requests[-1].headers["user-agent"]
    assert default_ua.startswith("openpanel-async/")
    assert seen == [("ctx", "203.0.113.7", "ua/2")] * 5 + [("bare", None, default_ua)]
    assert [r.payload.get("profileId") for r in recorder.requests] == ["p9"] * 5 + [None]
    with pytest.raises(ClientClosedError):
        op.send(Track(name="after"), timeout=1)
    assert op.stats().dropped_by_reason == {"closed": 1}


def test_sync_client_closes_at_interpreter_exit() -> None:
    code = textwrap.dedent(
        f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from openpanel_async import SyncOpenPanel
        from openpanel_async.testing import EventRecorder

        class Noisy(EventRecorder):
            async def aclose(self):
                await super().aclose()
                print("delivered", len(self.requests), flush=True)

        op = SyncOpenPanel(client_id={CLIENT_ID!r}, transport=Noisy(), shutdown_timeout=2)
        for i in range(20):
            op.track("bye", {{"i": i}})
        # no close(): the interpreter exits with the events pending
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "delivered 20"
    assert "20 delivered, 0 failed" in result.stderr


async def test_sync_client_against_the_local_server(server: LocalOpenPanel) -> None:
    def use() -> tuple[int, int]:
        with SyncOpenPanel(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            api_url=server.url,
            retry=FAST_RETRY,
        ) as op:
            op.identify("u1", email="joe@doe.com")
            op.increment("u1", "visits")
            op.track("page_view", profile_id="u1")
            assert op.flush(timeout=5)
            stats = op.stats()
        return stats.accepted, stats.delivered

    assert await asyncio.to_thread(use) == (3, 3)
    assert [r.type for r in server.requests if r.type != "track"] == ["identify", "increment"]


def test_sync_client_logs_nothing_when_idle(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="openpanel_async")
    SyncOpenPanel(client_id=CLIENT_ID).close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
