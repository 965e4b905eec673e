"""How many requests may be in flight at once: ``max_concurrency``, lowered when more only wait.

One event per request means delivered events/s = requests in flight / round trip, so over a
slow link the client needs many requests in flight. But once something on the path is
saturated (the server, or the client's own event loop handling answers), every extra request
only waits in a queue: the round trip grows, throughput does not, and the event loop spends
ever longer iterations handling a flood of answers at once (that is the "loop lag" the
application's other tasks feel). Two signals therefore lower the limit:

- **Queueing** (delay-based, in the manner of TCP Vegas). The floor, the median round trip
  of a few requests sent with almost nothing else in flight, is what a request costs with
  no queue. With ``n`` requests in flight taking ``rtt`` each, about ``n * floor / rtt``
  are being served and the rest wait. A round is one limit's worth of answers (about one
  round trip). After each round:

  - when round trips exceed ``RTT_TOLERANCE`` times the floor and more than
    ``QUEUE_HIGH`` requests wait, the limit is cut to what would leave ``QUEUE_HIGH``
    waiting, by at most half per round (one slow round, a noisy neighbour or a GC pause,
    must not cut it all the way);
  - otherwise, while the limit holds events back: if round trips are within the
    tolerance (or fewer than ``QUEUE_LOW`` wait) it doubles, but only up to the level
    of the last cut, and above that grows by ``QUEUE_LOW`` per round (TCP's slow start
    and congestion avoidance); else it grows to what would leave ``QUEUE_HIGH`` waiting.

  It starts at ``START``. Over a 50 ms round trip the client's own delays of a few
  milliseconds are within the tolerance, so the limit grows to what the demand needs, up
  to ``max_concurrency``. Over loopback, where the client's loop is the bottleneck, it
  settles near ``QUEUE_HIGH`` plus the few the server answers at once. A server that
  answers many at once and queues the rest gets a sawtooth: up by ``QUEUE_LOW`` per round
  until its queue doubles the round trip, then cut.
- **429s** (AIMD): one burst of 429s halves the limit; every ``limit`` answers without one
  grow it back by half.

The two are kept apart (``value`` is the lower of them) so that recovering from a 429 storm
does not wait for a backlog, and a queue does not hide behind a 429 cut. Only successful
answers are round trips (a proxy's fast 502 says nothing about the server), and timeouts,
as round trips of at least the request timeout.

Delivery that somebody waits for is the exception: while a ``send()`` waits for room in the
queue, or a ``flush()`` (or the drain of ``aclose()``) waits for the events to go out, and
the queue a round found is the client's own event loop, the round does not cut and the
limit grows towards ``max_concurrency`` as if nothing queued. Those callers wait on
delivery itself, and when the loop is what requests queue for, more of them in flight
spread each loop iteration over more answers and deliver more (10-25% on loopback). The
loop is taken for the queue when both hold over the round:

- answers waited for the loop: it handled at least ``BATCHED`` of them per iteration on
  average (against a saturated server an idle loop takes each answer as it comes);
- its thread was on the CPU for at least ``LOOP_SATURATED`` of the round (a server that
  answers several requests at once also makes batches, but leaves the loop idle).

A round with a timeout is never lifted. The price is paid by everything else on the loop:
while somebody waits, lag is not held down. Once nobody waits, the limit returns at once
to where it was before: when a worker finds nothing to send, or a round queues. A 429
burst ends the lift too, and halves the level from before it. (Where the thread's CPU
clock is coarse, as on Windows with its 15.6 ms ticks, the share over a short round is
rough, and the lift less steady.)

Under steady load every round trip includes some queueing, so a floor taken from them would
creep up and hide the queue. The first answer, and the first after every ``FLOOR_WINDOW``
seconds, therefore start a probe: the limit drops to ``PROBE_LIMIT`` until ``MIN_ROUND``
requests sent during the probe have answered (those already in flight drain first), and
the floor is the median of their round trips (a server that has become slower for good is
thus taken for a queue for one window at most). The median, not the minimum: a server
whose answers vary from 10 to 30 ms is not queueing when most take 20. A probe costs
about three round trips at ``PROBE_LIMIT`` in flight: one to drain, two for its answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

QUEUE_LOW = 4
QUEUE_HIGH = 8
START = 64
PROBE_LIMIT = QUEUE_LOW
# Round trips under this many times the floor are never taken for a queue: over a long
# round trip, a busy event loop's few milliseconds of delay make no queue, and halving
# the requests in flight would halve delivery.
RTT_TOLERANCE = 2.0
# A timeout counts as a round trip of at most this many floors (see timed_out()).
TIMEOUT_WEIGHT = 2 * RTT_TOLERANCE
FLOOR_WINDOW = 10.0
# A round is at least this many answers (and at least the limit): fewer are too noisy.
MIN_ROUND = 8
# The share of a round's wall time the sender's thread spent on the CPU from which the
# queue is taken for the client's own event loop (with BATCHED, below). It tells a loop
# too busy to take answers as they come from one that idles between the bursts of a
# server answering many at once. Low, because CPU time misses the time a busy thread
# waits for a core (half of it, on a crowded VM).
LOOP_SATURATED = 0.3
# Answers handled per loop iteration, on average over a round, from which answers are
# taken to have waited for the loop.
BATCHED = 2.0


def _nobody_waits(now: float) -> bool:
    return False


class ConcurrencyLimit:
    """The current limit, adjusted from every answer's round trip and every 429 burst."""

    __slots__ = (
        "_adaptive",
        "_awaited",
        "_batches",
        "_blind_timeouts",
        "_cap_before_wait",
        "_cpu_clock",
        "_cut_blocked_until",
        "_floor",
        "_next_probe",
        "_probe_rtts",
        "_probe_since",
        "_queue_cap",
        "_rate_answers",
        "_rate_cap",
        "_round_answers",
        "_round_batches",
        "_round_cpu",
        "_round_in_flight",
        "_round_rtt",
        "_round_started",
        "_round_timed_out",
        "_round_wanted_more",
        "_slow_start_until",
        "maximum",
        "value",
    )

    def __init__(
        self,
        maximum: int,
        *,
        adaptive: bool = True,
        awaited: Callable[[float], bool] = _nobody_waits,
        batches: Callable[[], int] | None = None,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        """``awaited``: whether a caller waits for delivery (a send() for room, a flush())
        at a time on the answers' clock; asked only when a round would cut. ``batches``:
        a count of the loop iterations in which answers were handled so far (None: no
        count, and the limit is never lifted). ``cpu_clock``: the CPU time of the thread
        the answers are handled on. Both are read once per round.
        """
        self.maximum = maximum
        self._adaptive = adaptive
        self._awaited = awaited
        self._batches = batches
        self._cpu_clock = cpu_clock
        # The queue cap when waiting callers first lifted it (None: not lifted).
        self._cap_before_wait: int | None = None
        # How many can go without queueing (without adaptation: all of them).
        self._queue_cap = min(maximum, START) if adaptive else maximum
        # Like TCP's ssthresh: the queue cap doubles per round below it, and grows by
        # QUEUE_LOW per round above it. Set by every cut, so that the limit creeps back
        # towards the level that queued instead of overshooting it again at once.
        self._slow_start_until = maximum
        self._rate_cap = maximum  # lowered by 429 bursts
        self._rate_answers = 0  # answers since the rate cap last moved
        self._floor = math.inf  # what the last probe measured (inf: none yet)
        # The first answer starts a probe: the floor is known before the limit moves.
        self._next_probe = -math.inf  # set when a probe ends
        self._probe_since: float | None = None  # when the current probe started
        # Round trips of its answers to requests sent after it started.
        self._probe_rtts: list[float] = []
        self._round_answers = 0
        self._round_rtt = 0.0
        self._round_in_flight = 0
        self._round_wanted_more = False
        self._round_timed_out = False
        self._round_started = 0.0  # when the round's first answer came
        self._round_cpu = 0.0  # and the thread's CPU time then
        self._round_batches = 0  # and the batch count then
        self._cut_blocked_until = 0.0
        self._blind_timeouts = 0  # timeouts before any answer (see timed_out)
        self.value = self._queue_cap

    @property
    def floor(self) -> float:
        """The round trip with no queue, as the last probe measured it (inf before one)."""
        return self._floor

    @property
    def probing(self) -> bool:
        return self._probe_since is not None

    def answered(self, rtt: float, in_flight: int, now: float, *, wanted_more: bool) -> bool:
        """Record one successful answer: its round trip, how many were in flight with it.

        Only successes count: a proxy's fast 502 says nothing about the server's round
        trip. ``wanted_more``: events were waiting for a free slot when it came. Returns
        True when the limit grew, so the caller can start sending more at once.
        """
        before = self.value
        if self._rate_cap < self.maximum:
            self._rate_answers += 1
            if self._rate_answers >= self._rate_cap:
                self._rate_answers = 0
                self._rate_cap = min(self.maximum, self._rate_cap + max(1, self._rate_cap // 2))
        if self._adaptive:
            if self._probe_since is not None:
                # Only answers to requests sent during the probe met no queue of ours; those
                # already in flight when it began are drained first, however many they are.
                if now - rtt >= self._probe_since:
                    rtts = self._probe_rtts
                    rtts.append(rtt)
                    if len(rtts) >= MIN_ROUND:
                        rtts.sort()
                        self._floor = rtts[len(rtts) // 2]
                        self._probe_since = None
                        self._next_probe = now + FLOOR_WINDOW
            elif now >= self._next_probe:
                self._start_probe(now)
            else:
                self._count(rtt, in_flight, now, wanted_more)
        self._set_value()
        return self.value > before

    def timed_out(self, waited: float, in_flight: int, now: float) -> bool:
        """A request got no answer within the request timeout: a round trip of ``waited``.

        A server so slow that requests time out is the longest queue of all: counting
        these keeps the client from holding ``max_concurrency`` requests (and their
        retries) against it. They never set the floor nor end (or start) a probe: a
        server that stopped answering would never let one end.

        Each counts as ``TIMEOUT_WEIGHT`` floors at most: a round that mostly times out
        still reads as a queue, but one stray timeout of 10 s among answers of 50 ms
        must not drag the round's mean past the tolerance and halve the limit.

        Returns True when the limit grew: a timeout can end a round whose earlier answers
        found events waiting, and the caller must then start sending more, as after
        ``answered``.
        """
        before = self.value
        if self._adaptive and self._probe_since is None:
            if self._floor < math.inf:
                rtt = min(waited, TIMEOUT_WEIGHT * self._floor)
                self._round_timed_out = True
                self._count(rtt, in_flight, now, wanted_more=False)
            else:
                # Nothing has answered yet, so there is no floor to compare with: a server
                # too slow from the start still gets fewer requests. Each round of timeouts
                # (as many as the limit) halves it, down to the probe's few.
                self._blind_timeouts += 1
                if self._blind_timeouts >= self.value:
                    self._blind_timeouts = 0
                    self._queue_cap = max(PROBE_LIMIT, self._queue_cap // 2)
                    self._slow_start_until = self._queue_cap
            self._set_value()
        return self.value > before

    def rate_limited(self, now: float, paused_until: float) -> None:
        """A 429: halve the limit, once for the whole burst answered before the pause ends."""
        if now >= self._cut_blocked_until:
            if self._cap_before_wait is not None:
                # The server asks for less: halve what was sent before any lift.
                self._drop_lift()
            # The limit outside a probe: a probe's PROBE_LIMIT is no level to halve.
            self._rate_cap = max(1, min(self._queue_cap, self._rate_cap) // 2)
            self._rate_answers = 0
            self._cut_blocked_until = paused_until
            self._clear_round()
            self._set_value()

    @property
    def lifted(self) -> bool:
        """Whether waiting callers lifted the limit (see the module's docstring)."""
        return self._cap_before_wait is not None

    def backlog_gone(self) -> None:
        """A worker found nothing to send: unless a caller still waits (a send() about to
        refill the queue), the wait is over, and the next burst must not start with
        ``max_concurrency`` in flight. Here a wait that has ended counts no more, however
        recently (``awaited`` is asked at an infinite time): kept, the lift would outlast
        the job. With delivery="thread" and a queue barely above the limit this can end a
        lift between a producer's waits; the next rounds lift it again."""
        if self._cap_before_wait is not None and not self._awaited(math.inf):
            self._drop_lift()
            self._set_value()

    def _drop_lift(self) -> None:
        assert self._cap_before_wait is not None
        self._queue_cap = min(self._queue_cap, self._cap_before_wait)
        self._slow_start_until = self._queue_cap
        self._cap_before_wait = None

    def _loop_saturated(
        self, answers: int, now: float, started: float, cpu: float, batches: int
    ) -> bool:
        """Whether the round's answers waited for this loop (see the module's docstring)."""
        if self._batches is None:
            return False
        iterations = self._batches() - batches + 1
        if answers < BATCHED * iterations:
            return False
        wall = now - started
        return wall <= 0 or self._cpu_clock() - cpu >= LOOP_SATURATED * wall

    def _set_value(self) -> None:
        value = min(self._queue_cap, self._rate_cap)
        self.value = min(value, PROBE_LIMIT) if self._probe_since is not None else value

    def _start_probe(self, now: float) -> None:
        # Under steady load every round trip includes some queueing, so the floor would
        # creep up and hide the queue. Every FLOOR_WINDOW seconds, hold PROBE_LIMIT
        # requests in flight for a moment: the requests already in flight answer first,
        # then MIN_ROUND answers that met (almost) no queue set the floor afresh.
        self._probe_since = now
        self._probe_rtts = []
        self._slow_start_until = self.maximum  # a fresh look at how far the limit may grow
        self._clear_round()

    def _clear_round(self) -> None:
        self._round_answers = 0
        self._round_rtt = 0.0
        self._round_in_flight = 0
        self._round_wanted_more = False
        self._round_timed_out = False

    def _count(self, rtt: float, in_flight: int, now: float, wanted_more: bool) -> None:
        """Add one answer to the round; at the round's end, move the queue cap."""
        answers = self._round_answers + 1
        if answers == 1:
            self._round_started = now
            self._round_cpu = self._cpu_clock()
            self._round_batches = self._batches() if self._batches is not None else 0
        self._round_rtt += rtt
        self._round_in_flight += in_flight
        # Only while the limit itself held events back: a few events that just arrived
        # and find every request busy at a low rate are no reason to allow more.
        if wanted_more and in_flight >= self.value:
            self._round_wanted_more = True
        if answers < max(self.value, MIN_ROUND):
            self._round_answers = answers
            return
        mean_rtt = self._round_rtt / answers
        mean_in_flight = self._round_in_flight / answers
        # Growing is for when the queue cap is what holds events back, not a 429 cut.
        wanted = self._round_wanted_more and self._queue_cap <= self._rate_cap
        timed_out = self._round_timed_out
        started, cpu, batches = self._round_started, self._round_cpu, self._round_batches
        self._clear_round()

        floor = self.floor
        served = mean_in_flight * floor / mean_rtt if mean_rtt > 0 else mean_in_flight
        queued = mean_in_flight - served
        cap = self._queue_cap
        # The limit that would leave QUEUE_HIGH requests waiting.
        target = math.ceil(served) + QUEUE_HIGH
        slowed = mean_rtt > RTT_TOLERANCE * floor
        if (
            queued > QUEUE_HIGH
            and slowed
            and not timed_out
            and self._loop_saturated(answers, now, started, cpu, batches)
            and self._awaited(now)
        ):
            # Callers wait for delivery itself, and the queue is our own loop: lag is no
            # reason to hold back (see the module's docstring). The limit grows.
            slowed = False
            self._slow_start_until = self.maximum
            if self._cap_before_wait is None:
                self._cap_before_wait = cap
        if queued > QUEUE_HIGH and slowed:
            cap = min(cap, max(target, cap // 2))
            if self._cap_before_wait is not None:
                # The lift is over (nobody waits, the loop is no longer the queue, or a
                # request timed out): straight back, not by halves over many rounds.
                cap = min(cap, self._cap_before_wait)
                self._cap_before_wait = None
            self._slow_start_until = cap
        elif wanted:
            if queued < QUEUE_LOW or not slowed:
                if cap < self._slow_start_until:
                    cap = min(cap * 2, self._slow_start_until)
                else:
                    cap += QUEUE_LOW
            else:
                cap = max(cap, target)
        self._queue_cap = min(cap, self.maximum)
