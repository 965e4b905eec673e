r"""A FastAPI app whose OpenPanel events carry each request's user, IP and user agent.

Try it against the local OpenPanel server, which prints every event it receives::

    pip install 'openpanel-async[fastapi]'
    python -m openpanel_async serve --port 3000                 # terminal 1
    OPENPANEL_API_URL=http://127.0.0.1:3000 \
    OPENPANEL_CLIENT_ID=00000000-0000-4000-8000-000000000000 \
        python examples/fastapi_app.py                          # terminal 2
    curl -H 'X-User-Id: user_42' -H 'X-Org-Id: org_acme' \
        http://127.0.0.1:8000/articles/7                        # terminal 3

Settings come from ``OPENPANEL_API_URL``, ``OPENPANEL_CLIENT_ID``,
``OPENPANEL_CLIENT_SECRET`` and ``TRUSTED_PROXIES``, or from ``create_app()``'s arguments.

* ``openpanel_lifespan(op)`` starts the client with the app and, on shutdown, delivers
  the events still queued.
* ``OpenPanelMiddleware`` gives every event tracked while handling a request that
  request's IP and user agent, with no arguments: in async and plain ``def`` endpoints
  and in background tasks. Behind a reverse proxy, put its address in ``TRUSTED_PROXIES``
  (comma-separated IPs or networks, e.g. ``10.0.0.0/8``): ``X-Forwarded-For`` is believed
  from those peers only, since anyone else can forge it.
* The ``identify_user`` dependency calls ``set_identity()``: the request's events carry
  the user's profile id and groups. Concurrent requests never see each other's.

With the uvicorn command line, run the factory and leave proxy headers to the middleware::

    uvicorn --factory examples.fastapi_app:create_app --no-proxy-headers
"""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException

from openpanel_async import OpenPanel, set_identity
from openpanel_async.asgi import OpenPanelMiddleware, openpanel_lifespan


async def identify_user(
    x_user_id: Annotated[str | None, Header()] = None,
    x_org_id: Annotated[str | None, Header()] = None,
) -> str | None:
    """Who is calling. A stand-in for real authentication: trust the X-User-Id header.

    ``set_identity()`` tags every event of the current request with the profile id (and
    groups); call it from your own authentication dependency.
    """
    if x_user_id:
        set_identity(x_user_id, groups=[x_org_id] if x_org_id else None)
    return x_user_id


CurrentUser = Annotated[str | None, Depends(identify_user)]


def create_app(
    *,
    api_url: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    trusted_proxies: list[str] | None = None,
) -> FastAPI:
    op = OpenPanel(
        client_id=client_id or os.environ.get("OPENPANEL_CLIENT_ID", ""),
        client_secret=client_secret or os.environ.get("OPENPANEL_CLIENT_SECRET"),
        api_url=api_url or os.environ.get("OPENPANEL_API_URL", "https://api.openpanel.dev"),
    )
    if trusted_proxies is None:
        trusted_proxies = os.environ.get("TRUSTED_PROXIES", "").split(",")
    trusted_proxies = [proxy.strip() for proxy in trusted_proxies if proxy.strip()]

    # Every route depends on identify_user, so every request gets its identity.
    app = FastAPI(lifespan=openpanel_lifespan(op), dependencies=[Depends(identify_user)])
    app.add_middleware(OpenPanelMiddleware, trusted_proxies=trusted_proxies)
    app.state.openpanel = op

    @app.get("/articles/{article_id}")
    async def read_article(article_id: int) -> dict[str, int]:
        # No profile_id, client_ip or user_agent: the request's context supplies them.
        op.track("article_viewed", {"article_id": article_id})
        return {"article_id": article_id}

    @app.get("/search")
    def search(q: str) -> dict[str, list[str]]:
        # A plain def endpoint runs in a worker thread: the request's context goes along.
        op.track("searched", {"query": q})
        return {"results": []}

    async def build_report(report_id: int) -> None:
        # ... the slow part, run after the response was sent ...
        op.track("report_built", {"report_id": report_id})

    @app.post("/reports/{report_id}", status_code=202)
    async def request_report(report_id: int, background: BackgroundTasks) -> dict[str, str]:
        op.track("report_requested", {"report_id": report_id})
        background.add_task(build_report, report_id)  # tracked with this request's context
        return {"status": "building"}

    @app.post("/login")
    async def login(user_id: CurrentUser) -> dict[str, str]:
        if user_id is None:
            raise HTTPException(status_code=401, detail="send an X-User-Id header")
        # Profile events name their profile explicitly; IP and user agent come from the
        # request, as for every event.
        op.identify(user_id, properties={"last_login_method": "password"})
        op.increment(user_id, "logins")
        return {"user_id": user_id}

    return app


if __name__ == "__main__":
    import uvicorn

    # proxy_headers=False: uvicorn would otherwise rewrite the client address from
    # X-Forwarded-For for its own --forwarded-allow-ips (127.0.0.1 by default), so that
    # a header sent through a local peer is believed even with TRUSTED_PROXIES empty.
    uvicorn.run(create_app(), host="127.0.0.1", port=8000, proxy_headers=False)
