"""The dashboard's own HTTP routes beside Streamlit's (mounted by app/dashboard/server.py): the
local-account sign-in, which sets the session cookie, and a watch on the hospital sign-in's
callback that records a refusal in the audit log.

Why a route: a Streamlit page cannot set an HttpOnly cookie (its script talks to the browser over
a websocket, and page JavaScript could read any cookie it set). So the sign-in form on the login
page posts to ``POST /fedfew/login``; that answer sets ``fedfew_session`` (HttpOnly, Secure,
SameSite=Strict, no Max-Age: gone when the browser closes) and sends the browser back to ``/``.
The Streamlit session reads the cookie from its websocket handshake (``st.context.cookies``).
Nothing that grants access is ever in a URL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from app.dashboard.auth import UserStore, new_session
from app.dashboard.errors import AuthError, DashboardError, RateLimitedError, user_message
from app.dashboard.persistence import SessionStore
from app.dashboard.provenance import ACTION_LOCKED, ACTION_LOGIN, ACTION_LOGIN_FAILED, AuditLog
from app.dashboard.settings import DashboardSettings, load_settings

_LOG = logging.getLogger(__name__)
SESSION_COOKIE = "fedfew_session"  # the local sign-in's session token
IDENTITY_COOKIE = "_streamlit_user"  # Streamlit's signed identity cookie (and its chunks)
NOTICE_COOKIE = "fedfew_notice"  # a message for the next page (a refused sign-in), not a secret
NOTICE_MAX_AGE_S = 60  # long enough to survive the redirect, short enough not to linger
LOGIN_PATH = "/fedfew/login"
CALLBACK_PATH = "/oauth2callback"  # Streamlit's OIDC callback
FORM_USERNAME = "username"
FORM_PASSWORD = "password"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def cookie_header(
    name: str, value: str, *, secure: bool, max_age: int | None = None, path: str = "/"
) -> str:
    """A ``Set-Cookie`` value: HttpOnly and SameSite=Strict always, Secure unless ``secure`` is
    False (plain HTTP chosen with ``--insecure-http``), a session cookie unless ``max_age``."""
    parts = [f"{name}={quote(value, safe='')}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def read_notice(cookies: Mapping[str, str]) -> str:
    """The notice a route left for the page ("" when none)."""
    return unquote(cookies.get(NOTICE_COOKIE, ""))


def _same_origin(headers: dict[str, str]) -> bool:
    """A form post from this dashboard's own page (login CSRF defence): the Origin, when the
    browser sends one, names the host the request was sent to."""
    origin = headers.get("origin")
    if origin is None or origin == "null":  # "null": a page with Referrer-Policy no-referrer
        return headers.get("sec-fetch-site", "same-origin") in {"same-origin", "none"}
    return urlsplit(origin).netloc == headers.get("host", "")


def client_label(address: str | None) -> str:
    """How a client's address is recorded, the same for this route and for a page
    (``st.context.ip_address``, which is None for this machine's own 127.0.0.1 and ::1)."""
    if not address or address in {"127.0.0.1", "::1"}:
        return "unknown"
    return address


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return client_label(str(client[0]) if client else None)


def sign_in(
    config: DashboardSettings, username: str, password: str, *, client: str
) -> tuple[str | None, str]:
    """Check a local account's password and open a session for it.

    Returns:
        ``(token, "")`` on success; ``(None, message)`` when refused. Every outcome is recorded
        in the audit log.
    """
    users = UserStore(config.users_db)
    audit = AuditLog(config.users_db)
    username = username.strip()
    try:
        user = users.authenticate(username, password, client=client)
    except RateLimitedError as exc:
        audit.record_event(
            user=username, action=ACTION_LOGIN_FAILED, detail=f"refused, throttled: {client}"
        )
        return None, user_message(exc)
    except AuthError as exc:
        audit.record_event(user=username, action=ACTION_LOGIN_FAILED, detail=f"{exc}: {client}")
        wait = users.retry_after(username, client=client)
        if wait > 0:  # this failure made the client wait: the account is locked for it
            audit.record_event(
                user=username, action=ACTION_LOCKED, detail=f"{client} waits {wait:.0f} s"
            )
        return None, user_message(exc)
    session = new_session(user.username, (user.role,), hours=config.session_hours)
    token = SessionStore(config.users_db).create(session, client=client, now=time.time())
    audit.record_event(user=user.username, action=ACTION_LOGIN, detail=f"local, from {client}")
    return token, ""


async def _form(receive: Receive) -> dict[str, str]:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > 64 * 1024:  # a username and a password, never more
            break
        if not message.get("more_body"):
            break
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


async def _redirect(send: Send, *cookies: str, status: int = 303) -> None:
    headers = [(b"location", b"/"), (b"cache-control", b"no-store")]
    headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def login_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /fedfew/login``: the local sign-in form's target (ASGI)."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if scope.get("method") != "POST" or not _same_origin(headers):
        await send({"type": "http.response.start", "status": 403, "headers": []})
        await send({"type": "http.response.body", "body": b"refused: sign in from the dashboard"})
        return
    form = await _form(receive)
    try:
        config = load_settings()
        secure = not config.insecure_http
        token, refusal = sign_in(
            config, form.get(FORM_USERNAME, ""), form.get(FORM_PASSWORD, ""), client=_client(scope)
        )
    except DashboardError as exc:
        secure, token, refusal = True, None, user_message(exc)
    if token is None:
        notice = cookie_header(NOTICE_COOKIE, refusal, secure=secure, max_age=NOTICE_MAX_AGE_S)
        await _redirect(send, notice)
        return
    cleared = cookie_header(NOTICE_COOKIE, "", secure=secure, max_age=0)
    await _redirect(send, cookie_header(SESSION_COOKIE, token, secure=secure), cleared)


def harden_identity_cookie(header: str, *, secure: bool) -> str:
    """Streamlit's identity cookie as this dashboard sends it: SameSite=Strict instead of Lax,
    Secure (unless ``--insecure-http``), and, when it is set rather than deleted, without
    Streamlit's 30-day Max-Age: it goes when the browser closes, like ``fedfew_session``.
    Any other cookie is left as it is."""
    if not header.startswith(IDENTITY_COOKIE):
        return header
    parts = [p.strip() for p in header.split(";")]
    deleting = any(p.lower() == "max-age=0" for p in parts)
    dropped = (
        ("samesite=", "secure") if deleting else ("samesite=", "secure", "max-age=", "expires=")
    )
    kept = [parts[0], *(p for p in parts[1:] if not p.lower().startswith(dropped))]
    return "; ".join([*kept, "SameSite=Strict", *(["Secure"] if secure else [])])


def _secure() -> bool:
    try:
        return not load_settings().insecure_http
    except DashboardError:
        return True


class SignInWatch:
    """ASGI middleware: the login route; a refusal by the identity provider (the callback's
    ``error``) recorded in the audit log and said on the next page; and Streamlit's identity
    cookie hardened (:func:`harden_identity_cookie`)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == LOGIN_PATH:
            await login_endpoint(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secure = _secure()
        callback = scope.get("path") == CALLBACK_PATH
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")) if callback else {}
        error = query.get("error", [""])[0][:100]

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookies = [
                    harden_identity_cookie(v.decode("latin-1"), secure=secure)
                    for name, v in message.get("headers", [])
                    if name.lower() == b"set-cookie"
                ]
                headers = [
                    (n, v) for n, v in message.get("headers", []) if n.lower() != b"set-cookie"
                ]
                notice = self._outcome(scope, query, error, cookies, secure=secure)
                if callback and notice:
                    cookies.append(notice)
                headers += [(b"set-cookie", c.encode("latin-1")) for c in cookies]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_hardened)

    @staticmethod
    def _outcome(
        scope: Scope,
        query: Mapping[str, list[str]],
        error: str,
        cookies: list[str],
        *,
        secure: bool,
    ) -> str | None:
        """How a callback ended, as the notice cookie for the next page (None: not a sign-in,
        e.g. the return from the provider's sign-out). A sign-in (Streamlit set an identity
        cookie) clears an older notice; a refusal by the provider, or a code that signed nobody
        in (a failed exchange: a wrong client secret, a replayed callback), is recorded in the
        audit log and said."""
        if not error and "code" not in query:
            return None
        signed_in = any(
            c.startswith(f"{IDENTITY_COOKIE}=") and not c.startswith(f'{IDENTITY_COOKIE}=""')
            for c in cookies
        )
        if signed_in and not error:
            return cookie_header(NOTICE_COOKIE, "", secure=secure, max_age=0)
        if error:
            description = query.get("error_description", [""])[0][:200]
            detail = f"hospital sign-in: {error}: {description}"
            message = f"The hospital sign-in refused: {description or error}."
        else:
            detail = "hospital sign-in did not complete (the dashboard's log says why)"
            message = "The hospital sign-in did not complete: try again, or tell IT."
        try:
            AuditLog(load_settings().users_db).record_event(
                user="", action=ACTION_LOGIN_FAILED, detail=f"{detail}: {_client(scope)}"
            )
        except DashboardError as exc:  # the page says the sign-in failed all the same
            _LOG.warning("a failed hospital sign-in could not be audited: %s", exc)
        return cookie_header(NOTICE_COOKIE, message, secure=secure, max_age=NOTICE_MAX_AGE_S)
