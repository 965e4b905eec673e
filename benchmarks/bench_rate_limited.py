"""5. Rate-limited delivery: the server allows R requests per second.

The local server limits requests to R per second and answers the excess with 429 and
``retry-after``; every answer carries ``x-ratelimit-limit/-remaining/-reset``. A client
with default settings is kept backlogged (a producer task awaits ``op.send()`` for the
typical event, so the queue is always full) for ``--duration`` seconds. Figures: the rate of
200s the server gave during that time as a share of R (the baseline is R itself: the
rate an ideal client would get), and the share of requests answered 429.

Limiter variants (all with R = ``--rate``):
* fixed window of 1 s, reset times in milliseconds: the goal is judged on this one;
* token bucket (R tokens, refilled continuously);
* fixed window with reset times rounded up to whole seconds, as the real server (fastify's
  rate-limit plugin) sends them;
* fixed window with a 20 ms round trip (the server answers after 10 to 30 ms), so that
  requests are still in flight when the window runs out.

The token bucket starts full, so an ideal client gets R + R/duration per second on average
(the initial burst): that is its baseline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from _common import (
    TYPICAL_NAME,
    TYPICAL_PROFILE_ID,
    TYPICAL_PROPERTIES,
    Figure,
    Report,
    finish,
    make_client,
    parse_args,
    quiet_library_logs,
)
from _server import BenchServer, ServerOptions

from openpanel_async import ClientClosedError, Track

VARIANTS: dict[str, dict[str, Any]] = {
    "fixed": {"rate_mode": "fixed", "integer_headers": False},
    "bucket": {"rate_mode": "bucket", "integer_headers": False},
    "fixed_whole_seconds": {"rate_mode": "fixed", "integer_headers": True},
    "fixed_rtt": {
        "rate_mode": "fixed",
        "integer_headers": False,
        "response_delay": 0.02,
        "delay_jitter": 0.5,
    },
}
LABELS = {
    "fixed": "fixed window",
    "bucket": "token bucket",
    "fixed_whole_seconds": "fixed window, whole-second headers",
    "fixed_rtt": "fixed window, 10-30 ms round trip",
}


async def _variant(server: BenchServer, rate: int, duration: float) -> dict[str, Any]:
    name, props, pid = TYPICAL_NAME, TYPICAL_PROPERTIES, TYPICAL_PROFILE_ID
    op = make_client(server.url, shutdown_timeout=0.0)
    await op.start()

    async def produce() -> None:
        try:
            while True:
                await op.send(Track(name=name, properties=props, profile_id=pid))
        except ClientClosedError:
            return

    producer = asyncio.create_task(produce())
    start = time.perf_counter()
    paused_samples: list[float] = []
    while time.perf_counter() - start < duration:
        await asyncio.sleep(0.05)
        paused_samples.append(op.stats().paused_for)
    stats_at_end = await server.astats()
    elapsed = time.perf_counter() - start
    client = op.stats()
    producer.cancel()
    await op.aclose()
    total = stats_at_end["total"]
    return {
        "elapsed": elapsed,
        "ok": stats_at_end["ok"],
        "limited": stats_at_end["limited"],
        "total": total,
        "achieved_per_s": stats_at_end["ok"] / elapsed,
        "share_429": stats_at_end["limited"] / total if total else 0.0,
        "ok_per_second": stats_at_end["ok_per_second"],
        "limited_per_second": stats_at_end["limited_per_second"],
        "client_rate_limited": client.rate_limited,
        "client_retries": client.retries,
        "share_of_time_paused": sum(p > 0 for p in paused_samples) / max(1, len(paused_samples)),
    }


async def _measure(server: BenchServer, rate: int, duration: float) -> dict[str, Any]:
    results = {}
    for variant, options in VARIANTS.items():
        await server.aconfigure(
            rate_limit=rate,
            rate_window=1.0,
            **{"response_delay": 0.0, "delay_jitter": 0.0, **options},
        )
        await server.areset()
        results[variant] = await _variant(server, rate, duration)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    def setup(parser: Any) -> None:
        parser.add_argument("--rate", type=int, default=1000, help="R, requests per second")
        parser.add_argument("--duration", type=float, default=None, help="seconds per variant")

    args = parse_args(__doc__ or "", argv, setup)
    quick: bool = args.quick
    duration = args.duration or (2.0 if quick else 5.0)
    rate: int = args.rate
    report = Report("bench_rate_limited", f"5. Rate-limited delivery (R = {rate}/s)", quick)
    quiet_library_logs()
    with BenchServer(ServerOptions()) as server:
        data = asyncio.run(_measure(server, rate, duration))
    report.details = data
    labels = LABELS
    for variant, result in data.items():
        is_goal = variant == "fixed"
        share = result["achieved_per_s"] / rate
        if variant == "bucket":
            ideal, ideal_label = rate * (1 + 1 / result["elapsed"]), "ideal: R + burst"
        else:
            ideal, ideal_label = rate, "R"
        report.add(
            Figure(
                f"achieved_{variant}",
                f"achieved rate, {labels[variant]}",
                result["achieved_per_s"],
                "req/s",
                ideal,
                ideal_label,
                ">= 0.90x" if is_goal else None,
                share >= 0.90 if is_goal else None,
            )
        )
        report.add(
            Figure(
                f"share_429_{variant}",
                f"share of requests 429, {labels[variant]}",
                result["share_429"],
                "",
                goal="< 5%" if is_goal else None,
                passed=result["share_429"] < 0.05 if is_goal else None,
            )
        )
        report.note(
            f"{labels[variant]}: 200s per second {result['ok_per_second']}, 429s per second "
            f"{result['limited_per_second']}; client paused {result['share_of_time_paused']:.0%}"
            " of the time"
        )
    report.note(f"{duration:g} s per variant, default client settings, always backlogged.")
    return finish(report, args.json)


if __name__ == "__main__":
    main()
