"""ASGI integration (Starlette, FastAPI, any ASGI app); needs no framework to import.

``OpenPanelMiddleware`` is a pure ASGI middleware (no task per request, unlike
``BaseHTTPMiddleware``): for each HTTP or WebSocket request it puts the end user's IP and
user agent into the event context, so every event tracked while handling the request, in
background tasks it starts too, carries them. ``openpanel_lifespan`` starts a client with
the app and drains it on shutdown.

The client IP comes from the connection. The forwarding header your proxies set
(``X-Forwarded-For`` by default, or ``Forwarded``) is read only when the immediate peer is
one of ``trusted_proxies``: trusting it from anyone would let a client forge its location.
Only that one header is read: proxies append to their own header and pass the other
through, so reading both would let a client choose its address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ._client import OpenPanel
from ._context import enter_request, exit_request

__all__ = ["OpenPanelMiddleware", "openpanel_lifespan"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_USER_AGENT = 1024
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_FORWARDING_HEADERS = ("x-forwarded-for", "forwarded")


class OpenPanelMiddleware:
    """Carry each request's end-user IP and user agent to the events it tracks.

    Args:
        app: the ASGI application to wrap.
        trusted_proxies: addresses or networks (``"10.0.0.0/8"``) of the reverse proxies in
            front of the app. The forwarding header is honoured only from these peers.
        forwarded_header: the header those proxies write: ``"x-forwarded-for"`` (nginx,
            most load balancers) or ``"forwarded"`` (RFC 7239).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: str = "x-forwarded-for",
    ) -> None:
        self.app = app
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(proxy.strip(), strict=False) for proxy in trusted_proxies
        )
        header = forwarded_header.lower()
        if header not in _FORWARDING_HEADERS:
            raise ValueError(
                "forwarded_header: must be 'x-forwarded-for' or 'forwarded', "
                f"not {forwarded_header!r}"
            )
        self._header = header.encode("latin-1")
        self._rfc7239 = header == "forwarded"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        user_agent = None
        forwarded: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"user-agent":
                # Browsers send UTF-8 (or ASCII); decode it so it goes out as it came in.
                user_agent = value.decode("utf-8", "replace")
            elif name == self._header:
                forwarded.append(value.decode("latin-1"))
        client = scope.get("client")
        peer = client[0] if client else None
        token = enter_request(self._client_ip(peer, forwarded), _clean_user_agent(user_agent))
        try:
            await self.app(scope, receive, send)
        finally:
            exit_request(token)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def _client_ip(self, peer: str | None, forwarded: list[str]) -> str | None:
        peer_address = _parse_ip(peer)
        if peer_address is None:
            return None
        if not self._trusted or not self._is_trusted(peer_address):
            return str(peer_address)
        hops = _forwarded_for(forwarded) if self._rfc7239 else _x_forwarded_for(forwarded)
        if not hops:
            return str(peer_address)  # the proxy's own request (a health check, say)
        # Walk from the nearest hop back: the first address that is not one of our proxies
        # is the client. Anything to its left was written by the client and can be forged.
        for hop in reversed(hops):
            address = _parse_ip(hop)
            if address is None:
                # Our proxy wrote something that is not an address ("unknown", an obfuscated
                # node): the client's address is not known, and what lies further left is
                # the client's own word.
                return None
            if not self._is_trusted(address):
                return str(address)
        leftmost = _parse_ip(hops[0])
        return None if leftmost is None else str(leftmost)


def _x_forwarded_for(values: list[str]) -> list[str]:
    return [hop.strip() for hop in ",".join(values).split(",") if hop.strip()]


def _forwarded_for(values: list[str]) -> list[str]:
    """The ``for=`` of each element of RFC 7239 ``Forwarded`` headers, nearest last."""
    hops = []
    for element in _split_unquoted(",".join(values), ","):
        for pair in _split_unquoted(element, ";"):
            name, equals, value = pair.partition("=")
            if equals and name.strip().lower() == "for":
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                hops.append(value)
    return hops


def _split_unquoted(text: str, separator: str) -> Iterator[str]:
    """Split on ``separator`` outside double-quoted strings (which may hold escapes)."""
    start = 0
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            yield text[start:index]
            start = index + 1
    yield text[start:]


def _parse_ip(value: str | None) -> IPAddress | None:
    if not value:
        return None
    text = value.strip()
    if text.startswith("["):  # "[2001:db8::1]:4711" (Forwarded) or "[2001:db8::1]"
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket (uvicorn --host ::) reports IPv4 peers as ::ffff:10.0.0.5: that
    # is 10.0.0.5, for the trusted proxies and for the server's geo lookup alike.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _clean_user_agent(value: str | None) -> str | None:
    # A header the client fully controls: never let it make track() raise.
    if not value or _BAD_HEADER_CHARS.search(value):
        return None
    return value[:_MAX_USER_AGENT]


def openpanel_lifespan(
    client: OpenPanel,
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A Starlette/FastAPI ``lifespan``: start ``client`` with the app, drain it on shutdown.

    ``FastAPI(lifespan=openpanel_lifespan(op))``. To combine with your own lifespan, use
    ``async with op:`` inside it instead.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with client:
            yield

    return lifespan
