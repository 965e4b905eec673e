"""ASGI integration (Starlette, FastAPI, any ASGI app); needs no framework to import.

``OpenPanelMiddleware`` is a pure ASGI middleware (no task per request, unlike
``BaseHTTPMiddleware``): for each HTTP or WebSocket request it puts the end user's IP and
user agent into the event context, so every event tracked while handling the request, in
background tasks it starts too, carries them. ``openpanel_lifespan`` starts a client with
the app and drains it on shutdown.

The client IP comes from the connection. ``X-Forwarded-For`` and ``Forwarded`` are read
only when the immediate peer is one of ``trusted_proxies``: trusting them from anyone would
let a client forge its location.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
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
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_FORWARDED_FOR = re.compile(r'for=("[^"]*"|[^;,\s]*)', re.IGNORECASE)


class OpenPanelMiddleware:
    """Carry each request's end-user IP and user agent to the events it tracks.

    Args:
        app: the ASGI application to wrap.
        trusted_proxies: addresses or networks (``"10.0.0.0/8"``) of the reverse proxies in
            front of the app. Forwarding headers are honoured only from these peers.
    """

    def __init__(self, app: ASGIApp, *, trusted_proxies: Iterable[str] = ()) -> None:
        self.app = app
        self._trusted: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(proxy.strip(), strict=False) for proxy in trusted_proxies
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        user_agent = None
        forwarded_for: list[str] = []
        forwarded: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"user-agent":
                user_agent = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
            elif name == b"forwarded":
                forwarded.append(value.decode("latin-1"))
        client = scope.get("client")
        peer = client[0] if client else None
        token = enter_request(
            self._client_ip(peer, forwarded, forwarded_for), _clean_user_agent(user_agent)
        )
        try:
            await self.app(scope, receive, send)
        finally:
            exit_request(token)

    def _is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self._trusted)

    def _client_ip(
        self, peer: str | None, forwarded: list[str], forwarded_for: list[str]
    ) -> str | None:
        peer_address = _parse_ip(peer)
        if peer_address is None or not self._trusted or not self._is_trusted(peer_address):
            return None if peer_address is None else str(peer_address)
        if forwarded:
            hops = [m.group(1).strip('"') for m in _FORWARDED_FOR.finditer(",".join(forwarded))]
        else:
            hops = [hop.strip() for hop in ",".join(forwarded_for).split(",")]
        # Walk from the nearest hop back: the first address that is not one of our proxies
        # is the client. Anything to its left was written by the client and can be forged.
        chain = [address for address in map(_parse_ip, hops) if address is not None]
        for address in reversed(chain):
            if not self._is_trusted(address):
                return str(address)
        return str(chain[0]) if chain else str(peer_address)


def _parse_ip(value: str | None) -> IPAddress | None:
    if not value:
        return None
    text = value.strip()
    if text.startswith("["):  # "[2001:db8::1]:4711" (Forwarded) or "[2001:db8::1]"
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


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
