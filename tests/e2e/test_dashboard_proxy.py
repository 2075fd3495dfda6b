"""The runbook's TLS proxy in front of the dashboard, for real: nginx with deploy/proxy/nginx.conf
(ports and file paths moved into a temporary folder, nothing else changed) before `fedfew dashboard
--host 127.0.0.1`, with a certificate from fedfew's own CA; headless Chromium signs in with a local
account over HTTPS through it (websocket included), keeps the session over a reload, and plain
HTTP only redirects."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dashboard.auth import ROLE_CLINICIAN, UserStore
from app.dashboard.web_session import SESSION_COOKIE
from federation.deploy.certificates import make_ca, make_server_certificate
from tests.app.dashboard.conftest import PASSWORD, TEST_KDF_N
from tests.e2e.dashboard_pages import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    REPO,
    STEP_TIMEOUT_MS,
    free_port,
    log_in,
    stop_process,
    wait_until_up,
)

CONFIG = REPO / "deploy" / "proxy" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if NGINX is None:
    pytest.skip("no nginx (apt-get install -y nginx-light)", allow_module_level=True)


def _proxy_config(
    root: Path, *, https: int, http: int, upstream: int, cert: Path, key: Path
) -> Path:
    """deploy/proxy/nginx.conf with this test's ports and files."""
    text = CONFIG.read_text()
    replacements = {  # in order: the temporary folder first (the certificates lie under /tmp too)
        "/tmp/": f"{root}/",
        "listen 8443 ssl;": f"listen 127.0.0.1:{https} ssl;",
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "https://$host:8443": f"https://$host:{https}",
        "http://127.0.0.1:8501": f"http://127.0.0.1:{upstream}",
        "/etc/fedfew/tls/dashboard.pem": str(cert),
        "/etc/fedfew/tls/dashboard.key": str(key),
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in {CONFIG}"
        text = text.replace(old, new)
    path = root / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("proxy")
    ca_cert, ca_key = make_ca(root / "ca")
    cert, key = make_server_certificate(
        root / "tls", ca_cert=ca_cert, ca_key=ca_key, hosts=["127.0.0.1"]
    )
    UserStore(root / "users.sqlite", kdf_n=TEST_KDF_N).add(
        ROLE_CLINICIAN, PASSWORD, role=ROLE_CLINICIAN
    )
    port, https, http = free_port(), free_port(), free_port()
    config = _proxy_config(root, https=https, http=http, upstream=port, cert=cert, key=key)
    check = subprocess.run(
        [NGINX, "-t", "-p", str(root), "-c", str(config), "-e", str(root / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    processes, logs = [], []
    try:
        log = (root / "server.log").open("w")
        logs.append(log)
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dashboard", "--host", "127.0.0.1",
             "--port", str(port), "--users-db", str(root / "users.sqlite"),
             "--registry", str(root / "registry")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "FEDFEW_HOME": str(root / "home")},
        )  # fmt: skip
        processes.append(dashboard)
        nginx = subprocess.Popen(
            [NGINX, "-p", str(root), "-c", str(config), "-e", str(root / "error.log"),
             "-g", "daemon off;"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        processes.append(nginx)
        url = f"https://127.0.0.1:{https}"
        wait_until_up(f"{url}/_stcore/health", dashboard, root / "server.log", ca=ca_cert)
        yield {"url": url, "http": http, "root": root}
    finally:
        for process in reversed(processes):
            stop_process(process)
        for handle in logs:
            handle.close()


def test_plain_http_at_the_proxy_only_redirects(proxied) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", int(proxied["http"]), timeout=10)
    try:
        connection.request("GET", "/")
        reply = connection.getresponse()
        reply.read()
    finally:
        connection.close()
    assert reply.status == 301
    assert reply.getheader("location").startswith("https://127.0.0.1:")
    assert not reply.getheader("set-cookie")


def test_sign_in_through_the_proxy_over_https(proxied) -> None:
    expect = playwright_api.expect
    url = str(proxied["url"])
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            playwright_api.expect.set_options(timeout=STEP_TIMEOUT_MS)
            log_in(page, url, ROLE_CLINICIAN)  # the form posts through the proxy
            signed_in = page.get_by_text(f"Signed in as {ROLE_CLINICIAN} ({ROLE_CLINICIAN})")
            expect(signed_in).to_be_visible()  # the websocket runs through the proxy
            (cookie,) = [c for c in page.context.cookies(url) if c["name"] == SESSION_COOKIE]
            assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            page.reload()
            expect(signed_in).to_be_visible()
            response = page.request.get(url)
            assert "max-age=31536000" in response.headers["strict-transport-security"]
        finally:
            browser.close()
