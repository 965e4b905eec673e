"""The HTTP/1.1 transport: against LocalOpenPanel, and against tiny raw servers for what
aiohttp will not do on demand (chunked trailers, 1xx, HTTP/1.0, malformed answers, races).

Raw servers are asyncio stream servers scripted per test; they count connections (total and
at the same time) and record each request's bytes, so reuse is checked on the server side.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from openpanel_async import ConfigError, OpenPanel
from openpanel_async._happy_eyeballs import DELAY, connect_first
from openpanel_async._http11 import Http11Transport
from openpanel_async._http11_connection import (
    Connection,
    ConnectionClosedError,
    HttpProtocolError,
    MalformedResponseError,
)
from openpanel_async._transport import MAX_RESPONSE_BYTES, Transport, TransportResponse
from openpanel_async.testing import LocalOpenPanel, Reply

from .conftest import CLIENT_ID, CLIENT_SECRET

pytestmark = pytest.mark.anyio

BODY = msgspec.json.encode({"type": "track", "payload": {"name": "signup"}})
HEADERS = {
    "content-type": "application/json",
    "openpanel-client-id": CLIENT_ID,
    "openpanel-client-secret": CLIENT_SECRET,
    "openpanel-sdk-name": "openpanel-async",
    "user-agent": "openpanel-async/test",
}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@asynccontextmanager
async def open_transport(**options: Any) -> AsyncIterator[Http11Transport]:
    settings: dict[str, Any] = {"max_connections": 4, "request_timeout": 2.0, **options}
    transport = Http11Transport(**settings)
    try:
        yield transport
    finally:
        await transport.aclose()


def count_connects(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the client's connects (for servers we cannot instrument): a one-item list."""
    loop = asyncio.get_running_loop()
    original = loop.create_connection
    count = [0]

    async def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", counting)
    return count


# --- a scriptable raw server ---------------------------------------------------------------


class RawConn:
    """One accepted connection, as the handler sees it."""

    def __init__(
        self,
        server: RawServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        index: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.index = index
        self.requests = 0
        self.finished = asyncio.Event()  # the handler is done and the socket closed
        self.client_closed = False  # we read EOF (or a reset) from the client

    async def request(self) -> bytes | None:
        """One complete request (head and Content-Length body), or None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_closed = True
            return None
        self.requests += 1
        self.server.requests.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_client_close(self) -> None:
        """Reads (and drops) until the client closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.client_closed = True


Handler = Callable[[RawConn], Awaitable[None]]


class RawServer:
    """An asyncio TCP (or TLS) server on 127.0.0.1 running ``handler`` per connection."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.port = 0
        self.accepted = 0
        self.active = 0
        self.peak = 0
        self.requests: list[bytes] = []
        self.connections: list[RawConn] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/track"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the closed transports report connection_lost
        if self.errors and exc_info[0] is None:
            raise self.errors[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = RawConn(self, reader, writer, self.accepted)
        self.accepted += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.connections.append(conn)
        try:
            await self.handler(conn)
        except (ConnectionError, ssl.SSLError):
            pass  # the client went away while we were writing: part of several scenarios
        except asyncio.CancelledError:
            pass  # __aexit__ ends the handlers that are still running; not an error
        except Exception as exc:
            self.errors.append(exc)
        finally:
            self.active -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                conn.finished.set()
                self._tasks.discard(task)


def answer(*responses: bytes) -> Handler:
    """Answers every request, on every connection, with the next response (the last one
    repeats)."""
    queue = list(responses)

    async def handler(conn: RawConn) -> None:
        while await conn.request() is not None:
            await conn.send(queue.pop(0) if len(queue) > 1 else queue[0])

    return handler


@asynccontextmanager
async def raw_server(handler: Handler, **options: Any) -> AsyncIterator[RawServer]:
    async with RawServer(handler, **options) as server:
        yield server


async def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def test_transport_response_is_an_immutable_value() -> None:
    """What a user's own transport builds and returns: by position or keyword, frozen."""
    by_position = TransportResponse(429, {"retry-after": "2"}, b"slow down")
    by_keyword = TransportResponse(status=429, headers={"retry-after": "2"}, body=b"slow down")
    assert by_position == by_keyword
    assert (by_keyword.status, by_keyword.headers["retry-after"], by_keyword.body) == (
        429,
        "2",
        b"slow down",
    )
    assert repr(by_keyword) == (
        "TransportResponse(status=429, headers={'retry-after': '2'}, body=b'slow down')"
    )
    with pytest.raises(AttributeError):
        by_keyword.status = 200  # type: ignore[misc]


# --- against LocalOpenPanel -----------------------------------------------------------------


async def test_posts_an_event_to_local_openpanel(server: LocalOpenPanel) -> None:
    async with open_transport() as transport:
        response = await transport.post(server.url + "/track", BODY, HEADERS)
    assert isinstance(response, TransportResponse)
    assert response.status == 200
    assert set(msgspec.json.decode(response.body)) == {"deviceId", "sessionId"}
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["content-length"] == str(len(response.body))
    assert all(name == name.lower() for name in response.headers)
    [request] = server.requests
    assert request.body == BODY
    assert request.path == "/track"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-length"] == str(len(BODY))
    for name, value in HEADERS.items():
        assert request.headers[name] == value


async def test_statuses_headers_and_bodies_come_back_as_sent(server: LocalOpenPanel) -> None:
    server.script(
        Reply(status=401),
        Reply(status=429, headers={"X-RateLimit-Remaining": "0", "Retry-After": "1.5"}),
        Reply(status=503, body="down for maintenance"),
        Reply(status=400, body={"status": 400, "message": "bad payload"}),
        Reply(status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"}),
        Reply(status=202, body=b"\x00\xffbinary"),
    )
    url = server.url + "/track"
    async with open_transport() as transport:
        responses = [await transport.post(url, BODY, HEADERS) for _ in range(6)]
    unauthorized, limited, unavailable, rejected, redirect, binary = responses
    assert (unauthorized.status, unauthorized.body) == (401, b"Ingestion: Invalid cors or secret")
    assert unauthorized.headers["content-type"].startswith("text/plain")
    assert limited.status == 429
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert limited.headers["retry-after"] == "1.5"
    assert msgspec.json.decode(limited.body)["error"] == "Too Many Requests"
    assert (unavailable.status, unavailable.body) == (503, b"down for maintenance")
    assert msgspec.json.decode(rejected.body) == {"status": 400, "message": "bad payload"}
    # Redirects are returned, never followed: the server saw exactly our six requests.
    assert redirect.status == 302
    assert redirect.headers["location"] == "http://127.0.0.1:9/elsewhere"
    assert (binary.status, binary.body) == (202, b"\x00\xffbinary")
    assert server.request_count == 6


async def test_sequential_posts_reuse_one_connection(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects = count_connects(monkeypatch)
    async with open_transport() as transport:
        for _ in range(10):
            assert (await transport.post(server.url + "/track", BODY, HEADERS)).status == 200
    assert connects[0] == 1
    assert server.request_count == 10


async def test_concurrency_is_capped_by_max_connections(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects = count_connects(monkeypatch)
    server.script(*[Reply(delay=0.01)] * 40)
    async with open_transport(max_connections=4) as transport:
        responses = await asyncio.gather(
            *(transport.post(server.url + "/track", BODY, HEADERS) for _ in range(40))
        )
    assert {r.status for r in responses} == {200}
    assert server.peak_in_flight == 4
    assert connects[0] == 4


async def test_a_hung_request_times_out_and_its_connection_is_dropped(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    connects = count_connects(monkeypatch)
    url = server.url + "/track"
    async with open_transport(request_timeout=0.2) as transport:
        assert (await transport.post(url, BODY, HEADERS)).status == 200
        server.script(Reply(hang=True))
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"within 0\.2 s"):
            await transport.post(url, BODY, HEADERS)
        assert 0.15 < time.monotonic() - started < 1.0
        assert (await transport.post(url, BODY, HEADERS)).status == 200
    assert connects[0] == 2  # the timed-out connection was not reused


async def test_a_dropped_connection_raises_and_is_never_reused(
    server: LocalOpenPanel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reused or fresh, a connection dropped without an answer raises: repeating the request
    # is the sender's (counted) retry, never a silent one here.
    connects = count_connects(monkeypatch)
    url = server.url + "/track"
    async with open_transport() as transport:
        assert (await transport.post(url, BODY, HEADERS)).status == 200
        server.script(Reply(drop=True))
        with pytest.raises(ConnectionClosedError, match="before answering"):
            await transport.post(url, BODY, HEADERS)
        assert (await transport.post(url, BODY, HEADERS)).status == 200
        assert server.request_count == 3
        assert connects[0] == 2
    server.script(Reply(drop=True))
    async with open_transport() as transport:
        with pytest.raises(ConnectionClosedError, match="before answering"):
            await transport.post(url, BODY, HEADERS)
    assert server.request_count == 4


# --- the request on the wire ------------------------------------------------------------------


async def test_the_request_is_one_exact_write() -> None:
    async with raw_server(answer(OK)) as srv, open_transport() as transport:
        headers = {"Content-Type": "application/json", "X-Mixed-Case": "Value"}
        await transport.post(srv.url + "?ref=a%20b", b"{}", headers)
        assert srv.requests[0] == (
            b"POST /track?ref=a%20b HTTP/1.1\r\n"
            b"Host: 127.0.0.1:" + str(srv.port).encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"X-Mixed-Case: Value\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        # The cached head follows changes to the same dict, and other dicts.
        headers["X-Mixed-Case"] = "Changed"
        await transport.post(srv.url, b"", headers)
        assert b"\r\nX-Mixed-Case: Changed\r\nContent-Length: 0\r\n\r\n" in srv.requests[1]
        other = {**headers, "x-client-ip": "203.0.113.9"}
        await transport.post(srv.url, b"abc", other)
        assert srv.requests[2].endswith(
            b"\r\nx-client-ip: 203.0.113.9\r\nContent-Length: 3\r\n\r\nabc"
        )
        await transport.post(srv.url, b"{}", headers)
        assert b"x-client-ip" not in srv.requests[3]
    assert srv.accepted == 1


@pytest.mark.parametrize(
    "headers",
    [
        {"x-a": "v\r\nX-Injected: 1"},
        {"x-a": "v\nX-Injected: 1"},
        {"x-a": "v\rX"},
        {"x-a": "v\x00"},
        {"x-a\r\nX-Injected": "1"},
        {"x a": "v"},
        {"x-a:": "v"},
        {"": "v"},
        {"content-length": "5"},
        {"Transfer-Encoding": "chunked"},
        {"Host": "evil.example"},
    ],
)
async def test_header_injection_is_refused(headers: dict[str, str]) -> None:
    async with raw_server(answer(OK)) as srv, open_transport() as transport:
        with pytest.raises(ValueError, match="header"):
            await transport.post(srv.url, BODY, headers)
    assert srv.accepted == 0


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/tr ack", b"/tr%20ack"),
        # urlsplit() drops CR, LF and tab (the standard library's own guard).
        ("/track\r\nX-Injected: 1", b"/trackX-Injected:%201"),
        ("/caf\u00e9/ü", b"/caf%C3%A9/%C3%BC"),
        ("/already%20encoded", b"/already%20encoded"),  # left as it is, as aiohttp does
    ],
)
async def test_a_target_is_percent_encoded_so_it_cannot_break_the_request_line(
    path: str, target: bytes
) -> None:
    async with raw_server(answer(OK)) as srv, open_transport() as transport:
        response = await transport.post(f"http://127.0.0.1:{srv.port}{path}", BODY, HEADERS)
    assert response.status == 200
    assert srv.requests[0].split(b"\r\n", 1)[0] == b"POST " + target + b" HTTP/1.1"
    assert b"X-Injected" not in srv.requests[0].split(b"\r\n", 1)[1]


async def test_a_host_name_that_is_not_ascii_is_refused() -> None:
    # The standard library's IDNA 2003 maps "straße" to "strasse", another domain than
    # browsers and aiohttp reach ("xn--strae-oqa"): the secret would go there.
    async with open_transport() as transport:
        with pytest.raises(ValueError, match=r"'api.straße.example' must be ASCII"):
            await transport.post("http://api.straße.example/track", BODY, HEADERS)
    with pytest.raises(ConfigError, match=r"api_url: .* must be ASCII.*http_client='builtin'"):
        OpenPanel(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            api_url="https://api.straße.example",
            http_client="builtin",
        )
    # aiohttp encodes such a name correctly (IDNA 2008): it is not refused there.
    OpenPanel(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, api_url="https://api.straße.example"
    )


async def test_one_origin_and_http_schemes_only() -> None:
    async with raw_server(answer(OK)) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).status == 200
        # Another path of the same origin is fine.
        assert (
            await transport.post(f"http://127.0.0.1:{srv.port}/other", BODY, HEADERS)
        ).status == 200
        for url in (
            f"http://localhost:{srv.port}/track",
            f"http://127.0.0.1:{srv.port + 1}/track",
            f"https://127.0.0.1:{srv.port}/track",
            f"ftp://127.0.0.1:{srv.port}/track",
            f"http://user:pw@127.0.0.1:{srv.port}/track",
            "http://127.0.0.1:99999/track",
        ):
            with pytest.raises(ValueError, match=r"origin|http and https|credentials|invalid URL"):
                await transport.post(url, BODY, HEADERS)
    async with open_transport() as transport:
        for url in ("ws://127.0.0.1/track", "/track", "127.0.0.1:80/track"):
            with pytest.raises(ValueError, match="only http and https"):
                await transport.post(url, BODY, HEADERS)


# --- response framing -------------------------------------------------------------------------


async def test_chunked_body_with_extensions_and_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"4;name=value\r\nWiki\r\n"
        b"5 ; a=b;c\r\npedia\r\n"
        b"E\r\n in\r\n\r\nchunks.\r\n"
        b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    async with raw_server(answer(chunked)) as srv, open_transport() as transport:
        first = await transport.post(srv.url, BODY, HEADERS)
        second = await transport.post(srv.url, BODY, HEADERS)
    assert first.body == second.body == b"Wikipedia in\r\n\r\nchunks."
    assert first.headers["transfer-encoding"] == "chunked"
    assert "x-checksum" not in first.headers  # trailers are read, not merged
    assert srv.accepted == 1  # the connection was reused after a complete chunked body


async def test_a_response_trickling_in_byte_by_byte() -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )

    async def trickle(conn: RawConn) -> None:
        while await conn.request() is not None:
            for i in range(len(response)):
                await conn.send(response[i : i + 1])
                await asyncio.sleep(0)

    async with raw_server(trickle) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"abc"
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"abc"
    assert srv.accepted == 1


async def test_a_body_until_eof() -> None:
    async def until_eof(conn: RawConn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
        await conn.send(b"world")
        # then closes (the server's finally)

    async with raw_server(until_eof) as srv, open_transport() as transport:
        for _ in range(2):
            response = await transport.post(srv.url, BODY, HEADERS)
            assert (response.status, response.body) == (200, b"hello world")
    assert srv.accepted == 2


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
    ],
)
async def test_interim_responses_are_skipped(interim: bytes) -> None:
    final = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
    async with raw_server(answer(interim + final)) as srv, open_transport() as transport:
        for _ in range(2):
            response = await transport.post(srv.url, BODY, HEADERS)
            assert (response.status, response.body) == (201, b"done")
            assert response.headers == {"content-length": "4", "x-final": "yes"}
    assert srv.accepted == 1


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
        # Keep-Alive: timeout=1 leaves no safe idle time (we keep a 1 s margin).
        (
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=100\r\nContent-Length: 2\r\n\r\nok",
            False,
        ),
        (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=30\r\nContent-Length: 2\r\n\r\nok", True),
        # Content-Length and chunked together: chunked wins, the connection is not reused.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            False,
        ),
        # More than asked for: the stream is out of step.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n", False),
        # Chunked framing from an HTTP/1.0 server is faulty framing (RFC 9112 6.1).
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            False,
        ),
    ],
)
async def test_when_a_connection_is_reused(response: bytes, reused: bool) -> None:
    # The server would keep every connection open: reuse is the client's decision.
    async with raw_server(answer(response)) as srv, open_transport() as transport:
        for _ in range(2):
            result = await transport.post(srv.url, BODY, HEADERS)
            assert (result.status, result.body) == (200, b"ok")
    assert srv.accepted == (1 if reused else 2)


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(status: int) -> None:
    # Content-Length on a 204/304 describes another response; no body follows.
    response = f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode()
    async with raw_server(answer(response)) as srv, open_transport() as transport:
        for _ in range(2):
            result = await transport.post(srv.url, BODY, HEADERS)
            assert (result.status, result.body) == (status, b"")
    assert srv.accepted == 1


async def test_repeated_folded_and_odd_headers() -> None:
    response = (
        b"HTTP/1.1 200 \r\n"  # an empty reason phrase
        b"Set-Thing: a\r\n"
        b"set-thing: b\r\n"
        b"X-Spaces: \t padded value \t\r\n"
        b"X-Folded: first\r\n   second\r\n"
        b"X-Empty:\r\n"
        b"X-Latin: caf\xe9\r\n"
        # Single-valued fields the client reads, repeated (an origin's and a proxy's): the
        # first is kept, as aiohttp's headers.get() gives it; joined, they would not parse.
        b"Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n"
        b"Retry-After: 30\r\n"
        b"X-RateLimit-Reset: 30\r\n"
        b"x-ratelimit-reset: 60\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    async with raw_server(answer(response)) as srv, open_transport() as transport:
        result = await transport.post(srv.url, BODY, HEADERS)
    assert result.headers == {
        "set-thing": "a, b",
        "x-spaces": "padded value",
        "x-folded": "first second",
        "x-empty": "",
        "x-latin": "caf\u00e9",
        "retry-after": "Wed, 21 Oct 2015 07:28:00 GMT",
        "x-ratelimit-reset": "30",
        "content-length": "0",
    }


@pytest.mark.parametrize("body", [b"ok", b"\r\nok", b"\nok"])
async def test_bare_lf_line_ends_are_accepted(body: bytes) -> None:
    # Also when the body itself starts with a line end: the head still ends at "\n\n".
    response = b"HTTP/1.1 200 OK\nContent-Length: %d\nX-A: b\n\n%s" % (len(body), body)
    async with raw_server(answer(response)) as srv, open_transport() as transport:
        result = await transport.post(srv.url, BODY, HEADERS)
    assert (result.status, result.body, result.headers["x-a"]) == (200, body, "b")


async def test_an_answer_before_the_whole_request_was_sent() -> None:
    # The server answers 413 after the head, never reading the body: the client's request is
    # still queued when the answer arrives, so the connection cannot be reused (or closed
    # gracefully: that would wait for the unread bytes to drain).
    async def early(conn: RawConn) -> None:
        if conn.index > 0:
            await answer(OK)(conn)
            return
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
        await asyncio.sleep(0.05)  # let the answer arrive before we drain the request
        await conn.wait_client_close()

    async with raw_server(early) as srv, open_transport() as transport:
        response = await transport.post(srv.url, bytes(16 * 1024 * 1024), HEADERS)
        assert (response.status, response.body) == (413, b"big")
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert srv.connections[0].client_closed
    assert srv.accepted == 2


async def test_arguments_and_the_transport_protocol() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        Http11Transport(max_connections=0, request_timeout=1.0)
    with pytest.raises(ValueError, match="request_timeout"):
        Http11Transport(max_connections=1, request_timeout=0)
    async with open_transport() as transport:
        assert isinstance(transport, Transport)
        assert not transport.closed
    assert transport.closed


# --- bodies larger than we keep ----------------------------------------------------------------


def big(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


async def test_a_drainable_large_body_is_cut_and_the_connection_kept() -> None:
    payload = big(100 * 1024)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
    async with raw_server(answer(response, OK)) as srv, open_transport() as transport:
        result = await transport.post(srv.url, BODY, HEADERS)
        assert result.body == payload[:MAX_RESPONSE_BYTES]
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
async def test_a_huge_body_is_cut_and_the_connection_closed(framing: str) -> None:
    block = big(16 * 1024)

    async def huge(conn: RawConn) -> None:
        if conn.index > 0:
            await answer(OK)(conn)
            return
        await conn.request()
        piece = block
        if framing == "length":
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        elif framing == "chunked":
            await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (len(block), block)
        else:
            await conn.send(b"HTTP/1.1 200 OK\r\n\r\n")
        # Endless: only the client closing the connection stops us.
        while True:
            await conn.send(piece)

    async with raw_server(huge) as srv, open_transport() as transport:
        result = await transport.post(srv.url, BODY, HEADERS)
        assert len(result.body) == MAX_RESPONSE_BYTES
        assert result.body[: len(block)] == block
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
    assert srv.accepted == 2


# --- malformed answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : space before colon\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded first\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: bare\rcr\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: nul\x00\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon trailer\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 5000 + b"\r\n",
    ],
)
async def test_malformed_responses_raise_and_close_the_connection(response: bytes) -> None:
    async def malformed(conn: RawConn) -> None:
        if conn.index > 0:
            await answer(OK)(conn)
            return
        await conn.request()
        await conn.send(response)
        await conn.wait_client_close()

    async with raw_server(malformed) as srv, open_transport() as transport:
        with pytest.raises(MalformedResponseError) as caught:
            await transport.post(srv.url, BODY, HEADERS)
        assert isinstance(caught.value, HttpProtocolError)
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert srv.connections[0].client_closed
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 2


@pytest.mark.parametrize(
    "partial",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Le", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"],
)
async def test_a_fresh_connection_closed_early_raises(partial: bytes) -> None:
    async def early_close(conn: RawConn) -> None:
        await conn.request()
        await conn.send(partial)

    async with raw_server(early_close) as srv, open_transport() as transport:
        with pytest.raises(ConnectionClosedError):
            await transport.post(srv.url, BODY, HEADERS)
    assert srv.accepted == 1  # no retry on a new connection


# --- keep-alive races and expiry -----------------------------------------------------------------


async def test_the_server_closing_an_idle_connection() -> None:
    async def one_then_close(conn: RawConn) -> None:
        await conn.request()
        await conn.send(OK)
        await asyncio.sleep(0.01)  # idle for a moment, then the server's keep-alive ends

    async with raw_server(one_then_close) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        await asyncio.sleep(0.01)
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 2
    assert len(srv.requests) == 2


async def test_a_close_racing_the_next_request_raises_for_a_counted_retry() -> None:
    # The server closes as the second request arrives on a connection, without answering:
    # what a client sees when its request crosses the server's keep-alive timeout. The
    # server may have read (even stored) it, so the transport does not resend it silently:
    # it raises, and the sender's retry, which it counts, sends it again.
    async def close_on_second(conn: RawConn) -> None:
        await conn.request()
        await conn.send(OK)
        await conn.request()

    async with raw_server(close_on_second) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        with pytest.raises(ConnectionClosedError, match="before answering"):
            await transport.post(srv.url, BODY, HEADERS)
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"  # a new connection
    assert srv.accepted == 2
    assert len(srv.requests) == 3


async def test_a_connection_closing_after_its_answer_is_not_handed_to_a_waiting_post() -> None:
    # The server closes each connection right after its answer, without "Connection:
    # close". Its FIN makes the transport closing a callback before the connection counts
    # as closed; a post waiting for the one connection must not be handed it (nothing was
    # sent on it, so failing would cost the event a counted retry): it gets a new one.
    async def one_then_close(conn: RawConn) -> None:
        await conn.request()
        await conn.send(OK)

    async with raw_server(one_then_close) as srv, open_transport(max_connections=1) as transport:
        for _ in range(10):
            results = await asyncio.gather(
                *(transport.post(srv.url, BODY, HEADERS) for _ in range(2)),
                return_exceptions=True,
            )
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, failures
    assert len(srv.requests) == srv.accepted == 20


async def test_no_retry_once_the_answer_has_started() -> None:
    async def partial_on_second(conn: RawConn) -> None:
        await conn.request()
        await conn.send(OK)
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-")

    async with raw_server(partial_on_second) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        with pytest.raises(ConnectionClosedError, match="before the response was complete"):
            await transport.post(srv.url, BODY, HEADERS)
    assert srv.accepted == 1


async def test_idle_connections_expire() -> None:
    async with raw_server(answer(OK)) as srv, open_transport() as transport:
        transport._idle_expiry = 0.1  # (white box) instead of 15 s
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.sleep(0.15)
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert srv.connections[0].client_closed
    assert srv.accepted == 2


async def test_unsolicited_bytes_on_an_idle_connection_drop_it() -> None:
    async def chatty(conn: RawConn) -> None:
        await conn.request()
        await conn.send(OK)
        if conn.index == 0:
            await conn.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            await conn.wait_client_close()
        else:
            await answer(OK)(conn)

    async with raw_server(chatty) as srv, open_transport() as transport:
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 2


# --- deadlines, limits, cancellation, closing ---------------------------------------------------


async def never_answer(conn: RawConn) -> None:
    await conn.request()
    await conn.wait_client_close()


async def test_a_server_that_never_answers_times_out() -> None:
    async with (
        raw_server(never_answer) as srv,
        open_transport(max_connections=1, request_timeout=0.2) as transport,
    ):
        started = time.monotonic()
        # The second post waits for the only connection, under the same deadline.
        results = await asyncio.gather(
            transport.post(srv.url, BODY, HEADERS),
            transport.post(srv.url, BODY, HEADERS),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.15 < elapsed < 1.0
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert srv.connections[0].client_closed  # closed, not returned to the pool
        # The second post may have got the freed slot a moment before its own deadline.
        assert srv.accepted in (1, 2)
        # The slots were given back: a third post gets a connection (and times out too).
        accepted = srv.accepted
        with pytest.raises(TimeoutError):
            await transport.post(srv.url, BODY, HEADERS)
        assert srv.accepted == accepted + 1


@pytest.mark.parametrize("phase", ["sock_connect", "create_connection"])
async def test_a_connect_timeout_is_part_of_the_deadline(
    phase: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The TCP connect, or the transport's set-up on the connected socket (the TLS
    # handshake with https), hangs.
    loop = asyncio.get_running_loop()

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    async with raw_server(answer(OK)) as srv:
        monkeypatch.setattr(loop, phase, slow)
        async with open_transport(max_connections=1, request_timeout=0.1) as transport:
            with pytest.raises(TimeoutError):
                await transport.post(srv.url, BODY, HEADERS)
            assert transport._count == 0  # (white box) the slot was freed


# --- several addresses per host (Happy Eyeballs) -----------------------------------------------


@asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A port on 127.0.0.1 whose connects hang: a listener never accepting, queue full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        await asyncio.sleep(0.05)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def resolve_to(monkeypatch: pytest.MonkeyPatch, *addresses: tuple[int, str, int]) -> None:
    """Make the running loop resolve every name to ``addresses`` (family, ip, port)."""

    async def getaddrinfo(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        return [
            (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
            for family, ip, port in addresses
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)


async def test_an_address_that_hangs_does_not_hold_up_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first address drops packets (a broken IPv6 route, say): tried one after
    # another, every connect would wait out the whole request timeout.
    async with blackhole() as dead, raw_server(answer(OK)) as srv:
        resolve_to(
            monkeypatch,
            (socket.AF_INET, "127.0.0.1", dead),
            (socket.AF_INET, "127.0.0.1", srv.port),
        )
        async with open_transport(request_timeout=5.0) as transport:
            started = time.perf_counter()
            result = await transport.post(
                f"http://api.example.test:{srv.port}/track", BODY, HEADERS
            )
            took = time.perf_counter() - started
    assert result.status == 200
    assert DELAY <= took < DELAY + 1.0
    assert srv.requests[0].split(b"\r\n")[1] == f"Host: api.example.test:{srv.port}".encode()


async def test_a_refused_address_moves_on_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with raw_server(answer(OK)) as srv:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: refused
        resolve_to(
            monkeypatch,
            (socket.AF_INET, "127.0.0.1", refused_port),
            (socket.AF_INET, "127.0.0.1", srv.port),
        )
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        sock = await connect_first(loop, "api.example.test", srv.port, delay=5.0)
        took = time.perf_counter() - started
        assert sock.getpeername() == ("127.0.0.1", srv.port)
        sock.close()
    assert took < 2.0  # not the 5 s delay: a failed attempt starts the next


async def test_when_no_address_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = []
    for _ in range(2):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        ports.append(closed.getsockname()[1])
        closed.close()
    loop = asyncio.get_running_loop()
    resolve_to(monkeypatch, (socket.AF_INET, "127.0.0.1", ports[0]))
    with pytest.raises(ConnectionRefusedError):  # one address: its own error
        await connect_first(loop, "api.example.test", ports[0])
    resolve_to(monkeypatch, *((socket.AF_INET, "127.0.0.1", port) for port in ports))
    with pytest.raises(OSError, match=r"any of the 2 addresses of 'api\.example\.test'"):
        await connect_first(loop, "api.example.test", ports[0])
    resolve_to(monkeypatch)
    with pytest.raises(OSError, match="no addresses"):
        await connect_first(loop, "api.example.test", ports[0])


async def test_an_ip_literal_is_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # A lookup runs in the loop's executor (a thread hop per connection); an IP literal
    # needs none.
    loop = asyncio.get_running_loop()

    async def no_lookup(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("getaddrinfo called for an IP literal")

    async with raw_server(answer(OK)) as srv:
        monkeypatch.setattr(loop, "getaddrinfo", no_lookup)
        sock = await connect_first(loop, "127.0.0.1", srv.port)
        assert sock.getpeername() == ("127.0.0.1", srv.port)
        sock.close()


async def test_families_alternate_and_losers_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Attempts go v6, v4, v6, v4 (the resolver's first family first). A deadline that
    # cancels the race leaves no socket open, connected or not.
    loop = asyncio.get_running_loop()
    tried: list[tuple[Any, ...]] = []
    made: list[socket.socket] = []

    async def sock_connect(sock: socket.socket, address: tuple[Any, ...]) -> None:
        tried.append(address)
        made.append(sock)
        await asyncio.sleep(10)  # every address hangs

    resolve_to(
        monkeypatch,
        (socket.AF_INET6, "::1", 1),
        (socket.AF_INET6, "::1", 2),
        (socket.AF_INET, "127.0.0.1", 3),
        (socket.AF_INET, "127.0.0.1", 4),
    )
    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):  # long after the fourth attempt started
            await connect_first(loop, "api.example.test", 1, delay=0.01)
    assert [address[1] for address in tried] == [1, 3, 2, 4]
    await asyncio.sleep(0)
    assert len(made) == 4
    assert all(sock.fileno() == -1 for sock in made)


async def test_max_connections_holds_under_50_concurrent_posts() -> None:
    async def slowish(conn: RawConn) -> None:
        while await conn.request() is not None:
            await asyncio.sleep(0.005)
            await conn.send(OK)

    async with raw_server(slowish) as srv, open_transport(max_connections=5) as transport:
        results = await asyncio.gather(*(transport.post(srv.url, BODY, HEADERS) for _ in range(50)))
    assert [r.body for r in results] == [b"ok"] * 50
    assert srv.peak == 5
    assert srv.accepted == 5
    assert len(srv.requests) == 50


async def test_refused_connections_raise_and_free_their_slot() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now.
    async with open_transport(max_connections=1) as transport:
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError):
                await transport.post(f"http://127.0.0.1:{port}/track", BODY, HEADERS)
        assert transport._count == 0


async def test_cancellation_mid_request_drops_the_connection() -> None:
    async def first_hangs(conn: RawConn) -> None:
        if conn.index == 0:
            await never_answer(conn)
        else:
            await answer(OK)(conn)

    async with raw_server(first_hangs) as srv, open_transport() as transport:
        task = asyncio.create_task(transport.post(srv.url, BODY, HEADERS))
        await eventually(lambda: len(srv.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
        assert srv.connections[0].client_closed
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 2


async def test_cancellation_while_waiting_for_a_connection() -> None:
    async def slowish(conn: RawConn) -> None:
        while await conn.request() is not None:
            await asyncio.sleep(0.02)
            await conn.send(OK)

    async with raw_server(slowish) as srv, open_transport(max_connections=1) as transport:
        tasks = [asyncio.create_task(transport.post(srv.url, BODY, HEADERS)) for _ in range(4)]
        await eventually(lambda: len(srv.requests) == 1)
        tasks[1].cancel()  # these two wait for the only connection
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], TransportResponse)
        assert isinstance(results[1], asyncio.CancelledError)
        assert isinstance(results[2], TransportResponse)
        assert isinstance(results[3], asyncio.CancelledError)
        assert (await transport.post(srv.url, BODY, HEADERS)).body == b"ok"
    assert srv.accepted == 1
    assert len(srv.requests) == 3


async def test_aclose_with_requests_in_flight() -> None:
    async with raw_server(never_answer) as srv:
        transport = Http11Transport(max_connections=2, request_timeout=5.0)
        tasks = [asyncio.create_task(transport.post(srv.url, BODY, HEADERS)) for _ in range(3)]
        await eventually(lambda: len(srv.requests) == 2)
        started = time.monotonic()
        await transport.aclose()
        assert time.monotonic() - started < 0.5
        assert transport.closed
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, ConnectionClosedError) for r in results) == 2, results
        assert sum(isinstance(r, RuntimeError) for r in results) == 1, results  # was waiting
        for conn in srv.connections:
            await asyncio.wait_for(conn.finished.wait(), 2.0)
            assert conn.client_closed
        with pytest.raises(RuntimeError, match="aclose"):
            await transport.post(srv.url, BODY, HEADERS)
        await transport.aclose()  # idempotent
    assert srv.accepted == 2


async def test_aclose_closes_idle_connections() -> None:
    async with raw_server(answer(OK)) as srv:
        transport = Http11Transport(max_connections=3, request_timeout=2.0)
        await asyncio.gather(*(transport.post(srv.url, BODY, HEADERS) for _ in range(3)))
        await transport.aclose()
        for conn in srv.connections:
            await asyncio.wait_for(conn.finished.wait(), 2.0)
            assert conn.client_closed
    assert srv.accepted == 3


# --- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line tool is not on PATH: no test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


async def test_https_with_a_trusted_certificate(certificate: tuple[Path, Path]) -> None:
    client = ssl.create_default_context(cafile=str(certificate[0]))
    async with raw_server(answer(OK), ssl_context=server_context(certificate)) as srv:
        async with open_transport(ssl_context=client) as transport:
            for _ in range(3):
                response = await transport.post(srv.url, BODY, HEADERS)
                assert (response.status, response.body) == (200, b"ok")
        assert srv.requests[0].startswith(b"POST /track HTTP/1.1\r\nHost: 127.0.0.1:")
        await asyncio.wait_for(srv.connections[0].finished.wait(), 2.0)
    assert srv.accepted == 1


async def test_https_with_an_untrusted_certificate_fails(certificate: tuple[Path, Path]) -> None:
    # A blocking TLS server in a thread: asyncio's own server would report the failed
    # handshake to the loop's exception handler (in debug mode), failing the test.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    context = server_context(certificate)
    handshakes: list[BaseException] = []

    def serve_once() -> None:
        with listener:
            listener.settimeout(5.0)
            conn, _ = listener.accept()
            with conn:
                try:
                    with context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError) as exc:
                    handshakes.append(exc)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        async with open_transport() as transport:  # the default context: system CAs only
            with pytest.raises(ssl.SSLCertVerificationError):
                await transport.post(f"https://127.0.0.1:{port}/track", BODY, HEADERS)
    finally:
        await asyncio.to_thread(thread.join, 5.0)
    assert len(handshakes) == 1  # the client refused the handshake


# --- the parser, fed piece by piece (deterministic) ------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


RESPONSES = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", b"hello", True),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;ext="q"\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nT: v\r\n\r\n',
        b"hello world",
        True,
    ),
    "interim": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"ok",
        True,
    ),
    "http10": (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    "bare-lf": (b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nok\n0\n\n", b"ok", True),
}


@pytest.mark.parametrize("name", sorted(RESPONSES))
async def test_the_parser_at_every_split_point(name: str) -> None:
    raw, body, reusable = RESPONSES[name]
    loop = asyncio.get_running_loop()
    owner = Http11Transport(max_connections=1, request_timeout=1.0)
    splits = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    splits += [[raw[:i], raw[i:]] for i in range(1, len(raw))]
    for pieces in splits:
        conn = Connection(owner, loop, 15.0)
        conn.connection_made(FakeTransport())
        waiter = conn.send(b"request")
        for piece in pieces:
            assert not waiter.done()
            conn.data_received(piece)
        assert waiter.done(), pieces
        response = waiter.result()
        assert (response.status, response.body) == (200, body), pieces
        assert conn.reusable is reusable
        conn.connection_lost(None)
