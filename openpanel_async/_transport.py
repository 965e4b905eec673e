"""The one seam between the delivery engine and HTTP: POST a body, get status, headers, body.

The default transport is aiohttp with one pooled session. Tests (ours and our users')
plug in other transports, such as ``openpanel_async.testing.EventRecorder``, without
patching anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import aiohttp
import msgspec

__all__ = ["AiohttpTransport", "Transport", "TransportResponse"]

# Enough for any message the server sends; a larger body is cut, never buffered whole.
MAX_RESPONSE_BYTES = 64 * 1024


class TransportResponse(msgspec.Struct, frozen=True):
    """An HTTP answer. ``headers`` must look names up without case (or use lower case).

    Immutable; built positionally or by keyword. A msgspec Struct rather than a frozen
    dataclass: one is made per request, and a frozen dataclass's ``__init__`` (an
    ``object.__setattr__`` per field) costs several times more.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


@runtime_checkable
class Transport(Protocol):
    """Sends one request. Raise any exception for a network failure: it is retried."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> TransportResponse: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """One aiohttp ClientSession with a keep-alive pool; created on the running loop.

    ``default_headers``: the mapping most requests are posted with (the sender's static
    headers, which it never changes). The session holds them as its default headers, and
    a post with that very mapping passes none: aiohttp then copies its prepared defaults
    instead of converting and merging a dict per request (3-4% of the CPU per request).
    """

    def __init__(
        self,
        *,
        max_connections: int,
        request_timeout: float,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        self._default_headers = default_headers
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0),
            # ceil_threshold: aiohttp would otherwise round a timeout of 5 s or more up
            # to the next whole second of the loop's clock.
            timeout=aiohttp.ClientTimeout(total=request_timeout, ceil_threshold=math.inf),
            headers=default_headers,
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        # Any other mapping holds every header and overrides the defaults it repeats.
        sent = None if headers is self._default_headers else headers
        try:
            # Never follow redirects: the secret must not travel to another host.
            async with self._session.post(
                url, data=body, headers=sent, allow_redirects=False
            ) as response:
                content = await response.content.read(MAX_RESPONSE_BYTES)
                return TransportResponse(response.status, response.headers, content)
        except aiohttp.ClientError as exc:
            error = _without_request(exc)
        # Raised outside the handler, so that not even its __context__ leads back to
        # aiohttp's exception.
        raise error

    async def aclose(self) -> None:
        await self._session.close()

    @property
    def closed(self) -> bool:
        return self._session.closed


def _without_request(exc: aiohttp.ClientError) -> Exception:
    """``exc`` as a plain error with its type and message only.

    aiohttp's errors keep the request (``request_info.headers``, the client secret
    included), and the sender hands the last one to the application as
    ``DeliveryError.cause``. A timeout stays a TimeoutError: the sender counts those.
    """
    kind: type[Exception] = TimeoutError if isinstance(exc, TimeoutError) else ConnectionError
    return kind(f"{type(exc).__name__}: {exc}")
