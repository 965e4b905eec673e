"""A lean HTTP/1.1 client transport: one origin, a keep-alive pool, asyncio protocols.

Why it exists: every event is one small ``POST /track``, and a general-purpose client
(aiohttp) costs 120-170 µs of CPU per request on a small machine, which saturates the
caller's event loop at a few thousand events per second. This transport does the least
HTTP/1.1 needs for that one job, in about a third of that CPU time:

* The request is one ``transport.write()`` of prebuilt bytes: the request line, ``Host``
  and the caller's headers are encoded once per headers mapping and cached (the sender
  passes the same dict for almost every request), so the hot path only formats
  ``Content-Length`` and joins the body.
* Responses are parsed incrementally by an ``asyncio.Protocol`` (in ``_http11_connection``;
  no streams, no per-request tasks): the status line, the headers (a plain dict with
  lower-case names, repeated fields joined with ", ", except the single-valued ones the
  client reads, such as ``Retry-After``, of which the first is kept), then the body by
  ``Content-Length``, ``Transfer-Encoding: chunked`` (extensions and trailers are read and
  ignored) or until EOF. 1xx interim responses are skipped. At most
  ``MAX_RESPONSE_BYTES`` of a body is kept; a longer body is drained when it is short
  enough to keep the connection, else the connection is closed. No input is ever buffered
  without a bound (head, chunk-size line and trailers are all capped).
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
pipelining, and no cookies. Hostnames are resolved by the event loop at each connect, and
a host's addresses are tried as in Happy Eyeballs (``_happy_eyeballs``).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote, urlsplit

from ._happy_eyeballs import connect_first
from ._http11_connection import (
    _TOKEN,
    Connection,
    ConnectionClosedError,
    HttpProtocolError,
    MalformedResponseError,
)
from ._transport import TransportResponse

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
# Cached request heads (per headers mapping), and request targets (per URL).
_CACHE_SIZE: Final = 32

# What a request target may carry as it is (RFC 3986 pchar, "/" and "?", and "%").
_TARGET_SAFE: Final = "/?%!$&'()*+,;=:@-._~"
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")
# The transport writes these itself; a caller's copy would contradict the framing.
_RESERVED_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding"})


def parse_url(url: str) -> tuple[tuple[str, str, int], bytes]:
    """``url``'s origin (scheme, host, port) and its request target, percent-encoded.

    Raises ValueError for what this transport cannot send to. A host name must be ASCII:
    the standard library only knows IDNA 2003, which maps some names (``straße``) to
    another domain than browsers, aiohttp and the DNS do, and the secret would go there.
    """
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
    if not host.isascii():
        raise ValueError(
            f"the host name {host!r} must be ASCII: give its IDNA form (xn--...) instead"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if port is None:
        port = 443 if scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    # Spaces, controls and non-ASCII characters are percent-encoded (UTF-8), as aiohttp
    # does; "%" is left alone, so a path that is already encoded stays as it is.
    target = quote(target, safe=_TARGET_SAFE)
    return (scheme, host, port), target.encode("ascii")


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
        self._idle: deque[Connection] = deque()
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._conns: set[Connection] = set()  # every transport not yet lost, for aclose()

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
        origin, encoded = parse_url(url)
        if self._origin is None:
            self._set_origin(origin)
        elif origin != self._origin:
            raise ValueError(
                f"Http11Transport serves one origin, {self._describe_origin()}; got {url!r}"
            )
        if len(self._targets) >= _CACHE_SIZE:
            self._targets.clear()
        self._targets[url] = encoded
        return encoded

    def _set_origin(self, origin: tuple[str, str, int]) -> None:
        scheme, host, port = origin  # parse_url() refuses non-ASCII host names
        ascii_host = f"[{host}]" if ":" in host else host  # brackets an IPv6 literal
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

    async def _acquire(self) -> Connection:
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
                if now - conn.idle_since < conn.idle_limit and conn.usable:
                    return conn
                conn.close()  # expired (or closing): try the next, older one
                self._free_slot()
            if self._count < self._max:
                self._count += 1
                return await self._connect()
            waiter: asyncio.Future[Connection | None] = loop.create_future()
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
            if handed.usable:
                return handed
            # It is closing (the server closed it after its last answer, without saying
            # so): nothing was sent on it, so try again rather than fail the request.
            self._discard(handed, abort=True)

    async def _connect(self) -> Connection:
        """Opens a connection in a slot the caller has taken; frees the slot on failure."""
        loop = self._loop
        assert loop is not None
        conn = Connection(self, loop, self._idle_expiry)
        try:
            sock = await connect_first(loop, self._host, self._port)
            try:
                if self._ssl is not None:
                    await loop.create_connection(
                        lambda: conn, sock=sock, ssl=self._ssl, server_hostname=self._host
                    )
                else:
                    await loop.create_connection(lambda: conn, sock=sock)
            except BaseException:
                sock.close()  # no transport owns it (or the one that does closed it)
                raise
        except BaseException:
            self._free_slot()
            raise
        if self._closed:
            conn.abort()
            raise RuntimeError("Http11Transport was closed")
        return conn

    def _release(self, conn: Connection) -> None:
        """Back to a waiter or to the idle pool after a complete response, if reusable."""
        transport = conn.transport
        if transport is None or transport.get_write_buffer_size():
            # The server answered before reading the whole request (an early 413, say): the
            # rest is still queued, the stream is out of step, and a graceful close would
            # wait for a peer that may never read it.
            self._discard(conn, abort=True)
            return
        if not conn.reusable or not conn.usable or self._closed:
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

    def _discard(self, conn: Connection, *, abort: bool) -> None:
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

    def connection_opened(self, conn: Connection) -> None:
        self._conns.add(conn)

    def connection_gone(self, conn: Connection) -> None:
        self._conns.discard(conn)
        if conn.in_pool:
            self._idle_lost(conn)

    def _idle_lost(self, conn: Connection) -> None:
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
