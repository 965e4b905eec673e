"""What a response means for the event that caused it: a pure function of status and body."""

from __future__ import annotations

import enum

import msgspec

MAX_MESSAGE_CHARS = 300


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    BOT = "bot"  # 202: the server dropped it as a bot; retrying cannot help
    REJECTED = "rejected"  # 4xx and redirects: retrying cannot help
    UNAUTHORIZED = "unauthorized"  # 401: no request can succeed with these credentials
    PROFILE_PENDING = "profile_pending"  # 404 on increment/decrement: retry a few times
    RATE_LIMITED = "rate_limited"  # 429: pause everything, then retry
    RETRY = "retry"  # 408, 5xx: retry with backoff


_RETRYABLE = frozenset({408, 425, 500, 502, 503, 504})
_PROFILE_OPS = frozenset({"increment", "decrement"})


def server_message(body: bytes) -> str | None:
    """The human-readable message of a response body, JSON or plain text; never raises."""
    if not body:
        return None
    text: str | None = None
    if body[:1] in (b"{", b"["):
        try:
            data = msgspec.json.decode(body)
        except Exception:
            # Not only DecodeError: UnicodeDecodeError for invalid UTF-8, RecursionError
            # for a deeply nested body. Whatever a body holds, it must not crash the sender.
            data = None
        if isinstance(data, dict):
            for key in ("message", "error"):
                value = data.get(key)
                if isinstance(value, str) and value:
                    text = value
                    break
    if text is None:
        text = body.decode("utf-8", "replace").strip()
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text or None


def classify(status: int, message: str | None, event_type: str) -> Verdict:
    if status == 202:
        return Verdict.BOT
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 429:
        return Verdict.RATE_LIMITED
    if status in _RETRYABLE:
        return Verdict.RETRY
    if status == 401:
        return Verdict.UNAUTHORIZED
    if (
        status == 404
        and event_type in _PROFILE_OPS
        and message is not None
        and "profile not found" in message.lower()
    ):
        return Verdict.PROFILE_PENDING
    # Redirects are never followed (the secret must not travel to another host), other
    # 4xx cannot succeed on retry, and an unknown 5xx is not worth hammering.
    return Verdict.REJECTED
