"""What ``demo`` sends: a large realistic mix for the local server, a small set for a project."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

from .._client import OpenPanel
from .._version import __version__
from ._common import PROG


class TrackCall(NamedTuple):
    name: str
    properties: dict[str, Any]
    profile_id: str | None
    groups: list[str] | None
    user_agent: str
    client_ip: str


OtherCall = Callable[[OpenPanel], bool]

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Linus", "Margaret", "Ken", "Barbara", "Dennis")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Torvalds", "Hamilton", "Thompson", "Liskov")
_PAGES = ("/", "/pricing", "/docs", "/docs/quickstart", "/blog/launch", "/signup", "/settings")
_BUTTONS = ("start_trial", "upgrade", "invite_teammate", "export_csv", "dark_mode")
_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
)
_ORGS = (("org_acme", "Acme Inc"), ("org_globex", "Globex"), ("org_initech", "Initech"))


def demo_calls(rng: random.Random, count: int = 2048) -> list[TrackCall | OtherCall]:
    """A realistic, reproducible mix: mostly track(), and every other event type."""
    users = [f"user_{n:04d}" for n in range(300)]
    kinds = ("track", "identify", "increment", "decrement", "group", "assign_group")
    weights = (82, 5, 5, 2, 2, 4)
    identified: list[str] = []
    return [
        _demo_call(kind, rng, users, identified)
        for kind in rng.choices(kinds, weights=weights, k=count)
    ]


def _demo_call(
    kind: str, rng: random.Random, users: list[str], identified: list[str]
) -> TrackCall | OtherCall:
    counts = kind in ("increment", "decrement")
    if counts and identified:
        user = rng.choice(identified)  # the server only counts for a profile it stored
    else:
        if counts:
            kind = "identify"  # nobody identified yet
        user = rng.choice(users)
    if kind == "identify":
        identified.append(user)
    org_id, org_name = rng.choice(_ORGS)
    if kind == "track":
        return _demo_track(rng, user, org_id)
    if kind == "identify":
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        plan = rng.choice(("free", "pro", "team"))
        email = f"{first.lower()}.{last.lower()}@example.com"
        return lambda op: op.identify(
            user, first_name=first, last_name=last, email=email, properties={"plan": plan}
        )
    if kind == "increment":
        return lambda op: op.increment(user, "logins")
    if kind == "decrement":
        credits = rng.randint(1, 5)
        return lambda op: op.decrement(user, "credits", credits)
    if kind == "group":
        seats = rng.randint(2, 250)
        return lambda op: op.group(org_id, "company", org_name, {"plan": "team", "seats": seats})
    return lambda op: op.assign_group([org_id], profile_id=user)


def _demo_track(rng: random.Random, user: str, org_id: str) -> TrackCall:
    page = rng.choice(_PAGES)
    name, properties = rng.choice(
        (
            ("page_view", {"path": page, "title": page.strip("/").title() or "Home"}),
            ("page_view", {"path": page, "referrer": "https://news.ycombinator.com/"}),
            ("button_clicked", {"button": rng.choice(_BUTTONS), "path": page}),
            ("search", {"query": rng.choice(("pricing", "sso", "api")), "results": 12}),
            ("checkout_completed", {"plan": "pro", "amount": 49.0, "currency": "EUR"}),
        )
    )
    signed_in = rng.random() < 0.7  # the rest are anonymous visitors
    return TrackCall(
        name=name,
        properties=properties,
        profile_id=user if signed_in else None,
        groups=[org_id] if signed_in and rng.random() < 0.5 else None,
        user_agent=rng.choice(_AGENTS),
        client_ip=f"203.0.113.{rng.randint(1, 254)}",  # TEST-NET-3: documentation addresses
    )


DEMO_PROFILE = "openpanel-async-demo"


def remote_demo_calls() -> list[tuple[str, OtherCall]]:
    """A small, readable set for a real project: one profile, one group, every event type."""
    profile = DEMO_PROFILE
    org = "openpanel-async-demo-org"
    props = {"source": f"{PROG} demo", "version": __version__}
    return [
        (
            f"identify {profile}",
            lambda op: op.identify(
                profile, first_name="Demo", last_name="User", email="demo@example.com",
                properties=props,
            ),
        ),
        (f"group {org}", lambda op: op.group(org, "company", "openpanel-async demo", props)),
        (f"assign_group {org}", lambda op: op.assign_group([org], profile_id=profile)),
        ("track demo_started", lambda op: op.track("demo_started", props, profile_id=profile)),
        (
            "track page_view /pricing",
            lambda op: op.track(
                "page_view", {"path": "/pricing"}, profile_id=profile, groups=[org]
            ),
        ),
        (
            "track button_clicked",
            lambda op: op.track(
                "button_clicked", {"button": "start_trial"}, profile_id=profile, groups=[org]
            ),
        ),
        ("increment demo_runs", lambda op: op.increment(profile, "demo_runs")),
        ("decrement demo_credits", lambda op: op.decrement(profile, "demo_credits")),
        ("track demo_finished", lambda op: op.track("demo_finished", props, profile_id=profile)),
    ]  # fmt: skip
