"""A minimal, counting OpenPanel ingestion server for benchmarks, run in its own process.

The parent starts it with :class:`BenchServer` (a context manager): the server runs in a
child Python process (``python _server.py <json options>``) on 127.0.0.1 with a free port,
so it never shares the client's CPU time (or GIL). It answers ``POST /track`` with a
200 JSON body like the real server's, and can be told to answer slowly, to rate limit
(fixed window or token bucket, with ``x-ratelimit-*`` and ``retry-after`` headers in
seconds), to fail a share of requests with 503, and to drop a share of connections.

It keeps counters only (no per-request recording): totals, by status, dropped
connections, the peak number of requests in flight, and per-second histograms. The parent
reads them from ``GET /_stats``; ``POST /_reset`` zeroes them, ``POST /_config`` changes the
options of a running server.

The child exits on its own when its stdin closes (the parent died) or after
``max_lifetime`` seconds; the parent terminates it (then kills it) in ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Self

_READY = "BENCH-SERVER-READY"
_OK_BODY = b'{"deviceId":"0b7e4c8a-bench-device","sessionId":"9d1f2e3a-bench-session"}'
_FAIL_BODY = b"Service Unavailable"
_LIMITED_BODY = b'{"statusCode":429,"error":"Too Many Requests","message":"Rate limit exceeded"}'


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """How the benchmark server behaves. All durations in seconds.

    Attributes:
        response_delay: wait this long before every answer (a WAN round trip).
        delay_jitter: vary each delay uniformly by up to this fraction of it (0.5: from
            half to one and a half times ``response_delay``), as a real network does.
        rate_limit: requests allowed per ``rate_window``; 0 disables the limiter.
        rate_window: the window (fixed) or refill period (bucket) of the limiter.
        rate_mode: ``"fixed"`` (a fixed window, like fastify's rate-limit plugin) or
            ``"bucket"`` (a token bucket holding ``rate_limit`` tokens).
        integer_headers: send rate-limit times as whole seconds (rounded up), as the real
            server does, instead of milliseconds precision.
        fail_rate: the share of requests answered 503.
        drop_rate: the share of requests whose connection is closed without an answer.
        seed: seeds the random faults.
        use_uvloop: run the server on uvloop when it is installed.
        max_lifetime: the server exits by itself after this long, whatever happens.
    """

    response_delay: float = 0.0
    delay_jitter: float = 0.0
    rate_limit: int = 0
    rate_window: float = 1.0
    rate_mode: str = "fixed"
    integer_headers: bool = False
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    seed: int = 1
    use_uvloop: bool = True
    max_lifetime: float = 180.0


@dataclass(slots=True)
class _Counters:
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    ok: int = 0
    limited: int = 0
    failed: int = 0
    dropped: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0  # of the requests that arrived since the last reset
    peak_in_flight: int = 0
    first_request: float | None = None
    last_ok: float | None = None
    body_bytes: int = 0
    # Per whole second since the first request: 200s and 429s.
    ok_per_second: dict[int, int] = field(default_factory=dict)
    limited_per_second: dict[int, int] = field(default_factory=dict)


# --- the child process --------------------------------------------------------------------


class _Limiter:
    """Decides whether a request is over the limit and which headers it gets."""

    def __init__(self, options: ServerOptions) -> None:
        self.limit = options.rate_limit
        self.window = options.rate_window
        self.mode = options.rate_mode
        self.integer = options.integer_headers
        self.window_start = 0.0
        self.count = 0
        self.tokens = float(self.limit)
        self.refilled = time.monotonic()

    def _seconds(self, value: float) -> str:
        if self.integer:
            return str(math.ceil(value))
        return f"{value:.3f}"

    def check(self) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        if self.mode == "bucket":
            rate = self.limit / self.window
            self.tokens = min(float(self.limit), self.tokens + (now - self.refilled) * rate)
            self.refilled = now
            limited = self.tokens < 1.0
            if not limited:
                self.tokens -= 1.0
            remaining = int(self.tokens)
            reset = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / rate
        else:
            if now - self.window_start >= self.window:
                self.window_start = now
                self.count = 0
            self.count += 1
            limited = self.count > self.limit
            remaining = max(0, self.limit - self.count)
            reset = max(0.0, self.window_start + self.window - now)
        headers = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": self._seconds(reset),
        }
        if limited:
            headers["retry-after"] = self._seconds(reset)
        return limited, headers


class _App:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.counters = _Counters()
        self.random = random.Random(options.seed)
        self.limiter = _Limiter(options) if options.rate_limit > 0 else None

    def configure(self, changes: dict[str, Any]) -> None:
        self.options = replace(self.options, **changes)
        self.random = random.Random(self.options.seed)
        self.limiter = _Limiter(self.options) if self.options.rate_limit > 0 else None

    def reset(self) -> None:
        # Requests still being answered belong to the old counters: a fresh object is
        # counted only by the requests that arrive from now on.
        self.counters = _Counters()
        if self.limiter is not None:
            self.limiter = _Limiter(self.options)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        now = time.monotonic()
        usage = os.times()
        return {
            "total": c.total,
            "ok": c.ok,
            "limited": c.limited,
            "failed": c.failed,
            "dropped": c.dropped,
            "by_status": dict(c.by_status),
            "in_flight": c.in_flight,
            "peak_in_flight": c.peak_in_flight,
            "body_bytes": c.body_bytes,
            # Seconds from the first request to the last 200, on the server's clock.
            "ok_span": (
                c.last_ok - c.first_request
                if c.last_ok is not None and c.first_request is not None
                else 0.0
            ),
            "since_reset": now - c.started,
            "ok_per_second": [c.ok_per_second.get(i, 0) for i in range(_span(c.ok_per_second))],
            "limited_per_second": [
                c.limited_per_second.get(i, 0) for i in range(_span(c.limited_per_second))
            ],
            "cpu_seconds": usage.user + usage.system,
            "pid": os.getpid(),
            "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "options": asdict(self.options),
        }

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        path = request.path
        if path.startswith("/_"):
            return await self._control(request, path)
        c = self.counters
        now = time.monotonic()
        if c.first_request is None:
            c.first_request = now
        c.total += 1
        c.in_flight += 1
        if c.in_flight > c.peak_in_flight:
            c.peak_in_flight = c.in_flight
        try:
            body = await request.read()
            c.body_bytes += len(body)
            options = self.options
            delay = options.response_delay
            if delay > 0:
                if options.delay_jitter:
                    delay *= 1.0 + options.delay_jitter * (2.0 * self.random.random() - 1.0)
                await asyncio.sleep(delay)
            if options.drop_rate and self.random.random() < options.drop_rate:
                c.dropped += 1
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return web.Response(status=499)  # never reaches the client
            headers: dict[str, str] | None = None
            if self.limiter is not None:
                limited, headers = self.limiter.check()
                if limited:
                    return self._answer(c, 429, _LIMITED_BODY, headers, "application/json")
            if options.fail_rate and self.random.random() < options.fail_rate:
                return self._answer(c, 503, _FAIL_BODY, headers, "text/plain")
            return self._answer(c, 200, _OK_BODY, headers, "application/json")
        finally:
            c.in_flight -= 1

    def _answer(
        self,
        c: _Counters,
        status: int,
        body: bytes,
        headers: dict[str, str] | None,
        content_type: str,
    ) -> Any:
        from aiohttp import web

        now = time.monotonic()
        second = int(now - (c.first_request or now))
        key = str(status)
        c.by_status[key] = c.by_status.get(key, 0) + 1
        if status == 200:
            c.ok += 1
            c.last_ok = now
            c.ok_per_second[second] = c.ok_per_second.get(second, 0) + 1
        elif status == 429:
            c.limited += 1
            c.limited_per_second[second] = c.limited_per_second.get(second, 0) + 1
        else:
            c.failed += 1
        return web.Response(status=status, body=body, headers=headers, content_type=content_type)

    async def _control(self, request: Any, path: str) -> Any:
        from aiohttp import web

        if path == "/_stats":
            return web.Response(body=json.dumps(self.stats()), content_type="application/json")
        if path == "/_reset" and request.method == "POST":
            self.reset()
            return web.Response(body=b"{}", content_type="application/json")
        if path == "/_config" and request.method == "POST":
            self.configure(json.loads(await request.read()))
            return web.Response(body=b"{}", content_type="application/json")
        return web.Response(status=404)


def _span(histogram: dict[int, int]) -> int:
    return max(histogram) + 1 if histogram else 0


async def _serve(options: ServerOptions) -> None:
    from aiohttp import web

    app = _App(options)
    loop = asyncio.get_running_loop()
    server = web.Server(app.handle, access_log=None, handler_cancellation=False)
    listener = await loop.create_server(server, "127.0.0.1", 0, backlog=4096)
    port = listener.sockets[0].getsockname()[1]
    print(f"{_READY} {port}", flush=True)
    done = asyncio.Event()

    def watch_stdin() -> None:
        # EOF on stdin: the parent is gone (or closed us); never outlive it.
        with contextlib.suppress(Exception):
            sys.stdin.buffer.read()
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        async with asyncio.timeout(options.max_lifetime):
            await done.wait()
    except TimeoutError:
        pass
    listener.close()
    await server.shutdown(0.5)


def _child_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.CRITICAL)
    options = ServerOptions(**json.loads(argv[0])) if argv else ServerOptions()
    runner: Any = asyncio.run
    if options.use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    try:
        runner(_serve(options))
    except KeyboardInterrupt:
        pass
    finally:
        # Do not wait for the stdin thread or lingering connections.
        sys.stdout.flush()
        os._exit(0)


# --- the parent side --------------------------------------------------------------------------


class BenchServer:
    """The parent's handle on a benchmark server process.

    Use as ``with BenchServer(ServerOptions(...)) as server: ... server.url ...``; the
    process is terminated on exit, whatever happened. Start and stop it outside the event
    loop: both block for a moment.
    """

    def __init__(self, options: ServerOptions | None = None, start_timeout: float = 15.0) -> None:
        self.options = options or ServerOptions()
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        # Closed in close(); a context manager cannot span start() and close().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else 0

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), json.dumps(asdict(self.options))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            self.port = self._read_port()
        except BaseException:
            self.close()
            raise

    def _read_port(self) -> int:
        process = self._process
        assert process is not None
        assert process.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        buffer = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffer += chunk
                for line in buffer.decode(errors="replace").splitlines():
                    if line.startswith(_READY):
                        return int(line.split()[1])
            elif process.poll() is not None:
                break
        self._stderr.seek(0)
        detail = self._stderr.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"the benchmark server did not start: {detail or buffer!r}")

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=3.0)
        finally:
            if process.stdout is not None:
                process.stdout.close()
            self._stderr.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Blocking control calls: use them outside the event loop, or through asyncio.to_thread.

    def _call(self, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method="GET" if data is None else "POST"
        )
        with urllib.request.urlopen(request, timeout=10.0) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    def stats(self) -> dict[str, Any]:
        return self._call("/_stats")

    def reset(self) -> None:
        self._call("/_reset", {})

    def configure(self, **changes: Any) -> None:
        known = {f.name for f in fields(ServerOptions)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown server options: {sorted(unknown)}")
        self._call("/_config", changes)
        self.options = replace(self.options, **changes)

    async def astats(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.stats)

    async def areset(self) -> None:
        await asyncio.to_thread(self.reset)

    async def aconfigure(self, **changes: Any) -> None:
        await asyncio.to_thread(lambda: self.configure(**changes))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
