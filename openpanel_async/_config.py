"""Checks of the client's options: each error names the option, and never echoes a secret."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from .errors import ConfigError, InvalidEventError

_UUID_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE | re.ASCII
)
_BAD_HEADER_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_client_id(client_id: object) -> str:
    """The client id as sent: a UUID, lower-cased."""
    if not isinstance(client_id, str) or not _UUID_RE.fullmatch(client_id.strip()):
        raise ConfigError("client_id: must be a UUID such as 'c0ffee00-1234-4321-abcd-...'")
    return client_id.strip().lower()


def check_client_secret(client_secret: object) -> None:
    if client_secret is not None and (
        not isinstance(client_secret, str)
        or not client_secret
        or _BAD_HEADER_CHARS.search(client_secret)
    ):
        # Never echo the value: it is a secret.
        raise ConfigError("client_secret: must be a non-empty str without control characters")


def _masked(url: str) -> str:
    """``url`` with everything up to its last "@" masked, but the scheme.

    A password may itself hold "/", "?", "#" or a newline, and a mistyped URL may lack
    the "//": masking too much of an odd URL in an error message is fine, echoing any of
    a password is not.
    """
    if "@" not in url:
        return url
    host = url.rsplit("@", 1)[1]
    scheme, separator, _ = url.partition("://")
    return f"{scheme}://***@{host}" if separator and "@" not in scheme else f"***@{host}"


def check_api_url(api_url: object) -> str:
    if not isinstance(api_url, str):
        raise ConfigError(f"api_url: must be a str, not {type(api_url).__name__}")
    url = api_url.strip().rstrip("/")
    shown = _masked(url)  # never echo a password given in the URL
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        raise ConfigError(f"api_url: {shown!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"api_url: {shown!r} must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            "api_url: must not carry a query, a fragment or credentials (only a path prefix)"
        )
    return url


def check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be an int >= 1, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: must be True or False, got {value!r}")


def check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def checked_global_properties(properties: object) -> dict[str, Any] | None:
    if properties is None:
        return None
    if not isinstance(properties, Mapping):
        raise ConfigError(f"global_properties: must be a dict, not {type(properties).__name__}")
    checked = dict(properties)
    try:
        msgspec.json.encode(checked)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"global_properties: cannot be encoded as JSON: {exc}") from None
    return checked or None


def check_header_value(value: object, field: str) -> None:
    """An event's client_ip / user_agent, which go out as request headers."""
    if not isinstance(value, str):
        raise InvalidEventError(f"{field}: must be a str, not {type(value).__name__}")
    if not value or _BAD_HEADER_CHARS.search(value):
        raise InvalidEventError(f"{field}: must be non-empty and free of control characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate: no HTTP client can send it (the builtin one would fail
            # every attempt), so refuse it here.
            raise InvalidEventError(
                f"{field}: must be valid Unicode (no lone surrogates)"
            ) from None
