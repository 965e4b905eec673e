"""A lean HTTP/1.1 client transport: one origin, a keep-alive pool, asyncio protocols.

Why it exists: every event is one small ``POST /track``, and a general-purpose client
(aiohttp) costs 120-170 µs of CPU per request on a small machine, which saturates the
caller's event loop at a few thousand events per second. This transport does the least
HTTP/1.1 needs for that one job, in about a third of that CPU time:

* The request is one ``transport.write()`` of prebuilt bytes: the request line, ``Host``
  and the caller's headers are encoded once per headers mapping and cached (the sender
  passes the same dict for almost every request), so the hot path only formats
  ``Content-Length`` and joins the body.
* Responses are parsed incrementally by an ``asyncio.Protocol`` (no streams, no per-request
  tasks): the status line, the headers (a plain dict with lower-case names, repeated fields
  joined with ", "), then the body by ``Content-Length``, ``Transfer-Encoding: chunked``
  (extensions and trailers are read and ignored) or until EOF. 1xx interim responses are
  skipped. At most ``MAX_RESPONSE_BYTES`` of a body is kept; a longer body is drained when
  it is short enough to keep the connection, else the connection is closed. No input is
  ever buffered without a bound (head, chunk-size line and trailers are all capped).
* Connections are opened lazily, at most ``max_connections`` at once (callers beyond that
  wait, under the same deadline), and reused last-in-first-out so that surplus connections
  age out: an idle connection older than ``_IDLE_EXPIRY`` (or the server's ``Keep-Alive:
  timeout``) is closed instead of reused, and so is one the server has already closed.
  A request that fails because the server closed the connection as it arrived (a race
  every keep-alive client meets) raises: the caller's counted retry sends it again.
* ``request_timeout`` bounds each ``post()`` as a whole: waiting for a connection,
  connecting (and the TLS handshake), writing, and reading the complete response. A
  connection interrupted by the timeout, a cancellation or any error is aborted, never
  returned to the pool half-read.

Limits, on purpose: one origin per transport (the client posts to one URL), HTTP/1.1 (and
1.0 answers) only, no proxies (``HTTP(S)_PROXY`` are ignored), no redirects (a 3xx is
returned as is: the secret must not travel to another host), no content codings (we send
no ``Accept-Encoding``; a ``Transfer-Encoding`` other than ``chunked`` is an error), no
``Expect: 100-continue`` handshake (the body is sent at once; a 100 is merely skipped), no
pipelining, and no cookies. Hostnames are resolved by the event loop at each connect.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Final, cast
from urllib.parse import urlsplit

from ._transport import MAX_RESPONSE_BYTES, TransportResponse

__all__ = [
    "ConnectionClosedError",
    "Http11Transport",
    "HttpProtocolError",
    "MalformedResponseError",
]

# An idle connection is not reused after this long: servers drop idle connections after a
# while (uvicorn after 5 s, nginx 75 s, aiohttp 75 s) and a shorter bound makes the "closed
# while idle" race rarer. A server's ``Keep-Alive: timeout=N`` lowers it per connection.
_IDLE_EXPIRY: Final = 15.0
# The status line and headers of one response (and of any 1xx before it), and the trailers.
_MAX_HEAD: Final = 64 * 1024
# A chunk-size line with its extensions.
_MAX_CHUNK_LINE: Final = 4 * 1024
# Past the kept MAX_RESPONSE_BYTES, read (and drop) at most this much more to keep the
# connection; a longer body costs more than a new connection, so the connection is closed.
_MAX_DRAIN: Final = 256 * 1024
# Cached request heads (per headers mapping), and request targets (per URL).
_CACHE_SIZE: Final = 32

# Parser states.
_IDLE: Final = 0
_HEAD: Final = 1
_LENGTH: Final = 2
_UNTIL_EOF: Final = 3
_CHUNK_SIZE: Final = 4
_CHUNK_DATA: Final = 5
_CHUNK_END: Final = 6
_TRAILERS: Final = 7

_TOKEN_CHARS = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(f"[{_TOKEN_CHARS}]+")
_STATUS_LINE = re.compile(r"HTTP/1\.([0-9]) ([1-9][0-9][0-9])(?:[ \t][^\x00-\x08\x0a-\x1f\x7f]*)?")
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*([0-9]{1,9})", re.IGNORECASE)
_OWS: Final = " \t"
# Header names seen in responses (valid tokens only) -> their lower case; bounded.
_NAMES: dict[str, str] = {}
_MAX_NAMES: Final = 256
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")
# The transport writes these itself; a caller's copy would contradict the framing.
_RESERVED_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding"})


class HttpProtocolError(Exception):
    """The server broke the HTTP/1.1 protocol, or the connection ended mid-response."""


class MalformedResponseError(HttpProtocolError):
    """The response could not be parsed (status line, headers, framing or chunks)."""


class ConnectionClosedError(HttpProtocolError, ConnectionError):
    """The connection closed (or was reset) before the response was complete."""


class Http11Transport:
    """POSTs to one origin over pooled HTTP/1.1 connections (see the module docstring).

    Args:
        max_connections: at most this many connections are open at once; more concurrent
            ``post()`` calls wait for one.
        request_timeout: seconds for one ``post()`` as a whole, waiting included.
        ssl_context: for ``https``; ``ssl.create_default_context()`` when None.
    """

    def __init__(
        self,
        *,
        max_connections: int,
        request_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, got {request_timeout}")
        self._max = max_connections
        self._timeout = request_timeout
        self._ssl_option = ssl_context
        self._idle_expiry = _IDLE_EXPIRY  # for new connections; tests shorten it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

        # The origin, fixed by the first URL.
        self._origin: tuple[str, str, int] | None = None
        self._host = ""
        self._port = 0
        self._host_header = b""
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, bytes] = {}
        # id(headers) -> (headers, snapshot, url, prefix). The entry holds the mapping
        # itself, so its id cannot be reused by another object while it is cached.
        self._heads: dict[int, tuple[Mapping[str, str], dict[str, str], str, bytes]] = {}

        # The pool. ``_count`` is the number of slots taken: connections being opened, in
        # use, handed to a waiter, or idle. A slot is given back exactly once, by
        # ``_free_slot()``, when its connection is discarded (or failed to open).
        self._count = 0
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._conns: set[_Connection] = set()  # every transport not yet lost, for aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- the request ------------------------------------------------------------------------

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        if self._closed:
            raise RuntimeError("Http11Transport.post() after aclose()")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        elif asyncio.get_running_loop() is not loop:
            raise RuntimeError("Http11Transport is bound to another event loop")
        # The common case: the same headers dict as last time, unchanged (the equality test
        # is a C-level dict comparison of a handful of strings).
        entry = self._heads.get(id(headers))
        if entry is not None and entry[0] is headers and entry[2] == url and entry[1] == headers:
            prefix = entry[3]
        else:
            prefix = self._encode_head(url, headers)
        data = b"%s%d\r\n\r\n%s" % (prefix, len(body), body)

        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                return await self._exchange(data)
        except TimeoutError as exc:
            if deadline.expired():
                raise TimeoutError(
                    f"no complete response from {self._describe_origin()} "
                    f"within {self._timeout:g} s"
                ) from exc
            raise

    async def _exchange(self, data: bytes) -> TransportResponse:
        conn = await self._acquire()
        try:
            response = await conn.send(data)
        except BaseException:
            # Errors, the deadline and cancellation alike: the connection may be
            # half-written or half-read, so it is never reused. A connection the server
            # closed as our request arrived is not retried here either: the server may
            # have read it, and every repeated request must be the sender's own counted
            # retry (stats().retries, DeliveryError.attempts).
            self._discard(conn, abort=True)
            raise
        self._release(conn)
        return response

    # --- encoding ----------------------------------------------------------------------------

    def _encode_head(self, url: str, headers: Mapping[str, str]) -> bytes:
        """The request up to the Content-Length value, validated; cached per mapping."""
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        parts = [b"POST ", target, b" HTTP/1.1\r\nHost: ", self._host_header, b"\r\n"]
        for name, value in headers.items():
            if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
                raise ValueError(f"invalid HTTP header name: {name!r}")
            if not isinstance(value, str) or _FORBIDDEN_IN_VALUE.search(value) is not None:
                # CR, LF or NUL would let a value end the header block and smuggle headers.
                raise ValueError(f"invalid value for HTTP header {name!r}: {value!r}")
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"the {name!r} header is set by the transport")
            parts += (name.encode("ascii"), b": ", value.encode("utf-8"), b"\r\n")
        parts.append(b"Content-Length: ")
        prefix = b"".join(parts)
        heads = self._heads
        if len(heads) >= _CACHE_SIZE:
            # Per-request dicts (a forwarded IP or user agent) churn through here; dropping
            # the oldest entry costs the common dict at most one re-encoding now and then.
            del heads[next(iter(heads))]
        heads[id(headers)] = (headers, dict(headers), url, prefix)
        return prefix

    def _target(self, url: str) -> bytes:
        """Validates ``url`` (scheme, one origin, no injection) and returns its target."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"only http and https URLs are supported, got {url!r}")
        host = parts.hostname
        if not host:
            raise ValueError(f"the URL has no host: {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in the URL are not supported")
        if port is None:
            port = 443 if scheme == "https" else 80
        origin = (scheme, host, port)
        if self._origin is None:
            self._set_origin(origin)
        elif origin != self._origin:
            raise ValueError(
                f"Http11Transport serves one origin, {self._describe_origin()}; got {url!r}"
            )
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not target.isascii() or any(c <= " " or c == "\x7f" for c in target):
            # Spaces, controls or CR/LF in the target would break (or inject into) the
            # request line; callers must percent-encode.
            raise ValueError(f"the URL path must be percent-encoded ASCII: {url!r}")
        encoded = target.encode("ascii")
        if len(self._targets) >= _CACHE_SIZE:
            self._targets.clear()
        self._targets[url] = encoded
        return encoded

    def _set_origin(self, origin: tuple[str, str, int]) -> None:
        scheme, host, port = origin
        # IDNA for the Host header; the loop's resolver does its own for the connect.
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"invalid host name {host!r}: {exc}") from None
        if ":" in ascii_host:
            ascii_host = f"[{ascii_host}]"  # an IPv6 literal
        default_port = 443 if scheme == "https" else 80
        host_header = ascii_host if port == default_port else f"{ascii_host}:{port}"
        if scheme == "https":
            context = self._ssl_option
            if context is None:
                context = ssl.create_default_context()
                # Tell servers that also speak h2 that we want HTTP/1.1.
                context.set_alpn_protocols(["http/1.1"])
            self._ssl = context
        self._origin = origin
        self._host = host
        self._port = port
        self._host_header = host_header.encode("ascii")

    def _describe_origin(self) -> str:
        if self._origin is None:
            return "the server"
        return f"{self._origin[0]}://{self._host_header.decode('ascii')}"

    # --- the pool ----------------------------------------------------------------------------

    async def _acquire(self) -> _Connection:
        """A connection holding a slot: idle (LIFO), new, or handed over by a release."""
        loop = self._loop
        assert loop is not None
        while True:
            if self._closed:
                raise RuntimeError("Http11Transport was closed")
            idle = self._idle
            now = loop.time()
            while idle:
                conn = idle.pop()
                conn.in_pool = False
                if now - conn.idle_since < conn.idle_limit:
                    return conn
                conn.close()  # expired; those below it are older still
                self._free_slot()
            if self._count < self._max:
                self._count += 1
                return await self._connect()
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    # Handed a connection (or a slot) just as we were cancelled: pass it on.
                    got = waiter.result()
                    if got is None:
                        self._free_slot()
                    else:
                        self._release(got)
                else:
                    try:
                        self._waiters.remove(waiter)
                    except ValueError:
                        pass
                raise
            if self._closed:
                raise RuntimeError("Http11Transport was closed")
            if handed is None:
                return await self._connect()  # a slot was handed over
            if not handed.closed:
                return handed
            self._free_slot()  # it died on the way; try again

    async def _connect(self) -> _Connection:
        """Opens a connection in a slot the caller has taken; frees the slot on failure."""
        loop = self._loop
        assert loop is not None
        conn = _Connection(self, loop, self._idle_expiry)
        try:
            if self._ssl is not None:
                await loop.create_connection(
                    lambda: conn, self._host, self._port, ssl=self._ssl, server_hostname=self._host
                )
            else:
                await loop.create_connection(lambda: conn, self._host, self._port)
        except BaseException:
            self._free_slot()
            raise
        if self._closed:
            conn.abort()
            raise RuntimeError("Http11Transport was closed")
        return conn

    def _release(self, conn: _Connection) -> None:
        """Back to a waiter or to the idle pool after a complete response, if reusable."""
        transport = conn.transport
        if transport is None or transport.get_write_buffer_size():
            # The server answered before reading the whole request (an early 413, say): the
            # rest is still queued, the stream is out of step, and a graceful close would
            # wait for a peer that may never read it.
            self._discard(conn, abort=True)
            return
        if not conn.reusable or conn.closed or self._closed:
            self._discard(conn, abort=False)
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        conn.idle_since = now
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.in_pool = True
        idle = self._idle
        idle.append(conn)
        # LIFO reuse leaves the surplus at the bottom: close it once it has expired.
        while idle and now - idle[0].idle_since >= idle[0].idle_limit:
            oldest = idle.popleft()
            oldest.in_pool = False
            oldest.close()
            self._free_slot()

    def _discard(self, conn: _Connection, *, abort: bool) -> None:
        if abort:
            conn.abort()
        else:
            conn.close()
        self._free_slot()

    def _free_slot(self) -> None:
        """Gives a slot to the first live waiter (who will connect), else frees it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._count -= 1

    def _idle_lost(self, conn: _Connection) -> None:
        """An idle connection was closed by the server (or reset): forget it."""
        conn.in_pool = False
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._free_slot()

    # --- closing -----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Closes every connection, idle or in use; fails waiting and in-flight posts."""
        if not self._closed:
            self._closed = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)  # the waiter sees _closed and raises
            self._waiters.clear()
            for conn in self._idle:
                conn.in_pool = False
            self._idle.clear()
            for conn in list(self._conns):
                conn.fail(ConnectionClosedError("the transport was closed during the request"))
        # abort() reports connection_lost within a loop iteration or two; wait for it so
        # that no socket outlives aclose() (and no ResourceWarning follows).
        pending = [conn.lost for conn in self._conns if not conn.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=1.0)


class _Connection(asyncio.Protocol):
    """One connection and its response parser. One request at a time (no pipelining)."""

    __slots__ = (
        "_body",
        "_buf",
        "_drain",
        "_headers",
        "_keep_alive",
        "_kept",
        "_loop",
        "_owner",
        "_remaining",
        "_state",
        "_status",
        "_trailer_bytes",
        "_waiter",
        "closed",
        "got_bytes",
        "idle_limit",
        "idle_since",
        "in_pool",
        "lost",
        "requests",
        "reusable",
        "transport",
    )

    def __init__(
        self, owner: Http11Transport, loop: asyncio.AbstractEventLoop, expiry: float
    ) -> None:
        self._owner = owner
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self.in_pool = False
        self.idle_since = 0.0
        self.idle_limit = expiry
        self.requests = 0
        self.reusable = False
        self.got_bytes = False
        self._waiter: asyncio.Future[TransportResponse] | None = None
        self._state = _IDLE
        self._buf = b""  # an incomplete head, chunk-size line or trailer section
        self._status = 0
        self._headers: dict[str, str] = {}
        self._keep_alive = False
        self._body: list[bytes] = []
        self._kept = 0  # bytes in _body, at most MAX_RESPONSE_BYTES
        self._remaining = 0  # of the Content-Length body, or of the current chunk
        self._drain = 0  # body bytes we may still read beyond the kept ones
        self._trailer_bytes = 0

    # --- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (selector, uvloop or SSL), whatever its declared type.
        self.transport = cast(asyncio.Transport, transport)
        self._owner._conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small requests must leave at once (asyncio sets it too; uvloop may not).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for: the stream is out of step, so the connection is
            # useless (and may be holding garbage for the next request).
            self.abort()
            return
        self.got_bytes = True
        try:
            self._feed(data)
        except HttpProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        if self._state == _UNTIL_EOF:
            self._finish(reusable=False)
        elif self._waiter is not None:
            self.fail(ConnectionClosedError(self._closed_message()))
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if not self.lost.done():
            self.lost.set_result(None)
        self._owner._conns.discard(self)
        if self._waiter is not None:
            if self._state == _UNTIL_EOF and exc is None:
                self._finish(reusable=False)
            else:
                error = ConnectionClosedError(self._closed_message())
                error.__cause__ = exc
                self.fail(error)
        if self.in_pool:
            self._owner._idle_lost(self)

    # --- requests -------------------------------------------------------------------------------

    def send(self, data: bytes) -> asyncio.Future[TransportResponse]:
        """Writes a request; the future gets the response (or the error)."""
        transport = self.transport
        self.got_bytes = False
        if self.closed or transport is None or transport.is_closing():
            raise ConnectionClosedError("the connection was closed before the request")
        self.requests += 1
        self.reusable = False
        self._state = _HEAD
        self._buf = b""
        waiter = self._waiter = self._loop.create_future()
        transport.write(data)
        return waiter

    def close(self) -> None:
        """Graceful: flushes what is queued (TLS: sends close_notify)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def fail(self, exc: BaseException) -> None:
        """Ends the current request (if any) with ``exc`` and drops the connection."""
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
        self._body = []
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def _closed_message(self) -> str:
        if not self.got_bytes:
            return "the server closed the connection before answering"
        return "the server closed the connection before the response was complete"

    def _finish(self, *, reusable: bool) -> None:
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
        self.reusable = reusable and self._keep_alive
        body = self._body
        self._body = []
        assert waiter is not None
        if not waiter.done():
            waiter.set_result(
                TransportResponse(self._status, self._headers, b"".join(body) if body else b"")
            )

    # --- the parser ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        pos = 0
        if self._state == _HEAD:
            buf = self._buf + data if self._buf else data
            start = max(0, len(self._buf) - 2)  # the end marker may straddle two reads
            while True:
                # The head ends at the first empty line: "\n\r\n" (CRLF lines) or "\n\n"
                # (bare LF lines, which RFC 9112 2.2 lets a recipient accept).
                end = buf.find(b"\n\r\n", start)
                bare = buf.find(b"\n\n", start, len(buf) if end < 0 else end)
                if bare >= 0:
                    end, pos = bare, bare + 2
                elif end >= 0:
                    pos = end + 3
                else:
                    if len(buf) > _MAX_HEAD:
                        raise MalformedResponseError("response head too long")
                    self._buf = buf
                    return
                if end > _MAX_HEAD:
                    raise MalformedResponseError("response head too long")
                self._buf = b""
                if end > 0 and buf[end - 1] == 0x0D:
                    end -= 1
                if self._parse_head(buf[:end]):
                    break
                # A 1xx interim response: the final one follows.
                buf = buf[pos:]
                pos = start = 0
            data = buf
        elif self._buf:
            data = self._buf + data
            self._buf = b""
        self._feed_body(data, pos)

    def _parse_head(self, head: bytes) -> bool:
        """Parses status line and headers; sets up the body. False for a 1xx response."""
        text = head.decode("latin-1")
        lines = text.split("\r\n")
        count = len(lines) - 1
        if text.count("\n") != count or text.count("\r") != count or "\x00" in text:
            lines = _split_lines(text)  # bare LF line ends (or an error)
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise MalformedResponseError(f"invalid status line: {lines[0][:100]!r}")
        status = int(match.group(2))
        headers: dict[str, str] = {}
        last = ""
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            # Servers send the same few names in the same case: a cache hit both validates
            # the name and gives its lower case.
            lower = _NAMES.get(name) if colon else None
            if lower is None:
                if line[:1] in (" ", "\t"):
                    # Obsolete line folding: more of the previous value (RFC 9112 5.2).
                    if not last:
                        raise MalformedResponseError("folded line before any header")
                    headers[last] = f"{headers[last]} {line.strip(_OWS)}".strip(_OWS)
                    continue
                if not colon or _TOKEN.fullmatch(name) is None:
                    raise MalformedResponseError(f"invalid header line: {line[:100]!r}")
                lower = name.lower()
                if len(_NAMES) < _MAX_NAMES:
                    _NAMES[name] = lower
            value = value.strip(" \t")
            if lower in headers:
                headers[lower] = f"{headers[lower]}, {value}"
            else:
                headers[lower] = value
            last = lower
        if status < 200:
            if status == 101:
                raise MalformedResponseError("unexpected 101 Switching Protocols")
            return False
        self._status = status
        self._headers = headers

        # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told not to.
        keep_alive = match.group(1) != "0"
        connection = headers.get("connection")
        if connection is not None:
            tokens = [token.strip() for token in connection.lower().split(",")]
            keep_alive = "keep-alive" in tokens if not keep_alive else "close" not in tokens
        keep_alive_header = headers.get("keep-alive")
        if keep_alive_header is not None:
            limit = _KEEP_ALIVE_TIMEOUT.search(keep_alive_header)
            if limit is not None:
                # Leave a margin: the server's timer started when it sent the answer.
                self.idle_limit = min(self.idle_limit, max(0.0, int(limit.group(1)) - 1.0))

        self._body = []
        self._kept = 0
        transfer_encoding = headers.get("transfer-encoding")
        content_length = headers.get("content-length")
        if status == 204 or status == 304:
            self._state = _IDLE  # never a body, whatever the headers say
        elif transfer_encoding is not None:
            codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
            if codings != ["chunked"]:
                raise MalformedResponseError(
                    f"unsupported Transfer-Encoding: {transfer_encoding[:100]!r}"
                )
            if content_length is not None:
                # Both framings at once is a smuggling pattern: trust chunked, but do not
                # let the connection carry anything else (RFC 9112 6.3).
                keep_alive = False
            self._state = _CHUNK_SIZE
            self._drain = MAX_RESPONSE_BYTES + _MAX_DRAIN
        elif content_length is not None:
            if content_length.isdigit() and content_length.isascii() and len(content_length) < 19:
                length = int(content_length)
            else:
                length = _content_length(content_length)
            self._remaining = length
            self._state = _LENGTH
            # A body too long to drain is cut at the kept part, and the connection closed.
            self._drain = length if length <= MAX_RESPONSE_BYTES + _MAX_DRAIN else 0
        else:
            self._state = _UNTIL_EOF
            keep_alive = False
        self._keep_alive = keep_alive
        return True

    def _keep(self, data: bytes, start: int, end: int) -> None:
        """Keeps data[start:end] up to MAX_RESPONSE_BYTES in all; drops the rest."""
        room = MAX_RESPONSE_BYTES - self._kept
        if room <= 0 or end <= start:
            return
        if end - start > room:
            end = start + room
        piece = data if start == 0 and end == len(data) else data[start:end]
        self._body.append(piece)
        self._kept += end - start

    def _feed_body(self, data: bytes, pos: int) -> None:
        size = len(data)
        state = self._state
        if state == _IDLE:  # no body (204, 304)
            self._finish(reusable=pos == size)
            return
        if state == _LENGTH:
            take = min(self._remaining, size - pos)
            self._keep(data, pos, pos + take)
            self._remaining -= take
            pos += take
            if self._remaining == 0:
                # Bytes after the response: the server sent more than it was asked for.
                self._finish(reusable=pos == size)
            elif not self._drain and self._kept >= MAX_RESPONSE_BYTES:
                self._finish(reusable=False)
            return
        if state == _UNTIL_EOF:
            self._keep(data, pos, size)
            if self._kept >= MAX_RESPONSE_BYTES:
                self._finish(reusable=False)  # the rest would only be thrown away
            return
        self._feed_chunked(data, pos)

    def _feed_chunked(self, data: bytes, pos: int) -> None:
        size = len(data)
        while True:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                self._keep(data, pos, pos + take)
                self._remaining -= take
                self._drain -= take
                pos += take
                if self._drain < 0:
                    self._finish(reusable=False)  # too long to drain: cut it here
                    return
                if self._remaining:
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if size - pos < 2:
                    if pos < size and data[pos] == 0x0A:  # a bare LF
                        pos += 1
                        self._state = _CHUNK_SIZE
                        continue
                    if pos < size and data[pos] != 0x0D:
                        raise MalformedResponseError("missing CRLF after chunk data")
                    self._buf = data[pos:]
                    return
                if data.startswith(b"\r\n", pos):
                    pos += 2
                elif data[pos] == 0x0A:
                    pos += 1
                else:
                    raise MalformedResponseError("missing CRLF after chunk data")
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = data.find(b"\n", pos)
                if end < 0:
                    if size - pos > _MAX_CHUNK_LINE:
                        raise MalformedResponseError("chunk-size line too long")
                    self._buf = data[pos:]
                    return
                if end - pos > _MAX_CHUNK_LINE:
                    raise MalformedResponseError("chunk-size line too long")
                line = data[pos:end]
                pos = end + 1
                # Extensions (";name=value") are allowed and ignored.
                size_text = line.rstrip(b"\r").split(b";", 1)[0].strip(b" \t")
                if _CHUNK_SIZE_RE.fullmatch(size_text) is None:
                    raise MalformedResponseError(f"invalid chunk size: {line[:100]!r}")
                chunk = int(size_text, 16)
                if chunk == 0:
                    self._state = _TRAILERS
                    self._trailer_bytes = 0
                else:
                    self._state = _CHUNK_DATA
                    self._remaining = chunk
            else:  # _TRAILERS: header lines (ignored) up to an empty line
                end = data.find(b"\n", pos)
                if end < 0:
                    if self._trailer_bytes + size - pos > _MAX_HEAD:
                        raise MalformedResponseError("trailer section too long")
                    self._buf = data[pos:]
                    return
                line = data[pos:end]
                pos = end + 1
                self._trailer_bytes += len(line) + 1
                if self._trailer_bytes > _MAX_HEAD:
                    raise MalformedResponseError("trailer section too long")
                if line in (b"", b"\r"):
                    self._finish(reusable=pos == size)
                    return
                if b":" not in line or b"\r" in line[:-1] or b"\x00" in line:
                    raise MalformedResponseError(f"invalid trailer line: {line[:100]!r}")


def _split_lines(text: str) -> list[str]:
    """The lines of a head that has bare LF line ends; a CR or NUL elsewhere is an error."""
    lines = []
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if "\r" in line or "\x00" in line:
            raise MalformedResponseError(f"CR or NUL in the response head: {line[:100]!r}")
        lines.append(line)
    return lines


def _content_length(value: str) -> int:
    if _DIGITS.fullmatch(value) is None:
        # A repeated header arrives joined ("5, 5"): fine if all copies agree.
        values = {v.strip(_OWS) for v in value.split(",")}
        if len(values) != 1 or _DIGITS.fullmatch(next(iter(values))) is None:
            raise MalformedResponseError(f"invalid Content-Length: {value[:100]!r}")
        value = values.pop()
    return int(value)
