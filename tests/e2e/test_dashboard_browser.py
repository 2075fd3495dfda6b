"""The dashboard end to end in headless Chromium: `fedfew dashboard` on 127.0.0.1 with a registry,
ledger and accounts made here; a clinician adapts, saves and classifies, an administrator checks
the budget. Screenshots go to the test's temp dir, and also to docs/screenshots/ when
FEDFEW_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, UserStore
from tests.app.dashboard.conftest import (
    PASSWORD,
    TEST_KDF_N,
    png_bytes,
    write_ledger,
    write_tiny_model,
)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 90  # the server imports torch and MONAI before it answers
STEP_TIMEOUT_MS = 60_000  # one page action on a busy 2-core machine
SHOTS = 4
NEW_CASES = 3

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if CHROMIUM is None:
    pytest.skip(
        "no system chromium (apt-get install -y chromium); browser test skipped",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Registry, ledger, accounts and case files of one hospital, all synthetic."""
    from models.synthetic import synthetic_arrays

    root = tmp_path_factory.mktemp("site")
    write_tiny_model(root / "registry")
    write_ledger(root / "ledger.db", site="hospital-a", charges=3, refusal=True)
    users = UserStore(root / "users.sqlite", kdf_n=TEST_KDF_N)
    users.add(ROLE_CLINICIAN, PASSWORD, role=ROLE_CLINICIAN)
    users.add(ROLE_ADMIN, PASSWORD, role=ROLE_ADMIN)
    arrays = synthetic_arrays(n_classes=3, per_class=SHOTS + 1, size=48, seed=5)
    cases = root / "cases"
    for i, (image, label) in enumerate(zip(arrays["images"], arrays["labels"], strict=True)):
        folder = cases / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"case_{i:02d}.png").write_bytes(png_bytes(image))
    return {"root": root, "cases": cases}


@pytest.fixture(scope="module")
def server(site: dict[str, Path]) -> Iterator[str]:
    """`python -m app.cli dashboard` in its own process group; stopped at the end."""
    root, port = site["root"], _free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "dashboard",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--registry",
            str(root / "registry"),
            "--ledger",
            str(root / "ledger.db"),
            "--users-db",
            str(root / "users.sqlite"),
            "--federation-status",
            str(root / "status.json"),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "FEDFEW_HOME": str(root / "home")},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                output = (root / "server.log").read_text()
                pytest.fail(f"dashboard exited with {process.returncode}: {output}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not up after {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        log.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 2400})
        tab = context.new_page()
        tab.set_default_timeout(STEP_TIMEOUT_MS)
        playwright_api.expect.set_options(timeout=STEP_TIMEOUT_MS)
        try:
            yield tab
        finally:
            browser.close()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("FEDFEW_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SCREENSHOTS / path.name)


def _log_in(page, url: str, username: str) -> None:
    page.goto(url)
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def _idle(page) -> None:
    """Wait until Streamlit has finished the script run (its status widget disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def test_clinician_adapts_and_classifies_then_admin_checks_budget(server, site, page, tmp_path):
    expect = playwright_api.expect
    _log_in(page, server, ROLE_CLINICIAN)
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_text("stay on this hospital's machine")).to_be_visible()

    classes = sorted(p.name for p in site["cases"].iterdir())
    page.get_by_label("Condition", exact=True).fill("e2e lesions")
    page.get_by_label("Condition", exact=True).press("Enter")
    _idle(page)
    area = page.get_by_label("Classes, one per line")
    area.fill("\n".join(classes))
    area.press("Control+Enter")
    uploaders = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
    expect(uploaders).to_have_count(len(classes))
    for i, name in enumerate(classes):
        files = sorted((site["cases"] / name).iterdir())[:SHOTS]
        uploaders.nth(i).set_input_files([str(f) for f in files])
        _idle(page)
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))

    page.get_by_role("button", name="Adapt", exact=True).click()
    expect(page.get_by_text("would be classified right")).to_be_visible()
    expect(page.get_by_text("Intended use").first).to_be_visible()
    page.get_by_label("Save as").fill("e2e-lesions")
    page.get_by_role("button", name="Save adapter").click()
    expect(page.get_by_text("Saved as v2 e2e-lesions")).to_be_visible()
    _idle(page)
    _shot(page, tmp_path, "dashboard-adapt")

    # A reload keeps the login, the condition, the classes and the uploaded cases.
    page.reload()
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_label("Condition", exact=True)).to_have_value("e2e lesions")
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))

    page.get_by_role("link", name="Classify cases").click()
    expect(page.get_by_role("heading", name="Classify cases")).to_be_visible()
    new = [sorted((site["cases"] / name).iterdir())[SHOTS] for name in classes]
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(
        [str(f) for f in new]
    )
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect(page.get_by_text("regions that support")).to_be_visible()
    expect(page.get_by_role("button", name="Download results (CSV)")).to_be_visible()
    _idle(page)
    _shot(page, tmp_path, "dashboard-classify")

    page.get_by_role("link", name="Account").click()
    page.get_by_role("button", name="Log out").click()
    _log_in(page, server, ROLE_ADMIN)
    expect(page.get_by_role("heading", name="Privacy budgets")).to_be_visible()
    expect(page.get_by_role("heading", name="Site hospital-a")).to_be_visible()
    expect(page.get_by_text("Refusals (1)")).to_be_visible()
    page.get_by_role("button", name="Verify the record").click()
    expect(page.get_by_text("Record intact: all 4 entries")).to_be_visible()
    _idle(page)
    _shot(page, tmp_path, "dashboard-privacy")

    # The clinician's classification is in the audit log (a table, so: not the empty notice).
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    expect(page.get_by_text("No classification recorded yet")).to_have_count(0)
