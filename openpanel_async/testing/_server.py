"""A local OpenPanel ingestion server that speaks the wire contract, for tests and demos.

It validates payloads with the same rules as the client (400 JSON), checks credentials
(401 plain text), answers 200 JSON, and can be scripted to misbehave: statuses with headers,
delays, dropped connections, hung responses, a random failure rate, and a fixed-window rate
limiter that sends the ``x-ratelimit-*`` and ``retry-after`` headers. It records every
request it receives.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import msgspec
from aiohttp import web

from .._events import Decrement, Identify, Increment, decode_envelope
from ..errors import InvalidEventError

_MAX_BODY_BYTES = 1024 * 1024
_BOT_RE = re.compile(r"bot\b|crawler|spider|slurp|headlesschrome", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """One scripted answer. Scripted replies are used in order, one per request.

    Attributes:
        status: the HTTP status to answer with. With ``None`` the request is handled
            normally (validation, credentials, success) after ``delay``.
        body: the response body; a dict or list is sent as JSON. Default: the body the real
            server sends for that status.
        headers: extra response headers.
        delay: seconds to wait before answering (or before dropping the connection).
        drop: close the connection without answering.
        hang: never answer (until the server stops); for testing client deadlines.
    """

    status: int | None = None
    body: str | bytes | dict[str, Any] | list[Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    hang: bool = False


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request as the server received it, and how it answered."""

    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    arrived: float  # time.monotonic()
    status: int | None  # None: the connection was dropped or the request hung
    type: str | None  # the event type, when the body parsed
    payload: dict[str, Any] | None  # the decoded payload, when the body parsed
    # Every header in the order received, repeats kept (``headers`` keeps the last).
    raw_headers: tuple[tuple[str, str], ...] = ()  # lower-case names

    @property
    def properties(self) -> dict[str, Any]:
        props = (self.payload or {}).get("properties")
        return props if isinstance(props, dict) else {}


def _default_body(status: int) -> str | dict[str, Any]:
    if status == 200:
        return {"deviceId": uuid.uuid4().hex, "sessionId": uuid.uuid4().hex}
    if status == 401:
        return "Ingestion: Invalid cors or secret"
    if status == 429:
        return {"status": 429, "error": "Too Many Requests", "message": "Rate limit exceeded"}
    if status == 404:
        return {"status": 404, "message": "Profile not found"}
    if status >= 500:
        return "Internal server error"
    return {"status": status, "error": "Error", "message": f"HTTP {status}"}


class LocalOpenPanel:
    """An OpenPanel ingestion server on 127.0.0.1, started with ``async with``.

    Args:
        client_id: when given, requests must carry it (else 401). When None, any id is taken.
        client_secret: when given, requests must carry it (else 401).
        port: 0 picks a free port.
        path_prefix: serve ``{path_prefix}/track``, like a self-hosted install's ``/api``.
        response_delay: seconds before every answer (a WAN round trip, say).
        capacity: answer at most this many requests at a time, each after
            ``response_delay``; the others wait their turn, as on a saturated server, so
            the round trip grows with the number of requests in flight. None: no limit.
        rate_limit: ``(requests, window_seconds)``: a fixed-window limiter. Every answer
            then carries ``x-ratelimit-limit/-remaining/-reset``; refused requests get 429
            and ``retry-after``. Times are sent in (fractional) seconds.
        whole_seconds: send rate-limit times rounded up to whole seconds, as the real
            server does (by default they carry milliseconds, so that tests can use short
            windows).
        fail_rate: the share of requests answered with a random 500/502/503.
        seed: seeds the random failures, for reproducible runs.
        on_request: called with each request once it is answered (or dropped).
        record: keep every request in ``requests``. Turn off for long runs (with
            ``on_request`` to observe them) so that memory stays flat.
        strict_profiles: as the real server does, answer an ``increment`` or
            ``decrement`` of a profile no ``identify`` has stored with 404 "Profile not
            found" (the client retries it a few spaced times, then fails it). ``profiles``
            holds the stored ids (as text: ``1`` and ``"1"`` are one profile); add to it to
            start with profiles that exist. False: every profile exists.
    """

    def __init__(
        self,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        path_prefix: str = "",
        response_delay: float = 0.0,
        capacity: int | None = None,
        rate_limit: tuple[int, float] | None = None,
        whole_seconds: bool = False,
        fail_rate: float = 0.0,
        seed: int | None = None,
        on_request: Callable[[ReceivedRequest], None] | None = None,
        record: bool = True,
        strict_profiles: bool = True,
    ) -> None:
        self.client_id = client_id.lower() if client_id else None
        self.client_secret = client_secret
        self.host = host
        self.port = port
        self.path_prefix = path_prefix.rstrip("/")
        self.response_delay = response_delay
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity: must be >= 1 or None, got {capacity!r}")
        self._capacity = asyncio.Semaphore(capacity) if capacity is not None else None
        self.rate_limit = rate_limit
        self.whole_seconds = whole_seconds
        self.fail_rate = fail_rate
        self.requests: list[ReceivedRequest] = []
        self.strict_profiles = strict_profiles
        self.profiles: set[str] = set()
        self.on_request = on_request
        self.record = record
        self.request_count = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._random = random.Random(seed)
        self._script: deque[Reply] = deque()
        self._window_start = 0.0
        self._window_count = 0
        self._recent: dict[bytes, float] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The ``api_url`` to give the client."""
        return f"http://{self.host}:{self.port}{self.path_prefix}"

    async def start(self) -> None:
        app = web.Application(client_max_size=_MAX_BODY_BYTES * 4)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()  # a port in use must not leave a half-started server
            raise
        self._runner = runner
        server = site._server
        if self.port == 0 and server is not None:
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        """Stop listening and end every connection (hung requests included)."""
        self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- scripting and inspection -----------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue scripted replies for the next requests, in order."""
        self._script.extend(replies)

    def clear_script(self) -> None:
        self._script.clear()

    @property
    def events(self) -> list[ReceivedRequest]:
        """The requests answered 200: the events the server stored."""
        return [r for r in self.requests if r.status == 200]

    def payloads(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Payloads of the stored events, optionally of one type, in arrival order."""
        return [
            r.payload
            for r in self.events
            if r.payload is not None and (event_type is None or r.type == event_type)
        ]

    def reset(self) -> None:
        """Forget recorded requests, peaks, script and rate-limit window."""
        self.requests.clear()
        self.request_count = 0
        self._script.clear()
        self.peak_in_flight = self.in_flight
        self._window_count = 0
        self._window_start = 0.0

    async def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` requests in all were answered (or dropped)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.request_count >= count)

    # --- the handler ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        arrived = time.monotonic()
        body = b""
        status: int | None = None
        event_type: str | None = None
        payload: dict[str, Any] | None = None
        try:
            body = await request.read()
            reply = self._script.popleft() if self._script else None
            delay = self.response_delay if reply is None else reply.delay
            if self._capacity is not None:
                async with self._capacity:
                    await self._sleep(delay)
            elif delay > 0:
                await self._sleep(delay)
            if reply is not None and reply.hang:
                await self._stopping.wait()
                raise _Dropped
            if reply is not None and reply.drop:
                raise _Dropped
            if reply is None and self.fail_rate and self._random.random() < self.fail_rate:
                reply = Reply(status=self._random.choice((500, 502, 503)))
            response, event_type, payload = self._answer(request, body, reply)
            status = response.status
            return response
        except _Dropped:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=499)  # never reaches the client
        finally:
            self.in_flight -= 1
            raw_headers = tuple((k.lower(), v) for k, v in request.headers.items())
            received = ReceivedRequest(
                path=request.path,
                headers=dict(raw_headers),  # a repeated header: the last one
                raw_headers=raw_headers,
                body=body,
                arrived=arrived,
                status=status,
                type=event_type,
                payload=payload,
            )
            self.request_count += 1
            if self.record:
                self.requests.append(received)
            if self.on_request is not None:
                self.on_request(received)
            await self._notify()

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return
        raise _Dropped

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _answer(
        self, request: web.Request, body: bytes, reply: Reply | None
    ) -> tuple[web.Response, str | None, dict[str, Any] | None]:
        limit_headers, limited = self._rate_limit_headers()
        try:
            raw = msgspec.json.decode(body)
            event_type = raw.get("type") if isinstance(raw, dict) else None
            payload = raw.get("payload") if isinstance(raw, dict) else None
        except msgspec.DecodeError:
            event_type, payload = None, None
        if not isinstance(event_type, str):
            event_type = None
        if not isinstance(payload, dict):
            payload = None

        if reply is not None and reply.status is not None:
            headers = {**limit_headers, **reply.headers}
            return _response(reply.status, reply.body, headers), event_type, payload
        if limited:
            return _response(429, None, limit_headers), event_type, payload
        return self._ingest(request, body, limit_headers), event_type, payload

    def _ingest(self, request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
        """What the real server does with a request that nothing scripted."""
        if request.method != "POST" or request.path != f"{self.path_prefix}/track":
            return _response(404, {"status": 404, "message": "Route not found"}, headers)
        if len(body) > _MAX_BODY_BYTES:
            return _response(413, None, headers)
        if request.headers.get("content-encoding", "identity") != "identity":
            message = "body must be uncompressed JSON"
            return _response(400, _error(400, message), headers)
        if request.content_type != "application/json":
            return _response(415, None, headers)
        try:
            event, body_id, body_secret = decode_envelope(body)
        except InvalidEventError as exc:
            return _response(400, _error(400, str(exc)), headers)
        client_id = request.headers.get("openpanel-client-id") or body_id
        secret = request.headers.get("openpanel-client-secret") or body_secret
        if not client_id or (self.client_id is not None and client_id != self.client_id):
            return _response(401, "Ingestion: Invalid cors or secret", headers)
        if self.client_secret is not None and secret != self.client_secret:
            return _response(401, "Ingestion: Invalid cors or secret", headers)
        if secret is None and _BOT_RE.search(request.headers.get("user-agent", "")):
            return _response(202, {"bot": {"name": "bot"}}, headers)
        if request.headers.get("origin") is not None and self._is_duplicate(body):
            return _response(200, "Duplicate event", headers)
        profile = event.order_key()  # the profile's id as the server keys it, if any
        if isinstance(event, Identify) and profile is not None:
            self.profiles.add(profile)
        elif (
            isinstance(event, Increment | Decrement)
            and self.strict_profiles
            and profile not in self.profiles
        ):
            return _response(404, None, headers)
        return _response(200, None, headers)

    def _is_duplicate(self, body: bytes) -> bool:
        now = time.monotonic()
        seen = self._recent.get(body)
        self._recent = {k: t for k, t in self._recent.items() if now - t < 0.1}
        self._recent[body] = now
        return seen is not None and now - seen < 0.1

    def _rate_limit_headers(self) -> tuple[dict[str, str], bool]:
        """The limiter's headers for this request, and whether it is over the limit."""
        if self.rate_limit is None:
            return {}, False
        limit, window = self.rate_limit
        now = time.monotonic()
        if now - self._window_start >= window:
            self._window_start = now
            self._window_count = 0
        self._window_count += 1
        reset = max(0.0, self._window_start + window - now)
        reset_text = str(math.ceil(reset)) if self.whole_seconds else f"{reset:.3f}"
        headers = {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(0, limit - self._window_count)),
            "x-ratelimit-reset": reset_text,
        }
        limited = self._window_count > limit
        if limited:
            headers["retry-after"] = reset_text
        return headers, limited


class _Dropped(Exception):
    """Internal: close the connection without an answer."""


def _error(status: int, message: str) -> dict[str, Any]:
    return {"status": status, "error": "Error", "message": message}


def _response(
    status: int,
    body: str | bytes | dict[str, Any] | list[Any] | None,
    headers: Mapping[str, str],
) -> web.Response:
    if body is None:
        body = _default_body(status)
    if isinstance(body, dict | list):
        return web.Response(
            status=status,
            body=msgspec.json.encode(body),
            content_type="application/json",
            headers=dict(headers),
        )
    if isinstance(body, str):
        body = body.encode()
    return web.Response(status=status, body=body, content_type="text/plain", headers=dict(headers))
