"""Helpers of the sign-in tests: the dashboard's sign-in route served in-process (httpx over
ASGI: real HTTP requests and answers, no socket), and an AppTest that presents the browser's
cookies.

AppTest cannot send cookies (Streamlit reads them from a real websocket handshake), so
:func:`browser_with` replaces only the function that reads them; the real cookie path runs in
tests/e2e (Chromium)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import RedirectResponse
from starlette.routing import Route
from streamlit.testing.v1 import AppTest

from app.dashboard import signin
from app.dashboard.web_session import CALLBACK_PATH, LOGIN_PATH, SESSION_COOKIE, SignInWatch
from tests.app.dashboard.conftest import ENTRY, TIMEOUT

ORIGIN = "http://dashboard.test"  # the client's own host: a same-origin form post
CLIENT = "10.20.30.40"  # the browser's address as the server sees it


class RouteClient:
    """Synchronous requests to an ASGI app (httpx's ASGI transport), from :data:`CLIENT`."""

    def __init__(self, app: Any, *, client: str = CLIENT) -> None:
        self._transport = httpx.ASGITransport(app=app, client=(client, 50000))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=self._transport, base_url=ORIGIN) as client:
                return await client.request(method, path, **kwargs)

        return asyncio.run(go())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


async def _callback(request) -> RedirectResponse:
    """Stands in for Streamlit's own callback: a code that its exchange accepts ("good") sets
    the identity cookie as Streamlit 1.67 does; any other sets none."""
    response = RedirectResponse("/", status_code=302)
    if request.query_params.get("code") == "good":
        response.set_cookie(
            "_streamlit_user", "signed", httponly=True, samesite="lax", path="/", max_age=2592000
        )
    return response


def route_client(*, client: str = CLIENT) -> RouteClient:
    """The sign-in middleware around a stand-in for Streamlit's app, asked from ``client``
    (127.0.0.1: this machine, as an AppTest's session is)."""
    app = Starlette(routes=[Route(CALLBACK_PATH, _callback)], middleware=[Middleware(SignInWatch)])
    return RouteClient(app, client=client)


def post_login(client: RouteClient, username: str, password: str, *, origin: str = ORIGIN):
    """The login form's POST, as a browser sends it from the dashboard's page."""
    return client.post(
        LOGIN_PATH, data={"username": username, "password": password}, headers={"origin": origin}
    )


def session_cookie(response) -> str | None:
    """The session token the route's answer sets (None when it sets none)."""
    return response.cookies.get(SESSION_COOKIE)


def browser_with(monkeypatch: pytest.MonkeyPatch, cookies: Mapping[str, str]) -> AppTest:
    """A fresh browser tab (an AppTest of the entry file) that sends ``cookies``."""
    monkeypatch.setattr(signin, "request_cookies", lambda: dict(cookies))
    return AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
