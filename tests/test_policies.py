"""Pure policy functions: rate-limit headers, retry backoff, and response classification."""

from __future__ import annotations

import math
import random
from email.utils import formatdate
from typing import Any

import pytest
from multidict import CIMultiDict

from openpanel_async import ConfigError, RetryPolicy
from openpanel_async._outcome import MAX_MESSAGE_CHARS, Verdict, classify, server_message
from openpanel_async._pacing import BUDGET_POLL, WindowBudget
from openpanel_async._ratelimit import (
    parse_reset,
    parse_retry_after,
    requested_wait,
    window_budget,
)

NOW = 1_700_000_000.0  # a fixed wall clock: 2023-11-14T22:13:20Z


def http_date(epoch: float) -> str:
    return formatdate(epoch, usegmt=True)


# --- _ratelimit ------------------------------------------------------------------------

RETRY_AFTER: list[tuple[str, float | None]] = [
    ("3", 3.0),
    ("0.25", 0.25),
    (" 2 ", 2.0),
    ("0", 0.0),
    ("120", 120.0),
    ("-1", 0.0),
    ("-0.5", 0.0),
    (http_date(NOW + 5), 5.0),
    (f" {http_date(NOW + 5)} ", 5.0),
    (http_date(NOW + 3600), 3600.0),
    (http_date(NOW - 30), 0.0),
    ("garbage", None),
    ("", None),
    ("3s", None),
    ("nan", None),
    ("inf", None),
    ("-inf", None),
]


def test_http_date_helper() -> None:
    assert http_date(NOW + 5) == "Tue, 14 Nov 2023 22:13:25 GMT"


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


RESET: list[tuple[str, float | None]] = [
    ("30", 30.0),
    ("0", 0.0),
    ("1.5", 1.5),
    (" 7 ", 7.0),
    ("-3", 0.0),
    ("3600", 3600.0),
    ("90000", 90.0),  # milliseconds, from old servers
    ("120000", 120.0),
    (str(int(NOW) + 42), 42.0),  # an epoch timestamp
    (str(NOW + 0.5), 0.5),
    (str(int(NOW) - 10), 0.0),
    ("garbage", None),
    ("", None),
    ("Infinity", None),
    ("nan", None),
]


@pytest.mark.parametrize(("value", "expected"), RESET)
def test_parse_reset(value: str, expected: float | None) -> None:
    assert parse_reset(value, NOW) == expected


REQUESTED_WAIT: list[tuple[list[tuple[str, str]], float | None]] = [
    ([("Retry-After", "3"), ("X-RateLimit-Reset", "10")], 3.0),
    ([("X-RateLimit-Reset", "10"), ("RETRY-AFTER", "3")], 3.0),
    ([("Retry-After", "0"), ("X-RateLimit-Reset", "10")], 0.0),
    ([("retry-after", http_date(NOW + 5)), ("x-ratelimit-reset", "10")], 5.0),
    ([("X-RATELIMIT-RESET", "10")], 10.0),
    ([("x-ratelimit-reset", "90000")], 90.0),
    ([("x-ratelimit-reset", str(int(NOW) + 8))], 8.0),
    ([("Retry-After", "soon"), ("X-RateLimit-Reset", "10")], 10.0),
    ([("Retry-After", "soon")], None),
    ([("Retry-After", "soon"), ("X-RateLimit-Reset", "junk")], None),
    ([("X-RateLimit-Reset", "junk")], None),
    ([("X-RateLimit-Limit", "100"), ("X-RateLimit-Remaining", "0")], None),
    ([], None),
]


@pytest.mark.parametrize(("pairs", "expected"), REQUESTED_WAIT)
def test_requested_wait(pairs: list[tuple[str, str]], expected: float | None) -> None:
    assert requested_wait(CIMultiDict(pairs), NOW) == expected


WINDOW: list[tuple[list[tuple[str, str]], tuple[int, float] | None]] = [
    ([("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "10")], (0, 10.0)),
    ([("x-ratelimit-remaining", "5"), ("x-ratelimit-reset", "0.25")], (5, 0.25)),
    ([("X-RATELIMIT-REMAINING", " 0 "), ("X-RATELIMIT-RESET", " 2 ")], (0, 2.0)),
    ([("X-RateLimit-Remaining", "0.0"), ("X-RateLimit-Reset", "1")], (0, 1.0)),
    ([("X-RateLimit-Remaining", "-1"), ("X-RateLimit-Reset", "1")], (-1, 1.0)),
    ([("X-RateLimit-Remaining", "99"), ("X-RateLimit-Reset", "90000")], (99, 90.0)),
    ([("X-RateLimit-Remaining", "3"), ("X-RateLimit-Reset", str(NOW + 4))], (3, 4.0)),
    ([("X-RateLimit-Remaining", "0")], None),  # no reset: nothing to pace by
    ([("X-RateLimit-Reset", "10")], None),
    ([("X-RateLimit-Remaining", "garbage"), ("X-RateLimit-Reset", "1")], None),
    ([("X-RateLimit-Remaining", ""), ("X-RateLimit-Reset", "1")], None),
    ([("X-RateLimit-Remaining", "nan"), ("X-RateLimit-Reset", "1")], None),
    ([("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "soon")], None),
    ([], None),
]


@pytest.mark.parametrize(("pairs", "expected"), WINDOW)
def test_window_budget(pairs: list[tuple[str, str]], expected: tuple[int, float] | None) -> None:
    assert window_budget(CIMultiDict(pairs), NOW) == expected


# --- _pacing ---------------------------------------------------------------------------


def limit_headers(limit: int, remaining: int, reset: str) -> CIMultiDict[str]:
    return CIMultiDict(
        [
            ("X-RateLimit-Limit", str(limit)),
            ("X-RateLimit-Remaining", str(remaining)),
            ("X-RateLimit-Reset", reset),
        ]
    )


def test_pacing_spends_the_window_then_pauses_every_request_until_its_end() -> None:
    budget = WindowBudget(max_wait=60.0)
    assert budget.wait(0.0, 0) == (0.0, False)  # nothing known: no pacing
    # 5 left in a window that ends in 1 s; 2 requests are still out (already counted).
    budget.read(limit_headers(10, 5, "1"), now=100.0, now_wall=NOW, in_flight=2)
    assert budget.remaining == 3
    for _ in range(3):
        assert budget.wait(100.1, 0) == (0.0, False)
        budget.spend()
    assert budget.wait(100.25, 0) == (0.75, True)
    # The window ends: a fresh one is assumed to allow the limit until an answer says.
    assert budget.wait(101.0, 0) == (0.0, False)
    assert budget.remaining == 10


def test_pacing_polls_for_news_when_a_fresh_window_is_spent() -> None:
    budget = WindowBudget(max_wait=60.0)
    budget.read(limit_headers(2, 0, "0.5"), now=0.0, now_wall=NOW, in_flight=0)
    assert budget.wait(0.5, 3) == (0.0, False)  # a new window: 2 allowed
    budget.spend()
    budget.spend()
    # Spent, its end not yet told, answers on their way: look again shortly.
    assert budget.wait(0.6, 3) == (BUDGET_POLL, False)
    # No request left to answer (they failed on the network): stop guessing.
    assert budget.wait(0.6, 0) == (0.0, False)
    assert budget.remaining is None


def test_pacing_caps_long_windows_and_ends_rounded_ones_on_time() -> None:
    budget = WindowBudget(max_wait=5.0)
    budget.read(limit_headers(100, 0, "3600"), now=0.0, now_wall=NOW, in_flight=0)
    assert budget.wait(0.0, 0) == (5.0, True)  # an hour is treated as max_wait
    budget = WindowBudget(max_wait=60.0)
    # The window's first answer says 0.4 s left; a later one rounds its reset up to 1 s
    # (whole seconds, as the real server sends them): the window still ends at 0.4.
    budget.read(limit_headers(3, 2, "0.4"), now=10.0, now_wall=NOW, in_flight=0)
    budget.read(limit_headers(3, 0, "1"), now=10.1, now_wall=NOW, in_flight=0)
    wait, whole_client = budget.wait(10.2, 0)
    assert whole_client
    assert wait == pytest.approx(0.2)


def test_pacing_stops_when_the_headers_stop() -> None:
    budget = WindowBudget(max_wait=60.0)
    budget.read(limit_headers(10, 0, "1"), now=0.0, now_wall=NOW, in_flight=0)
    assert budget.wait(0.0, 0) == (1.0, True)
    budget.read(CIMultiDict(), now=0.1, now_wall=NOW, in_flight=0)
    assert budget.wait(0.1, 0) == (0.0, False)
    budget.read(limit_headers(10, 0, "soon"), now=0.2, now_wall=NOW, in_flight=0)
    assert budget.remaining is None  # unreadable: nothing to pace by


# --- _retry ----------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.wait_initial, policy.wait_max) == (6, 0.5, 30.0)
    assert (policy.wait_jitter, policy.max_elapsed, policy.max_retry_after) == (1.0, 300.0, 120.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 1},
        {"wait_initial": 0, "wait_max": 0},
        {"wait_initial": 2, "wait_max": 2},
        {"wait_jitter": 0, "max_elapsed": 0, "max_retry_after": 0},
        {"wait_initial": 1, "wait_max": 60.5},
    ],
)
def test_retry_policy_accepted(kwargs: dict[str, Any]) -> None:
    policy = RetryPolicy(**kwargs)
    for name, value in kwargs.items():
        assert getattr(policy, name) == value


POLICY_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"max_attempts": 0}, "max_attempts"),
    ({"max_attempts": -1}, "max_attempts"),
    ({"max_attempts": True}, "max_attempts"),
    ({"max_attempts": 2.0}, "max_attempts"),
    ({"max_attempts": "3"}, "max_attempts"),
    ({"max_attempts": None}, "max_attempts"),
    ({"wait_initial": -1}, "wait_initial"),
    ({"wait_initial": math.nan}, "wait_initial"),
    ({"wait_initial": math.inf}, "wait_initial"),
    ({"wait_initial": True}, "wait_initial"),
    ({"wait_initial": "1"}, "wait_initial"),
    ({"wait_max": -1}, "wait_max"),
    ({"wait_max": math.nan}, "wait_max"),
    ({"wait_max": False}, "wait_max"),
    ({"wait_jitter": -0.1}, "wait_jitter"),
    ({"wait_jitter": math.nan}, "wait_jitter"),
    ({"wait_jitter": True}, "wait_jitter"),
    ({"max_elapsed": -1}, "max_elapsed"),
    ({"max_elapsed": math.inf}, "max_elapsed"),
    ({"max_elapsed": None}, "max_elapsed"),
    ({"max_retry_after": -1}, "max_retry_after"),
    ({"max_retry_after": math.nan}, "max_retry_after"),
    ({"max_retry_after": True}, "max_retry_after"),
    ({"wait_initial": 2, "wait_max": 1}, "wait_max"),
    ({"wait_initial": 31}, "wait_max"),  # above the default wait_max of 30
]


@pytest.mark.parametrize(("kwargs", "field"), POLICY_REFUSED, ids=repr)
def test_retry_policy_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**kwargs)
    assert str(info.value).startswith(f"RetryPolicy.{field}: "), str(info.value)
    assert isinstance(info.value, ValueError)


DRAWS = 400


@pytest.mark.parametrize("attempt", range(1, 71))
def test_backoff_stays_within_full_jitter_bounds(attempt: int) -> None:
    policy = RetryPolicy(wait_initial=0.5, wait_max=30.0)
    ceiling = min(30.0, 0.5 * 2.0 ** (attempt - 1))
    rand = random.Random(1000 + attempt)
    waits = [policy.backoff(attempt, rand) for _ in range(DRAWS)]
    assert all(0.0 <= wait <= ceiling for wait in waits)
    # Full jitter: the draws spread over the whole range, up to near the ceiling.
    assert max(waits) >= 0.95 * ceiling
    assert min(waits) <= 0.05 * ceiling
    assert 0.4 * ceiling <= sum(waits) / DRAWS <= 0.6 * ceiling


def test_backoff_reaches_the_cap() -> None:
    policy = RetryPolicy(wait_initial=0.5, wait_max=30.0)
    rand = random.Random(7)
    # 0.5 * 2**6 = 32 > 30: from the 7th attempt on the ceiling is wait_max.
    for attempt in (7, 10, 65, 70):
        waits = [policy.backoff(attempt, rand) for _ in range(DRAWS)]
        assert max(waits) <= 30.0
        assert max(waits) >= 29.0


def test_backoff_is_reproducible_with_a_seed() -> None:
    policy = RetryPolicy()
    first = [policy.backoff(n, random.Random(42)) for n in range(1, 10)]
    second = [policy.backoff(n, random.Random(42)) for n in range(1, 10)]
    assert first == second


def test_backoff_zero_initial_wait() -> None:
    policy = RetryPolicy(wait_initial=0, wait_max=0)
    rand = random.Random(3)
    assert {policy.backoff(n, rand) for n in range(1, 71)} == {0.0}


@pytest.mark.parametrize("requested", [0.0, 0.5, 3.0, 60.0, 119.0])
def test_server_wait_adds_bounded_jitter(requested: float) -> None:
    # Jitter is at most wait_jitter, and at most a tenth of the requested wait.
    policy = RetryPolicy(wait_jitter=1.0, max_retry_after=120.0)
    rand = random.Random(11)
    waits = [policy.server_wait(requested, rand) for _ in range(DRAWS)]
    jitter = min(1.0, requested / 10)
    assert all(requested <= wait <= min(120.0, requested + jitter) for wait in waits)
    if requested + jitter <= 120.0:
        assert max(waits) - requested >= jitter * 0.95
        assert min(waits) - requested <= jitter * 0.05 + 1e-12


@pytest.mark.parametrize("requested", [120.0, 121.0, 500.0, 86_400.0, math.inf])
def test_server_wait_is_capped(requested: float) -> None:
    policy = RetryPolicy(wait_jitter=1.0, max_retry_after=120.0)
    rand = random.Random(5)
    assert {policy.server_wait(requested, rand) for _ in range(50)} == {120.0}


def test_server_wait_without_jitter_is_exact() -> None:
    policy = RetryPolicy(wait_jitter=0.0, max_retry_after=10.0)
    assert policy.server_wait(2.5, random.Random(1)) == 2.5
    assert policy.server_wait(-4.0, random.Random(1)) == 0.0
    assert policy.server_wait(11.0, random.Random(1)) == 10.0


def test_server_wait_negative_request() -> None:
    policy = RetryPolicy(wait_jitter=1.0)
    rand = random.Random(9)
    assert all(0.0 <= policy.server_wait(-5.0, rand) <= 1.0 for _ in range(DRAWS))


# --- _outcome --------------------------------------------------------------------------

MESSAGES: list[tuple[bytes, str | None]] = [
    (
        b'{"status":400,"error":"Error","message":"body/payload/name must be a string"}',
        "body/payload/name must be a string",
    ),
    (b'{"status":404,"message":"Profile not found"}', "Profile not found"),
    (b'{"status":429,"error":"Too Many Requests"}', "Too Many Requests"),
    (b'{"error":"Error","message":""}', "Error"),
    (b'{"message":5,"error":"Boom"}', "Boom"),
    (b'{"message":{"a":1}}', '{"message":{"a":1}}'),
    (b'{"bot":{"name":"x"}}', '{"bot":{"name":"x"}}'),
    (b'["x"]', '["x"]'),
    (b"{not json", "{not json"),
    (b"Ingestion: Invalid cors or secret", "Ingestion: Invalid cors or secret"),
    (b"Duplicate event", "Duplicate event"),
    (b"Internal server error\n", "Internal server error"),
    (b"<html><body>Bad Gateway</body></html>", "<html><body>Bad Gateway</body></html>"),
    (b"caf\xc3\xa9", "caf\u00e9"),
    (b"\xff\xfeoops", "\ufffd\ufffdoops"),
    (b"", None),
    (b"   \n", None),
]


@pytest.mark.parametrize(("body", "expected"), MESSAGES, ids=repr)
def test_server_message(body: bytes, expected: str | None) -> None:
    assert server_message(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"x" * 1_000_000,
        b'{"message":"' + b"x" * 1_000_000 + b'"}',
        b'{"error":"' + b"x" * 1_000_000 + b'"}',
    ],
    ids=["text", "json-message", "json-error"],
)
def test_server_message_truncates_a_huge_body(body: bytes) -> None:
    message = server_message(body)
    assert MAX_MESSAGE_CHARS == 300
    assert message == "x" * 297 + "..."


def test_server_message_keeps_a_300_char_body() -> None:
    assert server_message(b"y" * 300) == "y" * 300
    assert server_message(b"y" * 301) == "y" * 297 + "..."


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"message":"\xff"}', '{"message":"\ufffd"}'),
        (b'["\xc3"]', '["\ufffd"]'),
        (b'{"error":"Bad \xed\xa0\x80 gateway"}', '{"error":"Bad \ufffd\ufffd\ufffd gateway"}'),
    ],
    ids=repr,
)
def test_server_message_never_raises_on_invalid_utf8_json(body: bytes, expected: str) -> None:
    assert server_message(body) == expected


CLASSIFY: list[tuple[int, str | None, str, Verdict]] = [
    (200, None, "track", Verdict.DELIVERED),
    (200, "Duplicate event", "track", Verdict.DELIVERED),
    (201, None, "identify", Verdict.DELIVERED),
    (204, None, "group", Verdict.DELIVERED),
    (202, None, "track", Verdict.BOT),
    (202, "bot", "increment", Verdict.BOT),
    (400, "body/payload/name ...", "track", Verdict.REJECTED),
    (400, None, "increment", Verdict.REJECTED),
    (401, "Ingestion: Invalid cors or secret", "track", Verdict.UNAUTHORIZED),
    (401, None, "increment", Verdict.UNAUTHORIZED),
    (404, "Profile not found", "increment", Verdict.PROFILE_PENDING),
    (404, "Profile not found", "decrement", Verdict.PROFILE_PENDING),
    (404, "profile NOT found", "decrement", Verdict.PROFILE_PENDING),
    (404, "Profile not found", "track", Verdict.REJECTED),
    (404, "Profile not found", "identify", Verdict.REJECTED),
    (404, "Profile not found", "assign_group", Verdict.REJECTED),
    (404, "Route not found", "increment", Verdict.REJECTED),
    (404, None, "increment", Verdict.REJECTED),
    (408, None, "track", Verdict.RETRY),
    (413, "Request body is too large", "track", Verdict.REJECTED),
    (415, None, "track", Verdict.REJECTED),
    (429, "Too Many Requests", "track", Verdict.RATE_LIMITED),
    (429, None, "increment", Verdict.RATE_LIMITED),
    (500, "Internal server error", "track", Verdict.RETRY),
    (502, None, "track", Verdict.RETRY),
    (503, None, "identify", Verdict.RETRY),
    (504, None, "decrement", Verdict.RETRY),
    (501, None, "track", Verdict.REJECTED),
    (505, None, "track", Verdict.REJECTED),
    (301, None, "track", Verdict.REJECTED),
    (302, None, "track", Verdict.REJECTED),
    (307, None, "track", Verdict.REJECTED),
]


@pytest.mark.parametrize(("status", "message", "event_type", "verdict"), CLASSIFY, ids=repr)
def test_classify(status: int, message: str | None, event_type: str, verdict: Verdict) -> None:
    assert classify(status, message, event_type) is verdict
