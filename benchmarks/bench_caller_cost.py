"""1. Caller cost: microseconds per track() call, from a coroutine and from a plain thread.

Each call of ``op.track(name, 5 properties, profile_id=...)`` is timed on its own with
``perf_counter_ns`` (the cost of the timer pair, measured in the same run, is subtracted).
The client runs on the event loop against the local benchmark server, as in production: the
calls come in batches of ``--batch`` with a loop iteration in between, and the sender
delivers in the background between batches (never during a timed call). The first call of
each batch pays for the caches the sender's work evicted, and for waking the sender when a
worker of it is idle (at this rate they are mostly all busy, and need no wake-up).

Baseline: the raw cost of ``deque.append(msgspec.json.Encoder().encode(envelope))`` for the
same event, timed the same way, in batches interleaved with the track() batches (which of
the two goes first after the loop turn alternates) so that both see the same noise.

Also shown: the cost of the first call after a loop turn (the sender's work in between
evicts the CPU caches), which is what an application calling track() once per request
handler pays on every call.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
from _common import (
    TYPICAL_NAME,
    TYPICAL_PROFILE_ID,
    TYPICAL_PROPERTIES,
    Figure,
    Report,
    finish,
    make_client,
    parse_args,
    percentile,
    quiet_library_logs,
    timer_overhead_ns,
)
from _server import BenchServer, ServerOptions

from openpanel_async import OpenPanel

_TS = "2026-11-26T08:00:00.000Z"


def _time_track(op: OpenPanel, samples: list[int], start: int, count: int) -> int:
    """Time ``count`` track() calls into ``samples[start:]``; the number accepted."""
    pc = time.perf_counter_ns
    track = op.track
    name, props, pid = TYPICAL_NAME, TYPICAL_PROPERTIES, TYPICAL_PROFILE_ID
    accepted = 0
    for i in range(start, start + count):
        t0 = pc()
        ok = track(name, props, profile_id=pid)
        t1 = pc()
        samples[i] = t1 - t0
        accepted += ok
    return accepted


def _time_raw(queue: deque[bytes], encode: Any, samples: list[int], start: int, count: int) -> None:
    """Time ``count`` raw encode+append operations of the same event."""
    pc = time.perf_counter_ns
    name, pid = TYPICAL_NAME, TYPICAL_PROFILE_ID
    props = {**TYPICAL_PROPERTIES, "__timestamp": _TS}
    append = queue.append
    for i in range(start, start + count):
        t0 = pc()
        append(
            encode(
                {"type": "track", "payload": {"name": name, "properties": props, "profileId": pid}}
            )
        )
        t1 = pc()
        samples[i] = t1 - t0
    queue.clear()


def _summary(samples: Sequence[int], overhead: int) -> dict[str, float]:
    values = sorted(max(0, s - overhead) for s in samples)
    return {
        "p50_us": percentile(values, 0.50) / 1000,
        "p99_us": percentile(values, 0.99) / 1000,
        "p999_us": percentile(values, 0.999) / 1000,
        "max_us": values[-1] / 1000,
        "mean_us": sum(values) / len(values) / 1000,
        "calls": len(values),
    }


async def _measure(
    url: str, calls: int, thread_calls: int, batch: int, delivery: str
) -> dict[str, Any]:
    encode = msgspec.json.Encoder().encode
    raw_queue: deque[bytes] = deque()
    op = make_client(
        url,
        max_queue_size=calls + thread_calls + 2 * batch,
        shutdown_timeout=0.3,
        delivery=delivery,
    )
    await op.start()
    try:
        # Warm up: the name cache, the timestamp cache, the sender and its connections.
        warm = [0] * batch
        for _ in range(5):
            _time_track(op, warm, 0, batch)
            _time_raw(raw_queue, encode, warm, 0, batch)
            await asyncio.sleep(0.01)
        await op.flush(5.0)

        overhead = timer_overhead_ns()
        track_samples = [0] * calls
        raw_samples = [0] * calls
        accepted = 0
        track_first: list[int] = []
        raw_first: list[int] = []
        for index, start in enumerate(range(0, calls, batch)):
            count = min(batch, calls - start)
            # Alternate which goes first after the loop turn: the first call pays for caches
            # the sender's work evicted, and both should pay that equally often.
            if index % 2:
                accepted += _time_track(op, track_samples, start, count)
                _time_raw(raw_queue, encode, raw_samples, start, count)
                track_first.append(track_samples[start])
            else:
                _time_raw(raw_queue, encode, raw_samples, start, count)
                accepted += _time_track(op, track_samples, start, count)
                raw_first.append(raw_samples[start])
            await asyncio.sleep(0)  # one loop iteration: the sender wakes and sends

        # A plain thread (no event loop in it) calling track() on the loop's client.
        thread_track = [0] * thread_calls
        thread_raw = [0] * thread_calls

        def in_thread() -> int:
            got = 0
            thread_queue: deque[bytes] = deque()
            for start in range(0, thread_calls, batch):
                count = min(batch, thread_calls - start)
                _time_raw(thread_queue, encode, thread_raw, start, count)
                got += _time_track(op, thread_track, start, count)
                time.sleep(0)  # let the loop thread run
            return got

        thread_accepted = await asyncio.to_thread(in_thread)
        stats = op.stats()
    finally:
        await op.aclose()
    gc_counts = gc.get_stats()
    return {
        "overhead_ns": overhead,
        "coroutine": _summary(track_samples, overhead),
        "coroutine_raw": _summary(raw_samples, overhead),
        "thread": _summary(thread_track, overhead),
        "thread_raw": _summary(thread_raw, overhead),
        "coroutine_first": _summary(track_first, overhead),
        "coroutine_raw_first": _summary(raw_first, overhead),
        "accepted": accepted,
        "thread_accepted": thread_accepted,
        "dropped": stats.dropped,
        "delivered_in_background": stats.delivered,
        "gc_collections": [g["collections"] for g in gc_counts],
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    def setup(parser: Any) -> None:
        parser.add_argument("--batch", type=int, default=50, help="calls per loop turn")
        parser.add_argument(
            "--delivery", choices=("loop", "thread"), default="loop", help="the client's mode"
        )

    args = parse_args(__doc__ or "", argv, setup)
    quick: bool = args.quick
    calls = 20_000 if quick else 200_000
    thread_calls = 10_000 if quick else 100_000
    report = Report("bench_caller_cost", "1. Caller cost of track()", quick)
    quiet_library_logs()
    with BenchServer(ServerOptions()) as server:
        data = asyncio.run(_measure(server.url, calls, thread_calls, args.batch, args.delivery))
    report.details = data
    co, co_raw = data["coroutine"], data["coroutine_raw"]
    th, th_raw = data["thread"], data["thread_raw"]
    raw = "raw encode+append"
    report.add(
        Figure(
            "coroutine_p50_us",
            "track() p50, coroutine",
            co["p50_us"],
            "µs",
            co_raw["p50_us"],
            raw,
            "<= 2 µs",
            co["p50_us"] <= 2.0,
        )
    )
    report.add(
        Figure(
            "coroutine_p99_us",
            "track() p99, coroutine",
            co["p99_us"],
            "µs",
            co_raw["p99_us"],
            raw,
            "<= 10 µs",
            co["p99_us"] <= 10.0,
        )
    )
    report.add(
        Figure(
            "coroutine_max_us", "track() max, coroutine", co["max_us"], "µs", co_raw["max_us"], raw
        )
    )
    p50_ratio = co["p50_us"] / co_raw["p50_us"]
    report.add(
        Figure(
            "coroutine_p50_vs_raw",
            "track() p50 / raw p50, coroutine",
            p50_ratio,
            "x",
            goal="<= 3x",
            passed=p50_ratio <= 3.0,
        )
    )
    first, raw_first = data["coroutine_first"], data["coroutine_raw_first"]
    report.add(
        Figure(
            "coroutine_first_p50_us",
            "track() p50, first call after a loop turn",
            first["p50_us"],
            "µs",
            raw_first["p50_us"],
            raw + ", same position",
        )
    )
    report.add(
        Figure(
            "thread_p50_us", "track() p50, plain thread", th["p50_us"], "µs", th_raw["p50_us"], raw
        )
    )
    report.add(
        Figure(
            "thread_p99_us", "track() p99, plain thread", th["p99_us"], "µs", th_raw["p99_us"], raw
        )
    )
    report.add(
        Figure(
            "thread_max_us", "track() max, plain thread", th["max_us"], "µs", th_raw["max_us"], raw
        )
    )
    report.note(
        f"{calls:,} timed calls from a coroutine and {thread_calls:,} from a thread, batches of "
        f"{args.batch}; delivery={args.delivery!r}; "
        f"timer overhead {data['overhead_ns']} ns subtracted; dropped {data['dropped']}."
    )
    return finish(report, args.json)


if __name__ == "__main__":
    main()
