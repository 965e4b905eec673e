"""The ``openpanel-async`` command line, run as a subprocess against a local OpenPanel server.

Each command runs as ``python -m openpanel_async ...`` against a LocalOpenPanel that lives
in a background thread with its own event loop (or against ``serve`` itself), and the
tests check the output, the exit status and exactly what the server received.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import pytest

from openpanel_async import __version__, _cli
from openpanel_async._cli._common import Target, make_client
from openpanel_async._cli._import import IMPORT_RETRY, Importer
from openpanel_async._cli._input import LongLine, Source, split_lines
from openpanel_async._cli._parser import build_parser, parse_property, parse_rate
from openpanel_async.testing import LocalOpenPanel, ReceivedRequest, Reply

CLIENT_ID = "5f1c1c1e-0000-4000-8000-00000000abcd"
CLIENT_SECRET = "sec_do_not_leak_42"
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
CLI = [sys.executable, "-W", "always::ResourceWarning", "-m", "openpanel_async"]
TIMEOUT = 20.0  # for any one subprocess; they take about a second


# --- a server on its own loop, in a thread --------------------------------------------------


class ServerThread:
    """A LocalOpenPanel on a private event loop in a daemon thread."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._server: LocalOpenPanel | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with LocalOpenPanel(**self._options) as server:
                self._server = server
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "the server thread did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def server(self) -> LocalOpenPanel:
        assert self._server is not None
        return self._server

    def on_loop(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on the server's loop (script() and reset() are not thread-safe)."""
        assert self._loop is not None

        async def call() -> Any:
            return action()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(5)

    def requests(self) -> list[ReceivedRequest]:
        return list(self.server.requests)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedRequest]:
        deadline = time.monotonic() + timeout
        while len(self.server.requests) < count:
            assert time.monotonic() < deadline, f"expected {count} requests"
            time.sleep(0.01)
        return self.requests()


@pytest.fixture(scope="module")
def server_thread() -> Iterator[ServerThread]:
    with ServerThread(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as thread:
        yield thread


@pytest.fixture
def local(server_thread: ServerThread) -> Iterator[ServerThread]:
    """The shared server, reset, with its knobs put back after the test."""
    server = server_thread.server
    server_thread.on_loop(server.reset)
    yield server_thread
    server.rate_limit = None
    server.response_delay = 0.0
    # A killed subprocess leaves requests sleeping in the server's handlers; let them end
    # before the reset, or they would be recorded into the next test.
    deadline = time.monotonic() + 5
    while server_thread.on_loop(lambda: server.in_flight) and time.monotonic() < deadline:
        time.sleep(0.01)
    server_thread.on_loop(server.reset)


# --- running the command ---------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENPANEL_")}
    env.update(extra)
    return env


def creds(url: str) -> list[str]:
    return ["--api-url", url, "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]


def start(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [*CLI, *args], text=True, env=env if env is not None else cli_env(), **popen
    )


def finish(
    proc: subprocess.Popen[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(stdin, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert_no_noise(err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    popen = {"stdin": subprocess.PIPE} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return finish(start(*args, env=env, **popen), stdin)


def run_all(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands at the same time: interpreter start-up dominates."""
    procs = [start(*command, stdin=subprocess.DEVNULL) for command in commands]
    return [finish(proc) for proc in procs]


def assert_no_noise(stderr: str) -> None:
    for noise in ("Traceback", "Warning", "Exception ignored", "Task was destroyed"):
        assert noise not in stderr, stderr


def assert_one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("openpanel-async: error: "), lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class PipeLines:
    """Lines of a subprocess pipe, read in a thread so that a test can wait with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self._pipe = pipe
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """After the process ended: the reader sees the end of the pipe, then it is closed."""
        self._thread.join(5)
        self._pipe.close()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)

    def next(self, timeout: float = 10.0) -> str:
        return self._lines.get(timeout=timeout)

    def rest(self, timeout: float = 1.0) -> str:
        lines = []
        while True:
            try:
                lines.append(self._lines.get(timeout=timeout))
            except queue.Empty:
                return "".join(lines)


# --- the program ------------------------------------------------------------------------------


def test_help_version_and_console_script() -> None:
    script = Path(sys.executable).parent / "openpanel-async"
    runs = [start("--help", stdin=subprocess.DEVNULL)]
    if script.exists():  # installed with pip install -e
        runs.append(
            subprocess.Popen(
                [script, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    help_text, *versions = [finish(proc) for proc in runs]
    assert help_text.returncode == 0
    for command in ("demo", "serve", "send", "import"):
        assert command in help_text.stdout
    for version in versions:
        assert version.stdout.strip() == f"openpanel-async {__version__}"


# --- send ------------------------------------------------------------------------------------

SEND_CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "track": (
        [
            "track", "my_event", "--prop", "foo=bar", "--prop", "seats=25", "--prop",
            "beta=true", "--prop", 'meta={"a": [1, 2.5]}', "--prop", 'zip="01234"',
            "--prop", "empty=", "--profile-id", "user_123", "--group", "org_acme",
            "--group", "org_b",
        ],
        {
            "name": "my_event",
            "properties": {
                "foo": "bar", "seats": 25, "beta": True, "meta": {"a": [1, 2.5]},
                "zip": "01234", "empty": "",
            },
            "profileId": "user_123",
            "groups": ["org_acme", "org_b"],
        },
    ),
    "identify": (
        [
            "identify", "123", "--first-name", "Joe", "--last-name", "Doe", "--email",
            "joe@doe.com", "--prop", "tier=premium",
        ],
        {
            "profileId": "123", "firstName": "Joe", "lastName": "Doe",
            "email": "joe@doe.com", "properties": {"tier": "premium"},
        },
    ),
    "increment": (
        ["increment", "1", "visits"],
        {"profileId": "1", "property": "visits", "value": 1},
    ),
    "decrement": (
        ["decrement", "1", "visits", "--value", "2.5"],
        {"profileId": "1", "property": "visits", "value": 2.5},
    ),
    "group": (
        [
            "group", "org_acme", "--type", "company", "--name", "Acme Inc", "--prop",
            "plan=enterprise", "--prop", "seats=25",
        ],
        {
            "id": "org_acme", "type": "company", "name": "Acme Inc",
            "properties": {"plan": "enterprise", "seats": 25},
        },
    ),
    "assign_group": (
        ["assign_group", "org_acme", "org_b", "--profile-id", "user_123"],
        {"groupIds": ["org_acme", "org_b"], "profileId": "user_123"},
    ),
}  # fmt: skip


def test_send_every_type(local: ServerThread) -> None:
    url = local.server.url
    local.server.profiles.add("1")  # the commands run at once: identify may come last
    commands = [["send", *args, *creds(url)] for args, _ in SEND_CASES.values()]
    results = run_all(*commands)
    received = {r.type: r for r in local.wait_for(len(SEND_CASES))}
    assert len(local.requests()) == len(SEND_CASES)
    for (event_type, (_, payload)), result in zip(SEND_CASES.items(), results, strict=True):
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        request = received[event_type]
        assert request.status == 200
        assert request.headers["openpanel-client-id"] == CLIENT_ID
        assert request.headers["openpanel-client-secret"] == CLIENT_SECRET
        sent = dict(request.payload or {})
        if event_type == "track":
            properties = dict(sent["properties"])
            assert TIMESTAMP_RE.fullmatch(properties.pop("__timestamp"))
            sent["properties"] = properties
        assert sent == payload
        # What the command prints is the exact body that went out.
        line = result.stdout.strip()
        assert line.startswith("delivered: ")
        assert line.removeprefix("delivered: ").encode() == request.body


def test_send_from_environment_with_client_ip_and_user_agent(local: ServerThread) -> None:
    env = cli_env(
        OPENPANEL_API_URL=local.server.url,
        OPENPANEL_CLIENT_ID=CLIENT_ID,
        OPENPANEL_CLIENT_SECRET=CLIENT_SECRET,
    )
    result = run(
        "send", "track", "page_view", "--ip", "203.0.113.7", "--user-agent",
        "Mozilla/5.0 (X11; Linux x86_64)", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (request,) = local.wait_for(1)
    assert request.payload is not None
    assert request.payload["name"] == "page_view"
    assert request.headers["x-client-ip"] == "203.0.113.7"
    assert request.headers["user-agent"] == "Mozilla/5.0 (X11; Linux x86_64)"


def test_send_prints_the_servers_message_when_it_rejects(local: ServerThread) -> None:
    message = "body/payload/name: not today"
    reply = Reply(status=400, body={"status": 400, "error": "Error", "message": message})
    local.on_loop(lambda: local.server.script(reply))
    result = run("send", "track", "my_event", *creds(local.server.url))
    line = assert_one_error_line(result, 1)
    assert line == (f"openpanel-async: error: the server rejected the track event (400): {message}")
    assert result.stdout == ""
    assert len(local.requests()) == 1  # a 400 is not retried


def test_send_refused_credentials_never_shows_the_secret(local: ServerThread) -> None:
    wrong = "wrong_secret_123"
    args = ["--api-url", local.server.url, "--client-id", CLIENT_ID, "--client-secret", wrong]
    result = run("send", "identify", "u1", *args)
    line = assert_one_error_line(result, 1)
    assert "(401): Ingestion: Invalid cors or secret" in line
    assert wrong not in result.stdout + result.stderr
    assert [r.status for r in local.requests()] == [401]


def test_send_to_a_dead_server_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run("send", "track", "x", *creds(url), "--timeout", "1")
    line = assert_one_error_line(result, 1)
    assert "failed after 3 attempts" in line
    assert time.monotonic() - started < 10


def test_user_mistakes_end_as_one_line_and_exit_2(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9"  # never reached: every command fails before sending
    cases: list[tuple[list[str], str]] = [
        (["send", "track", "x", "--api-url", url], "send needs credentials: pass --client-id"),
        (["import", str(tmp_path / "missing.jsonl"), *creds(url)], "No such file or directory"),
        (["send", "track", "x", "--prop", "novalue", *creds(url)], "expected KEY=VALUE"),
    ]
    results = run_all(*(args for args, _ in cases))
    for (args, expected), result in zip(cases, results, strict=True):
        line = assert_one_error_line(result, 2)
        assert expected in line, (args, line)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["send", "track", "x", "--client-id", CLIENT_ID, "--api-url", "localhost:3333"],
         "--api-url: 'localhost:3333' must be an http:// or https:// URL with a host"),
        (["send", "track", "x", "--client-id", "not-a-uuid"], "--client-id: must be a UUID"),
        (["send", "track", "session_start", "--client-id", CLIENT_ID],
         "track.name: 'session_start' is reserved by OpenPanel"),
        (["send", "identify", "u1", "--email", "nope", "--client-id", CLIENT_ID],
         "identify.email: 'nope' is not a valid email address"),
        (["send", "increment", "u1", "n", "--value", "0", "--client-id", CLIENT_ID],
         "increment.value: must be greater than 0"),
        (["send", "alias", "x"], "argument TYPE: invalid choice: 'alias'"),
        (["import", ".", "--client-id", CLIENT_ID], "cannot read .: Is a directory"),
        (["serve", "--rate-limit", "10/x"], "argument --rate-limit: expected REQUESTS/s"),
        (["serve", "--rate-limit", "100/"], "argument --rate-limit: expected REQUESTS/s"),
        (["serve", "--rate-limit", "0/s"], "argument --rate-limit: expected REQUESTS/s"),
        (["serve", "--fail-rate", "2"], "argument --fail-rate: must be between 0 and 1"),
        (["serve", "--port", "70000"], "argument --port: must be between 0 and 65535"),
        (["demo", "--api-url", "http://127.0.0.1:9"], "--api-url and --client-secret need"),
        (["demo", "--seconds", "0"], "argument --seconds: must be greater than 0"),
        ([], "the following arguments are required: COMMAND"),
    ],
)  # fmt: skip
def test_more_user_mistakes(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """In process, for speed: each fails before any event loop or request."""
    for name in list(os.environ):
        if name.startswith("OPENPANEL_"):
            monkeypatch.delenv(name)
    log = logging.getLogger("openpanel_async")
    saved = (log.handlers[:], log.propagate, log.level)
    try:
        status = _cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code  # type: ignore[assignment]
    finally:
        log.handlers, log.propagate = saved[0], saved[1]
        log.setLevel(saved[2])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("openpanel-async: error: ")
    assert expected in err


# --- import ------------------------------------------------------------------------------------

OLD_STAMP = "2026-01-01T08:00:00.000Z"


def envelope(event_type: str, payload: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "payload": payload})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def received_payloads(local: ServerThread) -> list[str]:
    """Stored payloads as canonical JSON, sorted: concurrent delivery has no fixed order."""
    return sorted(json.dumps(p, sort_keys=True) for p in local.server.payloads())


def test_import_reports_bad_lines_and_keeps_them_for_a_retry(
    local: ServerThread, tmp_path: Path
) -> None:
    good = [
        envelope("track", {"name": "signed_up", "properties": {"__timestamp": OLD_STAMP}}),
        envelope("identify", {"profileId": "u1", "email": "joe@doe.com"}),
        envelope("increment", {"profileId": "u1", "property": "logins"}),
        envelope("assign_group", {"groupIds": ["org_acme"], "profileId": "u1"}),
    ]
    bad = [
        "not json",
        envelope("alias", {"profileId": "1", "alias": "2"}),
        envelope("track", {"name": "session_start"}),
        envelope("identify", {"profileId": "u1", "email": None}),
    ]
    lines = [good[0], bad[0], good[1], "", bad[1], good[2], bad[2], bad[3], good[3]]
    source = write_lines(tmp_path / "events.jsonl", lines)
    failed = tmp_path / "failed.jsonl"
    result = run("import", str(source), "--failed", str(failed), *creds(local.server.url))
    assert result.returncode == 1, result.stderr
    reports = result.stderr.splitlines()
    assert reports[0].startswith("line 2: body: JSON is malformed: ")
    assert reports[1:] == [
        "line 5: body/type: must be one of assign_group, decrement, group, identify, "
        "increment, track, got 'alias'",
        "line 7: body/payload: track.name: 'session_start' is reserved by OpenPanel",
        "line 8: body/payload: Expected `str`, got `null` - at `$.email`",
    ]
    assert failed.read_text().splitlines() == bad
    assert received_payloads(local) == sorted(
        json.dumps(json.loads(line)["payload"], sort_keys=True) for line in good
    )
    assert "4 lines sent, 4 delivered, 4 invalid lines" in result.stdout
    assert f"4 lines written to {failed}" in result.stdout


def test_import_from_stdin_keeps_each_timestamp(local: ServerThread) -> None:
    stamps = [f"2026-01-0{day}T12:00:00.000Z" for day in range(1, 6)]
    lines = [
        envelope("track", {"name": "page_view", "properties": {"__timestamp": s, "n": n}})
        for n, s in enumerate(stamps)
    ]
    result = run("import", "-", *creds(local.server.url), stdin="\n".join(lines))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "imported 5 lines from stdin: 5 lines sent, 5 delivered" in result.stdout
    received = {
        p["properties"]["n"]: p["properties"]["__timestamp"] for p in local.server.payloads()
    }
    assert received == dict(enumerate(stamps))


def test_import_honours_the_rate_limit_and_delivers_everything(
    local: ServerThread, tmp_path: Path
) -> None:
    local.server.rate_limit = (10, 0.1)
    lines = [envelope("track", {"name": "bulk", "properties": {"i": i}}) for i in range(40)]
    source = write_lines(tmp_path / "bulk.jsonl", lines)
    result = run("import", str(source), *creds(local.server.url))
    assert result.returncode == 0, result.stderr
    statuses = [r.status for r in local.requests()]
    assert statuses.count(200) == 40
    assert statuses.count(429) >= 1
    assert sorted(p["properties"]["i"] for p in local.server.payloads()) == list(range(40))
    assert "40 lines sent, 40 delivered" in result.stdout
    assert "(429) waited out" in result.stdout


def test_import_writes_events_the_server_refused(local: ServerThread, tmp_path: Path) -> None:
    reply = Reply(status=400, body={"status": 400, "message": "body/payload: nope"})
    local.on_loop(lambda: local.server.script(reply))
    lines = [envelope("track", {"name": "first", "properties": {"__timestamp": OLD_STAMP}})]
    lines.append(envelope("track", {"name": "second"}))
    source = write_lines(tmp_path / "events.jsonl", lines)
    failed = tmp_path / "failed.jsonl"
    result = run(
        "import", str(source), "--failed", str(failed), "--concurrency", "1",
        *creds(local.server.url),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "failed: the server rejected the track event (400): body/payload: nope"
    ]
    # The exact body that was refused: ready to import again.
    assert failed.read_text() == lines[0].replace(": ", ":").replace(", ", ",") + "\n"
    assert "1 failed (rejected 1)" in result.stdout


def test_import_stops_at_refused_credentials(local: ServerThread, tmp_path: Path) -> None:
    lines = [envelope("track", {"name": "e", "properties": {"i": i}}) for i in range(200)]
    source = write_lines(tmp_path / "events.jsonl", lines)
    args = ["--api-url", local.server.url, "--client-id", CLIENT_ID, "--client-secret", "bad"]
    result = run("import", str(source), "--queue-size", "5", *args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "openpanel-async: error: the server refused the credentials (401): Ingestion: "
        "Invalid cors or secret (check the client id and secret)"
    ]
    assert re.search(r"stopped after line \d+ of .*events\.jsonl", result.stdout)
    assert len(local.requests()) < 20  # not 200 refused requests


def start_slow_import(
    local: ServerThread, tmp_path: Path, failed: Path, *, shutdown_timeout: float
) -> subprocess.Popen[str]:
    """An import of 300 lines, 10 requests at a time, running once this returns."""
    lines = [envelope("track", {"name": "slow", "properties": {"i": i}}) for i in range(300)]
    source = write_lines(tmp_path / "events.jsonl", lines)
    proc = start(
        "import", str(source), "--failed", str(failed), "--queue-size", "40",
        "--concurrency", "10", "--shutdown-timeout", str(shutdown_timeout),
        *creds(local.server.url), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    local.wait_for(1)  # importing: the signal handler is installed before the first request
    return proc


def test_ctrl_c_during_import_drains_and_says_what_was_sent(
    local: ServerThread, tmp_path: Path
) -> None:
    local.server.response_delay = 0.3
    failed = tmp_path / "failed.jsonl"
    proc = start_slow_import(local, tmp_path, failed, shutdown_timeout=0.5)
    proc.send_signal(signal.SIGINT)
    interrupted = time.monotonic()
    result = finish(proc)
    assert time.monotonic() - interrupted < 3.0  # the 0.5 s drain, and the way out
    assert result.returncode == 130, result.stderr
    assert "interrupted: draining for up to 0.5 s" in result.stderr
    match = re.search(
        r"interrupted after line (\d+) of .*: (\d+) lines sent, (\d+) delivered, (\d+) failed",
        result.stdout,
    )
    assert match, result.stdout
    line_no, sent, delivered, failed_count = map(int, match.groups())
    assert line_no == sent < 300  # every line handled was sent: the rest can be resumed
    assert sent == delivered + failed_count
    assert delivered > 0
    assert len(failed.read_text().splitlines()) == failed_count
    stored = len(local.server.events)  # cut-off requests may still have been stored
    assert delivered <= stored <= delivered + 10


def test_a_second_ctrl_c_stops_the_drain_and_the_summary_counts_what_failed(
    local: ServerThread, tmp_path: Path
) -> None:
    local.server.response_delay = 1.0
    failed = tmp_path / "failed.jsonl"
    proc = start_slow_import(local, tmp_path, failed, shutdown_timeout=30)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    assert "draining" in proc.stderr.readline()  # the first one was taken
    proc.send_signal(signal.SIGINT)  # do not wait for the 30 s drain
    interrupted = time.monotonic()
    result = finish(proc)
    assert time.monotonic() - interrupted < 5.0
    assert result.returncode == 130, result.stderr
    match = re.search(
        r"aborted after line (\d+) of .*: (\d+) lines sent, (\d+) delivered, (\d+) failed",
        result.stdout,
    )
    assert match, result.stdout
    line_no, sent, delivered, failed_count = map(int, match.groups())
    assert line_no == sent == delivered + failed_count
    assert failed_count > 0
    written = len(failed.read_text().splitlines())
    assert written == failed_count
    assert f"{written} lines written to {failed}" in result.stdout


class FailingInput(io.RawIOBase):
    """One line, then a read error, as a failing disk or a broken pipe gives."""

    def __init__(self, first: bytes) -> None:
        self._first: bytes | None = first

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        first, self._first = self._first, None
        if first is None:
            raise OSError(errno.EIO, "Input/output error")
        return first


def test_a_read_error_delivers_what_was_read_then_fails(
    local: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process: a read error cannot be provoked from outside on every system."""
    line = envelope("track", {"name": "before_the_error"}) + "\n"
    stream = cast(IO[bytes], FailingInput(line.encode()))
    importer = Importer(
        Source(stream, "flaky.jsonl", None), None, None, progress=False, shutdown_timeout=1
    )
    client = make_client(
        Target(local.server.url, CLIENT_ID, CLIENT_SECRET),
        on_error=importer.on_error,
        retry=IMPORT_RETRY,
        request_timeout=2.0,
        shutdown_timeout=1.0,
    )
    asyncio.run(importer.run(client))
    assert importer.report(client.stats(), importer.elapsed) == 1
    out, err = capsys.readouterr()
    assert err == "openpanel-async: error: cannot read the input: Input/output error\n"
    assert "stopped after line 1 of flaky.jsonl: 1 line sent, 1 delivered" in out
    assert [p["name"] for p in local.server.payloads()] == ["before_the_error"]


# --- serve -----------------------------------------------------------------------------------


class ServeProcess:
    """``openpanel-async serve --port 0`` in the background, its URL read from the banner."""

    def __init__(self, *args: str) -> None:
        self.proc = start("serve", "--port", "0", *args, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.out = PipeLines(self.proc.stdout)
        self.err = PipeLines(self.proc.stderr)
        banner = self.err.next()
        match = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert match, banner
        self.url = match.group()
        self.err.next()
        self.err.next()  # the three lines of the banner

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        self.out.close()
        self.err.close()

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        """Send ``sig``; the exit status, and what it wrote to stderr after the banner."""
        self.proc.send_signal(sig)
        status = self.proc.wait(TIMEOUT)
        rest = self.err.rest(timeout=0.5)
        assert_no_noise(rest)
        return status, rest


def post(url: str, body: object, **headers: str) -> int:
    request = urllib.request.Request(
        f"{url}/track",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "openpanel-client-id": CLIENT_ID, **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status


def test_serve_prints_one_line_per_event_and_a_summary() -> None:
    with ServeProcess() as serve:
        sent = run(
            "send", "track", "button clicked", "--prop", "plan=pro", "--profile-id", "u1",
            "--group", "org_acme", "--ip", "203.0.113.7", "--user-agent", "Mozilla/5.0 (X11)",
            *creds(serve.url),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        line = serve.out.next()
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d\.\d{3}  200  track  \"button clicked\"  profile=u1  "
            r'groups=org_acme  \{"plan":"pro"\}  ip=203\.0\.113\.7  ua="Mozilla/5\.0 \(X11\)"\n',
            line,
        ), line
        assert post(serve.url, {"type": "track", "payload": {"name": "../etc"}}) == 400
        line = serve.out.next()
        assert "  400  track  -> body/payload: track.name: contains '../'" in line
        escape = {"type": "identify", "payload": {"profileId": "\x1b[2Jx", "firstName": "Jo"}}
        assert post(serve.url, escape, **{"user-agent": "curl/8"}) == 200
        line = serve.out.next()
        assert "\x1b" not in line  # a payload cannot drive the terminal
        assert '200  identify  profile="\\u001b[2Jx"  name=Jo  ip=-  ua=curl/8' in line
        status, rest = serve.stop(signal.SIGINT)
    assert status == 0
    assert "3 requests in" in rest
    assert "2 events stored (track 1, identify 1); not stored: 1 x 400" in rest


def test_serve_json_lines_rate_limit_and_sigterm() -> None:
    with ServeProcess("--json", "--rate-limit", "1/10s", "--client-secret", "s3cret") as serve:
        body = {"type": "track", "payload": {"name": "a", "properties": {"__ip": "198.51.100.1"}}}
        assert post(serve.url, body, **{"openpanel-client-secret": "s3cret"}) == 200
        assert post(serve.url, body, **{"openpanel-client-secret": "s3cret"}) == 429
        first, second = json.loads(serve.out.next()), json.loads(serve.out.next())
        status, rest = serve.stop(signal.SIGTERM)
    assert first["status"] == 200
    assert first["type"] == "track"
    assert first["payload"] == body["payload"]
    assert first["client_ip"] == "198.51.100.1"
    assert first["client_id"] == CLIENT_ID
    assert "error" not in first
    assert second["status"] == 429
    assert second["error"] == "rate limited"
    assert "s3cret" not in json.dumps([first, second])
    assert status == 0
    assert "2 requests in" in rest
    assert "1 x 429" in rest


def test_serve_on_a_port_in_use(server_thread: ServerThread) -> None:
    result = run("serve", "--port", str(server_thread.server.port))
    line = assert_one_error_line(result, 1)
    assert f"cannot listen on 127.0.0.1:{server_thread.server.port}: the port is in use" in line


# --- demo ------------------------------------------------------------------------------------


def table_value(output: str, label: str) -> str:
    match = re.search(rf"^  {re.escape(label)}\s+(.+)$", output, re.MULTILINE)
    assert match, (label, output)
    return match.group(1).strip()


def test_demo_runs_locally_and_ends_with_a_table() -> None:
    result = run("demo", "--seconds", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "\r" not in out  # no progress line when stdout is not a terminal
    accepted = int(table_value(out, "accepted").replace(",", ""))
    assert accepted > 0
    assert table_value(out, "delivered") == table_value(out, "accepted")
    assert table_value(out, "failed") == "0"
    assert table_value(out, "dropped") == "0"
    assert int(table_value(out, "429s honoured").replace(",", "")) > 0
    mean = float(table_value(out, "track() mean cost").removesuffix(" µs"))
    p99 = float(table_value(out, "track() p99 cost").removesuffix(" µs"))
    assert 0 < mean <= p99
    assert f"the server stored {table_value(out, 'delivered')}." in out


def test_demo_timeout_applies_to_the_local_run_too() -> None:
    # A microsecond per request: every attempt times out, so nothing is delivered.
    result = run("demo", "--seconds", "0.1", "--events", "50", "--timeout", "0.000001")
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert table_value(out, "delivered") == "0"
    assert table_value(out, "failed") == table_value(out, "accepted") == "50"


def read_all(fd: int) -> bytes:
    output = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child has exited and the pty is drained
            return output
        if not chunk:
            return output
        output += chunk


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_demo_shows_live_progress_on_a_terminal() -> None:
    import pty

    master, slave = pty.openpty()
    proc = start("demo", "--seconds", "0.5", stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = read_all(master)
    os.close(master)
    assert proc.wait(TIMEOUT) == 0
    text = output.decode()
    assert re.search(r"\r\s*\d+\.\d s\s+[\d,]+ events/s  delivered [\d,]+  retried", text)
    assert "429s honoured" in text


def test_demo_with_credentials_sends_a_small_set_to_the_project(local: ServerThread) -> None:
    result = run("demo", *creds(local.server.url))
    assert result.returncode == 0, result.stderr
    types = {r.type for r in local.requests() if r.status == 200}
    assert types == {"track", "identify", "increment", "decrement", "group", "assign_group"}
    assert table_value(result.stdout, "failed") == "0"
    (identify,) = local.server.payloads("identify")
    assert identify["profileId"] == "openpanel-async-demo"
    assert CLIENT_SECRET not in result.stdout


def test_demo_sends_to_a_project_only_with_an_explicit_client_id(local: ServerThread) -> None:
    # Credentials that merely sit in the environment (an app's .env, the README's export
    # line) must not send demo data to that project.
    environment = cli_env(
        OPENPANEL_CLIENT_ID=CLIENT_ID,
        OPENPANEL_CLIENT_SECRET=CLIENT_SECRET,
        OPENPANEL_API_URL=local.server.url,
    )
    result = run("demo", "--events", "50", env=environment)
    assert result.returncode == 0, result.stderr
    assert local.requests() == []
    assert "demo data goes to a project only with --client-id" in result.stderr
    assert table_value(result.stdout, "delivered") == "50"
    # With --client-id, the environment supplies the rest.
    result = run("demo", "--client-id", CLIENT_ID, env=environment)
    assert result.returncode == 0, result.stderr
    assert {r.type for r in local.requests() if r.status == 200} >= {"identify", "track"}


# --- the pieces, in process ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42), ("2.5", 2.5), ("true", True), ("null", None), ('{"a": [1]}', {"a": [1]}),
        ('"42"', "42"), ("hello world", "hello world"), ("", ""), ("NaN", "NaN"),
        ("Infinity", "Infinity"), ("[1,", "[1,"), ("1e999", "1e999"), ('{"a": -1e999}', '{"a": -1e999}'),
    ],
)  # fmt: skip
def test_prop_values_are_json_when_they_parse(text: str, value: object) -> None:
    assert parse_property(f"key={text}") == ("key", value)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("100/s", (100, 1.0)), ("100", (100, 1.0)), ("5/10s", (5, 10.0)), ("600/min", (600, 60.0)),
     ("3/0.5s", (3, 0.5)), ("7/m", (7, 60.0))],
)  # fmt: skip
def test_rate_limits(text: str, rate: tuple[int, float]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("args", "verbose"),
    [
        (["-v", "send", "track", "x"], True),
        (["send", "-v", "track", "x"], True),
        (["send", "track", "x", "--verbose"], True),
        (["send", "track", "x"], False),
        (["-v", "serve"], True),
        (["serve"], False),
    ],
)
def test_verbose_is_taken_before_or_after_the_command(args: list[str], verbose: bool) -> None:
    assert getattr(build_parser().parse_args(args), "verbose", False) is verbose


def test_lines_split_across_chunks_and_overlong_lines() -> None:
    chunks = [b'{"a"', b':1}\n\n{"b":2}\r\n' + b"x" * 10, b"y" * 10 + b"\nlast"]
    lines = [line for batch in split_lines(chunks, max_line=15) for line in batch]
    assert lines == [b'{"a":1}', b"", b'{"b":2}\r', LongLine(20), b"last"]
