"""2. Event-loop lag while tracking at 1,000, 5,000 and 10,000 events per second.

A ticker task in the same loop sleeps 1 ms at a time and records how late it wakes up (the
lag). A producer task calls ``op.track()`` for the typical event at the offered rate (the
events due are tracked once per millisecond) for ``--duration`` seconds, then the client is
flushed. Figures per rate and per delivery mode: p99 and max lag, and the CPU time of the
loop's thread per delivered event (everything the client costs the caller's loop: track(),
waking the sender and, with ``delivery="loop"``, the HTTP requests themselves).

Both delivery modes are measured: ``delivery="loop"`` (the sender's tasks share the
caller's loop) and ``delivery="thread"`` (they run on the client's own thread and loop).

Baselines, same run: the ticker on an idle loop (lag), and the minimal hand-written sender
(encode per event, a plain asyncio.Queue, 64 workers over one aiohttp session, no retries)
fed by the same producer at the same rate (lag and CPU per event). At each rate the three
run in mirrored order (minimal, loop, thread, thread, loop, minimal), each in two halves
with a fresh client per half; the lags of both halves are pooled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from _common import (
    TYPICAL_NAME,
    TYPICAL_PROFILE_ID,
    TYPICAL_PROPERTIES,
    Figure,
    MinimalQueueSender,
    Report,
    finish,
    make_client,
    parse_args,
    percentile,
    quiet_library_logs,
)
from _server import BenchServer, ServerOptions

TICK = 0.001


class Ticker:
    """Sleeps TICK seconds in a loop and records how much later than asked it woke up."""

    def __init__(self) -> None:
        self.lags_ns: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        pc = time.perf_counter_ns
        tick_ns = int(TICK * 1e9)
        lags = self.lags_ns
        while True:
            t0 = pc()
            await asyncio.sleep(TICK)
            lags.append(pc() - t0 - tick_ns)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, float]:
        return _lag_summary(self.lags_ns)


def _lag_summary(lags_ns: Sequence[int]) -> dict[str, float]:
    values = sorted(max(0, v) for v in lags_ns)
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "ticks": 0}
    return {
        "p50_ms": percentile(values, 0.5) / 1e6,
        "p99_ms": percentile(values, 0.99) / 1e6,
        "max_ms": values[-1] / 1e6,
        "ticks": len(values),
    }


def _merge(phases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool the lags and add up the counts of the phases of one sender at one rate."""
    merged: dict[str, Any] = _lag_summary([v for p in phases for v in p["lags_ns"]])
    for key in phases[0]:
        if key != "lags_ns" and isinstance(phases[0][key], int | float):
            merged[key] = sum(p[key] for p in phases)
    merged["cpu_us_per_event"] = merged["cpu_s"] / max(1, merged["delivered"]) * 1e6
    merged["delivered_in_window_per_s"] = merged["delivered_in_window"] / merged["window_s"]
    return merged


async def _produce(track: Callable[[], object], rate: float, duration: float) -> int:
    """Call ``track`` ``rate`` times a second for ``duration`` seconds; the number of calls."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    made = 0
    while True:
        elapsed = loop.time() - start
        if elapsed >= duration:
            break
        due = min(int(rate * elapsed) + 1, int(rate * duration))
        while made < due:
            track()
            made += 1
        await asyncio.sleep(TICK)
    return made


DELIVERY_MODES = ("loop", "thread")
# --max-concurrency: the client's option (default: the library's own default).
CLIENT_OPTIONS: dict[str, Any] = {}


async def _library_phase(url: str, rate: float, duration: float, delivery: str) -> dict[str, Any]:
    name, props, pid = TYPICAL_NAME, TYPICAL_PROPERTIES, TYPICAL_PROFILE_ID
    op = make_client(url, shutdown_timeout=2.0, delivery=delivery, **CLIENT_OPTIONS)
    await op.start()  # with delivery="thread", starts the thread outside the measured window
    accepted = 0

    def track() -> None:
        nonlocal accepted
        accepted += op.track(name, props, profile_id=pid)

    cpu0 = time.thread_time()
    with Ticker() as ticker:
        made = await _produce(track, rate, duration)
    in_window = op.stats().delivered
    flushed = await op.flush(15.0)
    cpu = time.thread_time() - cpu0
    stats = op.stats()
    await op.aclose()
    return {
        "lags_ns": ticker.lags_ns,
        "window_s": duration,
        "offered": made,
        "delivered_in_window": in_window,
        "accepted": accepted,
        "delivered": stats.delivered,
        "dropped": stats.dropped,
        "failed": stats.failed,
        "flushed": int(flushed),
        "cpu_s": cpu,
    }


async def _minimal_phase(url: str, rate: float, duration: float) -> dict[str, Any]:
    name, props, pid = TYPICAL_NAME, TYPICAL_PROPERTIES, TYPICAL_PROFILE_ID
    async with MinimalQueueSender(url, 64) as sender:
        cpu0 = time.thread_time()
        with Ticker() as ticker:
            made = await _produce(lambda: sender.track(name, props, pid), rate, duration)
        in_window = sender.delivered
        await asyncio.wait_for(sender.drain(), 15.0)
        cpu = time.thread_time() - cpu0
        delivered = sender.delivered
    return {
        "lags_ns": ticker.lags_ns,
        "window_s": duration,
        "offered": made,
        "delivered_in_window": in_window,
        "delivered": delivered,
        "cpu_s": cpu,
    }


async def _idle_phase(duration: float) -> dict[str, float]:
    with Ticker() as ticker:
        await asyncio.sleep(duration)
    return ticker.summary()


async def _measure(
    url: str, rates: Sequence[int], duration: float, baseline_duration: float
) -> dict[str, Any]:
    idle = await _idle_phase(min(2.0, baseline_duration))
    results: dict[str, Any] = {"idle": idle, "minimal": {}}
    results.update({mode: {} for mode in DELIVERY_MODES})
    for rate in rates:
        # Mirrored order: each runs in two halves, so that a slow spell hits all alike.
        minimal = [await _minimal_phase(url, rate, baseline_duration / 2)]
        library: dict[str, list[dict[str, Any]]] = {mode: [] for mode in DELIVERY_MODES}
        for mode in (*DELIVERY_MODES, *reversed(DELIVERY_MODES)):
            library[mode].append(await _library_phase(url, rate, duration / 2, mode))
        minimal.append(await _minimal_phase(url, rate, baseline_duration / 2))
        results["minimal"][rate] = _merge(minimal)
        for mode in DELIVERY_MODES:
            results[mode][rate] = _merge(library[mode])
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    def setup(parser: Any) -> None:
        parser.add_argument(
            "--duration", type=float, default=None, help="seconds per rate and delivery mode"
        )
        parser.add_argument(
            "--max-concurrency", type=int, default=None, help="the client's max_concurrency"
        )
        parser.add_argument(
            "--rates",
            type=int,
            nargs="+",
            default=[1_000, 5_000, 10_000],
            help="events per second to track (default: 1000 5000 10000)",
        )

    args = parse_args(__doc__ or "", argv, setup)
    if args.max_concurrency is not None:
        CLIENT_OPTIONS["max_concurrency"] = args.max_concurrency
    quick: bool = args.quick
    duration = args.duration or (1.0 if quick else 4.0)
    baseline_duration = min(duration, 1.0 if quick else 2.5)
    rates: list[int] = args.rates
    report = Report("bench_loop_lag", "2. Event-loop lag while tracking", quick)
    quiet_library_logs()
    with BenchServer(ServerOptions()) as server:
        data = asyncio.run(_measure(server.url, rates, duration, baseline_duration))
        report.details["server"] = server.stats()
    report.details.update(data)
    idle = data["idle"]
    report.add(Figure("idle_lag_p99_ms", "lag p99, idle loop", idle["p99_ms"], "ms"))
    for rate in rates:
        mini = data["minimal"][rate]
        tag = f"{rate // 1000}k/s" if rate % 1000 == 0 else f"{rate:,}/s"
        for mode in DELIVERY_MODES:
            lib = data[mode][rate]
            label = f"{tag}, {mode}"
            goal = "<= 5 ms" if rate == 5_000 else None
            passed = lib["p99_ms"] <= 5.0 if rate == 5_000 else None
            report.add(
                Figure(
                    f"lag_p99_ms_{rate}_{mode}",
                    f"lag p99 @ {label}",
                    lib["p99_ms"],
                    "ms",
                    mini["p99_ms"],
                    "minimal sender",
                    goal,
                    passed,
                )
            )
            report.add(
                Figure(
                    f"lag_max_ms_{rate}_{mode}",
                    f"lag max @ {label}",
                    lib["max_ms"],
                    "ms",
                    mini["max_ms"],
                    "minimal sender",
                )
            )
            report.add(
                Figure(
                    f"cpu_us_per_event_{rate}_{mode}",
                    f"caller-loop CPU per delivered event @ {label}",
                    lib["cpu_us_per_event"],
                    "µs",
                    mini["cpu_us_per_event"],
                    "minimal sender",
                )
            )
            report.add(
                Figure(
                    f"delivered_in_window_{rate}_{mode}",
                    f"delivered during the window @ {label}",
                    lib["delivered_in_window_per_s"],
                    "ev/s",
                    mini["delivered_in_window_per_s"],
                    "minimal sender",
                )
            )
            if lib["dropped"] or lib["failed"]:
                report.note(
                    f"@ {label}: {lib['dropped']} dropped (queue full), {lib['failed']} failed"
                )
    report.note(
        f"max_concurrency {CLIENT_OPTIONS.get('max_concurrency', 'default')}; "
        f"library: {duration:g} s per rate and mode, minimal sender: {baseline_duration:g} s per "
        "rate (each in two mirrored halves); "
        f"idle baseline lag p99 {idle['p99_ms']:.2f} ms; lag = wake-up delay of a 1 ms sleep."
    )
    return finish(report, args.json)


if __name__ == "__main__":
    main()
