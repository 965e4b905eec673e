"""delivery="thread": the sender runs on a private thread with its own loop; callers only queue."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

import openpanel_async
from openpanel_async import (
    ClientClosedError,
    ConfigError,
    DeliveryError,
    Identify,
    OpenPanel,
    RejectedError,
    SendTimeoutError,
    SyncOpenPanel,
    Track,
    TransportResponse,
    _thread,
)
from openpanel_async._thread import DeliveryThread
from openpanel_async.testing import EventRecorder, LocalOpenPanel, Reply

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    FAST_RETRY,
    assert_accounted,
    make_client,
    run_in_fork,
)

pytestmark = pytest.mark.anyio

THREAD_NAME = "openpanel-async"
STAMP = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
STAMP_TEXT = "2026-03-04T05:06:07.890Z"


def thread_client(server: LocalOpenPanel, **kwargs: Any) -> OpenPanel:
    return make_client(server, delivery="thread", **kwargs)


def runner_thread(op: OpenPanel) -> threading.Thread:
    assert op._runner is not None
    assert op._runner.thread is not None
    return op._runner.thread


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def ended(thread: threading.Thread) -> None:  # see test_aclose_returns_only_once_...
    await until(lambda: not thread.is_alive(), timeout=1.0)


def sender_tasks(tasks: Iterable[asyncio.Task[Any]]) -> Counter[str]:
    names = (getattr(task.get_coro(), "__qualname__", "") for task in tasks)
    return Counter(name for name in names if name.startswith("Sender."))


def names(requests: Iterable[Any]) -> list[Any]:
    return [(r.payload or {}).get("name") for r in requests]


# --- what goes on the wire, and where it is sent from ---------------------------------------


async def delivered(server: LocalOpenPanel, delivery: str) -> list[tuple[bytes, Any]]:
    server.reset()
    async with make_client(server, delivery=delivery) as op:
        assert op.track("signup", {"plan": "pro"}, profile_id="u1", groups=["g"], timestamp=STAMP)
        assert op.track("visit", timestamp=STAMP, client_ip="198.51.100.7", user_agent="UA/1")
        assert op.identify("u1", first_name="Ada", email="a@example.com", properties={"t": 2})
        assert op.increment("u1", "visits", 3)
        assert op.decrement("u1", "credits", 1.5)
        assert op.group("g", "company", "Acme", {"seats": 25})
        assert op.assign_group(["g"], profile_id="u1")
        assert op.send_nowait(Track(name="raw", properties={"__timestamp": STAMP_TEXT}))
        assert await op.flush(timeout=5)
    stats = op.stats()
    assert (stats.accepted, stats.delivered, stats.failed, stats.dropped) == (8, 8, 0, 0)
    assert_accounted(stats, closed=True)
    return sorted((r.body, sorted(r.headers.items())) for r in server.requests)


async def test_same_bytes_and_headers_as_loop_mode(server: LocalOpenPanel) -> None:
    on_loop = await delivered(server, "loop")
    assert await delivered(server, "thread") == on_loop
    ts = {"__timestamp": STAMP_TEXT}
    assert {(r.type, (r.payload or {}).get("name")): r.payload for r in server.requests} == {
        ("track", "signup"): {"name": "signup", "properties": {"plan": "pro", **ts}, "profileId": "u1", "groups": ["g"]},
        ("track", "visit"): {"name": "visit", "properties": ts},
        ("track", "raw"): {"name": "raw", "properties": ts},
        ("identify", None): {"profileId": "u1", "firstName": "Ada", "email": "a@example.com", "properties": {"t": 2}},
        ("increment", None): {"profileId": "u1", "property": "visits", "value": 3},
        ("decrement", None): {"profileId": "u1", "property": "credits", "value": 1.5},
        ("group", "Acme"): {"id": "g", "type": "company", "name": "Acme", "properties": {"seats": 25}},
        ("assign_group", None): {"groupIds": ["g"], "profileId": "u1"},
    }  # fmt: skip
    version = openpanel_async.__version__
    for r in server.requests:
        visit = names([r]) == ["visit"]
        assert {k: v for k, v in r.headers.items() if k.startswith(("openpanel-", "x-", "user-", "content-t"))} == {
            "content-type": "application/json", "openpanel-client-id": CLIENT_ID,
            "openpanel-client-secret": CLIENT_SECRET, "openpanel-sdk-name": "openpanel-async",
            "openpanel-sdk-version": version, "user-agent": "UA/1" if visit else f"openpanel-async/{version}",
            **({"x-client-ip": "198.51.100.7"} if visit else {}),
        }  # fmt: skip


class NotingTransport:
    """Answers 200 (400 to an event named "bad"), noting the thread and loop of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, threading.Thread, asyncio.AbstractEventLoop]] = []

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        await self.aclose("post")
        status = 400 if b'"name":"bad"' in body else 200
        return TransportResponse(status, {}, b'{"message":"nope"}')

    async def aclose(self, what: str = "aclose") -> None:
        self.calls.append((what, threading.current_thread(), asyncio.get_running_loop()))


async def test_transport_and_on_error_run_on_the_delivery_thread() -> None:
    transport, errors = NotingTransport(), []
    op = OpenPanel(
        client_id=CLIENT_ID,
        transport=transport,
        delivery="thread",
        on_error=lambda error: errors.append((error, threading.current_thread())),
    )
    async with op:
        assert op._runner is not None
        thread, loop = runner_thread(op), op._runner.loop
        for name in ("good", "bad", "good"):
            op.track(name)
        assert await op.flush(timeout=5)
    assert (thread.name, thread.daemon) == (THREAD_NAME, True)
    assert thread is not threading.current_thread()
    assert loop is not asyncio.get_running_loop()
    assert transport.calls == [*[("post", thread, loop)] * 3, ("aclose", thread, loop)]
    [(error, called_on)] = errors
    assert isinstance(error, RejectedError)
    assert (error.status, error.reason, called_on) == (400, "rejected", thread)
    stats = op.stats()
    assert (stats.delivered, stats.failed, dict(stats.failed_by_reason)) == (2, 1, {"rejected": 1})
    assert_accounted(stats, closed=True)


async def test_no_sender_task_runs_on_the_callers_loop(server: LocalOpenPanel) -> None:
    server.script(*[Reply(delay=0.1)] * 3)
    async with thread_client(server) as op:
        for i in range(3):
            op.track("slow", {"i": i})
        await until(lambda: server.in_flight == 3)
        assert op.stats().in_flight == 3
        assert sender_tasks(asyncio.all_tasks()) == Counter()
        assert op._runner is not None  # where they do run, the same check finds them
        there = op._runner.call(lambda: sender_tasks(asyncio.all_tasks()))
        assert there["Sender._guard"] == 1
        assert there["Sender._worker"] >= 3
        assert await op.flush(timeout=5)
    assert sorted(r.properties["i"] for r in server.events) == [0, 1, 2]


# --- flush, send ----------------------------------------------------------------------------


async def test_flush_true_when_delivered_false_on_timeout(server: LocalOpenPanel) -> None:
    op = thread_client(server)
    assert await op.flush(timeout=0)  # nothing pending: at once, and no thread for it
    assert op._runner is not None
    assert not op._runner.started
    server.script(Reply(delay=0.2))
    op.track("slow")
    started = time.monotonic()
    assert await op.flush(timeout=0.02) is False
    assert time.monotonic() - started < 0.15
    assert (op.stats().pending, op.stats().delivered) == (1, 0)
    assert await op.flush(timeout=5) is True
    assert (op.stats().pending, op.stats().delivered) == (0, 1)
    op.track("quick")
    assert await op.flush(timeout=5) is True
    await op.aclose()
    assert names(server.events) == ["slow", "quick"]
    assert_accounted(op.stats(), closed=True)


async def test_send_waits_for_room_times_out_and_fails_when_closed(server: LocalOpenPanel) -> None:
    server.script(Reply(delay=0.05), *[Reply(delay=0.005)] * 6, Reply(delay=0.2))
    async with thread_client(server, max_queue_size=1) as op:
        assert op.track("first")
        await op.send(Track(name="second"), timeout=5)
        assert (op.stats().accepted, op.stats().delivered) == (2, 1)  # room came as "first" settled
        sends = [op.send(Track(name="bp", properties={"i": i}), timeout=5) for i in range(5)]
        await asyncio.gather(*sends)
        assert await op.flush(timeout=5)
        assert (op.stats().accepted, op.stats().delivered, op.stats().dropped) == (7, 7, 0)
        assert op.track("slow")
        started = time.monotonic()
        with pytest.raises(SendTimeoutError, match="max_queue_size=1"):
            await op.send(Identify(profile_id="2"), timeout=0.02)
        assert 0.015 <= time.monotonic() - started < 0.15
        waiting = asyncio.ensure_future(op.send(Identify(profile_id="3")))
        await asyncio.sleep(0.01)
        assert not waiting.done()
    with pytest.raises(ClientClosedError):
        await waiting  # released, with an error, when the client closed
    with pytest.raises(ClientClosedError):
        await op.send(Track(name="late"))
    stats = op.stats()
    assert (stats.accepted, stats.delivered, dict(stats.dropped_by_reason)) == (8, 8, {"closed": 2})
    assert names(server.requests) == ["first", "second", *["bp"] * 5, "slow"]
    assert sorted(r.properties["i"] for r in server.requests[2:7]) == [0, 1, 2, 3, 4]
    assert_accounted(stats, closed=True)


# --- aclose -----------------------------------------------------------------------------------


async def test_aclose_drains_stops_the_thread_and_is_idempotent(server: LocalOpenPanel) -> None:
    server.script(*[Reply(delay=0.05)] * 3)
    op = thread_client(server)
    for i in range(3):
        assert op.track("drain", {"i": i})
    thread = runner_thread(op)
    assert thread.is_alive()
    assert op.stats().pending == 3
    await op.aclose()
    await ended(thread)
    await op.aclose()  # idempotent
    assert op.track("late") is False
    assert op.identify("u1") is False
    assert await op.flush(timeout=1)
    assert runner_thread(op) is thread  # nothing started another
    stats = op.stats()
    assert (stats.state, stats.accepted, stats.delivered, stats.failed) == ("closed", 3, 3, 0)
    assert dict(stats.dropped_by_reason) == {"closed": 2}
    assert sorted(r.properties["i"] for r in server.requests) == [0, 1, 2]
    assert_accounted(stats, closed=True)


async def test_aclose_of_a_client_that_never_started(server: LocalOpenPanel) -> None:
    op = thread_client(server)
    await op.aclose()
    runner = op._runner
    assert runner is not None
    assert (runner.started, runner.stopped, runner.thread) == (False, True, None)
    assert op.track("late") is False
    with pytest.raises(ClientClosedError):
        await op.send(Track(name="late"))
    assert await op.flush(timeout=0.1)
    await op.aclose()
    stats = op.stats()
    assert (stats.state, stats.accepted, dict(stats.dropped_by_reason)) == (
        "closed",
        0,
        {"closed": 2},
    )
    assert_accounted(stats, closed=True)
    assert server.requests == []


async def test_cancelled_aclose_still_drains_and_stops_the_thread(server: LocalOpenPanel) -> None:
    server.script(*[Reply(delay=0.1)] * 3)
    op = thread_client(server)
    for i in range(3):
        op.track("drain", {"i": i})
    thread = runner_thread(op)
    await until(lambda: server.in_flight == 3)
    closing = asyncio.create_task(op.aclose())
    await asyncio.sleep(0.01)
    assert not closing.done()
    assert closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await until(lambda: not thread.is_alive())
    stats = op.stats()
    assert (stats.state, stats.accepted, stats.delivered, stats.failed) == ("closed", 3, 3, 0)
    assert sorted(r.properties["i"] for r in server.events) == [0, 1, 2]
    assert_accounted(stats, closed=True)
    await op.aclose()  # already closed: returns at once


async def test_aclose_returns_only_once_the_thread_has_ended(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = DeliveryThread._run

    def slow_to_end(*args: Any) -> None:
        run(*args)
        time.sleep(0.1)  # widens the window; unaided, about 1 aclose() in 4 lands in it

    monkeypatch.setattr(DeliveryThread, "_run", staticmethod(slow_to_end))
    op = thread_client(server)
    op.track("x")
    thread = runner_thread(op)
    try:
        await op.aclose()
        assert not thread.is_alive()
    finally:
        thread.join(1)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
async def test_aclose_racing_another_aclose(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = thread_client(server)
    op.track("x")
    runner, thread, paused, outcome = op._runner, runner_thread(op), threading.Event(), []
    ensure_started = runner.ensure_started  # type: ignore[union-attr]

    def preempted() -> asyncio.AbstractEventLoop:  # a thread switch right after the check
        loop = ensure_started()
        if threading.current_thread().name == "closer":
            paused.set()
            thread.join(5)
        return loop

    async def close_too() -> None:
        try:
            await asyncio.wait_for(op.aclose(), 2)
            outcome.append("closed")
        except BaseException as exc:
            outcome.append(repr(exc))

    monkeypatch.setattr(runner, "ensure_started", preempted)
    closer = threading.Thread(target=asyncio.run, args=(close_too(),), name="closer")
    closer.start()
    await until(paused.is_set)
    await op.aclose()
    await until(lambda: not closer.is_alive())
    gc.collect()
    assert outcome == ["closed"]


# --- retries, lazy start, several loops, configuration ------------------------------------------


async def test_retry_after_503_and_wait_after_429(server: LocalOpenPanel) -> None:
    server.script(Reply(status=503))
    errors: list[DeliveryError] = []
    async with thread_client(server, retry=FAST_RETRY, on_error=errors.append) as op:
        op.track("retried")
        assert await op.flush(timeout=5)
        assert (op.stats().retries, op.stats().delivered) == (1, 1)
        server.script(Reply(status=429, headers={"retry-after": "0.05"}))
        op.track("limited")
        assert await op.flush(timeout=5)
    assert [(r.status, (r.payload or {})["name"]) for r in server.requests] == [
        (503, "retried"), (200, "retried"), (429, "limited"), (200, "limited")
    ]  # fmt: skip
    assert server.requests[3].arrived - server.requests[2].arrived >= 0.05
    stats = op.stats()
    assert (stats.delivered, stats.failed, stats.retries, stats.rate_limited) == (2, 0, 2, 1)
    assert errors == []
    assert_accounted(stats, closed=True)


async def test_track_from_a_thread_without_a_loop_starts_delivery(server: LocalOpenPanel) -> None:
    op = thread_client(server)
    producer = threading.Thread(target=op.track, args=("no_loop",), kwargs={"timestamp": STAMP})
    producer.start()
    producer.join(5)
    assert not producer.is_alive()
    thread = runner_thread(op)
    assert (thread.name, thread.is_alive()) == (THREAD_NAME, True)
    await until(lambda: op.stats().delivered == 1)  # nothing awaits the client meanwhile
    assert [r.payload for r in server.requests] == [
        {"name": "no_loop", "properties": {"__timestamp": STAMP_TEXT}}
    ]
    await op.aclose()
    await ended(thread)
    assert_accounted(op.stats(), closed=True)


async def test_thread_mode_serves_one_event_loop_after_another(server: LocalOpenPanel) -> None:
    async def use(op: OpenPanel, n: int) -> bool:
        assert op.track("from_run", {"n": n})
        await op.send(Identify(profile_id=f"p{n}"), timeout=5)
        return await op.flush(timeout=5)

    async with make_client(server) as looped:  # loop mode refuses to be used from another loop
        with pytest.raises(RuntimeError, match="runs on another event loop"):
            await asyncio.to_thread(asyncio.run, use(looped, 0))
    op = thread_client(server)
    op.track("test_loop")
    assert await op.flush(timeout=5)
    assert await asyncio.to_thread(lambda: [asyncio.run(use(op, n)) for n in (1, 2)]) == [True] * 2
    op.track("back")
    await op.aclose()
    stats = op.stats()
    assert (stats.accepted, stats.delivered, stats.failed, stats.dropped) == (6, 6, 0, 0)
    got = sorted(p.get("name") or p["profileId"] for p in server.payloads())
    assert got == ["back", "from_run", "from_run", "from_run", "p1", "p2", "test_loop"]
    assert_accounted(stats, closed=True)


def test_bad_delivery_configuration() -> None:
    with pytest.raises(ConfigError, match=r"^delivery: must be one of loop, thread$"):
        OpenPanel(client_id=CLIENT_ID, delivery="process")
    with pytest.raises(ConfigError, match=r"^delivery: "):
        SyncOpenPanel(client_id=CLIENT_ID, delivery="loop")


# --- fork ---------------------------------------------------------------------------------------


def _fork_and_use(op: OpenPanel) -> int:
    """Runs in a worker thread; returns the child's exit status."""
    parent_thread = runner_thread(op)

    async def child() -> bool:
        before = op.stats()  # the parent's queue and counters are not the child's
        fresh = (before.accepted, before.pending, before.state) == (0, 0, "new")
        op.track("from_child", {"pid": os.getpid()})
        thread = runner_thread(op)  # the child's own delivery thread
        ok = fresh and thread is not parent_thread and thread.name == THREAD_NAME
        ok = ok and thread.is_alive() and await op.flush(timeout=5)
        await op.aclose()
        thread.join(2)
        return ok and not thread.is_alive() and op.stats().delivered == 1

    return run_in_fork(child)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_thread_client_used_before_fork_works_in_the_child(server: LocalOpenPanel) -> None:
    server.script(Reply(), Reply(delay=0.1))
    async with thread_client(server) as op:
        op.track("parent_before")
        assert await op.flush(timeout=5)
        op.track("parent_pending")  # in flight in the parent when it forks
        thread = runner_thread(op)
        assert await asyncio.get_running_loop().run_in_executor(None, _fork_and_use, op) == 0
        assert runner_thread(op) is thread
        assert thread.is_alive()
        op.track("parent_after")
        assert await op.flush(timeout=5)
    got = sorted(names(server.events))
    assert got == ["from_child", "parent_after", "parent_before", "parent_pending"]
    child = next(r for r in server.events if names([r]) == ["from_child"])
    assert child.properties["pid"] != os.getpid()
    stats = op.stats()
    assert (stats.accepted, stats.delivered) == (3, 3)
    await ended(thread)
    assert_accounted(stats, closed=True)


# --- races and shutdowns found in review ---------------------------------------------------------


async def test_cancelled_aclose_keeps_draining_after_the_callers_loop_ends(
    server: LocalOpenPanel,
) -> None:
    # aclose() cut short by a deadline, then the caller's loop ends (asyncio.run returns,
    # cancelling what is left): the drain on the delivery thread must go on to the end.
    server.script(*[Reply(delay=0.1)] * 5)
    op = thread_client(server, shutdown_timeout=5)

    async def caller() -> None:
        await op.start()
        for i in range(5):
            op.track("drained", {"i": i})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(op.aclose(), 0.02)

    await asyncio.to_thread(asyncio.run, caller())
    thread = runner_thread(op)
    await until(lambda: not thread.is_alive(), timeout=5)
    stats = op.stats()
    assert (stats.delivered, stats.failed, stats.state) == (5, 0, "closed")
    assert sorted(r.properties["i"] for r in server.requests) == [0, 1, 2, 3, 4]
    assert_accounted(stats, closed=True)


def test_sync_close_from_two_threads_at_once() -> None:
    for _ in range(20):
        op = SyncOpenPanel(client_id=CLIENT_ID, transport=EventRecorder())
        op.track("x")
        errors: list[BaseException] = []

        def close(op: SyncOpenPanel = op, errors: list[BaseException] = errors) -> None:
            try:
                op.close()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=close) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert errors == []
        stats = op.stats()
        assert (stats.delivered, stats.state) == (1, "closed")


async def test_close_racing_the_first_event_still_delivers_it(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aclose() finds the thread not started; the first event starts it before aclose()
    # stops it. That event was accepted, so it must be delivered, not stranded.
    op = thread_client(server)
    refuse = op._acc.refuse

    def first_event_sneaks_in(reason: str) -> None:
        thread = threading.Thread(target=op.track, args=("sneaked",))
        thread.start()
        thread.join(5)
        refuse(reason)

    monkeypatch.setattr(op._acc, "refuse", first_event_sneaks_in)
    await op.aclose()
    stats = op.stats()
    assert (stats.accepted, stats.delivered, stats.state) == (1, 1, "closed")
    assert [r.payload["name"] for r in server.requests if r.payload] == ["sneaked"]
    assert_accounted(stats, closed=True)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
async def test_delivery_thread_runs_either_event_loop(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch, loop_kind: str
) -> None:
    # uvloop is used when installed; asyncio's loop otherwise. Both must retry on time
    # (uvloop's millisecond timers may fire a little before the retry is due).
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    monkeypatch.setattr(_thread, "_new_event_loop", factory)
    server.script(
        Reply(status=503), Reply(status=503), Reply(status=429, headers={"retry-after": "0.02"})
    )
    async with thread_client(server, retry=FAST_RETRY) as op:
        op.track("retried")
        assert await op.flush(timeout=5)
        loop_class = type(op._runner.loop).__module__  # type: ignore[union-attr]
        stats = op.stats()
    assert loop_class.startswith(loop_kind)
    assert [r.status for r in server.requests] == [503, 503, 429, 200]
    assert (stats.delivered, stats.retries, stats.rate_limited) == (1, 3, 1)


_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class ContextNotingTransport:
    """Answers 200, noting the request id visible to each request (None: none)."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        self.seen.append(_REQUEST_ID.get(None))
        return TransportResponse(200, {}, b"{}")

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("delivery", ["loop", "thread"])
async def test_delivery_never_runs_in_the_context_of_a_caller(delivery: str) -> None:
    """Context variables of the code that tracks (a request id, a tracing span) must not
    follow the long-lived workers into requests sent for other callers."""
    transport = ContextNotingTransport()
    op = OpenPanel(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        transport=transport,
        delivery=delivery,
    )

    async def handler(request_id: str) -> None:
        _REQUEST_ID.set(request_id)
        for i in range(5):
            assert op.track("handled", {"i": i})
        await asyncio.sleep(0.01)

    async with op:
        await asyncio.gather(*(asyncio.create_task(handler(f"r{n}")) for n in range(4)))
        assert await op.flush(timeout=5)
        with pytest.raises(LookupError):
            _REQUEST_ID.get()  # the test's own context never had one
    assert transport.seen == [None] * 20


class _RequestState:
    """Something a request keeps in a context variable (a span, a session, a big object)."""


_REQUEST_STATE: contextvars.ContextVar[_RequestState] = contextvars.ContextVar("request_state")


async def test_the_sender_keeps_no_callers_context_alive() -> None:
    transport = ContextNotingTransport()
    op = OpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, transport=transport)
    alive: list[weakref.ref[_RequestState]] = []

    async def first_request() -> None:
        state = _RequestState()
        alive.append(weakref.ref(state))
        _REQUEST_STATE.set(state)
        assert op.track("starts the sender")  # lazily, in this request's context

    await asyncio.create_task(first_request())
    async with op:
        assert await op.flush(timeout=5)
        gc.collect()
        # The sender's long-lived tasks (its guardian, its workers) hold no copy of it.
        assert alive[0]() is None
    assert transport.seen == [None]
