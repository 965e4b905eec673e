"""A transport that records events instead of sending them: for users' own test suites."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from .._events import Event, decode_event
from .._transport import TransportResponse

_OK_BODY = b'{"deviceId":"recorded","sessionId":"recorded"}'
_JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request the client made: the exact body, its headers, and the decoded event."""

    url: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    event: Event

    @property
    def type(self) -> str:
        return self.event.wire_type

    @property
    def payload(self) -> dict[str, Any]:
        """The payload exactly as it went on the wire (camelCase keys)."""
        envelope = msgspec.json.decode(self.body)
        payload = envelope["payload"]
        assert isinstance(payload, dict)
        return payload


class EventRecorder:
    """Pass as ``OpenPanel(transport=EventRecorder())`` to capture events with no network.

    Every event goes through the client as usual (validation, encoding, queue, headers);
    the recorder answers each request with ``status`` (200 by default) and keeps it::

        recorder = EventRecorder()
        async with OpenPanel(client_id=..., transport=recorder) as op:
            op.track("signed_up", {"plan": "pro"})
        assert recorder.events == [Track(name="signed_up", properties=...)]
    """

    def __init__(self, *, status: int = 200) -> None:
        self.status = status
        self.requests: list[RecordedRequest] = []
        self.closed = False

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> TransportResponse:
        lowered = {name.lower(): value for name, value in headers.items()}
        self.requests.append(RecordedRequest(url, lowered, body, decode_event(body)))
        body_out = _OK_BODY if self.status == 200 else b'{"message":"recorded"}'
        return TransportResponse(self.status, _JSON_HEADERS, body_out)

    async def aclose(self) -> None:
        self.closed = True

    @property
    def events(self) -> list[Event]:
        """The events sent, in the order they were sent."""
        return [request.event for request in self.requests]

    def payloads(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Wire payloads, optionally of one type (``"track"``, ``"identify"``, ...)."""
        return [r.payload for r in self.requests if event_type is None or r.type == event_type]

    def names(self) -> list[str]:
        """The names of the ``track`` events sent, in order."""
        return [r.payload["name"] for r in self.requests if r.type == "track"]

    def clear(self) -> None:
        self.requests.clear()
