"""Delivery against a misbehaving local server: retries, rate limits, deadlines, failures."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Iterator

import pytest

from openpanel_async import (
    AuthenticationError,
    DeliveryError,
    DroppedByServerError,
    Increment,
    RejectedError,
    RetriesExhaustedError,
    RetryPolicy,
    ShutdownError,
)
from openpanel_async._transport import AiohttpTransport
from openpanel_async.testing import LocalOpenPanel, Reply

from .conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    FAST_RETRY,
    HTTP_CLIENT,
    assert_accounted,
    make_client,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=["aiohttp", "builtin"])
def http_client(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every delivery scenario, with each HTTP client the library offers."""
    HTTP_CLIENT["name"] = request.param
    yield request.param
    HTTP_CLIENT["name"] = "aiohttp"


async def test_concurrency_reaches_but_never_exceeds_max(server: LocalOpenPanel) -> None:
    server.response_delay = 0.05
    async with make_client(server, max_concurrency=8) as op:
        for i in range(48):
            op.track("slow", {"i": i})
        await asyncio.sleep(0.02)
        assert op.stats().in_flight == 8
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert server.peak_in_flight == 8
    assert stats.delivered == 48
    assert stats.concurrency == 8


async def test_worker_pool_shrinks_when_idle(server: LocalOpenPanel) -> None:
    server.response_delay = 0.02
    async with make_client(server, max_concurrency=16, idle_timeout=0.05) as op:
        for _ in range(64):
            op.track("burst")
        assert await op.flush(timeout=5)
        assert server.peak_in_flight == 16
        await asyncio.sleep(0.2)
        # Idle workers exited: no task of ours is left running between bursts.
        assert not [t for t in asyncio.all_tasks() if "_worker" in repr(t.get_coro())]
        op.track("again")
        assert await op.flush(timeout=5)
    assert len(server.events) == 65


async def test_server_errors_then_success_delivered_once(server: LocalOpenPanel) -> None:
    server.script(
        Reply(status=503),
        Reply(status=500, body="Internal server error"),
        Reply(status=502, body=b"\xff\xfe not utf-8"),
    )
    errors: list[DeliveryError] = []
    async with make_client(server, on_error=errors.append) as op:
        op.track("flaky")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert [r.status for r in server.requests] == [503, 500, 502, 200]
    assert len({r.body for r in server.requests}) == 1
    assert (stats.delivered, stats.failed, stats.retries) == (1, 0, 3)
    assert errors == []


async def test_timeouts_and_dropped_connections_are_retried(server: LocalOpenPanel) -> None:
    # The timeout leaves room for a slow connect on a busy machine: a request that timed
    # out before reaching the server would shift the script by one (and add a retry).
    server.script(Reply(drop=True), Reply(delay=2.0), Reply(status=408))
    async with make_client(server, request_timeout=0.3) as op:
        started = time.monotonic()
        op.track("unlucky")
        assert await op.flush(timeout=5)
        elapsed = time.monotonic() - started
        stats = op.stats()
    assert stats.delivered == 1
    assert stats.retries == 3
    assert elapsed < 1.5  # the 2 s answer was not waited for
    assert [r.status for r in server.requests][-1] == 200


async def test_retries_exhausted_reports_every_detail(server: LocalOpenPanel) -> None:
    server.script(*[Reply(status=503, body={"message": "try later"})] * 4)
    errors: list[DeliveryError] = []
    async with make_client(server, on_error=errors.append) as op:
        op.track("doomed")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert len(server.requests) == FAST_RETRY.max_attempts == 4
    assert (stats.delivered, stats.failed) == (0, 1)
    assert dict(stats.failed_by_reason) == {"retries_exhausted": 1}
    [error] = errors
    assert isinstance(error, RetriesExhaustedError)
    assert (error.status, error.server_message, error.attempts) == (503, "try later", 4)
    assert error.reason == "retries_exhausted"
    assert error.event_type == "track"
    assert error.event.name == "doomed"  # type: ignore[union-attr]
    assert "4 attempts" in str(error)


async def test_network_failure_reports_the_cause() -> None:
    errors: list[DeliveryError] = []
    # Nothing listens on this port: every attempt is refused.
    async with LocalOpenPanel() as srv:
        url = srv.url
    async with make_client(LocalOpenPanel(), api_url=url, on_error=errors.append) as op:
        op.track("nobody home")
        assert await op.flush(timeout=5)
    [error] = errors
    assert isinstance(error, RetriesExhaustedError)
    assert error.status is None
    assert error.cause is not None
    assert error.attempts == 4


@pytest.mark.parametrize("status", [400, 404, 413, 415, 422])
async def test_client_errors_fail_without_retry(server: LocalOpenPanel, status: int) -> None:
    server.script(Reply(status=status, body={"status": status, "message": f"nope {status}"}))
    errors: list[DeliveryError] = []
    async with make_client(server, on_error=errors.append) as op:
        op.track("refused")
        op.track("fine")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert len(server.requests) == 2
    assert (stats.delivered, stats.failed, stats.retries) == (1, 1, 0)
    [error] = errors
    assert isinstance(error, RejectedError)
    assert (error.status, error.server_message, error.attempts) == (status, f"nope {status}", 1)


async def test_a_redirect_is_reported_as_such_and_never_followed(server: LocalOpenPanel) -> None:
    # Typically http:// answered with a redirect to https://: the secret must not follow.
    server.script(Reply(status=302, body=b"", headers={"location": "https://elsewhere/"}))
    errors: list[DeliveryError] = []
    async with make_client(server, on_error=errors.append) as op:
        op.track("moved")
        assert await op.flush(timeout=5)
    [error] = errors
    assert str(error) == (
        "the server rejected the track event (302); redirects are not followed: check api_url"
    )
    assert len(server.requests) == 1


async def test_real_validation_error_from_server_is_reported(server: LocalOpenPanel) -> None:
    # An event our validation cannot see: a scripted 400 with the server's real message.
    server.script(
        Reply(status=400, body={"status": 400, "error": "Error", "message": "body/payload/name x"})
    )
    errors: list[DeliveryError] = []
    async with make_client(server, on_error=errors.append) as op:
        op.track("a")
        await op.flush(timeout=5)
    assert errors[0].server_message == "body/payload/name x"


async def test_unauthorized_stops_sending_and_logs_once(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture
) -> None:
    server.response_delay = 0.01
    errors: list[DeliveryError] = []
    caplog.set_level(logging.WARNING, logger="openpanel_async")
    async with make_client(
        server, client_secret="wrong", max_concurrency=2, on_error=errors.append
    ) as op:
        for i in range(50):
            op.track("x", {"i": i})
        assert await op.flush(timeout=5)
        stats = op.stats()
        assert op.track("after") is False
        after = op.stats()
    assert stats.state == "unauthorized"
    assert stats.failed == 50
    assert dict(stats.failed_by_reason) == {"unauthorized": 50}
    # Only the requests already in flight went out; nothing was retried.
    assert len(server.requests) <= 2
    assert all(isinstance(e, AuthenticationError) for e in errors)
    assert len(errors) == 50
    assert errors[0].server_message == "Ingestion: Invalid cors or secret"
    assert dict(after.dropped_by_reason) == {"unauthorized": 1}
    auth_lines = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert len(auth_lines) == 1
    assert auth_lines[0].levelno == logging.ERROR
    assert "Ingestion: Invalid cors or secret" in auth_lines[0].getMessage()


async def test_bot_drop_is_counted_not_retried(server: LocalOpenPanel) -> None:
    errors: list[DeliveryError] = []
    async with make_client(server, client_secret=None, on_error=errors.append) as op:
        server.client_secret = None
        op.track("crawl", user_agent="Googlebot/2.1 (+http://www.google.com/bot.html)")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert [r.status for r in server.requests] == [202]
    assert dict(stats.failed_by_reason) == {"bot": 1}
    assert isinstance(errors[0], DroppedByServerError)


async def test_duplicate_event_text_body_counts_as_delivered(server: LocalOpenPanel) -> None:
    server.script(Reply(status=200, body="Duplicate event"))
    async with make_client(server) as op:
        op.track("twice")
        assert await op.flush(timeout=5)
        assert op.stats().delivered == 1


async def test_redirects_are_not_followed(server: LocalOpenPanel) -> None:
    async with LocalOpenPanel() as elsewhere:
        server.script(Reply(status=307, headers={"location": elsewhere.url + "/track"}))
        errors: list[DeliveryError] = []
        async with make_client(server, on_error=errors.append) as op:
            op.track("moved")
            assert await op.flush(timeout=5)
        assert elsewhere.requests == []  # the secret never travelled
    assert isinstance(errors[0], RejectedError)
    assert errors[0].status == 307


async def test_429_retry_after_pauses_all_requests(server: LocalOpenPanel) -> None:
    server.script(Reply(status=429, headers={"retry-after": "0.3"}))
    async with make_client(server, max_concurrency=4) as op:
        op.track("first")
        await server.wait_for_requests(1)
        limited_at = server.requests[0].arrived
        await asyncio.sleep(0.01)
        paused = op.stats().paused_for
        assert 0.2 < paused <= 0.3
        for i in range(5):
            op.track("later", {"i": i})
        assert await op.flush(timeout=5)
        stats = op.stats()
    later = server.requests[1:]
    assert len(later) == 6
    assert all(r.status == 200 for r in later)
    assert min(r.arrived for r in later) - limited_at >= 0.3
    assert (stats.rate_limited, stats.delivered, stats.failed) == (1, 6, 0)


async def test_429_http_date_and_reset_header_fallback(server: LocalOpenPanel) -> None:
    server.script(
        Reply(status=429, headers={"x-ratelimit-reset": "0.2"}),
        Reply(status=429, body="slow down"),  # no header: backoff
    )
    async with make_client(server) as op:
        op.track("a")
        assert await op.flush(timeout=5)
        stats = op.stats()
    arrivals = [r.arrived for r in server.requests]
    assert arrivals[1] - arrivals[0] >= 0.2
    assert (stats.rate_limited, stats.delivered) == (2, 1)


async def test_429s_do_not_use_up_attempts_but_max_elapsed_bounds_them(
    server: LocalOpenPanel,
) -> None:
    server.script(*[Reply(status=429, headers={"retry-after": "0.01"})] * 6)
    async with make_client(server) as op:
        op.track("patient")
        assert await op.flush(timeout=5)
        assert op.stats().delivered == 1  # 6 rate limits > max_attempts=4, still delivered
    server.reset()
    server.script(*[Reply(status=429, headers={"retry-after": "0.05"})] * 50)
    errors: list[DeliveryError] = []
    policy = RetryPolicy(wait_initial=0.01, wait_max=0.02, wait_jitter=0, max_elapsed=0.2)
    async with make_client(server, retry=policy, on_error=errors.append) as op:
        op.track("impatient")
        assert await op.flush(timeout=5)
    assert isinstance(errors[0], RetriesExhaustedError)
    assert errors[0].status == 429
    assert 3 <= len(server.requests) <= 6


async def test_retry_after_is_capped_by_max_retry_after(server: LocalOpenPanel) -> None:
    server.script(Reply(status=429, headers={"retry-after": "3600"}))
    policy = RetryPolicy(wait_initial=0.01, wait_max=0.02, wait_jitter=0, max_retry_after=0.1)
    async with make_client(server, retry=policy) as op:
        started = time.monotonic()
        op.track("capped")
        assert await op.flush(timeout=5)
    assert 0.1 <= time.monotonic() - started < 1.0


async def test_remaining_zero_pauses_before_the_next_request(server: LocalOpenPanel) -> None:
    server.script(
        Reply(status=200, headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "0.25"})
    )
    async with make_client(server, max_concurrency=1) as op:
        op.track("one")
        op.track("two")
        assert await op.flush(timeout=5)
        stats = op.stats()
    first, second = server.requests
    assert second.arrived - first.arrived >= 0.25
    assert stats.rate_limited == 0
    assert stats.delivered == 2


async def test_flush_times_out_when_server_hangs(server: LocalOpenPanel) -> None:
    server.script(Reply(hang=True))
    async with make_client(server, shutdown_timeout=0.1) as op:
        op.track("stuck")
        started = time.monotonic()
        assert await op.flush(timeout=0.1) is False
        assert 0.1 <= time.monotonic() - started < 0.5
        assert op.stats().pending == 1


async def test_aclose_drains_pending_events(server: LocalOpenPanel) -> None:
    server.response_delay = 0.005
    op = make_client(server, max_concurrency=4)
    async with op:
        for i in range(100):
            op.track("drain", {"i": i})
    stats = op.stats()
    assert stats.delivered == 100
    assert stats.state == "closed"
    assert_accounted(stats, closed=True)


async def test_aclose_respects_deadline_when_server_hangs(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture
) -> None:
    server.script(*[Reply(hang=True)] * 10)
    errors: list[DeliveryError] = []
    op = make_client(server, max_concurrency=4, shutdown_timeout=0.2, on_error=errors.append)
    await op.start()
    for i in range(10):
        op.track("hung", {"i": i})
    await asyncio.sleep(0.02)
    started = time.monotonic()
    await op.aclose()
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.6
    stats = op.stats()
    assert stats.failed == 10
    assert dict(stats.failed_by_reason) == {"shutdown": 10}
    assert len(errors) == 10
    assert all(isinstance(e, ShutdownError) for e in errors)
    # The 4 on the wire may have been stored; the 6 behind them were never sent.
    texts = sorted(str(e) for e in errors)
    base = "the client closed before the event was delivered (shutdown_timeout=0.2s)"
    assert (
        texts
        == [f"not sent: {base}"] * 6
        + [f"{base} after 1 attempt; the server may have stored it"] * 4
    )
    assert_accounted(stats, closed=True)
    [summary] = [r for r in caplog.records if "closed:" in r.getMessage()]
    assert summary.levelno == logging.WARNING
    assert "10 failed (10 at shutdown)" in summary.getMessage()


async def test_cancelling_the_owner_closes_cleanly(server: LocalOpenPanel) -> None:
    server.script(*[Reply(hang=True)] * 3)
    entered = asyncio.Event()

    async def owner() -> None:
        async with make_client(server, shutdown_timeout=0.1) as op:
            for _ in range(3):
                op.track("owned")
            entered.set()
            await asyncio.sleep(10)

    before = set(asyncio.all_tasks())
    task = asyncio.ensure_future(owner())
    await entered.wait()
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    leftover = set(asyncio.all_tasks()) - before - {asyncio.current_task()}
    # The server's own handlers may still hang; none of the client's tasks may remain.
    assert not [t for t in leftover if "Sender" in t.get_coro().__qualname__]  # type: ignore[union-attr]
    assert task.cancelled()


async def test_profile_operations_keep_call_order(server: LocalOpenPanel) -> None:
    server.script(Reply(delay=0.05))  # the first one is slow; the rest must wait for it
    async with make_client(server, max_concurrency=8) as op:
        op.identify("p1", first_name="A")
        for i in range(1, 6):
            op.increment("p1", "n", i)
        op.increment("p2", "n", 1)  # another profile does not wait
        assert await op.flush(timeout=5)
    p1 = [r for r in server.requests if (r.payload or {}).get("profileId") == "p1"]
    assert [r.type for r in p1] == ["identify"] + ["increment"] * 5
    assert [(r.payload or {}).get("value") for r in p1[1:]] == [1, 2, 3, 4, 5]
    p2 = next(r for r in server.requests if (r.payload or {}).get("profileId") == "p2")
    assert p2.arrived < p1[1].arrived


async def test_profile_not_found_is_retried_then_failed(server: LocalOpenPanel) -> None:
    # The profile's identify is still being processed: two 404s, then it is found.
    not_found = Reply(status=404, body={"status": 404, "message": "Profile not found"})
    server.script(not_found, not_found)
    server.profiles.add("new")
    async with make_client(server) as op:
        op.send_nowait(Increment(profile_id="new", property="visits", value=1))
        assert await op.flush(timeout=5)
        assert op.stats().delivered == 1
    server.reset()
    server.profiles.clear()  # and one that never was: the server answers 404 by itself
    errors: list[DeliveryError] = []
    policy = RetryPolicy(max_attempts=10, wait_initial=0.01, wait_max=0.02, wait_jitter=0)
    async with make_client(server, retry=policy, on_error=errors.append) as op:
        op.decrement("new", "visits")
        assert await op.flush(timeout=5)
    assert len(server.requests) == 4  # a few spaced tries, not the whole budget
    assert isinstance(errors[0], RetriesExhaustedError)
    assert errors[0].server_message == "Profile not found"


async def test_the_local_server_knows_only_profiles_an_identify_stored(
    server: LocalOpenPanel,
) -> None:
    # As the real server: increment/decrement of a profile nothing identified is a 404.
    errors: list[DeliveryError] = []
    policy = RetryPolicy(wait_initial=0.001, wait_max=0.002)
    async with make_client(server, retry=policy, on_error=errors.append) as op:
        op.increment("stranger", "visits")
        op.identify(7, first_name="Ann")
        op.increment("7", "visits")  # 7 and "7" are one profile
        op.decrement(7.0, "credits")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert (stats.delivered, stats.failed) == (3, 1)
    assert errors[0].server_message == "Profile not found"
    assert server.profiles == {"7"}
    server.reset()
    server.strict_profiles = False
    async with make_client(server) as op:
        op.increment("anyone", "visits")
        assert await op.flush(timeout=5)
        assert op.stats().delivered == 1


async def test_on_error_that_raises_does_not_break_delivery(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(error: DeliveryError) -> None:
        raise RuntimeError("callback bug")

    server.script(Reply(status=400), Reply(status=400))
    async with make_client(server, on_error=explode) as op:
        op.track("a")
        op.track("b")
        op.track("c")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert (stats.delivered, stats.failed) == (1, 2)
    assert len([r for r in caplog.records if "on_error callback raised" in r.getMessage()]) == 1


async def test_a_bug_in_the_engine_fails_pending_events_loudly(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openpanel_async import _sender

    def broken(*args: object) -> object:
        raise RuntimeError("simulated bug")

    server.script(Reply(status=500))
    monkeypatch.setattr(_sender, "classify", broken)
    errors: list[DeliveryError] = []
    async with make_client(server, max_concurrency=1, on_error=errors.append) as op:
        for _ in range(5):
            op.track("victim")
        assert await op.flush(timeout=5)
        stats = op.stats()
        assert op.track("refused") is False
    assert stats.state == "broken"
    assert dict(stats.failed_by_reason) == {"internal": 5}
    assert all(e.reason == "internal" for e in errors)
    assert any("delivery engine failed" in r.getMessage() for r in caplog.records)
    assert_accounted(op.stats(), closed=True)


async def test_credentials_in_client_id_are_checked(server: LocalOpenPanel) -> None:
    errors: list[DeliveryError] = []
    other = "00000000-0000-4000-8000-000000000000"
    async with make_client(server, client_id=other, on_error=errors.append) as op:
        op.track("x")
        await op.flush(timeout=5)
    assert errors[0].status == 401
    assert server.requests[0].headers["openpanel-client-id"] == other


async def test_unauthorized_while_closing_stops_at_once(server: LocalOpenPanel) -> None:
    errors: list[DeliveryError] = []
    op = make_client(server, client_secret="wrong", max_concurrency=4, on_error=errors.append)
    async with op:
        for i in range(300):
            op.track("x", {"i": i})
        # Leaving the block drains: the first 401 must stop the drain, not 300 requests.
    stats = op.stats()
    assert len(server.requests) <= 4
    assert stats.failed == 300
    assert dict(stats.failed_by_reason) == {"unauthorized": 300}
    assert stats.state == "unauthorized"
    assert_accounted(stats, closed=True)


async def test_local_server_port_in_use_leaves_nothing_behind(server: LocalOpenPanel) -> None:
    clash = LocalOpenPanel(port=server.port)
    with pytest.raises(OSError, match="address already in use"):
        await clash.start()
    await clash.stop()  # harmless after a failed start


async def test_pacing_with_whole_second_reset_headers() -> None:
    # The real server rounds x-ratelimit-reset up to whole seconds. The client must still
    # resume when the window ends, not up to a second later. Two 1-second windows of 30
    # requests, each taking ~0.45 s to use up (2 in flight, 30 ms answers): the last answer
    # of the first window says "reset: 1" at ~0.45 s although the window ends at 1.0 s.
    async with LocalOpenPanel(rate_limit=(30, 1.0), whole_seconds=True) as srv:
        srv.response_delay = 0.03
        async with make_client(srv, max_concurrency=2) as op:
            for i in range(60):
                op.track("paced", {"i": i})
            started = time.monotonic()
            assert await op.flush(timeout=5)
            elapsed = time.monotonic() - started
    statuses = [r.status for r in srv.requests]
    assert statuses.count(200) == 60
    assert statuses.count(429) <= 2
    # ~1.0 s + ~0.45 s for the second window; trusting the rounded header alone: ~1.9 s.
    assert 1.0 <= elapsed < 1.7


async def test_budget_pacing_never_stalls_when_answers_fail(server: LocalOpenPanel) -> None:
    # A window of 2 opens; both of its requests fail on the network, so no answer ever
    # reports the new budget. Sending must go on, not wait for an answer forever.
    limits = {"x-ratelimit-limit": "2", "x-ratelimit-remaining": "1", "x-ratelimit-reset": "0.1"}
    server.script(Reply(status=200, headers=limits), Reply(drop=True), Reply(drop=True))
    async with make_client(server, max_concurrency=2) as op:
        op.track("e1")
        assert await op.flush(timeout=2)
        await asyncio.sleep(0.15)  # that window is over; the next one is assumed to hold 2
        op.track("e2")
        op.track("e3")
        assert await op.flush(timeout=3)
        stats = op.stats()
    assert (stats.delivered, stats.failed) == (3, 0)


async def test_a_huge_reset_is_capped_by_max_retry_after(server: LocalOpenPanel) -> None:
    limits = {"x-ratelimit-limit": "5", "x-ratelimit-remaining": "0", "x-ratelimit-reset": "86000"}
    server.script(Reply(status=200, headers=limits))
    policy = RetryPolicy(wait_initial=0.01, wait_max=0.02, wait_jitter=0, max_retry_after=0.2)
    async with make_client(server, retry=policy, max_concurrency=1) as op:
        op.track("one")
        assert await op.flush(timeout=2)
        assert op.stats().paused_for <= 0.2
        op.track("two")
        assert await op.flush(timeout=2)
    assert [r.status for r in server.requests] == [200, 200]


@pytest.mark.parametrize(
    "reply",
    [
        # msgspec raises RecursionError for a body nested this deep.
        Reply(status=503, body=b"[" * 5000),
        # An absurd zone offset: parsing the date raises OverflowError.
        Reply(status=429, headers={"retry-after": "Mon, 01 Jan 2026 00:00:00 -99999999999999999"}),
    ],
    ids=["nested-body", "overflowing-date"],
)
async def test_an_answer_that_breaks_a_parser_is_only_a_failed_request(
    server: LocalOpenPanel, reply: Reply
) -> None:
    # "Never let a body crash the sender" (the wire contract): one odd answer used to
    # break the whole client, failing every pending event and dropping every new one.
    server.script(reply)
    async with make_client(server) as op:
        for n in range(5):
            assert op.track("e", {"n": n})
        assert await op.flush(timeout=5)
        assert op.track("later")
        assert await op.flush(timeout=5)
        stats = op.stats()
    assert stats.state == "running"
    assert (stats.delivered, stats.failed, stats.dropped) == (6, 0, 0)
    assert stats.retries == 1


async def test_a_429_asking_for_no_wait_still_backs_off(server: LocalOpenPanel) -> None:
    # "Retry-After: 0" (or a date in the past, from a proxy whose clock is behind ours)
    # asks for no wait at all: sent again at once, the event would be retried back to back
    # (429s use up no attempts) until max_elapsed. Its own backoff is the least it waits.
    retry = RetryPolicy(max_attempts=4, wait_initial=0.02, wait_max=0.08, max_elapsed=30.0)
    server.script(*[Reply(status=429, headers={"retry-after": "0"})] * 1000)
    async with make_client(server, retry=retry, shutdown_timeout=0.0) as op:
        assert op.track("limited")
        await asyncio.sleep(0.5)
        sent = len(server.requests)
    # Backoff ceilings 0.02, 0.04, 0.08, 0.08, ... (waits drawn below them): about 0.04 s
    # apart on average, so some 12 in 0.5 s; back to back, it was hundreds.
    assert 3 <= sent <= 40, sent


async def test_a_short_retry_after_is_honoured_as_asked_every_time(
    server: LocalOpenPanel,
) -> None:
    # Only a wait below the first backoff step gets the backoff as its floor: a real
    # Retry-After, however often repeated, is what the event waits (plus a tenth at most).
    retry = RetryPolicy(wait_initial=0.04, wait_max=2.0, max_elapsed=30.0)
    server.script(*[Reply(status=429, headers={"retry-after": "0.05"})] * 6)
    async with make_client(server, retry=retry) as op:
        assert op.track("limited")
        assert await op.flush(timeout=10)
    arrivals = [r.arrived for r in server.requests]
    assert len(arrivals) == 7
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.05 - 0.005, gaps
    assert max(gaps) < 0.2, gaps  # a growing backoff would reach 0.64 and 1.28 s


async def test_a_server_that_never_answers_gets_fewer_requests_from_the_start() -> None:
    # No answer ever came, so there is no measured round trip to compare with; a round of
    # timeouts (as many as the limit) still halves the limit, down to the probe's 4.
    async with LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as server:
        server.script(*[Reply(hang=True)] * 10_000)
        retry = RetryPolicy(max_attempts=100, wait_initial=0.001, wait_max=0.002)
        async with make_client(
            server, max_concurrency=64, request_timeout=0.05, retry=retry, shutdown_timeout=0.0
        ) as op:
            for n in range(200):
                assert op.track("hangs", {"n": n})
            async with asyncio.timeout(5):
                while op.stats().concurrency > 4:
                    await asyncio.sleep(0.01)
            timed_out = len(server.requests)
            await asyncio.sleep(0.3)
            late = len(server.requests) - timed_out
            assert op.stats().in_flight <= 4
    # Each round of 64, 32, 16, 8 took one request timeout; now 4 per 0.05 s at most.
    assert timed_out <= 64 + 32 + 16 + 8 + 4 + 16, timed_out
    assert late <= 4 * (0.3 / 0.05 + 2), late


async def test_no_network_error_handed_to_the_application_carries_the_secret() -> None:
    # A malformed answer: aiohttp's ClientResponseError keeps the request's headers (the
    # secret among them) in request_info; DeliveryError.cause must not lead to it.
    async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nBroken header line without colon\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(malformed, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    errors: list[DeliveryError] = []
    retry = RetryPolicy(max_attempts=2, wait_initial=0.001, wait_max=0.002)
    try:
        async with make_client(
            LocalOpenPanel(),
            api_url=f"http://127.0.0.1:{port}",
            retry=retry,
            on_error=errors.append,
        ) as op:
            op.track("x")
            assert await op.flush(timeout=5)
    finally:
        server.close()
    [error] = errors
    assert "header" in str(error.cause)  # it still says what happened
    seen: list[object] = []
    todo: list[object] = [error]
    while todo:  # everything reachable through causes, contexts and attributes
        item = todo.pop()
        if any(item is s for s in seen) or len(seen) > 10_000:
            continue
        seen.append(item)
        assert CLIENT_SECRET not in repr(item)
        if isinstance(item, BaseException):
            todo += [item.__cause__, item.__context__, *vars(item).values()]


async def test_aiohttp_request_timeouts_are_exact() -> None:
    # aiohttp rounds a timeout of ceil_threshold (5 s) or more up to the next whole second
    # of the loop's clock, so request_timeout=5 could take almost 6 s per attempt.
    transport = AiohttpTransport(max_connections=1, request_timeout=5.0)
    try:
        assert transport._session.timeout.total == 5.0  # (white box)
        assert transport._session.timeout.ceil_threshold == math.inf
    finally:
        await transport.aclose()
