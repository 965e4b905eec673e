"""The adaptive concurrency limit: its rules on synthetic round trips, then the real client.

The unit tests feed ``ConcurrencyLimit`` answers with chosen round trips and counts in flight
and check every move of the limit. The end-to-end tests run the client against the local
server: a saturated server (``capacity=1``: round trips grow with the requests in flight)
must get few requests at once, a slow but unsaturated one (a WAN round trip) many.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import pytest

from openpanel_async import ConfigError, OpenPanel, SendTimeoutError, Track
from openpanel_async._accumulator import SEND_WAIT_GRACE
from openpanel_async._limit import (
    BATCHED,
    FLOOR_WINDOW,
    LOOP_SATURATED,
    MIN_ROUND,
    PROBE_LIMIT,
    QUEUE_HIGH,
    QUEUE_LOW,
    RTT_TOLERANCE,
    START,
    TIMEOUT_WEIGHT,
    ConcurrencyLimit,
)
from openpanel_async.testing import LocalOpenPanel, Reply

from .conftest import CLIENT_ID, CLIENT_SECRET

pytestmark = pytest.mark.anyio


class Feed:
    """Answers for one ConcurrencyLimit on a synthetic clock."""

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self.limit = limit
        self.now = 0.0
        self.count = 0  # answers fed so far

    def answers(
        self, count: int, rtt: float, in_flight: int | None = None, *, wanted: bool = True
    ) -> list[int]:
        """``count`` answers, ``in_flight`` each (default: the limit); the limit after each."""
        values = []
        for _ in range(count):
            self.now += rtt / max(1, self.limit.value)
            n = self.limit.value if in_flight is None else in_flight
            self.count += 1
            self.limit.answered(rtt, n, self.now, wanted_more=wanted)
            values.append(self.limit.value)
        return values

    def rounds(self, count: int, rtt: float | Callable[[int], float]) -> list[int]:
        """``count`` rounds of ``limit`` answers each (``rtt``: fixed, or of the limit)."""
        values = []
        for _ in range(count):
            n = self.limit.value
            self.answers(n, rtt(n) if callable(rtt) else rtt)
            values.append(self.limit.value)
        return values

    def past_probe(self, rtt: float) -> None:
        """Answer the probe the first answer starts, at ``rtt`` (no queue)."""
        self.answers(1, rtt)
        assert self.limit.probing
        while self.limit.probing:
            self.answers(1, rtt, PROBE_LIMIT)


def test_starts_at_start_or_the_maximum() -> None:
    assert ConcurrencyLimit(256).value == START
    assert ConcurrencyLimit(10).value == 10
    assert ConcurrencyLimit(256, adaptive=False).value == 256


def test_the_first_answer_probes_the_floor_then_the_limit_returns() -> None:
    limit = ConcurrencyLimit(256)
    limit.answered(0.050, 1, now=1.0, wanted_more=True)
    assert limit.probing
    assert limit.value == PROBE_LIMIT
    # Answers to requests sent before the probe began (now - rtt < 1.0) drain first and do
    # not count, however many there are.
    for i in range(3 * START):
        limit.answered(0.060, START, now=1.0 + 0.050 * i / (3 * START), wanted_more=True)
    assert limit.probing
    # MIN_ROUND answers to requests sent during the probe end it.
    for i in range(MIN_ROUND):
        assert limit.probing
        limit.answered(0.040, PROBE_LIMIT, now=1.1 + 0.01 * i, wanted_more=True)
    assert not limit.probing
    assert limit.value == START
    assert limit.floor == 0.040


def test_a_probe_with_few_requests_in_flight_ends_after_min_round_fresh_answers() -> None:
    limit = ConcurrencyLimit(256)
    limit.answered(0.3, 1, now=1.0, wanted_more=False)
    assert limit.probing
    # Demand needs only 2 in flight: nothing from before the probe is left to drain.
    for i in range(MIN_ROUND):
        limit.answered(0.3, 2, now=1.3 + 0.3 * i, wanted_more=False)
    assert not limit.probing


def test_a_429_during_a_probe_halves_the_limit_not_the_probe() -> None:
    limit = ConcurrencyLimit(256)
    limit.answered(0.050, 1, now=1.0, wanted_more=True)
    assert limit.value == PROBE_LIMIT
    limit.rate_limited(now=1.01, paused_until=1.02)
    assert limit.value == min(PROBE_LIMIT, START // 2)
    for i in range(MIN_ROUND):
        limit.answered(0.050, PROBE_LIMIT, now=1.1 + 0.01 * i, wanted_more=True)
    assert not limit.probing
    assert limit.value == START // 2


def test_a_long_round_trip_with_no_queue_grows_to_the_maximum_while_events_wait() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.050)
    # A busy loop adds a little to every round trip; under RTT_TOLERANCE x the floor that
    # is no queue, however many requests are in flight. The limit doubles per round.
    assert feed.rounds(3, 0.050 * 1.8) == [128, 256, 256]


def test_no_growth_without_waiting_events_or_while_the_limit_is_not_reached() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.050)
    feed.answers(3 * START, 0.050, wanted=False)
    assert limit.value == START
    # Events wait, but fewer requests than the limit are in flight: the limit is not what
    # holds them back (they just arrived).
    feed.answers(3 * START, 0.050, in_flight=START // 2)
    assert limit.value == START


def test_a_queue_cuts_the_limit_at_most_by_half_per_round_down_to_queue_high() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.001)
    # A saturated path: the round trip is proportional to the requests in flight.
    values = feed.rounds(8, lambda n: 0.001 * n)
    # served = n * floor / rtt = 1, so the target is 1 + QUEUE_HIGH; halving on the way.
    assert values[:2] == [START // 2, START // 4]
    assert values[-1] == 1 + QUEUE_HIGH
    assert min(values) == 1 + QUEUE_HIGH  # never below: queueing alone cannot starve it


def test_a_slow_round_within_tolerance_is_no_queue() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.050)
    feed.answers(limit.value, 0.050 * (RTT_TOLERANCE - 0.1), wanted=False)
    assert limit.value == START
    feed.answers(limit.value, 0.050 * (RTT_TOLERANCE + 0.5), wanted=False)
    assert limit.value < START


def test_it_settles_where_queue_high_requests_wait() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.010)
    # Round trips 2.5x the floor whatever the count: n * (1 - 1 / 2.5) wait. The cuts go
    # to ceil(n / 2.5) + QUEUE_HIGH: 64 -> 34 -> 22 -> 17 -> 15 -> 14, where 14 - 6 = 8
    # wait, and there it stays.
    assert feed.rounds(8, 0.025) == [34, 22, 17, 15, 14, 14, 14, 14]
    # Slowed, but fewer than QUEUE_HIGH waiting (14 * (1 - 10 / 22) = 7.6): the limit
    # grows to what would leave QUEUE_HIGH waiting, ceil(14 * 10 / 22) + 8 = 15.
    feed.answers(limit.value, 0.022)
    assert limit.value == 15


def test_round_trips_that_vary_are_no_queue() -> None:
    # A server answering in 10 to 34 ms whatever the load: the floor is the probe's median
    # (24 ms), so rounds averaging 22 ms with 64 in flight are no reason to cut. (From the
    # minimum, 10 ms, they would look like 35 requests queued, and be cut.)
    limit = ConcurrencyLimit(256)
    limit.answered(0.020, 1, now=1.0, wanted_more=True)
    spread = [0.010 + 0.024 * i / (MIN_ROUND - 1) for i in range(MIN_ROUND)]
    for i, rtt in enumerate(spread):
        limit.answered(rtt, PROBE_LIMIT, now=1.1 + 0.03 * i, wanted_more=True)
    assert not limit.probing
    assert limit.floor == spread[MIN_ROUND // 2]
    now = 2.0
    for _ in range(4):
        for rtt in spread * (limit.value // MIN_ROUND):
            now += 0.001
            limit.answered(rtt, limit.value, now=now, wanted_more=False)
    assert limit.value == START


def test_a_server_answering_many_at_once_gets_no_2x_swings() -> None:
    # A server answering 40 at once, the rest queued there: rtt = floor * max(1, n / 40).
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.010)
    values = feed.rounds(40, lambda n: 0.010 * max(1.0, n / 40))
    # 64 doubles to 128, which queues: cut to 64 (at most by half). From there up by
    # QUEUE_LOW per round until the queue doubles the round trip (past 80), cut to
    # 40 + QUEUE_HIGH = 48, and so on: a sawtooth between 48 and 80, not 2x swings.
    settled = values[5:]
    assert max(settled) <= 2 * 40 + QUEUE_LOW, values
    assert min(settled) >= 40, values
    steps = [b - a for a, b in itertools.pairwise(settled) if b > a]
    assert steps, values
    assert set(steps) == {QUEUE_LOW}, values


def test_the_floor_is_probed_again_every_floor_window() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.010)
    assert limit.floor == 0.010
    # The server became slower for good: 0.040 with no queue. Until the next probe the
    # rounds look queued (the limit is cut) ...
    feed.answers(limit.value, 0.040)
    assert limit.value < START
    assert not limit.probing
    feed.now += FLOOR_WINDOW
    feed.answers(1, 0.040)
    assert limit.probing
    assert limit.value == PROBE_LIMIT
    while limit.probing:
        feed.answers(1, 0.040, PROBE_LIMIT)
    # ... and after it the new floor holds: nothing queues, so it grows back.
    assert limit.floor == 0.040
    cut = limit.value
    feed.answers(limit.value, 0.040)
    assert limit.value == 2 * cut


def test_timeouts_count_as_long_round_trips_but_never_as_the_floor() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.010)
    # The server stops answering, long after the probe window (with the default 10 s
    # request timeout, every timeout comes that late): still counted.
    later = feed.now + 2 * FLOOR_WINDOW
    for i in range(START):
        limit.timed_out(10.0, START, now=later + i * 0.001)
    # 64 waited (counted as TIMEOUT_WEIGHT floors each): cut by half.
    assert limit.value == START // 2
    assert limit.floor == 0.010
    assert not limit.probing  # timeouts never start a probe either
    # During a probe they are ignored: only answers end it.
    limit._next_probe = 0.0
    feed.answers(1, 0.010)
    assert limit.probing
    for _ in range(100):
        limit.timed_out(0.300, 4, now=feed.now)
    assert limit.probing
    assert limit.value == PROBE_LIMIT


def test_timeouts_before_any_answer_halve_the_limit_per_round() -> None:
    # Nothing has answered, so no floor: each round of timeouts (as many as the limit)
    # halves it, down to PROBE_LIMIT; the first answer then starts a probe as usual.
    limit = ConcurrencyLimit(256)
    assert limit.floor == math.inf
    seen = [limit.value]
    for _ in range(8):
        for _ in range(limit.value):
            assert limit.timed_out(10.0, limit.value, now=1.0) is False
        seen.append(limit.value)
    assert seen == [START, 32, 16, 8, 4, 4, 4, 4, 4]
    limit.answered(0.010, 1, 2.0, wanted_more=True)
    assert limit.probing
    assert ConcurrencyLimit(64, adaptive=False).timed_out(10.0, 64, now=1.0) is False


def test_one_stray_timeout_among_answers_cuts_nothing() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.050)
    feed.answers(START - 1, 0.050, wanted=False)
    limit.timed_out(10.0, START, now=feed.now)
    assert limit.value == START
    assert limit.floor == 0.050
    assert TIMEOUT_WEIGHT > RTT_TOLERANCE  # a round of timeouts alone still reads as a queue


def test_a_timeout_that_ends_a_round_of_waiting_events_says_the_limit_grew() -> None:
    # The caller starts more requests only when told: a round whose answers found events
    # waiting grows the limit when it ends, whether an answer or a timeout ends it.
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.050)
    assert limit.value == START
    feed.answers(START - 1, 0.050)
    assert limit.value == START
    assert limit.timed_out(0.060, START, now=feed.now) is True
    assert limit.value == 2 * START
    # A timeout that moves nothing says no (one that cuts says no too: value <= before).
    assert limit.timed_out(0.060, START, now=feed.now) is False
    assert ConcurrencyLimit(8, adaptive=False).timed_out(10.0, 8, now=1.0) is False


def test_a_429_burst_halves_once_and_answers_grow_it_back() -> None:
    limit = ConcurrencyLimit(32, adaptive=False)
    limit.rate_limited(now=1.0, paused_until=1.5)
    assert limit.value == 16
    limit.rate_limited(now=1.2, paused_until=1.5)  # the same burst
    assert limit.value == 16
    limit.rate_limited(now=1.6, paused_until=2.0)  # a new one
    assert limit.value == 8
    feed = Feed(limit)
    feed.now = 2.0
    # Every `limit` answers without a 429 grow it by half: 8 -> 12 -> 18 -> 27 -> 32.
    assert feed.rounds(4, 0.001) == [12, 18, 27, 32]


def test_without_adaptation_queueing_never_moves_the_limit() -> None:
    limit = ConcurrencyLimit(64, adaptive=False)
    feed = Feed(limit)
    for rtt in (0.001, 0.064, 0.640):
        feed.answers(256, rtt)
        assert limit.value == 64
        assert not limit.probing


def test_the_lower_of_the_429_cut_and_the_queue_cut_applies() -> None:
    limit = ConcurrencyLimit(256)
    feed = Feed(limit)
    feed.past_probe(0.001)
    # A queue cuts the limit to 1 + QUEUE_HIGH ...
    feed.rounds(6, lambda n: 0.001 * n)
    queue_cut = 1 + QUEUE_HIGH
    assert limit.value == queue_cut
    # ... a 429 then halves that ...
    limit.rate_limited(now=feed.now, paused_until=feed.now)
    assert limit.value == queue_cut // 2
    # ... and with no queue any more, answers grow the 429 cap back by half per `limit`
    # answers. The queue cap does not grow meanwhile (the 429 cap held events back, not
    # it): the limit reaches the queue cut, then grows by QUEUE_LOW per round above it,
    # the level that queued last.
    assert feed.rounds(4, 0.001) == [6, queue_cut, queue_cut + QUEUE_LOW, queue_cut + 2 * QUEUE_LOW]


class Waited:
    """A limit fed synthetic answers while callers wait on delivery (or not), on a thread
    that is on the CPU for ``busy`` of the synthetic time and handles ``per_iteration``
    answers per loop iteration."""

    def __init__(self, *, awaited: bool, busy: float, per_iteration: float = 8) -> None:
        self.awaited = awaited
        self.busy = busy
        self.per_iteration = per_iteration
        self.asked = 0
        self.limit = ConcurrencyLimit(
            256, awaited=self._awaited, batches=self._batches, cpu_clock=self._cpu
        )
        self.feed = Feed(self.limit)
        self.feed.past_probe(0.001)

    def _awaited(self, now: float) -> bool:
        self.asked += 1
        return self.awaited

    def _batches(self) -> int:
        return int(self.feed.count / self.per_iteration)

    def _cpu(self) -> float:
        return self.feed.now * self.busy

    def saturated_rounds(self, count: int) -> list[int]:
        # Round trips proportional to the requests in flight: everything but one waits.
        return self.feed.rounds(count, lambda n: 0.001 * n)


def test_a_queue_in_a_saturated_loop_is_not_cut_while_callers_wait_for_delivery() -> None:
    waited = Waited(awaited=True, busy=1.0)
    # No cut: the limit doubles per round to the maximum, and stays there.
    assert waited.saturated_rounds(4) == [128, 256, 256, 256]
    # Nobody waits any more: the first round that queues takes the limit straight back to
    # where it was before the wait, and on from there by halves.
    waited.awaited = False
    assert waited.saturated_rounds(3) == [START, START // 2, START // 4]


def test_the_limit_returns_when_the_backlog_is_gone_and_nobody_waits() -> None:
    waited = Waited(awaited=True, busy=1.0)
    limit = waited.limit
    assert waited.saturated_rounds(2) == [128, 256]
    assert limit.lifted
    # A worker found nothing to send, but a send() still waits (it refills the queue in
    # the next loop iteration): the lift stays.
    limit.backlog_gone()
    assert limit.value == 256
    waited.awaited = False
    limit.backlog_gone()  # the wait is over
    assert limit.value == START
    assert not limit.lifted
    limit.backlog_gone()
    assert limit.value == START
    # A new wait lifts it again, from there.
    waited.awaited = True
    assert waited.saturated_rounds(2) == [128, 256]


def test_a_429_during_a_lift_halves_the_level_from_before_it() -> None:
    waited = Waited(awaited=True, busy=1.0)
    limit = waited.limit
    assert waited.saturated_rounds(2) == [128, 256]
    limit.rate_limited(now=waited.feed.now, paused_until=waited.feed.now)
    assert limit.value == START // 2
    assert not limit.lifted


def test_answers_that_did_not_wait_for_the_loop_are_a_queue_at_the_server() -> None:
    # Callers wait and the thread is busy (with other work), but the answers came one or
    # so per loop iteration: the loop took each as it came, and the queue is elsewhere.
    waited = Waited(awaited=True, busy=1.0, per_iteration=BATCHED * 0.75)
    assert waited.saturated_rounds(2) == [START // 2, START // 4]
    waited = Waited(awaited=True, busy=1.0, per_iteration=2 * BATCHED)
    assert waited.saturated_rounds(2) == [128, 256]


def test_without_a_batch_count_nothing_lifts_the_limit() -> None:
    limit = ConcurrencyLimit(256, awaited=lambda now: True, cpu_clock=time.perf_counter)
    feed = Feed(limit)
    feed.past_probe(0.001)
    assert feed.rounds(2, lambda n: 0.001 * n) == [START // 2, START // 4]


def test_a_loop_just_over_the_saturation_share_counts_as_saturated() -> None:
    waited = Waited(awaited=True, busy=LOOP_SATURATED * 1.01)
    assert waited.saturated_rounds(2) == [128, 256]


def test_a_queue_while_the_loop_is_mostly_idle_is_the_servers_and_is_cut() -> None:
    # Callers wait, but this thread was on the CPU for less than LOOP_SATURATED of the
    # round: what queues is the server, which more requests would only crowd.
    waited = Waited(awaited=True, busy=LOOP_SATURATED * 0.9)
    assert waited.saturated_rounds(2) == [START // 2, START // 4]


def test_a_queue_in_a_saturated_loop_is_cut_when_nobody_waits_for_delivery() -> None:
    # The loop-lag case: the application's tasks share the loop, and shorter iterations
    # (fewer answers at once) are what keeps them responsive.
    waited = Waited(awaited=False, busy=1.0)
    assert waited.saturated_rounds(2) == [START // 2, START // 4]


def test_a_round_with_a_timeout_is_cut_even_while_callers_wait() -> None:
    waited = Waited(awaited=True, busy=1.0)
    feed, limit = waited.feed, waited.limit
    feed.answers(START - 1, 0.001 * START)
    limit.timed_out(10.0, START, now=feed.now)
    assert limit.value == START // 2


def test_whether_callers_wait_is_asked_only_when_a_round_would_cut() -> None:
    waited = Waited(awaited=True, busy=1.0)
    waited.feed.rounds(3, 0.001)  # no queue
    assert waited.asked == 0
    waited.saturated_rounds(2)
    assert waited.asked == 2


# --- the real client ----------------------------------------------------------------------


def _client(url: str, **options: object) -> OpenPanel:
    return OpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, api_url=url, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("http_client", "delivery"),
    [("aiohttp", "loop"), ("builtin", "loop"), ("builtin", "thread")],
)
async def test_a_saturated_server_gets_few_requests_at_once(
    http_client: str, delivery: str
) -> None:
    # One request at a time, 1 ms each: 64 in flight would only wait 64 ms in its queue.
    # (With delivery="thread" the sender runs on its own loop: uvloop's when installed.)
    async with LocalOpenPanel(response_delay=0.001, capacity=1) as server:
        op = _client(server.url, max_concurrency=64, http_client=http_client, delivery=delivery)
        async with op:
            for n in range(400):
                assert op.track("queued", {"n": n})
            async with asyncio.timeout(10):
                while op.stats().delivered < 250:
                    await asyncio.sleep(0.005)
            server.reset()  # the peak from here on
            # Polled, not flush(): a caller waiting on delivery may get more in flight
            # when this loop is busy (see the tests below).
            async with asyncio.timeout(10):
                while op.stats().delivered < 400:
                    await asyncio.sleep(0.005)
            assert op._sender is not None
            floor = op._sender._limit.floor
        stats = op.stats()
        assert (stats.delivered, stats.failed) == (400, 0)
        # About QUEUE_HIGH + 4 (the probe's 4 in flight take 4 ms here, and the floor
        # takes them all for served); without adaptation, 64. The sawtooth climbs
        # QUEUE_LOW above that before each cut, so the bound leaves room: half of 64.
        # A probe in a slow spell of the machine measures a higher floor, and the limit
        # then takes more for served (25 and 37 seen, each once in a dozen full runs):
        # the bound follows the floor, up to three quarters of 64 (a broken probe that
        # measured with 64 in flight must still fail here).
        served = math.ceil(floor / 0.001)
        bound = min(48, max(4 * QUEUE_HIGH, served + QUEUE_HIGH + 2 * QUEUE_LOW))
        assert stats.concurrency <= bound, f"floor {floor * 1000:.1f} ms"
        assert server.peak_in_flight <= bound, f"floor {floor * 1000:.1f} ms"


def _loop_reads_as(op: OpenPanel, busy: bool) -> None:
    """Make the sender's limit read its loop as saturated (every answer of a round in one
    iteration, the thread always on the CPU) or idle (never on the CPU), whatever it does:
    with the local server answering one request at a time, it is neither."""
    sender = op._sender
    assert sender is not None
    if busy:
        sender._limit._batches = lambda: 0
        sender._limit._cpu_clock = time.perf_counter
    else:
        sender._limit._cpu_clock = lambda: 0.0


async def _peak_while_delivering(
    server: LocalOpenPanel, op: OpenPanel, waiting: asyncio.Task[object]
) -> int:
    """The server's peak in flight from the 250th delivery on, while ``waiting`` waits."""
    peak, _ = await _in_flight_while_delivering(server, op, waiting)
    return peak


async def _in_flight_while_delivering(
    server: LocalOpenPanel, op: OpenPanel, waiting: asyncio.Task[object]
) -> tuple[int, list[int]]:
    """The server's peak in flight from the 250th delivery on while ``waiting`` waits,
    and the client's limit every millisecond or so meanwhile."""
    async with asyncio.timeout(10):
        while op.stats().delivered < 250:
            await asyncio.sleep(0.005)
    assert not waiting.done()
    server.reset()
    limits = []
    async with asyncio.timeout(10):
        while not waiting.done():
            limits.append(op.stats().concurrency)
            await asyncio.sleep(0.001)
        await waiting
    return server.peak_in_flight, limits


@pytest.mark.parametrize(("delivery", "busy"), [("loop", True), ("thread", True), ("loop", False)])
async def test_a_flush_lifts_the_limit_only_through_a_saturated_loop(
    delivery: str, busy: bool
) -> None:
    async with LocalOpenPanel(response_delay=0.001, capacity=1) as server:
        op = _client(server.url, max_concurrency=64, delivery=delivery)
        async with op:
            await op.start()
            _loop_reads_as(op, busy=busy)
            for n in range(400):
                assert op.track("queued", {"n": n})
            flushing = asyncio.create_task(op.flush(timeout=10))
            peak = await _peak_while_delivering(server, op, flushing)
            assert flushing.result() is True
        assert op.stats().delivered == 400
        if busy:
            assert peak == 64
        else:  # the queue is the server's: as in the test above
            assert peak <= 4 * QUEUE_HIGH


async def test_the_drain_of_aclose_through_a_saturated_loop_gets_max_concurrency() -> None:
    # aclose() waits for the events to go out as flush() does (through a flush waiter).
    async with LocalOpenPanel(response_delay=0.001, capacity=1) as server:
        op = _client(server.url, max_concurrency=64, shutdown_timeout=10.0)
        await op.start()
        _loop_reads_as(op, busy=True)
        for n in range(400):
            assert op.track("queued", {"n": n})
        closing = asyncio.create_task(op.aclose())
        peak = await _peak_while_delivering(server, op, closing)
        assert op.stats().delivered == 400
        assert peak == 64


@pytest.mark.parametrize("delivery", ["loop", "thread"])
async def test_send_waiting_for_room_through_a_saturated_loop_gets_max_concurrency(
    delivery: str,
) -> None:
    # With delivery="thread" each wait ends on the delivery thread and the producer's next
    # events are queued from its own: the rounds in between must still see it waiting.
    async with LocalOpenPanel(response_delay=0.001, capacity=1) as server:
        op = _client(server.url, max_concurrency=64, max_queue_size=100, delivery=delivery)
        async with op:
            await op.start()
            _loop_reads_as(op, busy=True)

            async def produce() -> None:
                for n in range(400):
                    await op.send(Track(name="queued", properties={"n": n}))

            producing = asyncio.create_task(produce())
            peak, limits = await _in_flight_while_delivering(server, op, producing)
            assert await op.flush(timeout=10)
        assert op.stats().delivered == 400
        assert peak == 64
        assert set(limits) == {64}  # never cut meanwhile


async def test_a_bulk_send_through_this_saturated_loop_lifts_the_limit() -> None:
    # Nothing injected: the local server shares this loop and answers at once, so the
    # loop is saturated for real (answers wait for it in batches, its thread always on
    # the CPU) and round trips grow with the requests in flight. Tracked events nobody
    # waits for cut the limit; then one producer waits in send() for room, and the limit
    # must reach max_concurrency while it does, and return once the backlog is gone.
    async with LocalOpenPanel(record=False) as server:
        op = _client(server.url, max_concurrency=64, max_queue_size=200)
        async with op:
            await op.start()
            async with asyncio.timeout(30):
                for burst in range(10):
                    for n in range(150):
                        assert op.track("tracked", {"n": n, "burst": burst})
                    while op.stats().pending:
                        await asyncio.sleep(0.002)
            before = op.stats().concurrency
            assert before < 64
            limits: list[int] = []

            async def produce() -> None:
                for n in range(3000):
                    await op.send(Track(name="bulk", properties={"n": n}))
                    if n % 50 == 0:
                        limits.append(op.stats().concurrency)

            await asyncio.wait_for(produce(), 30)
            assert await op.flush(timeout=30)
            after = op.stats().concurrency
        assert op.stats().delivered == 4500
        assert max(limits) == 64
        assert after < 64


async def test_which_waits_count_as_callers_waiting_for_delivery() -> None:
    async with LocalOpenPanel() as server:
        server.script(Reply(delay=0.5))  # long enough for the checks below
        op = _client(server.url, max_queue_size=1)
        async with op:
            acc = op._acc

            def waiting() -> bool:
                return acc.delivery_awaited(time.perf_counter())

            assert not waiting()
            assert op.track("held")  # the server holds it: the queue is full
            async with asyncio.timeout(5):
                while server.in_flight < 1:
                    await asyncio.sleep(0.001)
            assert not waiting()
            sending = asyncio.create_task(op.send(Track(name="waits")))
            flushing = asyncio.create_task(op.flush())
            await asyncio.sleep(0.01)
            assert waiting()
            flushing.cancel()
            await asyncio.sleep(0)
            assert waiting()  # the send() still waits
            assert acc.senders_waiting == 1
            # Woken for a slot but not yet run (the other answers of the loop iteration
            # that freed it are still being handled): it still waits.
            acc.wake_one_room_waiter()
            assert waiting()
            sending.cancel()
            await asyncio.sleep(0)
            assert acc.senders_waiting == 0
            # A send() that just stopped waiting counts for SEND_WAIT_GRACE more (with
            # delivery="thread" a producer's next wait starts on its own thread), then not.
            ended = acc.send_wait_ended
            assert acc.delivery_awaited(ended + SEND_WAIT_GRACE / 2)
            assert not acc.delivery_awaited(ended + SEND_WAIT_GRACE)
            # A send() whose wait timed out: counted while it waited and for the grace
            # after, then not.
            with pytest.raises(SendTimeoutError):
                await op.send(Track(name="gives_up"), timeout=0.01)
            assert acc.senders_waiting == 0
            assert acc.send_wait_ended > ended
            assert not acc.delivery_awaited(acc.send_wait_ended + SEND_WAIT_GRACE)


async def test_without_adaptation_a_saturated_server_gets_max_concurrency() -> None:
    async with LocalOpenPanel(response_delay=0.001, capacity=1) as server:
        op = _client(server.url, max_concurrency=64, adaptive_concurrency=False)
        async with op:
            for n in range(200):
                assert op.track("queued", {"n": n})
            assert await op.flush(timeout=10)
        assert op.stats().delivered == 200
        assert server.peak_in_flight == 64


async def test_a_long_round_trip_grows_past_the_start() -> None:
    # A long round trip, no queue: requests in flight are what delivers. (100 ms: this
    # server shares the client's loop, and handling a burst of 128 answers and requests
    # takes this loop tens of milliseconds, which must stay well within the tolerance.)
    async with LocalOpenPanel(response_delay=0.1) as server:
        op = _client(server.url, max_concurrency=256)
        async with op:
            for n in range(1000):
                assert op.track("far", {"n": n})
            assert await op.flush(timeout=10)
        assert op.stats().delivered == 1000
        # The limit doubles to 128, then 256 (the peak counted at the server lags a bit).
        assert server.peak_in_flight > START + START // 2


async def test_an_event_right_after_a_probe_starts_is_sent_at_once() -> None:
    # Idle workers over the probe's limit exit when woken: an event must not be handed to
    # one of them and then wait for the others' idle timeout (5 s here).
    async with LocalOpenPanel() as server:
        op = _client(server.url, max_concurrency=64, idle_timeout=5.0)
        async with op:
            # The first burst starts the first probe, the second ends it; the third runs
            # up to the limit's workers, all idle afterwards.
            for burst in range(3):
                for n in range(64):
                    assert op.track("burst", {"n": n, "burst": burst})
                assert await op.flush(timeout=5)
            sender = op._sender
            assert sender is not None
            assert not sender._limit.probing
            idle = len(sender._workers)
            assert idle > PROBE_LIMIT + 1
            sender._limit._next_probe = 0.0  # as if FLOOR_WINDOW had passed
            assert op.track("starts_the_probe")
            assert await op.flush(timeout=1)
            assert sender._limit.probing
            assert len(sender._workers) == idle - 1  # the one that sent it left
            assert op.track("after_the_probe_started")
            assert await op.flush(timeout=1)
        assert op.stats().delivered == 3 * 64 + 2


async def test_requests_that_time_out_lower_the_limit() -> None:
    # 100 ms round trips: the limit grows (to 64, unless this loop is slow); then the
    # server stops answering for a while and a round of requests times out (0.5 s, 5x the
    # floor): the limit is cut instead of holding them all, and their retries, against it.
    async with LocalOpenPanel(response_delay=0.1) as server:
        op = _client(server.url, max_concurrency=64, request_timeout=0.5)
        async with op:
            for n in range(400):
                assert op.track("before", {"n": n})
            assert await op.flush(timeout=10)
            before = op.stats().concurrency
            assert before > 2 * QUEUE_HIGH
            server.script(*[Reply(hang=True)] * 64)
            for n in range(64):
                assert op.track("hangs", {"n": n})
            async with asyncio.timeout(5):
                while op.stats().retries < 64:
                    await asyncio.sleep(0.01)
            assert op.stats().concurrency < before
            assert await op.flush(timeout=10)
        assert op.stats().delivered == 464


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_adaptive_concurrency_must_be_a_bool(value: object) -> None:
    with pytest.raises(ConfigError, match=r"adaptive_concurrency: must be True or False"):
        _client("http://127.0.0.1:9", adaptive_concurrency=value)


def test_the_local_server_refuses_a_capacity_below_one() -> None:
    with pytest.raises(ValueError, match="capacity"):
        LocalOpenPanel(capacity=0)
