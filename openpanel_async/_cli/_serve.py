"""``openpanel-async serve``: the local test server in the foreground, one line per request."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import re
import sys
import time
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from .._events import decode_envelope
from ..errors import InvalidEventError
from ._common import ENV_API_URL, EXIT_OK, PROG, CliError, on_signals
from ._output import CONTROL_RE, plural, printable

if TYPE_CHECKING:
    from ..testing import LocalOpenPanel, ReceivedRequest

_IP_HEADERS = ("openpanel-client-ip", "x-client-ip", "x-forwarded-for", "x-real-ip")


def _client_ip(request: ReceivedRequest) -> str | None:
    """The end user's IP the server would locate: ``__ip``, then the headers it reads."""
    ip = request.properties.get("__ip")
    if isinstance(ip, str) and ip:
        return ip
    for header in _IP_HEADERS:
        value = request.headers.get(header)
        if value:
            return value.split(",")[0].strip()
    return None


def _refusal(request: ReceivedRequest) -> str:
    """Why the server did not store the event, in a few words."""
    status = request.status
    if status is None:
        return "connection dropped"
    if status == 429:
        return "rate limited"
    if status == 401:
        return "credentials refused"
    if status == 202:
        return "dropped as sent by a bot"
    if status >= 500:
        return "simulated server error"
    if status == 400:
        try:
            decode_envelope(request.body)
        except InvalidEventError as exc:
            return str(exc)
        return "rejected"
    if status == 404:
        return f"no route {request.path}"
    return f"HTTP {status}"


def _word(value: object) -> str:
    """A value as one token: bare when it is one, JSON-quoted when it has spaces or quotes."""
    text = value if isinstance(value, str) else json.dumps(value)
    if text and re.fullmatch(r"[\w@.:/+\-#]+", text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _event_details(event_type: str | None, payload: dict[str, Any]) -> list[str]:
    """The fields that say what an event is; defensive, the payload is anyone's JSON."""
    parts: list[str] = []
    if event_type == "track":
        parts.append(_word(payload.get("name")))
    elif event_type == "group":
        parts.append(f"{_word(payload.get('id'))} ({_word(payload.get('type'))})")
        parts.append(f"name={_word(payload.get('name'))}")
    if "profileId" in payload:
        parts.append(f"profile={_word(payload['profileId'])}")
    if event_type == "identify":
        full_name = " ".join(
            str(payload[key]) for key in ("firstName", "lastName") if payload.get(key)
        )
        if full_name:
            parts.append(f"name={_word(full_name)}")
        parts.extend(
            f"{key}={_word(payload[key])}" for key in ("email", "avatar") if key in payload
        )
    elif event_type in ("increment", "decrement"):
        sign = "+" if event_type == "increment" else "-"
        parts.append(f"{_word(payload.get('property'))} {sign}{_word(payload.get('value', 1))}")
    groups = payload.get("groups", payload.get("groupIds"))
    if isinstance(groups, list) and groups:
        parts.append("groups=" + ",".join(_word(group) for group in groups))
    properties = payload.get("properties")
    if isinstance(properties, dict):
        shown = {k: v for k, v in properties.items() if k != "__timestamp"}
        if shown:
            parts.append(_json(shown))
    return parts


def _moment(request: ReceivedRequest) -> float:
    """The wall-clock time the request arrived (the server records a monotonic time)."""
    return time.time() - (time.monotonic() - request.arrived)


def _event_time_note(request: ReceivedRequest, arrived: float) -> str | None:
    """``at=...`` when the event says it happened well before it arrived (imports, retries)."""
    stamp = request.properties.get("__timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        happened = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return f"at={_word(stamp)}"
    return f"at={stamp}" if abs(arrived - happened) > 60 else None


def _stored(request: ReceivedRequest) -> bool:
    """Whether the server kept the event: any 2xx but 202 (a bot, dropped)."""
    status = request.status
    return status is not None and 200 <= status < 300 and status != 202


def format_request(request: ReceivedRequest) -> str:
    """One readable line: time, status, type, what the event is, client IP, user agent."""
    arrived = _moment(request)
    stamp = (
        time.strftime("%H:%M:%S", time.localtime(arrived)) + f".{int(arrived * 1000) % 1000:03d}"
    )
    status = "---" if request.status is None else str(request.status)
    parts = [stamp, status, request.type or "-"]
    if _stored(request):
        parts.extend(_event_details(request.type, request.payload or {}))
        note = _event_time_note(request, arrived)
        if note is not None:
            parts.append(note)
    else:
        parts.append(f"-> {_refusal(request)}")
    parts.append(f"ip={_client_ip(request) or '-'}")
    parts.append(f"ua={_word(request.headers.get('user-agent', '-'))}")
    return printable("  ".join(parts))


def format_request_json(request: ReceivedRequest) -> str:
    arrived = _moment(request)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(arrived).astimezone().isoformat(timespec="milliseconds"),
        "status": request.status,
        "type": request.type,
        "payload": request.payload,
        "client_ip": _client_ip(request),
        "user_agent": request.headers.get("user-agent"),
        "client_id": request.headers.get("openpanel-client-id"),  # never the secret
        "path": request.path,
    }
    if not _stored(request):
        record["error"] = _refusal(request)
    # json.dumps escapes C0 controls; C1 ones are escaped too, so a terminal stays safe.
    return CONTROL_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", _json(record))


class RequestLog:
    """Prints what the local server receives and counts it for the summary."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self._out = out
        self._format = format_request_json if as_json else format_request
        self.stored: Counter[str] = Counter()  # by event type
        self.refused: Counter[str] = Counter()  # by status

    def write(self, request: ReceivedRequest) -> None:
        if _stored(request):
            self.stored[request.type or "?"] += 1
        else:
            self.refused["dropped" if request.status is None else str(request.status)] += 1
        self._out.write(self._format(request) + "\n")

    def summary(self, elapsed: float) -> str:
        total = sum(self.stored.values()) + sum(self.refused.values())
        stored = sum(self.stored.values())
        text = f"{plural(total, 'request')} in {elapsed:.1f} s, {plural(stored, 'event')} stored"
        if self.stored:
            text += " (" + ", ".join(f"{t} {n:,}" for t, n in self.stored.most_common()) + ")"
        if self.refused:
            refused = sorted(self.refused.items())
            text += "; not stored: " + ", ".join(f"{n:,} x {status}" for status, n in refused)
        return text


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


def _serve_banner(server: LocalOpenPanel, args: argparse.Namespace) -> str:
    lines = [f"{PROG} serve: a local OpenPanel server on {server.url} (POST /track)"]
    rules = [f"client id {args.client_id}" if args.client_id else "any client id"]
    if args.client_secret:
        rules.append("a client secret required")
    if args.rate_limit:
        count, window = args.rate_limit
        rules.append(f"rate limit {count:,} requests per {window:g} s")
    if args.fail_rate:
        rules.append(f"{args.fail_rate:.0%} of requests fail (5xx)")
    if args.delay:
        rules.append(f"{args.delay:g} s response delay")
    lines.append("  " + "; ".join(rules))
    lines.append(f"  point a client at it: {ENV_API_URL}={server.url}   (Ctrl-C to stop)")
    return "\n".join(lines)


async def _serve(args: argparse.Namespace) -> int:
    from ..testing import LocalOpenPanel

    stop = asyncio.Event()
    failures: list[BaseException] = []
    log = RequestLog(sys.stdout, args.json)

    def print_request(request: ReceivedRequest) -> None:
        # One line per request as it is answered; nothing is kept: a dev server may run
        # for days. A closed stdout (| head) ends the server.
        try:
            log.write(request)
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            failures.append(exc)
            stop.set()

    server = LocalOpenPanel(
        client_id=args.client_id,
        client_secret=args.client_secret,
        port=args.port,
        response_delay=args.delay,
        rate_limit=args.rate_limit,
        fail_rate=args.fail_rate,
        seed=args.seed,
        on_request=print_request,
        record=False,
    )
    try:
        await server.start()
    except OSError as exc:
        raise CliError(_listen_error(args.port, exc)) from None
    started = time.monotonic()
    try:
        print(_serve_banner(server, args), file=sys.stderr, flush=True)
        with on_signals(stop.set):
            await stop.wait()
    finally:
        await server.stop()
    if failures:
        raise failures[0]
    sys.stdout.flush()
    newline = "\n" if sys.stderr.isatty() else ""  # after the terminal's echoed ^C
    summary = log.summary(time.monotonic() - started)
    print(f"{newline}{PROG} serve: stopped: {summary}", file=sys.stderr, flush=True)
    return EXIT_OK


def _listen_error(port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on 127.0.0.1:{port}: the port is in use (pick another --port, "
            "or --port 0 for a free one)"
        )
    return f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"
