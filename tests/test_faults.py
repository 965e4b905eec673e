"""Fault injection: thousands of events through the real client while the server misbehaves.

Scenarios: random 5xx; dropped connections and answers slower than the request timeout;
the server going away and coming back on the same port; a 429 storm, a steady rate limit
and its lifting; 401 for everything; aclose() while the server hangs (or while paused by a
Retry-After); an outage that fills the queue (memory, drops, backoff, resumed delivery); and
random interleavings of calls, server behaviours and a close (hypothesis).

Every event carries a unique key: ``properties.n`` for track and identify, the property
name ``c<n>`` for increment and decrement. After each scenario three books are compared:

* what the caller saw: which calls returned True (accepted) or False (dropped);
* what the client reported: ``stats()`` and the errors passed to ``on_error`` (failed);
* what the server recorded: every request it received, and how it answered.

``_audit`` checks the accounting identity (``accepted == delivered + failed + pending`` with
nothing pending after close), that every event the client counts as delivered was stored by
the server (answered 200), that the server never received an event the client did not
accept, that no failed event was tried more often than its error says, and that nothing was
stored twice unless the scenario makes that legitimate.

Timings are tiny (milliseconds) so that the whole file runs in about 20 seconds.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from openpanel_async import (
    AuthenticationError,
    ClientClosedError,
    DeliveryError,
    OpenPanel,
    RetriesExhaustedError,
    RetryPolicy,
    SendTimeoutError,
    ShutdownError,
    Stats,
    Track,
)
from openpanel_async._limit import QUEUE_HIGH
from openpanel_async.testing import LocalOpenPanel, ReceivedRequest, Reply

from .conftest import CLIENT_ID, CLIENT_SECRET, assert_accounted

pytestmark = pytest.mark.anyio

# Hypothesis keeps a cache in ./.hypothesis by default: not in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "openpanel-async-hypothesis")

LOGGER = "openpanel_async"

# The client's HTTP transports (OpenPanel(http_client=...)): the scenarios where the wire
# misbehaves run with each.
HTTP_CLIENTS = ["aiohttp", "builtin"]

# Milliseconds instead of seconds: a retry scenario takes a fraction of a second.
FAST = RetryPolicy(
    max_attempts=6,
    wait_initial=0.005,
    wait_max=0.05,
    wait_jitter=0.0,
    max_elapsed=10.0,
    max_retry_after=2.0,
)


# --- the books -----------------------------------------------------------------------------------


def event_key(body: bytes) -> int:
    """The unique key of the event a request body (or a DeliveryError.body) carries."""
    envelope = json.loads(body)
    payload = envelope["payload"]
    if envelope["type"] in ("increment", "decrement"):
        return int(payload["property"][1:])
    return int(payload["properties"]["n"])


@dataclass
class Ledger:
    """What the caller tracked (by key) and what ``on_error`` reported."""

    accepted: set[int] = field(default_factory=set)
    refused: set[int] = field(default_factory=set)
    timed_out: set[int] = field(default_factory=set)
    errors: list[DeliveryError] = field(default_factory=list)
    next_key: int = 0

    def on_error(self, error: DeliveryError) -> None:
        self.errors.append(error)

    def _new_key(self) -> int:
        key = self.next_key
        self.next_key += 1
        return key

    def _book(self, key: int, accepted: bool) -> bool:
        (self.accepted if accepted else self.refused).add(key)
        return accepted

    def track(self, op: OpenPanel) -> bool:
        key = self._new_key()
        return self._book(key, op.track("fault", {"n": key}))

    def track_many(self, op: OpenPanel, count: int) -> int:
        return sum(self.track(op) for _ in range(count))

    def profile_event(self, op: OpenPanel, kind: str, profile: str) -> bool:
        key = self._new_key()
        if kind == "identify":
            return self._book(key, op.identify(profile, properties={"n": key}))
        method = op.increment if kind == "increment" else op.decrement
        return self._book(key, method(profile, f"c{key}"))

    async def send(self, op: OpenPanel, timeout: float) -> str:
        """``await op.send()``: waits for room; neither accepted nor dropped on a timeout."""
        key = self._new_key()
        try:
            await op.send(Track(name="fault", properties={"n": key}), timeout=timeout)
        except SendTimeoutError:
            self.timed_out.add(key)
            return "timed out"
        except ClientClosedError:
            self.refused.add(key)
            return "refused"
        self.accepted.add(key)
        return "accepted"

    def failed(self) -> dict[int, DeliveryError]:
        keys = Counter(event_key(error.body) for error in self.errors)
        twice = [key for key, count in keys.items() if count > 1]
        assert not twice, f"on_error reported events more than once: {twice[:10]}"
        return {event_key(error.body): error for error in self.errors}

    def check(self, stats: Stats) -> None:
        """The identity, and the caller's own count of accepted and dropped events."""
        assert_accounted(stats)
        assert stats.accepted == len(self.accepted)
        assert stats.dropped == len(self.refused)
        assert stats.pending >= 0
        assert stats.failed == len(self.errors)


@dataclass(frozen=True)
class Audit:
    stats: Stats
    delivered: set[int]  # accepted and not failed: what the client counts as delivered
    failed: dict[int, DeliveryError]
    stored: Counter[int]  # key -> how many requests for it the server answered 200
    requests: list[ReceivedRequest]

    @property
    def total_stored(self) -> int:
        return sum(self.stored.values())

    def statuses(self) -> Counter[int | None]:
        return Counter(r.status for r in self.requests)


def _audit(
    op: OpenPanel,
    ledger: Ledger,
    requests: Sequence[ReceivedRequest],
    *,
    may_be_stored: Callable[[DeliveryError], bool] = lambda error: False,
    duplicates: bool = False,
) -> Audit:
    """Compare the books after ``aclose()`` with every request the server(s) received.

    ``may_be_stored`` says which failed events the server may nevertheless have stored: one
    whose request was answered after the client had stopped listening (its request timeout
    or its shutdown deadline passed) is stored without the client knowing. ``duplicates``
    allows one event to be stored more than once, for the same reason: a retry after a
    timeout repeats a request the server already stored (at-least-once delivery).
    """
    stats = op.stats()
    assert_accounted(stats, closed=True)
    ledger.check(stats)
    failed = ledger.failed()
    assert set(failed) <= ledger.accepted, "on_error reported an event that was not accepted"
    assert dict(Counter(e.reason for e in failed.values())) == dict(stats.failed_by_reason)
    delivered = ledger.accepted - set(failed)
    assert stats.delivered == len(delivered)

    seen = {event_key(r.body) for r in requests}
    unaccepted = seen - ledger.accepted
    assert not unaccepted, (
        f"the server received events the client refused: {sorted(unaccepted)[:10]}"
    )
    received = Counter(event_key(r.body) for r in requests)
    for key, error in failed.items():
        # One request per attempt at most (a refused connection or a request cancelled
        # before it was read never reaches the server's handler).
        assert received[key] <= error.attempts, (received[key], error)
    stored = Counter(event_key(r.body) for r in requests if r.status == 200)
    lost = delivered - set(stored)
    assert not lost, f"counted as delivered, never stored: {sorted(lost)[:10]}"
    unconfirmed = set(stored) - delivered  # stored, yet failed at the client
    unexpected = sorted(key for key in unconfirmed if not may_be_stored(failed[key]))
    assert not unexpected, f"stored although failed: {[failed[k] for k in unexpected[:5]]}"
    if not duplicates:
        twice = sorted(key for key, count in stored.items() if count > 1)
        assert not twice, f"stored more than once: {twice[:10]}"
    return Audit(stats, delivered, failed, stored, list(requests))


# --- helpers -------------------------------------------------------------------------------------


def _client(api_url: str, ledger: Ledger, **options: Any) -> OpenPanel:
    config: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "api_url": api_url,
        "retry": FAST,
        # Generous: the exact request counts below assume no answer arrives after its
        # timeout, which a loaded CI machine could otherwise cause. Tests about timeouts
        # pass their own.
        "request_timeout": 5.0,
        "shutdown_timeout": 2.0,
        "on_error": ledger.on_error,
    }
    config.update(options)
    return OpenPanel(**config)


async def _until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    """Poll until ``predicate()``; return when it became true (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.002)
    return time.monotonic()


async def _free_port() -> int:
    """A port nothing listens on (a server was there a moment ago)."""
    probe = LocalOpenPanel()
    await probe.start()
    port = probe.port
    await probe.stop()
    return port


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


# --- 1. random server errors ---------------------------------------------------------------------


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_thirty_percent_server_errors_every_event_accounted_for(http_client: str) -> None:
    ledger = Ledger()
    async with LocalOpenPanel(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, fail_rate=0.3, seed=20260401
    ) as server:
        op = _client(server.url, ledger, max_concurrency=32, http_client=http_client)
        async with op:
            for _ in range(20):
                assert ledger.track_many(op, 100) == 100
                ledger.check(op.stats())
                await asyncio.sleep(0.005)
            assert await op.flush(timeout=20)
    audit = _audit(op, ledger, server.requests)
    statuses = audit.statuses()
    errors = sum(statuses[s] for s in (500, 502, 503))
    assert set(statuses) <= {200, 500, 502, 503}
    assert min(statuses[500], statuses[502], statuses[503]) > 0
    # Every request got a 200 or a 5xx; every 5xx was retried, unless it was the last straw.
    assert len(audit.requests) == audit.stats.delivered + errors
    assert 0.26 < errors / len(audit.requests) < 0.34
    exhausted = audit.stats.failed_by_reason.get("retries_exhausted", 0)
    assert audit.stats.retries == errors - exhausted
    assert audit.stats.failed == exhausted <= 10  # 0.3**6 of 2,000 events is ~1.5
    for error in audit.failed.values():
        assert isinstance(error, RetriesExhaustedError)
        assert error.attempts == FAST.max_attempts
        assert error.status in (500, 502, 503)
    assert audit.stats.delivered + audit.stats.failed == 2000


# --- 2. dropped connections and responses slower than the request timeout ------------------------


async def test_dropped_connections_and_late_responses(server: LocalOpenPanel) -> None:
    rng = random.Random(7)
    # Long enough that an ordinary answer never misses it on a loaded 2-core CI machine:
    # the exact counts below assume only the scripted late answers time out.
    timeout = 0.3
    plan: list[Reply] = []
    for _ in range(1800):
        roll = rng.random()
        if roll < 0.12:  # the connection dies mid-request, after the body was read
            plan.append(Reply(drop=True, delay=rng.choice((0.0, 0.005, 0.03))))
        elif roll < 0.2:  # stored and answered 200, but after the client gave up
            plan.append(Reply(delay=2 * timeout))
        else:
            plan.append(Reply())
    server.script(*plan)
    ledger = Ledger()
    retry = RetryPolicy(
        max_attempts=8, wait_initial=0.005, wait_max=0.05, wait_jitter=0, max_elapsed=10
    )
    op = _client(server.url, ledger, max_concurrency=32, request_timeout=timeout, retry=retry)
    async with op:
        for _ in range(15):
            assert ledger.track_many(op, 100) == 100
            await asyncio.sleep(0.01)
        assert await op.flush(timeout=20)
    # Late answers are still being written by the server; wait for them.
    await _until(lambda: server.in_flight == 0, what="late answers")
    audit = _audit(
        op,
        ledger,
        server.requests,
        # An event can time out on every attempt while one of them was stored anyway; and
        # a retry after a timeout stores the event a second time. Both are the price of
        # at-least-once delivery, and both only come from the late answers.
        may_be_stored=lambda e: e.reason == "retries_exhausted",
        duplicates=True,
    )
    consumed = plan[: len(audit.requests)]
    drops = sum(reply.drop for reply in consumed)
    late = sum(reply.delay == 2 * timeout for reply in consumed)
    assert len(audit.requests) >= 1500
    assert drops > 100
    assert late > 80
    statuses = audit.statuses()
    assert set(statuses) <= {200, None}
    assert statuses[None] == drops
    # Exactly one 200 per delivered event, plus one the client never saw per late answer.
    assert audit.total_stored == audit.stats.delivered + late
    exhausted = audit.stats.failed_by_reason.get("retries_exhausted", 0)
    assert audit.stats.retries == drops + late - exhausted
    assert audit.stats.failed == exhausted
    for error in audit.failed.values():
        assert error.status is None
        assert error.cause is not None


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_a_request_is_repeated_only_as_a_counted_retry(
    server: LocalOpenPanel, http_client: str
) -> None:
    # The first event leaves a keep-alive connection to reuse. The server reads the second
    # event's request, then closes that connection without a word: it may have stored the
    # event first (a crash, a proxy's timeout), so a repetition is a retry like any other.
    server.script(Reply(), Reply(drop=True))
    ledger = Ledger()
    op = _client(server.url, ledger, max_concurrency=1, http_client=http_client)
    async with op:
        for _ in range(2):
            assert ledger.track(op)
            assert await op.flush(timeout=5)
    audit = _audit(op, ledger, server.requests)
    assert [r.status for r in server.requests] == [200, None, 200]
    assert audit.stats.retries == 1


# --- 3. the server goes away and comes back ------------------------------------------------------


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_server_goes_away_and_comes_back_on_the_same_port(http_client: str) -> None:
    retry = RetryPolicy(
        max_attempts=1000, wait_initial=0.005, wait_max=0.05, wait_jitter=0, max_elapsed=10
    )
    ledger = Ledger()
    first = LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    await first.start()
    second = LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, port=first.port)
    op = _client(first.url, ledger, max_concurrency=16, retry=retry, http_client=http_client)
    keys_during_outage: set[int] = set()
    try:
        async with op:

            async def produce(seconds: float, into: set[int] | None = None) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    before = ledger.next_key
                    assert ledger.track_many(op, 5) == 5
                    if into is not None:
                        into.update(range(before, ledger.next_key))
                    await asyncio.sleep(0.005)

            await produce(0.25)
            await first.stop()
            down = op.stats()
            await produce(0.2, keys_during_outage)
            outage = op.stats()
            assert outage.state == "running"
            assert outage.pending > 0
            assert outage.retries > down.retries
            assert outage.delivered - down.delivered <= down.in_flight
            await second.start()
            back = time.monotonic()
            await produce(0.25)
            assert await op.flush(timeout=5)
    finally:
        await first.stop()
        await second.stop()
    audit = _audit(op, ledger, [*first.requests, *second.requests])
    assert audit.stats.failed == 0
    retried = [r.arrived for r in second.events if event_key(r.body) in keys_during_outage]
    assert len(retried) == len(keys_during_outage)
    # The events that waited out the outage went by themselves once the server was back:
    # the first within about one backoff cap (0.05 s), all of them soon after.
    assert min(retried) - back < 0.1
    assert max(retried) - back < 1.0


# --- 4. a 429 storm, then a steady rate limit, then none -----------------------------------------


def _window_starts(requests: Sequence[ReceivedRequest], window: float) -> list[float]:
    """When the server's fixed windows opened: at the first request after one expired."""
    starts: list[float] = []
    for r in sorted(requests, key=lambda r: r.arrived):
        if not starts or r.arrived - starts[-1] >= window:
            starts.append(r.arrived)
    return starts


def _paced_rate(requests: Sequence[ReceivedRequest], window: float) -> tuple[float, int]:
    """The rate of 200s over whole fixed windows, rebuilt the way the server opens them.

    A well-paced client spends each window's budget in a burst at its start; a window
    opened late is time lost. So the rate achieved is the 200s of the windows between the
    second window's opening and the last one's, over that time. (The first window is left
    out: the client learns the limit in it. Counting 200s over a fixed interval would not
    see late windows at all: their bursts would still fall inside the interval.)
    """
    starts = _window_starts(requests, window)
    assert len(starts) >= 3, starts
    ok = sum(r.status == 200 for r in requests if starts[1] <= r.arrived < starts[-1])
    return ok / (starts[-1] - starts[1]), len(starts) - 2


def _first_busy_slice(
    arrivals: Sequence[float], start: float, end: float, rate: float
) -> float | None:
    """When the first 0.25 s slice within [start, end) begins that holds ``rate``/s of 200s."""
    step, slide = 0.25, 0.05
    t = start
    while t + step <= end:
        if sum(t <= a < t + step for a in arrivals) >= rate * step:
            return t
        t += slide
    return None


# A LocalOpenPanel in a process of its own, driven by JSON lines on stdin (one answer line
# each). Sharing the client's event loop (or, in a thread, its GIL), the server would see
# each new window's first request late by as much as the client's own burst of work (a few
# % of R with hundreds of requests in flight): the harness's fault, not the client's.
_SERVER_PROCESS = """
import asyncio, json, sys
from openpanel_async.testing import LocalOpenPanel, Reply

async def main():
    async with LocalOpenPanel(client_id=sys.argv[1], client_secret=sys.argv[2]) as server:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print(json.dumps(server.port), flush=True)
        while line := await reader.readline():
            command = json.loads(line)
            answer = None
            if command["op"] == "rate_limit":
                limit = command["value"]
                server.rate_limit = None if limit is None else (limit[0], limit[1])
            elif command["op"] == "script":
                server.script(*[Reply(**reply) for reply in command["replies"]])
            elif command["op"] == "requests":
                answer = [[r.arrived, r.status, r.body.decode()] for r in server.requests]
            print(json.dumps(answer), flush=True)

asyncio.run(main())
"""


class ServerProcess:
    """``LocalOpenPanel`` in a child process: its clock (time.monotonic) is the same."""

    url: str
    _process: asyncio.subprocess.Process
    _stdin: asyncio.StreamWriter
    _stdout: asyncio.StreamReader

    async def __aenter__(self) -> ServerProcess:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SERVER_PROCESS,
            CLIENT_ID,
            CLIENT_SECRET,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,  # the list of requests comes back as one line
        )
        if self._process.stdin is None or self._process.stdout is None:
            raise RuntimeError("no pipes to the server process")
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        self.url = f"http://127.0.0.1:{await self._answer()}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stdin.close()  # the server stops at the end of its input
        try:
            async with asyncio.timeout(5):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()

    async def _answer(self) -> Any:
        line = await self._stdout.readline()
        assert line, "the server process died"
        return json.loads(line)

    async def command(self, op: str, **arguments: Any) -> Any:
        self._stdin.write(json.dumps({"op": op, **arguments}).encode() + b"\n")
        await self._stdin.drain()
        return await self._answer()

    async def requests(self) -> list[ReceivedRequest]:
        return [
            ReceivedRequest("/track", {}, body.encode(), arrived, status, None, None)
            for arrived, status, body in await self.command("requests")
        ]


class _Producer:
    """Keeps the client backlogged (~8,000 events/s offered) and samples its stats()."""

    def __init__(self, op: OpenPanel, ledger: Ledger) -> None:
        self.op, self.ledger = op, ledger
        self.samples: list[tuple[float, Stats]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Producer:
        self._tasks = [asyncio.create_task(self._produce()), asyncio.create_task(self._sample())]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _produce(self) -> None:
        while not self._stop.is_set():
            self.ledger.track_many(self.op, 40)
            await asyncio.sleep(0.005)

    async def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.op.stats()))
            await asyncio.sleep(0.01)

    def between(self, start: float, end: float) -> list[Stats]:
        return [stats for t, stats in self.samples if start <= t < end]


async def test_429_storm_then_limit_lifted_full_speed_returns(server: LocalOpenPanel) -> None:
    rate, window = 300, 0.5
    # With the server on the client's event loop, arrival times tell when requests were
    # sent only while few are in flight: 32, not the default.
    concurrency = 32
    ledger = Ledger()
    op = _client(
        server.url, ledger, max_concurrency=concurrency, max_queue_size=1000, request_timeout=1.0
    )
    async with op:
        async with _Producer(op, ledger) as producer:
            # A storm of 60 429s with Retry-After: 0.1 (concurrency halves at each burst).
            storm = 60
            server.script(*[Reply(status=429, headers={"retry-after": "0.1"})] * storm)
            await _until(lambda: op.stats().rate_limited >= storm, what="the storm")
            recovered = await _until(
                lambda: op.stats().concurrency > QUEUE_HIGH, timeout=2, what="AIMD growth"
            )
            # A steady limiter for a while, then none.
            server.rate_limit = (int(rate * window), window)
            await asyncio.sleep(0.75)
            server.rate_limit = None
            lifted = time.monotonic()
            await asyncio.sleep(1.1)
            end = time.monotonic()
        assert await op.flush(timeout=10)
    audit = _audit(op, ledger, server.requests)
    assert audit.stats.failed == 0  # the 429s too: waited out, then delivered

    # Each 429 paused all sending for the 0.1 s asked. Requests already on their way may
    # still arrive just after it; none may be sent later and before the pause ends.
    limited = [r.arrived for r in server.requests if r.status == 429][:storm]
    arrivals = sorted(r.arrived for r in server.requests)
    for t in limited:
        during = [a for a in arrivals if t + 0.04 < a < t + 0.095]
        assert not during, f"{len(during)} requests sent during a Retry-After pause"
    storm_end = max(limited)
    storm_samples = producer.between(0, storm_end + 0.1)
    assert any(s.paused_for > 0 for s in storm_samples)
    assert min(s.concurrency for s in storm_samples) < concurrency
    assert recovered - storm_end < 1.5
    # Full speed (several times R) within a second of the limit being lifted.
    ok = [r.arrived for r in server.requests if lifted <= r.arrived < end and r.status == 200]
    fast = _first_busy_slice(ok, lifted, end, 3 * rate)
    assert fast is not None, f"{len(ok) / (end - lifted):.0f}/s on average"
    assert fast - lifted <= 1.0
    # The 429 cuts are undone. Queueing may hold the limit below 32 (this server shares the
    # client's loop, so more requests in flight only wait longer), but never below what
    # leaves QUEUE_HIGH requests queued.
    assert all(
        s.concurrency > QUEUE_HIGH and s.paused_for == 0 for s in producer.between(end - 0.2, end)
    )


async def test_steady_rate_limit_is_paced_to_r() -> None:
    """The pacing goal: >= 90% of R delivered, < 5% of requests answered 429.

    The goal is checked last and reported with pytest.xfail() when missed, with this run's
    numbers. Against the library of 2026-11-26 ~12:00 (default max_concurrency 256) 18 runs
    measured 86-93% of R (mean 89%; 8 runs at or above 90%) and 0-9% of requests answered
    429, all of them in the first window; both goals were met in 4 runs of 18. A result
    straddling the threshold can be neither a strict xfail (the suite would fail whenever a
    run lands above it) nor a plain assertion (it would fail most runs). What pacing must
    always do is asserted outright. With adaptive concurrency (fewer requests in flight
    when the limit appears) 7 runs measured 97-99% of R and no 429 at all: the goal was
    met every time. The xfail stays, as the report should that change.
    """
    rate, window = 300, 0.5  # R = 300 requests per second, in fixed windows of 0.5 s
    ledger = Ledger()
    # The defaults users get (max_concurrency, and wait_jitter: up to a tenth of any wait
    # the server asks for), with the small backoff waits of this file.
    retry = RetryPolicy(max_attempts=6, wait_initial=0.005, wait_max=0.05, max_elapsed=30)
    # What the test runner holds (pytest, hypothesis, earlier tests) is not the client's:
    # keep it out of the garbage collector's scans, whose pauses of tens of ms would show
    # as windows opened late.
    gc.collect()
    gc.freeze()
    try:
        async with ServerProcess() as server:
            op = _client(server.url, ledger, max_queue_size=1000, request_timeout=1.0, retry=retry)
            async with op:
                async with _Producer(op, ledger) as producer:
                    # The limit appears while the client runs at full speed (as many in
                    # flight as the server answers without a queue, and QUEUE_HIGH more).
                    await _until(lambda: op.stats().in_flight >= QUEUE_HIGH, what="load")
                    start = time.monotonic()
                    await server.command("rate_limit", value=[int(rate * window), window])
                    # Long enough that learning the limit (the first window's overflow,
                    # up to the requests already in flight) is a small part of the run.
                    await asyncio.sleep(8.0)
                    end = time.monotonic()
                    await server.command("rate_limit", value=None)
                assert await op.flush(timeout=10)
            requests = await server.requests()
    finally:
        gc.unfreeze()
    audit = _audit(op, ledger, requests)
    assert audit.stats.failed == 0
    # The most requests the client allowed in flight at once during the run.
    concurrency = max(s.concurrency for s in producer.between(start, end))
    run = [r for r in requests if start <= r.arrived < end]
    achieved, windows = _paced_rate(run, window)
    learned = _window_starts(run, window)[1]  # the end of the first window
    overflow = sum(r.status == 429 for r in run if r.arrived < learned)
    steady = [r for r in run if r.arrived >= learned]
    share_429 = sum(r.status == 429 for r in run) / len(run)
    steady_429 = sum(r.status == 429 for r in steady) / len(steady)
    report = (
        f"{achieved:.0f}/s over {windows} windows = {achieved / rate:.1%} of R={rate}/s; "
        f"429s: {share_429:.1%} of {len(run)} requests, {overflow} of them in the first "
        f"window (limit up to {concurrency} in flight, budget {int(rate * window)} per window)"
    )
    print(report)
    # Always: the client pauses for the budget, learning the limit costs at most the
    # requests already in flight, and once it knows the limit it stays under it.
    assert any(s.paused_for > 0 for s in producer.between(start, end)), report
    assert overflow <= concurrency, report
    assert steady_429 < 0.05, report
    # The goal.
    if achieved < 0.9 * rate or share_429 >= 0.05:
        pytest.xfail(f"GOAL MISSED (needed >= 90% of R and < 5% 429s): {report}")


# --- 5. 401 for everything -----------------------------------------------------------------------


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_401_for_everything_logs_once_and_retries_nothing(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture, http_client: str
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server.response_delay = 0.005
    ledger = Ledger()
    concurrency = 8
    op = _client(
        server.url,
        ledger,
        client_secret="not-the-secret",
        max_concurrency=concurrency,
        http_client=http_client,
    )
    async with op:
        assert ledger.track_many(op, 1000) == 1000
        assert await op.flush(timeout=5)
        stats = op.stats()
        assert ledger.track(op) is False
        after = op.stats()
    audit = _audit(op, ledger, server.requests)
    assert stats.state == after.state == audit.stats.state == "unauthorized"
    assert (stats.delivered, stats.failed, stats.retries) == (0, 1000, 0)
    assert dict(stats.failed_by_reason) == {"unauthorized": 1000}
    assert dict(after.dropped_by_reason) == {"unauthorized": 1}
    assert all(isinstance(e, AuthenticationError) for e in ledger.errors)
    # Only the requests already in flight went out, each once.
    assert 1 <= len(server.requests) <= concurrency
    assert {r.status for r in server.requests} == {401}
    assert len({r.body for r in server.requests}) == len(server.requests)
    [line] = _records(caplog, "refused the credentials")
    assert line.levelno == logging.ERROR
    assert "Ingestion: Invalid cors or secret" in line.getMessage()
    assert "not-the-secret" not in caplog.text
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r for r in loud if r is not line and "closed:" not in r.getMessage()] == []


# Found by this suite (the in-flight events were retried after the 401, 15 requests in
# all); fixed in the library since.
async def test_nothing_is_sent_after_the_credentials_were_refused(
    server: LocalOpenPanel,
) -> None:
    concurrency = 8
    # The first request is refused at once; the 7 others are in flight, and then get a 503.
    server.script(Reply(status=401), *[Reply(status=503, delay=0.03)] * (concurrency - 1))
    ledger = Ledger()
    op = _client(server.url, ledger, client_secret="not-the-secret", max_concurrency=concurrency)
    async with op:
        assert ledger.track_many(op, 100) == 100
        assert await op.flush(timeout=5)
    audit = _audit(op, ledger, server.requests)
    assert dict(audit.stats.failed_by_reason) == {"unauthorized": 100}
    assert len(server.requests) == concurrency, Counter(r.status for r in server.requests)


# Found by this suite (send() raised ClientClosedError without counting a drop); fixed in
# the library since.
async def test_send_after_closing_a_never_started_client_counts_the_drop() -> None:
    op = OpenPanel(client_id=CLIENT_ID, api_url="http://127.0.0.1:9")  # never contacted
    await op.aclose()
    assert op.track("after") is False
    with pytest.raises(ClientClosedError):
        await op.send(Track(name="after"))
    assert dict(op.stats().dropped_by_reason) == {"closed": 2}


# --- 6. aclose() while the server hangs ----------------------------------------------------------


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_aclose_while_the_server_hangs_fails_the_rest_on_time(
    server: LocalOpenPanel, caplog: pytest.LogCaptureFixture, http_client: str
) -> None:
    concurrency, answered, total = 16, 300, 1000
    server.script(*[Reply()] * answered, *[Reply(hang=True)] * total)
    ledger = Ledger()
    shutdown = 0.3
    op = _client(
        server.url,
        ledger,
        max_concurrency=concurrency,
        # Exactly `concurrency` requests hang: the limit must not adapt to the round trips.
        adaptive_concurrency=False,
        request_timeout=5.0,
        shutdown_timeout=shutdown,
        http_client=http_client,
    )
    await op.start()
    assert ledger.track_many(op, total) == total
    await _until(
        lambda: op.stats().delivered == answered and op.stats().in_flight == concurrency,
        what="the server hanging",
    )
    started = time.monotonic()
    await op.aclose()
    elapsed = time.monotonic() - started
    assert shutdown <= elapsed < shutdown + 0.25
    await server.stop()  # ends the hung handlers, so that their requests are recorded
    audit = _audit(op, ledger, server.requests)
    assert audit.stats.state == "closed"
    assert audit.stats.delivered == answered
    assert dict(audit.stats.failed_by_reason) == {"shutdown": total - answered}
    assert all(isinstance(e, ShutdownError) for e in ledger.errors)
    assert audit.statuses() == {200: answered, None: concurrency}
    [summary] = _records(caplog, "closed:")
    assert f"{total - answered} failed ({total - answered} at shutdown)" in summary.getMessage()
    assert op.track("late") is False


async def test_aclose_while_paused_by_a_long_retry_after(server: LocalOpenPanel) -> None:
    events = 30  # all sent at once: the concurrency limit starts at START (64)
    server.script(*[Reply(status=429, headers={"retry-after": "3600"})] * events)
    ledger = Ledger()
    op = _client(server.url, ledger, shutdown_timeout=0.2)  # max_retry_after: 2 s
    await op.start()
    assert ledger.track_many(op, events) == events
    await _until(lambda: op.stats().rate_limited == events, what="the 429s")
    assert op.stats().paused_for > 1.5
    started = time.monotonic()
    await op.aclose()
    assert time.monotonic() - started < 0.45
    audit = _audit(op, ledger, server.requests)
    assert dict(audit.stats.failed_by_reason) == {"shutdown": events}
    assert audit.statuses() == {429: events}


# --- an outage: bounded memory, counted drops, capped backoff, resumed delivery ------------------


async def test_outage_memory_is_bounded_by_the_queue_and_delivery_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    port = await _free_port()
    queue, total, chunk = 1000, 100_000, 5000
    retry = RetryPolicy(
        max_attempts=100_000, wait_initial=0.005, wait_max=0.05, wait_jitter=0, max_elapsed=60
    )
    errors: list[DeliveryError] = []
    op = OpenPanel(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        api_url=f"http://127.0.0.1:{port}",
        max_queue_size=queue,
        max_concurrency=16,
        request_timeout=0.2,
        shutdown_timeout=2.0,
        retry=retry,
        on_error=errors.append,
    )
    accepted: list[int] = []  # not a set of all 100,000 keys: it would dominate the measure
    dropped = 0
    growth: list[int] = []
    async with op:
        # Objects that exist now are not ours to measure, and need not be scanned again by
        # every garbage collection while tracemalloc slows allocations down.
        gc.collect()
        gc.freeze()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for start in range(0, total, chunk):
                for n in range(start, start + chunk):
                    if op.track("outage", {"n": n}):
                        accepted.append(n)
                    else:
                        dropped += 1
                await asyncio.sleep(0.001)  # the sender keeps retrying meanwhile
                if start in (chunk, total - chunk):  # after 10,000 events, and at the end
                    gc.collect()
                    growth.append(tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
            gc.unfreeze()
            gc.collect()  # now, rather than as a pause in the middle of the next test
        outage = op.stats()
        server = LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, port=port)
        async with server:
            back = time.monotonic()
            assert await op.flush(timeout=5)
    print(f"memory growth {growth} bytes: {growth[-1] / queue:.0f} B per queued event")
    assert outage.state == "running"
    assert outage.retries > 0  # it kept trying
    assert (outage.accepted, outage.pending) == (queue, queue)
    assert (outage.delivered, outage.failed) == (0, 0)
    assert len(accepted) == queue
    assert dropped == total - queue
    assert dict(outage.dropped_by_reason) == {"queue_full": total - queue}
    # Bounded by the queue: a few hundred bytes per queued event (plus a fixed allowance for
    # the connection attempts in progress), and flat while 90,000 more events were dropped.
    assert growth[-1] < queue * 500 + 256 * 1024, growth
    assert growth[-1] - growth[0] < 64 * 1024, growth
    # Drops are reported, at most once per interval (10 s: once in this test).
    [report] = _records(caplog, "events dropped")
    assert "queue_full" in report.getMessage()
    # Delivery resumed by itself, within about one backoff cap (0.05 s).
    assert server.requests[0].arrived - back < 0.2
    stats = op.stats()
    assert_accounted(stats, closed=True)
    assert (stats.delivered, stats.failed) == (queue, 0)
    assert errors == []
    assert sorted(event_key(r.body) for r in server.events) == accepted


async def test_retries_back_off_to_their_cap(server: LocalOpenPanel) -> None:
    # 16 events: 160 capped waits, so that their median is within about 5 ms of where it
    # should be (with 8, it missed the bounds below about once in fifty runs).
    events, attempts = 16, 16
    cap, initial = 0.1, 0.005  # the ceiling doubles: 0.005, 0.01, ..., 0.08, then 0.1
    retry = RetryPolicy(
        max_attempts=attempts, wait_initial=initial, wait_max=cap, wait_jitter=0, max_elapsed=10
    )
    # Every connection is cut: as unreachable as an API gets while still being observable.
    server.script(*[Reply(drop=True)] * (events * attempts))
    ledger = Ledger()
    op = _client(server.url, ledger, retry=retry, max_concurrency=events)
    async with op:
        assert ledger.track_many(op, events) == events
        assert await op.flush(timeout=5)
    audit = _audit(op, ledger, server.requests)
    assert dict(audit.stats.failed_by_reason) == {"retries_exhausted": events}
    assert all(e.attempts == attempts for e in ledger.errors)
    by_key: dict[int, list[float]] = {}
    for r in audit.requests:
        by_key.setdefault(event_key(r.body), []).append(r.arrived)
    assert sorted(len(times) for times in by_key.values()) == [attempts] * events
    # gaps[k]: the time between attempt k and k + 1: the backoff (full jitter: uniform up to
    # min(cap, initial * 2 ** (k - 1))) plus the time to fail and reconnect, 5 to 20 ms on
    # a busy machine. Hence medians, quantiles and differences.
    gaps: dict[int, list[float]] = {}
    for times in by_key.values():
        times.sort()
        for attempt, (a, b) in enumerate(itertools.pairwise(times), start=1):
            gaps.setdefault(attempt, []).append(b - a)
    capped = sorted(g for k, gs in gaps.items() if initial * 2 ** (k - 1) >= cap for g in gs)
    early = statistics.median(gaps[1] + gaps[2])  # ceilings 0.005 and 0.01
    median = statistics.median(capped)
    p95 = capped[int(0.95 * len(capped))]
    report = f"early {early:.4f}; capped: median {median:.4f}, p95 {p95:.4f}, max {capped[-1]:.4f}"
    # It grows: the capped waits are longer than the first ones by about cap / 2...
    assert median - early > 0.25 * cap, report
    # ...and spread over [0, cap] (uniform: median cap / 2), reaching the cap, not beyond.
    assert 0.35 * cap < median < 0.8 * cap, report
    assert capped[-1] > 0.8 * cap, report
    # Not beyond: the next doubling would be 2 x cap; allow for a loaded machine's latency.
    assert p95 < 1.5 * cap, report


# --- 7. random interleavings (hypothesis) --------------------------------------------------------


@dataclass(frozen=True)
class Step:
    kind: str
    count: int = 1
    seconds: float = 0.0
    profile: str = "p1"
    reply: Reply | None = None


_TIMEOUT = 0.2  # the request timeout in the interleavings; LATE answers after it
_LATE = Reply(delay=_TIMEOUT + 0.05)
_REPLIES = st.sampled_from(
    [
        Reply(status=200),
        Reply(status=200, headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "0.02"}),
        Reply(status=202, body={"bot": {"name": "bot"}}),
        Reply(status=400),
        Reply(status=401),
        Reply(status=404),  # "Profile not found": spaced retries for increment/decrement
        Reply(status=429, headers={"retry-after": "0.01"}),
        Reply(
            status=429,
            headers={
                "x-ratelimit-limit": "4",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-reset": "0.015",
            },
        ),
        Reply(status=429),  # no header: backoff
        Reply(status=500),
        Reply(status=503, body="Internal server error"),
        Reply(status=503, delay=0.01),
        Reply(drop=True),
        Reply(drop=True, delay=0.01),
        Reply(delay=0.01),
        _LATE,
    ]
)
_PROFILES = st.sampled_from(["p1", "p2"])
_STEPS = st.lists(
    st.one_of(
        st.builds(Step, kind=st.just("track"), count=st.integers(1, 25)),
        st.builds(
            Step, kind=st.sampled_from(["identify", "increment", "decrement"]), profile=_PROFILES
        ),
        st.builds(Step, kind=st.just("send"), seconds=st.sampled_from([0.0, 0.02])),
        st.builds(Step, kind=st.just("flush"), seconds=st.sampled_from([0.0, 0.01, 0.05])),
        st.builds(Step, kind=st.just("script"), reply=_REPLIES, count=st.integers(1, 6)),
        st.builds(Step, kind=st.just("sleep"), seconds=st.sampled_from([0.0, 0.005, 0.02])),
        st.builds(Step, kind=st.just("close")),
    ),
    max_size=20,
)


@settings(
    # The same 40 examples on every run; for a longer, random hunt:
    # FAULTS_EXAMPLES=2000 pytest tests/test_faults.py -k interleavings
    max_examples=int(os.environ.get("FAULTS_EXAMPLES", "40")),
    derandomize="FAULTS_EXAMPLES" not in os.environ,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=_STEPS, concurrency=st.sampled_from([1, 3, 8]), queue=st.sampled_from([8, 64]))
async def test_random_interleavings_keep_the_books(
    steps: list[Step], concurrency: int, queue: int
) -> None:
    ledger = Ledger()
    closed = False
    async with LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as server:
        op = _client(
            server.url,
            ledger,
            max_concurrency=concurrency,
            max_queue_size=queue,
            request_timeout=_TIMEOUT,
            shutdown_timeout=0.2,
            retry=RetryPolicy(
                max_attempts=4, wait_initial=0.002, wait_max=0.02, wait_jitter=0, max_elapsed=5
            ),
        )
        try:
            for step in [*steps, Step("close")]:
                before = op.stats()
                # track() and friends never wait, so nothing settles during a burst of them:
                # exactly the room left in the queue is taken; none once closed or refused.
                accepting = before.state in ("new", "running")
                room = queue - before.pending if accepting else 0
                if step.kind == "track":
                    assert ledger.track_many(op, step.count) == min(step.count, room)
                elif step.kind in ("identify", "increment", "decrement"):
                    assert ledger.profile_event(op, step.kind, step.profile) is (room > 0)
                elif step.kind == "send":
                    outcome = await ledger.send(op, timeout=step.seconds)
                    if not accepting:
                        assert outcome == "refused"
                    elif room > 0:
                        assert outcome == "accepted"
                elif step.kind == "flush":
                    done = await op.flush(timeout=step.seconds)
                    if done:  # nothing was tracked while we waited: everything settled
                        assert op.stats().pending == 0
                    if closed:
                        assert done
                elif step.kind == "script":
                    assert step.reply is not None
                    server.script(*[step.reply] * step.count)
                elif step.kind == "sleep":
                    await asyncio.sleep(step.seconds)
                else:
                    await op.aclose()
                    closed = True
                stats = op.stats()
                ledger.check(stats)
                assert stats.in_flight <= concurrency
                if closed:
                    assert stats.pending == stats.in_flight == 0
        finally:
            await op.aclose()
        # Answers the client stopped waiting for (after its request timeout or at its
        # shutdown deadline) are still being written: let them finish.
        await _until(lambda: server.in_flight == 0, timeout=2, what="server idle")
    stats = op.stats()
    assert stats.state in ("closed", "unauthorized")
    late = any(step.reply == _LATE for step in steps)
    _audit(
        op,
        ledger,
        server.requests,
        # An event on the wire when the shutdown deadline passed may have been stored. With
        # late answers, any event that was sent may have been stored before it failed (for
        # whatever reason, a 401 included), and a retry may have stored it twice.
        may_be_stored=lambda e: e.reason == "shutdown" or (late and e.attempts > 0),
        duplicates=late,
    )
