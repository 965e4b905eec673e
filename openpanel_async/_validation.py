"""The server's payload rules, as pure functions that raise InvalidEventError.

Everything here mirrors ``openpanel-wire-contract.md`` ("Validation details"). Where the
contract lets a client be stricter (avatars), we are; we are never looser, so that an event
this module accepts is never refused by the server's own validation.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, NoReturn
from urllib.parse import urlsplit

from .errors import InvalidEventError

MAX_NAME_UNITS = 80
MAX_DEVICE_ID_UNITS = 64
# Integers beyond 2**53 do not survive the server's double-precision JSON numbers.
_MAX_SAFE_INT = 2**53

RESERVED_NAMES = frozenset({"session_start", "session_end"})

# Fragments that make the server's "blocked content" check refuse an event name. They are
# matched against the lower-cased name, so all of them are written in lower case.
BLOCKED_FRAGMENTS: tuple[str, ...] = (
    "../", "..\\", "%2e%2e", "%u002e%u002e", "/etc/passwd", "/etc/shadow", "win.ini",
    "system.ini", "${", "%{", "union select", "pg_sleep", "waitfor delay", "xp_dirtree",
    "load_file(", "extractvalue(", "dbms_pipe.receive_message", "exec master.dbo",
    "declare @", "' and '", "' or '", "') or ", "')and ", "nslookup ", "/bin/sleep",
    "/bin/bash", "cmd.exe", "wget+http", "wget http", "chmod+777", "chmod 777",
    "processbuilder", "runtime.getruntime", "java.lang.processbuilder", "oastify.com",
    "burpcollaborator", "interact.sh", "oast.me", "<!doctype", "<!entity", "<xi:include",
    "xsi:schemalocation", "bcc:", "eval-stdin.php", "phpinfo.php", "wp-config.php",
    ".git/config", ".env.backup", ".env.bak", "/vendor/phpunit/", "/setup.cgi?", "/cgi-bin/",
    "mozi.m", "#<article:0x", "#<video:0x", "#<brand:0x",
)  # fmt: skip
# One alternation instead of ~60 substring scans: a single pass over the name.
_BLOCKED_RE = re.compile("|".join(re.escape(f) for f in BLOCKED_FRAGMENTS))
# Names that look like a scanned URL path. The server compares ASCII letters without case.
# We match the file-extension rule as a prefix (not anchored at the end): stricter is safe.
_SCAN_PATH_RE = re.compile(
    r"/(?:wp-|wordpress|phpmyadmin)"
    r"|/\.[a-z]"
    r"|/[a-z_-]+\.(?:php|env|yml|yaml|json|xml|config|ini|bak|sql|log)",
    re.IGNORECASE | re.ASCII,
)

_EMAIL_RE = re.compile(
    r"(?!\.)[A-Za-z0-9_'+.-]+(?<![.'])"
    r"@(?:[A-Za-z0-9][A-Za-z0-9-]*\.)+[A-Za-z]{2,}",
    re.ASCII,
)
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HEX = frozenset("0123456789abcdefABCDEF")
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?", re.ASCII)
_WHITESPACE_OR_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")

# Names already checked: event names repeat, so the common case is one dict lookup.
# Bounded; cleared when full rather than tracking recency, which would cost on every hit.
_NAME_CACHE_SIZE = 4096
valid_names: dict[str, None] = {}


def fail(field: str, rule: str) -> NoReturn:
    raise InvalidEventError(f"{field}: {rule}")


def utf16_units(text: str, field: str) -> int:
    """Length as JavaScript counts it: characters outside the BMP count two."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-16-le")) // 2
    except UnicodeEncodeError:
        fail(field, "contains a lone surrogate, which is not valid Unicode text")


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_event_name(name: object, field: str = "name") -> None:
    if type(name) is str and name in valid_names:
        return
    if not isinstance(name, str):
        fail(field, f"must be a str, not {type(name).__name__}")
    if not name:
        fail(field, "must not be empty")
    units = utf16_units(name, field)
    if units > MAX_NAME_UNITS:
        fail(field, f"must be at most {MAX_NAME_UNITS} UTF-16 code units long, got {units}")
    if "\n" in name or "\r" in name:
        fail(field, "must not contain a newline (\\n or \\r)")
    if name in RESERVED_NAMES:
        fail(field, f"{name!r} is reserved by OpenPanel")
    lowered = name.lower()
    match = _BLOCKED_RE.search(lowered)
    if match is not None:
        fail(field, f"contains {match.group()!r}, which the server refuses as blocked content")
    if name.startswith("/") and (_SCAN_PATH_RE.match(name) or lowered.endswith(".php")):
        fail(field, f"{_describe(name)} looks like a scanned URL path, which the server refuses")
    if len(valid_names) >= _NAME_CACHE_SIZE:
        valid_names.clear()
    valid_names[name] = None


def check_nonempty_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        fail(field, f"must be a str, not {type(value).__name__}")
    if not value:
        fail(field, "must not be empty")


def check_optional_str(value: object, field: str) -> None:
    if not isinstance(value, str):
        fail(field, f"must be a str, not {type(value).__name__}")


def check_profile_id(value: object, field: str = "profile_id") -> None:
    if type(value) is str:
        if not value:
            fail(field, "must not be empty")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(field, f"must be a non-empty str or a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(field, f"must be a finite number, got {value!r}")
    if isinstance(value, int) and abs(value) > _MAX_SAFE_INT:
        # A float is a double already; an int this large would be rounded on the wire.
        fail(field, "is an int too large to survive JSON's double precision; send it as a str")


def check_string_list(value: object, field: str, *, allow_empty_list: bool) -> None:
    if not isinstance(value, list | tuple):
        fail(field, f"must be a list of str, not {type(value).__name__}")
    if not value and not allow_empty_list:
        fail(field, "must hold at least one id")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            fail(f"{field}[{index}]", f"must be a str, not {type(item).__name__}")
        if not item:
            fail(f"{field}[{index}]", "must not be empty")


def check_properties(value: object, field: str = "properties") -> None:
    if not isinstance(value, dict):
        fail(field, f"must be a dict, not {type(value).__name__}")


def check_reserved_properties(name: str, properties: dict[str, Any], field: str) -> None:
    """The few ``__`` properties the server itself checks; cheap when they are absent."""
    device_id = properties.get("__deviceId")
    if device_id is not None:
        if not isinstance(device_id, str):
            fail(f"{field}.__deviceId", f"must be a str, not {type(device_id).__name__}")
        if utf16_units(device_id, f"{field}.__deviceId") > MAX_DEVICE_ID_UNITS:
            fail(f"{field}.__deviceId", f"must be at most {MAX_DEVICE_ID_UNITS} characters")
    if name == "revenue":
        revenue = properties.get("__revenue")
        if revenue is not None:
            whole = (type(revenue) is int) or (
                isinstance(revenue, float) and math.isfinite(revenue) and revenue.is_integer()
            )
            if not whole or revenue < 0:
                fail(f"{field}.__revenue", f"must be a non-negative whole number, got {revenue!r}")


def check_positive_number(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        fail(field, f"must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(field, f"must be a finite number, got {value!r}")
    if value <= 0:
        fail(field, f"must be greater than 0, got {value!r} (use decrement to subtract)")
    if isinstance(value, int) and abs(value) > _MAX_SAFE_INT:
        fail(field, "is an int too large to survive JSON's double precision")


def check_email(value: object, field: str = "email") -> None:
    if not isinstance(value, str):
        fail(field, f"must be a str, not {type(value).__name__}")
    if not value.isascii() or ".." in value or _EMAIL_RE.fullmatch(value) is None:
        fail(field, f"{_describe(value)} is not a valid email address")


def _valid_host(host: str, *, bracketed: bool) -> bool:
    """A host a WHATWG URL parser takes: stricter, so some exotic valid hosts are refused."""
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    if not _HOSTNAME_RE.fullmatch(host):
        return False
    labels = host.rstrip(".").split(".")
    last = labels[-1]
    if last.isdigit() or (last[:2] in ("0x", "0X") and all(c in _HEX for c in last[2:])):
        # WHATWG parses a host whose last label is a number (decimal, or 0x and hex
        # digits, even none) as an IPv4 address; we take dotted decimal only (stricter).
        try:
            ipaddress.IPv4Address(host.rstrip("."))
        except ValueError:
            return False
        return True
    # Punycode labels must decode; we do not try to validate IDNA further.
    for label in labels:
        if label[:4].lower() == "xn--":
            try:
                label.encode("ascii").decode("idna")
            except UnicodeError:
                return False
    return True


def check_avatar(value: object, field: str = "avatar") -> None:
    """An http(s) URL with a host: stricter than the server's WHATWG parse, never looser."""
    if not isinstance(value, str):
        fail(field, f"must be a str, not {type(value).__name__}")
    url = value.strip()
    problem = None
    if _WHITESPACE_OR_CONTROL_RE.search(url):
        problem = "contains whitespace or control characters"
    else:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for an invalid port
        except ValueError:
            problem = "cannot be parsed"
        else:
            if parts.scheme not in ("http", "https"):
                problem = "must use http or https"
            elif not parts.hostname:
                problem = "has no host"
            elif not _valid_host(parts.hostname, bracketed="[" in parts.netloc):
                problem = "has an invalid host"
    if problem is not None:
        fail(field, f"{_describe(value)} is not a valid avatar URL: {problem}")
