"""How many requests may be in flight at once: ``max_concurrency``, lowered when more only wait.

One event per request means delivered events/s = requests in flight / round trip, so over a
slow link the client needs many requests in flight. But once something on the path is
saturated (the server, or the client's own event loop handling answers), every extra request
only waits in a queue: the round trip grows, throughput does not, and the event loop spends
ever longer iterations handling a flood of answers at once (that is the "loop lag" the
application's other tasks feel). Two signals therefore lower the limit:

- **Queueing** (delay-based, in the manner of TCP Vegas). The floor, the fastest recent
  round trip, is what a request costs with no queue. With ``n`` requests in flight taking
  ``rtt`` each, about ``n * floor / rtt`` are being served and the rest wait. A round is
  one limit's worth of answers (about one round trip). After each round:

  - when round trips exceed ``RTT_TOLERANCE`` times the floor and more than
    ``QUEUE_HIGH`` requests wait, the limit is cut to what would leave ``QUEUE_HIGH``
    waiting, by at most half per round (one slow round, a noisy neighbour or a GC pause,
    must not cut it all the way);
  - otherwise, while the limit holds events back, it doubles if round trips are within
    the tolerance (or fewer than ``QUEUE_LOW`` wait), else grows to what would leave
    ``QUEUE_HIGH`` waiting.

  It starts at ``START``. Over a 50 ms round trip the client's own delays of a few
  milliseconds are within the tolerance, so the limit grows to what the demand needs, up
  to ``max_concurrency``. Over loopback, where the client's loop is the bottleneck, it
  settles near ``QUEUE_HIGH`` plus the few the server answers at once.
- **429s** (AIMD): one burst of 429s halves the limit; every ``limit`` answers without one
  grow it back by half.

The two are kept apart (``value`` is the lower of them) so that recovering from a 429 storm
does not wait for a backlog, and a queue does not hide behind a 429 cut.

Under steady load every round trip includes some queueing, so a floor taken from them would
creep up and hide the queue. The first answer, and the first after every ``FLOOR_WINDOW``
seconds, therefore start a probe: the limit drops to ``PROBE_LIMIT`` until the requests
already in flight and ``MIN_ROUND`` more have answered, and the floor is measured afresh
(a server that has become slower for good is thus taken for a queue for one window at
most). A probe costs about two round trips at ``PROBE_LIMIT`` in flight.
"""

from __future__ import annotations

import math

QUEUE_LOW = 4
QUEUE_HIGH = 8
START = 64
PROBE_LIMIT = QUEUE_LOW
# Round trips under this many times the floor are never taken for a queue: over a long
# round trip, a busy event loop's few milliseconds of delay make no queue, and halving
# the requests in flight would halve delivery.
RTT_TOLERANCE = 2.0
FLOOR_WINDOW = 10.0
# A round is at least this many answers (and at least the limit): fewer are too noisy.
MIN_ROUND = 8


class ConcurrencyLimit:
    """The current limit, adjusted from every answer's round trip and every 429 burst."""

    __slots__ = (
        "_adaptive",
        "_cut_blocked_until",
        "_floor",
        "_floor_before",
        "_next_probe",
        "_probe_left",
        "_queue_cap",
        "_rate_answers",
        "_rate_cap",
        "_round_answers",
        "_round_in_flight",
        "_round_rtt",
        "_round_wanted_more",
        "maximum",
        "value",
    )

    def __init__(self, maximum: int, *, adaptive: bool = True) -> None:
        self.maximum = maximum
        self._adaptive = adaptive
        # How many can go without queueing (without adaptation: all of them).
        self._queue_cap = min(maximum, START) if adaptive else maximum
        self._rate_cap = maximum  # lowered by 429 bursts
        self._rate_answers = 0  # answers since the rate cap last moved
        self._floor = math.inf  # fastest round trip since the last probe started
        self._floor_before = math.inf  # the floor the probe before found
        # The first answer starts a probe: the floor is known before the limit moves.
        self._next_probe = -math.inf  # set when a probe ends
        self._probe_left = 0  # answers the current probe still waits for
        self._round_answers = 0
        self._round_rtt = 0.0
        self._round_in_flight = 0
        self._round_wanted_more = False
        self._cut_blocked_until = 0.0
        self.value = self._queue_cap

    @property
    def floor(self) -> float:
        """The fastest recent round trip (inf until the first answer)."""
        return self._floor if self._floor < math.inf else self._floor_before

    @property
    def probing(self) -> bool:
        return self._probe_left > 0

    def answered(self, rtt: float, in_flight: int, now: float, *, wanted_more: bool) -> bool:
        """Record one answer: its round trip, how many requests were in flight with it.

        ``wanted_more``: events were waiting for a free slot when it came. Returns True when
        the limit grew, so the caller can start sending more at once.
        """
        before = self.value
        if rtt < self._floor:
            self._floor = rtt
        if self._rate_cap < self.maximum:
            self._rate_answers += 1
            if self._rate_answers >= self._rate_cap:
                self._rate_answers = 0
                self._rate_cap = min(self.maximum, self._rate_cap + max(1, self._rate_cap // 2))
        if self._adaptive:
            if self._probe_left:
                self._probe_left -= 1
                if not self._probe_left:
                    self._next_probe = now + FLOOR_WINDOW
            elif now >= self._next_probe:
                self._start_probe()
            else:
                self._count(rtt, in_flight, wanted_more)
        self._set_value()
        return self.value > before

    def rate_limited(self, now: float, paused_until: float) -> None:
        """A 429: halve the limit, once for the whole burst answered before the pause ends."""
        if now >= self._cut_blocked_until:
            self._rate_cap = max(1, self.value // 2)
            self._rate_answers = 0
            self._cut_blocked_until = paused_until
            self._clear_round()
            self._set_value()

    def _set_value(self) -> None:
        value = min(self._queue_cap, self._rate_cap)
        self.value = min(value, PROBE_LIMIT) if self._probe_left else value

    def _start_probe(self) -> None:
        # Under steady load every round trip includes some queueing, so the floor would
        # creep up and hide the queue. Every FLOOR_WINDOW seconds, hold PROBE_LIMIT
        # requests in flight for a moment: the requests already in flight answer first,
        # then MIN_ROUND answers that met (almost) no queue set the floor afresh.
        self._floor_before = self.floor
        self._floor = math.inf
        # (The limit bounds how many are in flight now.)
        self._probe_left = self.value + MIN_ROUND
        self._clear_round()

    def _clear_round(self) -> None:
        self._round_answers = 0
        self._round_rtt = 0.0
        self._round_in_flight = 0
        self._round_wanted_more = False

    def _count(self, rtt: float, in_flight: int, wanted_more: bool) -> None:
        """Add one answer to the round; at the round's end, move the queue cap."""
        answers = self._round_answers + 1
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
        wanted = self._round_wanted_more
        self._clear_round()

        floor = self.floor
        served = mean_in_flight * floor / mean_rtt if mean_rtt > 0 else mean_in_flight
        queued = mean_in_flight - served
        cap = self._queue_cap
        # The limit that would leave QUEUE_HIGH requests waiting.
        target = math.ceil(served) + QUEUE_HIGH
        slowed = mean_rtt > RTT_TOLERANCE * floor
        if queued > QUEUE_HIGH and slowed:
            cap = min(cap, max(target, cap // 2))
        elif wanted:
            if queued < QUEUE_LOW or not slowed:
                cap *= 2
            else:
                cap = max(cap, target)
        self._queue_cap = min(cap, self.maximum)
