"""The hospital's sign-in end to end, against real parts: a real OpenID provider
(node-oidc-provider, tests/e2e/oidc/provider.mjs) over HTTPS on 127.0.0.1, `fedfew dashboard
--tls-cert --tls-key --oidc` over HTTPS with certificates from fedfew's own CA
(federation/deploy/certificates.py, what `fedfew server init` uses), and headless Chromium.

A clinician signs in through the provider and gets the clinician pages only; no session token
appears in any URL the browser requested or kept in its history; the session cookie is HttpOnly;
the page signs itself out after the (short) idle timeout and stays signed out on reload; a user the
provider has disabled, one in no dashboard group, and one it no longer knows are refused; an
administrator signs in, sees the administrator pages and signs out; every step is in the audit log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dashboard import provenance
from app.dashboard.provenance import AuditLog
from federation.deploy.certificates import make_ca, make_server_certificate
from tests.e2e.dashboard_pages import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    REPO,
    STEP_TIMEOUT_MS,
    free_port,
    stop_process,
    wait_until_up,
)

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
NODE = shutil.which("node")
IDLE_MINUTES = 0.5  # the walk-away test waits this long (the default is 15)
CLIENT_ID = "fedfew-dashboard"
CLIENT_SECRET = "test-only-client-secret"  # the test provider's, made up here
PASSWORD = "hospital password 1"  # its users', made up here
GROUPS = {"radiology": "clinician", "dashboard-admins": "administrator"}
USERS = {
    "alice": {"email": "alice@hospital.test", "groups": ["radiology", "cafeteria"]},
    "bob": {"email": "bob@hospital.test", "groups": ["dashboard-admins"]},
    "carol": {"email": "carol@hospital.test", "groups": ["radiology"], "disabled": True},
    "dave": {"email": "dave@hospital.test", "groups": ["cafeteria"]},
}

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if CHROMIUM is None:
    pytest.skip("no system chromium (apt-get install -y chromium)", allow_module_level=True)
if NODE is None:
    pytest.skip("no node (Node 20+): the test OpenID provider runs on it", allow_module_level=True)
if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
    pytest.skip(
        "oidc-provider is not installed: run `npm ci --prefix tests/e2e/oidc` (.ci/run does)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The identity provider and the dashboard, both over HTTPS with fedfew's CA."""
    root = tmp_path_factory.mktemp("hospital")
    ca_cert, ca_key = make_ca(root / "ca")
    cert, key = make_server_certificate(
        root / "tls", ca_cert=ca_cert, ca_key=ca_key, hosts=["127.0.0.1", "localhost"]
    )
    idp_port, port = free_port(), free_port()
    issuer, url = f"https://127.0.0.1:{idp_port}", f"https://127.0.0.1:{port}"
    provider_config = {
        "port": idp_port,
        "issuer": issuer,
        "cert": str(cert),
        "key": str(key),
        "client": {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [f"{url}/oauth2callback"],
        },
        "users": {name: {**user, "password": PASSWORD} for name, user in USERS.items()},
    }
    (root / "provider.json").write_text(json.dumps(provider_config))
    roles = "\n".join(f'"{group}" = "{role}"' for group, role in GROUPS.items())
    (root / "oidc.toml").write_text(
        f'issuer = "{issuer}"\nclient_id = "{CLIENT_ID}"\nclient_secret = "{CLIENT_SECRET}"\n'
        f'redirect_uri = "{url}/oauth2callback"\nrole_claim = "groups"\n'
        f'scope = "openid email profile groups"\nca_file = "{ca_cert}"\n[roles]\n{roles}\n'
    )
    processes = []
    logs = []
    try:
        idp_log = (root / "provider.log").open("w")
        logs.append(idp_log)
        idp = subprocess.Popen(
            [NODE, str(OIDC_DIR / "provider.mjs"), str(root / "provider.json")],
            cwd=OIDC_DIR,
            stdout=idp_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(idp)
        wait_until_up(
            f"{issuer}/.well-known/openid-configuration", idp, root / "provider.log", ca=ca_cert
        )
        log = (root / "server.log").open("w")
        logs.append(log)
        dashboard = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "dashboard",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--oidc",
                str(root / "oidc.toml"),
                "--idle-minutes",
                str(IDLE_MINUTES),
                "--users-db",
                str(root / "users.sqlite"),
                "--registry",
                str(root / "registry"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "FEDFEW_HOME": str(root / "home")},
        )
        processes.append(dashboard)
        wait_until_up(f"{url}/_stcore/health", dashboard, root / "server.log", ca=ca_cert)
        yield {"url": url, "issuer": issuer, "root": root}
    finally:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[tuple[object, list[str], list[str]]]:
    """A tab, every URL the browser requested, and every URL the tab committed (its history)."""
    requested: list[str] = []
    committed: list[str] = []
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        # The browser does not know fedfew's test CA (the dashboard's server side does).
        context = chromium.new_context(
            ignore_https_errors=True, viewport={"width": 1400, "height": 1400}
        )
        context.on("request", lambda request: requested.append(request.url))
        tab = context.new_page()
        tab.on("framenavigated", lambda f: committed.append(f.url) if f == tab.main_frame else None)
        tab.set_default_timeout(STEP_TIMEOUT_MS)
        playwright_api.expect.set_options(timeout=STEP_TIMEOUT_MS)
        try:
            yield tab, requested, committed
        except BaseException:
            tab.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            chromium.close()


def _sign_in(page, url: str, user: str) -> None:
    """Through the provider's own sign-in page (it asks every time: prompt=login)."""
    page.goto(url)
    page.get_by_role("button", name="Log in with your hospital account").click()
    page.get_by_label("Hospital username").fill(user)
    page.get_by_label("Hospital password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def _events(root: Path) -> list[tuple[str, str, str]]:
    return [
        (e.user, e.action, e.detail) for e in reversed(AuditLog(root / "users.sqlite").entries())
    ]


def test_hospital_sign_in_over_https_roles_idle_refusals_and_audit(hospital, browser) -> None:
    expect = playwright_api.expect
    page, requested, committed = browser
    url, root = str(hospital["url"]), Path(hospital["root"])

    # A clinician signs in with the hospital's identity and gets the clinician pages only.
    _sign_in(page, url, "alice")
    expect(page.get_by_text("Signed in as alice@hospital.test (clinician)")).to_be_visible()
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_role("link", name="Classify cases")).to_be_visible()
    expect(page.get_by_role("link", name="Audit log")).to_have_count(0)
    assert page.url.startswith("https://") and page.url.rstrip("/") == url

    # Nothing that grants access is in a URL: not the session (the identity cookie), not the
    # authorization code in the history (the callback answered with a redirect).
    cookies = {c["name"]: c for c in page.context.cookies(url)}
    identity = cookies["_streamlit_user"]
    assert identity["httpOnly"] and "_streamlit_user" not in page.evaluate("document.cookie")
    assert identity["secure"] and identity["sameSite"] == "Strict"
    assert identity["expires"] == -1  # gone when the browser closes, not in 30 days
    secrets = [c["value"] for c in cookies.values() if len(c["value"]) >= 16]
    assert secrets and not [u for u in requested if any(s[:16] in u for s in secrets)]
    ours = [u for u in committed if u.startswith(url)]
    assert ours and not [u for u in ours if "code=" in u or "session" in u or "token" in u]
    assert [u for u in requested if "/oauth2callback?code=" in u]  # the code went by redirect

    # A walk-away workstation: after the idle timeout the page signs itself out.
    expect(page.get_by_text("without activity")).to_be_visible(
        timeout=int(IDLE_MINUTES * 60_000) + 60_000
    )
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    page.reload()  # the identity cookie is still there; its session is not resumed
    expect(page.get_by_role("button", name="Log in with your hospital account")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)

    # Refused: disabled at the provider, in no dashboard group, unknown to the provider.
    _sign_in(page, url, "carol")
    expect(
        page.get_by_text("The hospital sign-in refused: this account is disabled")
    ).to_be_visible()
    _sign_in(page, url, "dave")
    expect(page.get_by_text("has no dashboard role")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    page.goto(url)
    page.get_by_role("button", name="Log in with your hospital account").click()
    page.get_by_label("Hospital username").fill("erin")  # removed from the directory
    page.get_by_label("Hospital password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_text("Wrong username or password.")).to_be_visible()

    # An administrator: the administrator pages, the audit log, then Sign out.
    _sign_in(page, url, "bob")
    expect(page.get_by_text("Signed in as bob@hospital.test (administrator)")).to_be_visible()
    expect(page.get_by_role("heading", name="Privacy budgets")).to_be_visible()
    expect(page.get_by_role("link", name="Adapt to a new condition")).to_have_count(0)
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Log in with your hospital account")).to_be_visible()
    page.reload()
    expect(page.get_by_role("button", name="Log in with your hospital account")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)

    events = _events(root)
    assert [(u, a) for u, a, _ in events] == [
        ("alice@hospital.test", provenance.ACTION_LOGIN),
        ("alice@hospital.test", provenance.ACTION_LOGOUT),  # idle
        ("", provenance.ACTION_LOGIN_FAILED),  # carol, refused by the provider
        ("dave@hospital.test", provenance.ACTION_LOGIN_FAILED),  # no dashboard role
        ("bob@hospital.test", provenance.ACTION_LOGIN),
        ("bob@hospital.test", provenance.ACTION_LOGOUT),
    ]
    assert events[0][2].startswith("hospital sign-in, clinician")
    assert events[1][2].startswith("idle")
    assert "access_denied: this account is disabled" in events[2][2]
    assert "without a role" in events[3][2]
    assert events[5][2] == ""
