"""7. Delivery under load with faults: 10% of requests answered 503, 1% of connections dropped.

The typical event is pushed as fast as possible with ``await op.send(...)`` and then
flushed, as in bench_throughput (default client settings, asyncio), first against a clean
server and then against one that answers 10% of the requests with 503 and closes 1% of
the connections without an answer. Figures: delivered events per second (first send() to
the end of flush(), so the tail of backed-off retries counts), the ratio to the clean run
of the same script (the baseline), the same up to the moment 99% of the events had arrived
(the rate without the tail of the last backed-off retries), and the events lost (every
event must still arrive: the default retry policy allows 6 attempts).

Baseline runs and fault runs alternate (clean, faults, faults, clean) so that the shared
machine's slow spells hit both alike.
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

from openpanel_async import Track

FAIL_RATE = 0.10
DROP_RATE = 0.01


async def _run(server: BenchServer, count: int) -> dict[str, Any]:
    name, props, pid = TYPICAL_NAME, TYPICAL_PROPERTIES, TYPICAL_PROFILE_ID
    before = await server.astats()
    op = make_client(server.url)
    t99: float | None = None

    async def watch() -> None:
        # When 99% of the events have arrived: the rate before the retry tail.
        nonlocal t99
        while op.stats().delivered < 0.99 * count:
            await asyncio.sleep(0.005)
        t99 = time.perf_counter() - start

    async with op:
        start = time.perf_counter()
        watcher = asyncio.create_task(watch())
        for _ in range(count):
            await op.send(Track(name=name, properties=props, profile_id=pid))
        sent = time.perf_counter()
        flushed = await op.flush(60.0)
        elapsed = time.perf_counter() - start
        stats = op.stats()
        await asyncio.wait_for(watcher, 1.0)
    assert t99 is not None
    after = await server.astats()
    return {
        "elapsed": elapsed,
        "t99": t99,
        "tail": elapsed - (sent - start),
        "flushed": flushed,
        "delivered": stats.delivered,
        "failed": stats.failed,
        "dropped": stats.dropped,
        "retries": stats.retries,
        "server_ok": after["ok"] - before["ok"],
        "server_503": after["by_status"].get("503", 0) - before["by_status"].get("503", 0),
        "server_dropped": after["dropped"] - before["dropped"],
        "server_requests": after["total"] - before["total"],
    }


async def _measure(server: BenchServer, count: int) -> dict[str, Any]:
    # Warm up the server and the client code paths.
    await _run(server, min(count, 2_000))
    half = count // 2
    runs: dict[str, list[dict[str, Any]]] = {"clean": [], "faults": []}
    for kind in ("clean", "faults", "faults", "clean"):
        if kind == "clean":
            await server.aconfigure(fail_rate=0.0, drop_rate=0.0)
        else:
            await server.aconfigure(fail_rate=FAIL_RATE, drop_rate=DROP_RATE, seed=len(runs[kind]))
        runs[kind].append(await _run(server, half))
    result: dict[str, Any] = {"runs": runs}
    for kind, items in runs.items():
        elapsed = sum(r["elapsed"] for r in items)
        delivered = sum(r["delivered"] for r in items)
        result[kind] = {
            "events_per_s": delivered / elapsed,
            "events_per_s_99": sum(0.99 * half / r["t99"] for r in items) / len(items),
            "lost": sum(half - r["server_ok"] for r in items)
            + sum(r["failed"] + r["dropped"] for r in items),
            "retries": sum(r["retries"] for r in items),
            "tail_s": max(r["tail"] for r in items),
            "server_503": sum(r["server_503"] for r in items),
            "server_dropped": sum(r["server_dropped"] for r in items),
            "server_requests": sum(r["server_requests"] for r in items),
        }
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    def setup(parser: Any) -> None:
        parser.add_argument(
            "--events", type=int, default=None, help="events per kind of run (default 20000)"
        )

    args = parse_args(__doc__ or "", argv, setup)
    quick: bool = args.quick
    count = args.events or (4_000 if quick else 20_000)
    report = Report("bench_faults", "7. Delivery with 10% 503s and 1% dropped connections", quick)
    quiet_library_logs()
    with BenchServer(ServerOptions()) as server:
        data = asyncio.run(_measure(server, count))
    report.details = data
    clean, faults = data["clean"], data["faults"]
    report.add(
        Figure(
            "events_per_s_faults",
            "delivered ev/s with faults",
            faults["events_per_s"],
            "ev/s",
            clean["events_per_s"],
            "clean run",
        )
    )
    report.add(
        Figure(
            "events_per_s_99_faults",
            "ev/s until 99% delivered, faults",
            faults["events_per_s_99"],
            "ev/s",
            clean["events_per_s_99"],
            "clean run",
        )
    )
    report.add(
        Figure(
            "lost_faults",
            "events lost with faults",
            faults["lost"],
            "events",
            goal="0",
            passed=faults["lost"] == 0,
        )
    )
    report.add(
        Figure(
            "retry_tail_s",
            "flush tail after the last send(), faults",
            faults["tail_s"],
            "s",
            clean["tail_s"],
            "clean run",
        )
    )
    report.add(
        Figure(
            "requests_per_event",
            "requests per delivered event, faults",
            faults["server_requests"] / max(1, count),
            "req",
            1.0,
            "one per event",
        )
    )
    report.note(
        f"{count:,} events per kind in two halves; faults: {faults['server_503']} x 503, "
        f"{faults['server_dropped']} dropped connections, {faults['retries']} retries"
    )
    return finish(report, args.json)


if __name__ == "__main__":
    main()
