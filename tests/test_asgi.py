"""The ASGI integration: OpenPanelMiddleware, openpanel_lifespan and the FastAPI example.

The middleware is first called directly with crafted scopes; then the example app of
``examples/fastapi_app.py`` runs under a real uvicorn server on 127.0.0.1 and is sent
hundreds of concurrent HTTP requests, and what reached the local OpenPanel server is
checked event by event.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openpanel_async import EventContext, OpenPanel, event_context, set_identity
from openpanel_async._context import current_context
from openpanel_async.asgi import OpenPanelMiddleware, openpanel_lifespan
from openpanel_async.testing import EventRecorder, LocalOpenPanel, ReceivedRequest

from .conftest import CLIENT_ID, CLIENT_SECRET, assert_accounted, make_client

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


# --- calling the middleware directly ---------------------------------------------------------


def http_scope(
    peer: str | None = "203.0.113.9",
    headers: Iterable[tuple[str, str | bytes]] = (),
    *,
    scope_type: str = "http",
) -> Scope:
    """A scope as uvicorn builds it: lower-case header names, ``client`` = (host, port)."""
    encoded = [
        (name.lower().encode("latin-1"), value if isinstance(value, bytes) else value.encode())
        for name, value in headers
    ]
    return {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http" if scope_type == "http" else "ws",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": encoded,
        "client": None if peer is None else (peer, 51234),
        "server": ("127.0.0.1", 8000),
    }


async def no_receive() -> Message:  # pragma: no cover - the test apps never read
    raise AssertionError("unexpected receive()")


async def no_send(message: Message) -> None:  # pragma: no cover - the test apps never answer
    raise AssertionError("unexpected send()")


def snapshot() -> EventContext | None:
    """A copy of the current context's public fields (equal to a plain EventContext(...))."""
    context = current_context()
    if context is None:
        return None
    return EventContext(
        client_ip=context.client_ip,
        user_agent=context.user_agent,
        profile_id=context.profile_id,
        groups=None if context.groups is None else list(context.groups),
    )


async def context_seen(
    scope: Scope, trusted: Iterable[str] = (), forwarded_header: str = "x-forwarded-for"
) -> EventContext | None:
    """The event context an app behind the middleware sees."""
    seen: list[EventContext | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(snapshot())

    middleware = OpenPanelMiddleware(
        app, trusted_proxies=trusted, forwarded_header=forwarded_header
    )
    await middleware(scope, no_receive, no_send)
    assert len(seen) == 1
    return seen[0]


async def client_ip_seen(scope: Scope, trusted: Iterable[str] = ()) -> str | None:
    # A scope carrying a Forwarded header is read with the RFC 7239 setting: the middleware
    # reads only the one header the operator names.
    names = {name for name, _ in scope["headers"]}
    header = (
        "forwarded"
        if b"forwarded" in names and b"x-forwarded-for" not in names
        else "x-forwarded-for"
    )
    context = await context_seen(scope, trusted, header)
    assert context is not None
    return context.client_ip


XFF = "x-forwarded-for"
TEN = ["10.0.0.0/8"]


@pytest.mark.parametrize(
    ("peer", "trusted", "headers", "expected"),
    [
        pytest.param("203.0.113.9", [], [], "203.0.113.9", id="peer-ipv4"),
        pytest.param("2001:DB8:0::0001", [], [], "2001:db8::1", id="peer-ipv6-normalised"),
        pytest.param(None, [], [], None, id="no-client-in-scope"),
        pytest.param("testclient", [], [], None, id="peer-not-an-ip"),
        # Forged headers: the peer is not a trusted proxy, so it is the client.
        pytest.param("127.0.0.1", [], [(XFF, "198.51.100.1")], "127.0.0.1", id="xff-no-trusted-proxies"),
        pytest.param("203.0.113.9", TEN, [(XFF, "198.51.100.1")], "203.0.113.9", id="xff-untrusted-peer"),
        pytest.param("203.0.113.9", TEN, [("forwarded", "for=198.51.100.1")], "203.0.113.9", id="forwarded-untrusted-peer"),
        pytest.param("11.0.0.1", TEN, [(XFF, "198.51.100.1")], "11.0.0.1", id="xff-peer-just-outside-cidr"),
        pytest.param("::1", ["127.0.0.1"], [(XFF, "198.51.100.1")], "::1", id="xff-ipv6-loopback-not-trusted-by-ipv4"),
        # A trusted peer: the nearest address that is not one of our proxies is the client.
        pytest.param("10.0.0.1", ["10.0.0.1"], [(XFF, "198.51.100.1")], "198.51.100.1", id="xff-trusted-ip"),
        pytest.param("10.1.2.3", TEN, [(XFF, "198.51.100.1")], "198.51.100.1", id="xff-trusted-cidr"),
        pytest.param("10.0.0.1", TEN, [(XFF, "1.2.3.4, 10.0.0.2")], "1.2.3.4", id="xff-chain-through-proxies"),
        pytest.param("10.0.0.1", TEN, [(XFF, "6.6.6.6, 1.2.3.4, 10.0.0.2")], "1.2.3.4", id="xff-forged-leftmost-ignored"),
        pytest.param("10.0.0.1", TEN, [(XFF, "6.6.6.6"), (XFF, "1.2.3.4, 10.0.0.2")], "1.2.3.4", id="xff-several-headers"),
        pytest.param("10.0.0.1", TEN, [(XFF, "10.0.0.3, 10.0.0.2")], "10.0.0.3", id="xff-all-trusted-leftmost"),
        pytest.param("10.0.0.1", TEN, [], "10.0.0.1", id="trusted-peer-no-header"),
        pytest.param("10.0.0.1", TEN, [(XFF, "")], "10.0.0.1", id="xff-empty"),
        pytest.param("10.0.0.1", TEN, [(XFF, "not-an-ip")], None, id="xff-only-invalid-means-unknown"),
        pytest.param("10.0.0.1", TEN, [(XFF, "bogus, 1.2.3.4")], "1.2.3.4", id="xff-invalid-left-skipped"),
        pytest.param("10.0.0.1", TEN, [(XFF, " 1.2.3.4 ,, 10.0.0.2 ")], "1.2.3.4", id="xff-blank-entries-skipped"),
        pytest.param("10.0.0.1", TEN, [(XFF, "198.51.100.7:4711, 10.0.0.2")], "198.51.100.7", id="xff-ipv4-with-port"),
        pytest.param("10.0.0.1", TEN, [(XFF, "[2a00:1450:4001::1]:443")], "2a00:1450:4001::1", id="xff-bracketed-ipv6-port"),
        pytest.param("2001:db8::1", ["2001:db8::/32"], [(XFF, "2a00:1450:4001::1, 2001:db8::5")], "2a00:1450:4001::1", id="xff-ipv6-cidr-chain"),
        pytest.param("2001:db8::1", ["10.0.0.0/8", "2001:db8::/32"], [(XFF, "198.51.100.4")], "198.51.100.4", id="xff-ipv6-peer-ipv4-client"),
        pytest.param("10.0.0.1", TEN, [("forwarded", "for=192.0.2.60;proto=http;by=203.0.113.43")], "192.0.2.60", id="forwarded-for"),
        pytest.param("10.0.0.1", TEN, [("forwarded", 'For="[2001:db8:cafe::17]:4711"')], "2001:db8:cafe::17", id="forwarded-quoted-ipv6-port"),
        pytest.param("10.0.0.1", TEN, [("forwarded", 'for="192.0.2.43:8080"')], "192.0.2.43", id="forwarded-quoted-ipv4-port"),
        pytest.param("10.0.0.1", TEN, [("forwarded", "for=6.6.6.6, for=198.51.100.17;proto=https, for=10.0.0.2")], "198.51.100.17", id="forwarded-chain"),
        pytest.param("10.0.0.1", TEN, [("forwarded", "for=6.6.6.6"), ("forwarded", "for=198.51.100.17")], "198.51.100.17", id="forwarded-several-headers"),
        # A dual-stack socket (uvicorn --host ::) reports IPv4 peers as IPv4-mapped IPv6.
        pytest.param("::ffff:10.0.0.5", TEN, [(XFF, "198.51.100.1")], "198.51.100.1", id="mapped-peer-trusted"),
        pytest.param("::ffff:203.0.113.9", TEN, [(XFF, "198.51.100.1")], "203.0.113.9", id="mapped-peer-untrusted"),
        pytest.param("10.0.0.1", TEN, [(XFF, "::ffff:198.51.100.2, ::ffff:10.0.0.2")], "198.51.100.2", id="mapped-hops"),
    ],
)  # fmt: skip
async def test_client_ip_selection(
    peer: str | None, trusted: list[str], headers: list[tuple[str, str]], expected: str | None
) -> None:
    assert await client_ip_seen(http_scope(peer, headers), trusted) == expected


async def test_forwarded_sent_by_the_client_does_not_override_the_proxys_xff() -> None:
    # The client sent "Forwarded: for=6.6.6.6"; the trusted proxy appended its real address.
    scope = http_scope("10.0.0.1", [("forwarded", "for=6.6.6.6"), (XFF, "198.51.100.23")])
    assert await client_ip_seen(scope, TEN) == "198.51.100.23"


async def test_forwarded_for_inside_a_quoted_value_is_not_a_hop() -> None:
    # A proxy that forwards the client-chosen Host in Forwarded ("=" is valid in a reg-name).
    scope = http_scope("10.0.0.1", [("forwarded", 'for=198.51.100.23;host="a.for=6.6.6.6"')])
    assert await client_ip_seen(scope, TEN) == "198.51.100.23"


async def test_forwarding_header_not_configured_is_ignored() -> None:
    # Proxies pass the other header through untouched: a client could write it freely.
    scope = http_scope("10.0.0.1", [(XFF, "6.6.6.6")])
    assert await context_seen(scope, TEN, "forwarded") == EventContext(client_ip="10.0.0.1")
    scope = http_scope("10.0.0.1", [("forwarded", "for=6.6.6.6")])
    assert await context_seen(scope, TEN) == EventContext(client_ip="10.0.0.1")


@pytest.mark.parametrize("hop", ["unknown", "_hidden", "garbage"])
async def test_unparseable_hop_from_our_proxy_stops_the_walk(hop: str) -> None:
    # Left of it is the client's own word: the address is unknown, never the forged one.
    scope = http_scope("10.0.0.1", [("forwarded", f"for=6.6.6.6, for={hop}")])
    assert await context_seen(scope, TEN, "forwarded") == EventContext(client_ip=None)


def test_unknown_forwarded_header_setting_is_refused() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
        pass

    with pytest.raises(ValueError, match="forwarded_header"):
        OpenPanelMiddleware(app, forwarded_header="x-real-ip")


def test_invalid_trusted_proxy_is_refused_at_construction() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
        pass

    with pytest.raises(ValueError, match="not-a-network"):
        OpenPanelMiddleware(app, trusted_proxies=["10.0.0.0/8", "not-a-network"])


async def test_user_agent_is_taken_from_the_request() -> None:
    ua = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    context = await context_seen(http_scope(headers=[("User-Agent", ua)]))
    assert context == EventContext(client_ip="203.0.113.9", user_agent=ua)
    context = await context_seen(http_scope(headers=[]))
    assert context == EventContext(client_ip="203.0.113.9", user_agent=None)


@pytest.mark.parametrize(
    "user_agent",
    [b"evil\x00agent", b"line\r\nx-client-ip: 6.6.6.6", b"tab\tbed", b"del\x7f", b"\x1f", b""],
)
async def test_user_agent_with_control_characters_is_dropped(user_agent: bytes) -> None:
    context = await context_seen(http_scope(headers=[("user-agent", user_agent)]))
    assert context is not None
    assert context.user_agent is None
    assert context.client_ip == "203.0.113.9"


async def test_hostile_user_agents_never_make_track_raise() -> None:
    """The UA is fully client-controlled: tracking in the request must still work."""
    recorder = EventRecorder()
    op = OpenPanel(client_id=CLIENT_ID, transport=recorder)
    agents = [b"evil\x00agent", b"x" * 5000, b"ok/1.0"]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert op.track("hit")

    middleware = OpenPanelMiddleware(app)
    async with op:
        for agent in agents:
            await middleware(http_scope(headers=[("user-agent", agent)]), no_receive, no_send)
    sent = [r.headers["user-agent"] for r in recorder.requests]
    assert sent[0].startswith("openpanel-async/")  # dropped: the SDK's own user agent
    assert sent[1] == "x" * 1024  # cut to a sane length
    assert sent[2] == "ok/1.0"
    assert {r.headers["x-client-ip"] for r in recorder.requests} == {"203.0.113.9"}


async def test_lifespan_and_other_scopes_pass_through_untouched() -> None:
    calls: list[tuple[Scope, Receive, Send, EventContext | None]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((scope, receive, send, snapshot()))

    middleware = OpenPanelMiddleware(app, trusted_proxies=TEN)
    lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await middleware(lifespan, no_receive, no_send)
    assert calls == [(lifespan, no_receive, no_send, None)]


async def test_websocket_requests_get_a_context_too() -> None:
    scope = http_scope(
        "10.0.0.1", [(XFF, "198.51.100.8"), ("user-agent", "ws/1")], scope_type="websocket"
    )
    assert await context_seen(scope, TEN) == EventContext(
        client_ip="198.51.100.8", user_agent="ws/1"
    )


async def test_the_request_context_does_not_leak_into_the_caller() -> None:
    inside: list[EventContext | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        set_identity("user_in_request", groups=["org_in_request"])
        inside.append(snapshot())

    middleware = OpenPanelMiddleware(app)
    assert current_context() is None
    await middleware(http_scope(), no_receive, no_send)
    assert current_context() is None

    with event_context(profile_id="outer", client_ip="192.0.2.1", user_agent="outer/1") as outer:
        await middleware(http_scope(headers=[("user-agent", "inner/1")]), no_receive, no_send)
        assert current_context() is outer
        assert outer == EventContext(
            client_ip="192.0.2.1", user_agent="outer/1", profile_id="outer"
        )
    assert current_context() is None
    request_context = EventContext(
        client_ip="203.0.113.9", profile_id="user_in_request", groups=["org_in_request"]
    )
    # A request starts afresh: nothing of the caller's context is inherited.
    assert inside == [request_context, replace(request_context, user_agent="inner/1")]


async def test_the_context_is_reset_when_the_app_raises() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        set_identity("doomed")
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await OpenPanelMiddleware(app)(http_scope(), no_receive, no_send)
    assert current_context() is None


async def test_set_identity_from_a_worker_thread_applies_to_the_request() -> None:
    """A sync FastAPI dependency runs in a thread with a copy of the context."""
    seen: list[EventContext | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await run_in_threadpool(set_identity, "user_from_thread", ["org_t"])
        seen.append(snapshot())

    await OpenPanelMiddleware(app)(http_scope(), no_receive, no_send)
    assert seen == [
        EventContext(client_ip="203.0.113.9", profile_id="user_from_thread", groups=["org_t"])
    ]
    assert current_context() is None


async def test_concurrent_requests_never_see_each_others_identity() -> None:
    """Many interleaved requests through the middleware, identity set sync and async."""
    recorder = EventRecorder()
    op = OpenPanel(client_id=CLIENT_ID, transport=recorder, max_queue_size=100_000)
    background: set[asyncio.Task[None]] = set()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        n = int(dict(scope["headers"])[b"x-n"])
        if n % 2:
            await run_in_threadpool(set_identity, f"user_{n}", [f"org_{n}"])  # sync dependency
        else:
            set_identity(f"user_{n}", groups=[f"org_{n}"])  # async dependency
        await asyncio.sleep(0)  # let the other requests run in between
        op.track("handled", {"n": n})
        await run_in_threadpool(op.track, "in_thread", {"n": n})  # a plain def endpoint

        async def later() -> None:
            await asyncio.sleep(0)
            op.track("in_task", {"n": n})

        task = asyncio.create_task(later())  # outlives the request, keeps its context
        background.add(task)
        task.add_done_callback(background.discard)

    middleware = OpenPanelMiddleware(app, trusted_proxies=["127.0.0.1"])
    count = 300

    async def request(n: int) -> None:
        headers = [(XFF, ip_of(n)), ("user-agent", f"agent/{n}"), ("x-n", str(n))]
        await middleware(http_scope("127.0.0.1", headers), no_receive, no_send)

    async with op:
        await asyncio.gather(*(request(n) for n in range(count)))
        while background:
            await asyncio.gather(*background)
        assert await op.flush(timeout=10)
    assert len(recorder.requests) == 3 * count
    names: dict[int, list[str]] = defaultdict(list)
    for r in recorder.requests:
        n = r.payload["properties"]["n"]
        names[n].append(r.payload["name"])
        assert r.payload["profileId"] == f"user_{n}"
        assert r.payload["groups"] == [f"org_{n}"]
        assert r.headers["user-agent"] == f"agent/{n}"
        assert r.headers["x-client-ip"] == ip_of(n)
    assert {n: sorted(v) for n, v in names.items()} == {
        n: ["handled", "in_task", "in_thread"] for n in range(count)
    }
    assert current_context() is None


def ip_of(n: int) -> str:
    """A distinct public-looking address per request (198.18.0.0/15, for benchmarks)."""
    return str(ipaddress.ip_address("198.18.0.0") + n)


async def test_fastapi_sync_and_async_dependencies_set_the_identity() -> None:
    """FastAPI runs a plain def dependency in a worker thread: set_identity still applies."""
    recorder = EventRecorder()
    op = OpenPanel(client_id=CLIENT_ID, transport=recorder)

    def sync_user(x_user_id: Annotated[str, Header()]) -> str:
        set_identity(x_user_id, groups=["org_sync"])
        return x_user_id

    async def async_user(x_user_id: Annotated[str, Header()]) -> str:
        set_identity(x_user_id, groups=["org_async"])
        return x_user_id

    app = FastAPI()
    app.add_middleware(OpenPanelMiddleware, trusted_proxies=["127.0.0.1"])

    @app.get("/sync", dependencies=[Depends(sync_user)])
    async def with_sync_dependency() -> None:
        op.track("via_sync_dependency")

    @app.get("/async", dependencies=[Depends(async_user)])
    def with_async_dependency() -> None:
        op.track("via_async_dependency")

    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with op, httpx.AsyncClient(transport=transport, base_url="http://app") as http:

        async def call(n: int) -> None:
            headers = {"x-user-id": f"user_{n}", "user-agent": f"agent/{n}", XFF: ip_of(n)}
            response = await http.get("/sync" if n % 2 else "/async", headers=headers)
            assert response.status_code == 200

        await asyncio.gather(*(call(n) for n in range(60)))
    assert len(recorder.requests) == 60
    for r in recorder.requests:
        n = int(r.headers["user-agent"].removeprefix("agent/"))
        kind = "sync" if n % 2 else "async"
        assert r.payload["name"] == f"via_{kind}_dependency"
        assert r.payload["profileId"] == f"user_{n}"
        assert r.payload["groups"] == [f"org_{kind}"]
        assert r.headers["x-client-ip"] == ip_of(n)


# --- openpanel_lifespan ---------------------------------------------------------------------


async def test_lifespan_starts_the_client_and_drains_it_on_shutdown(
    server: LocalOpenPanel,
) -> None:
    op = make_client(server)
    app = OpenPanelMiddleware(Starlette(lifespan=openpanel_lifespan(op)), trusted_proxies=TEN)
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope: Scope = {
        "type": "lifespan",
        "asgi": {"version": "3.0", "spec_version": "2.0"},
        "state": {},
    }
    async with asyncio.timeout(10):
        lifespan = asyncio.create_task(app(scope, to_app.get, from_app.put))
        assert op.stats().state == "new"
        await to_app.put({"type": "lifespan.startup"})
        assert await from_app.get() == {"type": "lifespan.startup.complete"}
        assert op.stats().state == "running"
        for i in range(50):
            assert op.track("during_the_apps_life", {"i": i})
        await to_app.put({"type": "lifespan.shutdown"})
        assert await from_app.get() == {"type": "lifespan.shutdown.complete"}
        # By the time the server is told the app has shut down, everything was delivered.
        stats = op.stats()
        assert (stats.state, stats.delivered, stats.failed) == ("closed", 50, 0)
        assert sorted(p["properties"]["i"] for p in server.payloads("track")) == list(range(50))
        await lifespan
    assert_accounted(stats, closed=True)
    assert op.track("after_shutdown") is False


# --- the FastAPI example under a real uvicorn server ----------------------------------------


def load_create_app() -> Callable[..., FastAPI]:
    """``examples/fastapi_app.py``'s factory; examples/ is not a package, load it by path."""
    name = "openpanel_fastapi_example"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # FastAPI resolves the string annotations through it
        spec.loader.exec_module(module)
    create_app: Callable[..., FastAPI] = module.create_app
    return create_app


class OverlapMeter:
    """Between uvicorn and the app: counts requests in progress at once, and holds each one
    open a moment before its response starts (with its context active) so they interleave."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = 0
        self.peak = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def slow_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.005)
            await send(message)

        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.app(scope, receive, slow_send)
        finally:
            self.active -= 1


@asynccontextmanager
async def uvicorn_serving(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (a free port), lifespan on; yields its URL.

    On exit uvicorn shuts down: connections close, background tasks finish, then the
    lifespan's shutdown drains the OpenPanel client.
    """
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        log_config=None,
        access_log=False,
        ws="none",
        # The middleware alone decides whom to believe about X-Forwarded-For.
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not serving.done(), "uvicorn stopped during startup"
                await asyncio.sleep(0.005)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await serving


@dataclass(frozen=True)
class Visit:
    """One request to the example app, and what it must make the app send to OpenPanel."""

    n: int
    forwarded_for: str  # the X-Forwarded-For the "proxy" (this test) sends
    client_ip: str  # the IP every event of this request must carry
    user_agent: str
    user: str | None
    org: str | None

    @property
    def kind(self) -> int:
        return self.n % 4

    @property
    def request(self) -> tuple[str, str]:
        return [
            ("GET", f"/articles/{self.n}"),
            ("GET", f"/search?q=term-{self.n}"),
            ("POST", f"/reports/{self.n}"),
            ("POST", "/login"),
        ][self.kind]

    @property
    def status(self) -> int:
        if self.kind == 3 and self.user is None:
            return 401
        return 202 if self.kind == 2 else 200

    @property
    def expected(self) -> dict[str, dict[str, Any]]:
        """Event label (track name or type) -> the payload fields it must carry."""
        if self.kind == 3:
            if self.user is None:
                return {}  # refused: nothing tracked
            return {
                "identify": {"properties": {"last_login_method": "password"}},
                "increment": {"property": "logins", "value": 1},
            }
        by_kind: list[dict[str, dict[str, Any]]] = [
            {"article_viewed": {"article_id": self.n}},
            {"searched": {"query": f"term-{self.n}"}},
            {"report_requested": {"report_id": self.n}, "report_built": {"report_id": self.n}},
        ]
        return by_kind[self.kind]

    @property
    def headers(self) -> dict[str, str]:
        headers = {"user-agent": self.user_agent, "x-forwarded-for": self.forwarded_for}
        if self.user is not None:
            headers["x-user-id"] = self.user
        if self.org is not None:
            headers["x-org-id"] = self.org
        return headers


def make_visits(count: int, *, behind_proxy: bool) -> list[Visit]:
    """Unique IP, user agent and user per request; some anonymous, some forged XFF chains."""
    visits = []
    for n in range(count):
        if n % 5 == 4:
            address = f"2001:db8::{n:x}"
        elif n < 254:
            address = f"198.51.100.{n + 1}"
        else:
            address = f"203.0.113.{n - 253}"
        # Half the clients forge a left-most entry; the proxy appends the real address.
        forwarded_for = f"192.0.2.{n % 250 + 1}, {address}" if n % 2 else address
        anonymous = n % 5 == 0
        visits.append(
            Visit(
                n=n,
                forwarded_for=forwarded_for,
                client_ip=str(ipaddress.ip_address(address)) if behind_proxy else "127.0.0.1",
                user_agent=f"e2e-browser/{n}.0 (request {n})",
                user=None if anonymous else f"user_{n}",
                org=None if anonymous else f"org_{n % 7}",
            )
        )
    assert len({v.forwarded_for for v in visits}) == count
    return visits


CONNECTIONS = 32  # concurrent HTTP connections to the app


async def run_visits(
    trusted_proxies: list[str], visits: list[Visit]
) -> tuple[list[ReceivedRequest], OpenPanel, int]:
    """Serve the example app under uvicorn, send all visits concurrently, shut down."""
    async with LocalOpenPanel(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as openpanel:
        app = load_create_app()(
            api_url=openpanel.url,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            trusted_proxies=trusted_proxies,
        )
        op: OpenPanel = app.state.openpanel
        meter = OverlapMeter(app)
        async with uvicorn_serving(meter) as url:
            limits = httpx.Limits(
                max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS
            )
            # At most CONNECTIONS requests handed to httpx at once: its pool's bookkeeping
            # grows with the square of the requests waiting in it.
            slots = asyncio.Semaphore(CONNECTIONS)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as http:

                async def visit(v: Visit) -> None:
                    method, path = v.request
                    async with slots:
                        response = await http.request(method, path, headers=v.headers)
                    assert response.status_code == v.status, (v, response.text)

                async with asyncio.timeout(30):
                    await asyncio.gather(*(visit(v) for v in visits))
        # uvicorn has shut down, and with it the app's lifespan drained the client.
        return list(openpanel.requests), op, meter.peak


def check_events_match_visits(events: list[ReceivedRequest], visits: list[Visit]) -> None:
    assert {r.status for r in events} == {200}
    by_user_agent: dict[str, list[ReceivedRequest]] = defaultdict(list)
    for r in events:
        by_user_agent[r.headers["user-agent"]].append(r)
    assert set(by_user_agent) == {v.user_agent for v in visits if v.expected}
    for v in visits:
        got = by_user_agent.get(v.user_agent, [])
        labels = sorted(
            r.payload["name"] if r.type == "track" else str(r.type) for r in got if r.payload
        )
        assert labels == sorted(v.expected), v
        for r in got:
            payload = r.payload
            assert payload is not None
            assert r.headers["x-client-ip"] == v.client_ip, v
            assert payload.get("profileId") == v.user, v
            if r.type == "track":
                assert payload.get("groups") == (None if v.org is None else [v.org]), v
                own = {k: val for k, val in r.properties.items() if k != "__timestamp"}
                assert own == v.expected[payload["name"]], v
            else:
                assert {k: payload[k] for k in v.expected[str(r.type)]} == v.expected[str(r.type)]


async def test_example_app_under_uvicorn_behind_a_trusted_proxy() -> None:
    visits = make_visits(400, behind_proxy=True)
    events, op, peak = await run_visits(["127.0.0.1"], visits)
    expected = sum(len(v.expected) for v in visits)
    assert expected == 560
    assert len(events) == expected
    check_events_match_visits(events, visits)
    stats = op.stats()
    assert (stats.state, stats.accepted, stats.delivered) == ("closed", expected, expected)
    assert_accounted(stats, closed=True)
    assert peak >= CONNECTIONS // 2, f"the requests barely overlapped (peak {peak})"


async def test_example_app_ignores_forwarded_for_from_an_untrusted_peer() -> None:
    visits = make_visits(60, behind_proxy=False)
    events, op, _ = await run_visits([], visits)
    assert len(events) == sum(len(v.expected) for v in visits)
    assert {r.headers["x-client-ip"] for r in events} == {"127.0.0.1"}
    check_events_match_visits(events, visits)
    assert op.stats().delivered == len(events)


def test_example_app_reads_its_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENPANEL_API_URL", "http://127.0.0.1:3000")
    monkeypatch.setenv("OPENPANEL_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("OPENPANEL_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("TRUSTED_PROXIES", " 10.0.0.0/8, ,2001:db8::/32 ")
    app = load_create_app()()
    op: OpenPanel = app.state.openpanel
    assert "http://127.0.0.1:3000" in repr(op)
    classes: list[object] = [m.cls for m in app.user_middleware]
    assert classes == [OpenPanelMiddleware]
    assert app.user_middleware[0].kwargs == {"trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"]}
    monkeypatch.setenv("TRUSTED_PROXIES", "")
    app = load_create_app()(trusted_proxies=None)
    assert [m.kwargs for m in app.user_middleware] == [{"trusted_proxies": []}]


# --- optional dependencies --------------------------------------------------------------------


def test_core_and_asgi_import_without_the_web_frameworks() -> None:
    code = textwrap.dedent(
        """
        import sys

        BLOCKED = {"fastapi", "starlette", "uvicorn"}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ImportError(f"{name} is not installed (blocked by the test)")
                return None

        sys.meta_path.insert(0, Blocker())
        try:
            import starlette
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")

        import openpanel_async
        import openpanel_async.asgi
        import openpanel_async.testing
        from openpanel_async.asgi import OpenPanelMiddleware, openpanel_lifespan

        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not loaded, loaded
        OpenPanelMiddleware(lambda scope, receive, send: None, trusted_proxies=["10.0.0.0/8"])
        print("imported", openpanel_async.__version__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported ")


async def test_non_ascii_user_agent_is_kept_and_c1_controls_dropped() -> None:
    context = await context_seen(http_scope(headers=[("user-agent", "café/1.0".encode())]))
    assert context is not None
    assert context.user_agent == "café/1.0"
    context = await context_seen(http_scope(headers=[("user-agent", "bad\u0085ua".encode())]))
    assert context is not None
    assert context.user_agent is None
