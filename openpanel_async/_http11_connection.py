"""One keep-alive HTTP/1.1 connection of the builtin transport, and its response parser.

An ``asyncio.Protocol``: a request is one ``transport.write()``; the response is parsed
incrementally as bytes arrive (status line, headers, then the body by Content-Length,
chunked framing or EOF; 1xx interim responses skipped) and completes a future, with no
streams and no per-request tasks. Every buffer is bounded: the head, a chunk-size line and
the trailers are capped, at most ``MAX_RESPONSE_BYTES`` of a body is kept, and a longer
body is drained only while that is cheaper than a new connection. The pool that owns the
connections is in ``_http11``.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Final, Protocol, cast

from ._transport import MAX_RESPONSE_BYTES, TransportResponse

__all__ = [
    "Connection",
    "ConnectionClosedError",
    "ConnectionOwner",
    "HttpProtocolError",
    "MalformedResponseError",
]

# The status line and headers of one response (and of any 1xx before it), and the trailers.
_MAX_HEAD: Final = 64 * 1024
# A chunk-size line with its extensions.
_MAX_CHUNK_LINE: Final = 4 * 1024
# Past the kept MAX_RESPONSE_BYTES, read (and drop) at most this much more to keep the
# connection; a longer body costs more than a new connection, so the connection is closed.
_MAX_DRAIN: Final = 256 * 1024

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
# Fields that hold one value, which the client reads: repeated (the origin's and a
# proxy's, say), the first is kept, as aiohttp's ``headers.get()`` gives it. Joined, they
# would not parse: an HTTP-date Retry-After itself contains ", ".
_FIRST_WINS: Final = frozenset(
    {
        "content-type",
        "retry-after",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    }
)
# Header names seen in responses (valid tokens only) -> their lower case; bounded.
_NAMES: dict[str, str] = {}
_MAX_NAMES: Final = 256


class HttpProtocolError(Exception):
    """The server broke the HTTP/1.1 protocol, or the connection ended mid-response."""


class MalformedResponseError(HttpProtocolError):
    """The response could not be parsed (status line, headers, framing or chunks)."""


class ConnectionClosedError(HttpProtocolError, ConnectionError):
    """The connection closed (or was reset) before the response was complete."""


class ConnectionOwner(Protocol):
    """The pool a connection reports to."""

    def connection_opened(self, conn: Connection) -> None: ...

    def connection_gone(self, conn: Connection) -> None:
        """``conn`` closed or was lost (``conn.in_pool``: while idle in the pool)."""
        ...


class Connection(asyncio.Protocol):
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
        self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop, expiry: float
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
        self._owner.connection_opened(self)
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
        if self._waiter is not None:
            if self._state == _UNTIL_EOF and exc is None:
                self._finish(reusable=False)
            else:
                error = ConnectionClosedError(self._closed_message())
                error.__cause__ = exc
                self.fail(error)
        self._owner.connection_gone(self)

    # --- requests -------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Open and not closing: the server's FIN (or our abort) makes a transport closing
        one callback before ``connection_lost`` marks the connection closed."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def send(self, data: bytes) -> asyncio.Future[TransportResponse]:
        """Writes a request; the future gets the response (or the error)."""
        self.got_bytes = False
        if not self.usable:
            raise ConnectionClosedError("the connection was closed before the request")
        transport = self.transport
        assert transport is not None
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
                # Up to end + 1: a bare-LF head whose body starts with CRLF ("\n\n\r\n")
                # has its "\n\n" just before that "\n\r\n", overlapping it.
                bare = buf.find(b"\n\n", start, len(buf) if end < 0 else end + 1)
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
                if lower in _FIRST_WINS:
                    continue
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
            if content_length is not None or match.group(1) == "0":
                # Both framings at once is a smuggling pattern, and so is chunked framing
                # from an HTTP/1.0 server: trust chunked, but do not let the connection
                # carry anything else (RFC 9112 6.1 and 6.3).
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
