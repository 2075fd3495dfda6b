"""What the dashboard's browser tests share (tests/e2e/test_dashboard_*.py): the Chromium they
drive, starting and stopping a dashboard over HTTPS, and page actions (log in, wait for
Streamlit, pick options, search and pull from the archive, screenshots) with what the browser
test checks behind the page (reports in the archive, another user's adapter)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.dashboard.conftest import PASSWORD
from tests.app.dashboard.orthanc import OrthancArchive

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 180  # the dashboard imports torch and MONAI before it answers
# One page action on a 2-core machine busy with other tests (shorter to debug a failure fast).
STEP_TIMEOUT_MS = int(os.environ.get("FEDFEW_E2E_STEP_MS", "120000"))
SCREENSHOTS = REPO / "docs" / "screenshots"
SCREENSHOT_BYTES = 200_000  # the README's images stay small
SCREENSHOT_WIDTH = 1100  # px, after shrinking


def _expect():
    from playwright.sync_api import expect

    return expect


def small_png(source: Path, target: Path) -> None:
    """``source`` without the empty page below the content, shrunk to :data:`SCREENSHOT_WIDTH`
    and reduced to a palette, shrunk further until it is under :data:`SCREENSHOT_BYTES`."""
    from PIL import Image, ImageChops

    with Image.open(source) as image:
        picture = image.convert("RGB")
    # Cut the empty page below the content (the viewport is tall so nothing needs scrolling).
    inner = picture.crop((8, 0, picture.width - 8, picture.height))  # not the border lines
    corner = inner.getpixel((inner.width - 1, inner.height - 1))
    content = ImageChops.difference(inner, Image.new("RGB", inner.size, corner)).getbbox()
    if content is not None:
        picture = picture.crop((0, 0, picture.width, min(picture.height, content[3] + 24)))
    width = min(SCREENSHOT_WIDTH, picture.width)
    while True:
        height = round(picture.height * width / picture.width)
        small = picture.resize((width, height), Image.Resampling.LANCZOS).quantize(colors=96)
        small.save(target, optimize=True)
        if target.stat().st_size < SCREENSHOT_BYTES:
            return
        width = round(width * 0.8)


def shot(page, tmp_path: Path, name: str, *, part=None) -> None:
    """Screenshot the whole page, or only ``part`` (a locator), when FEDFEW_SCREENSHOTS is 1 or
    FEDFEW_SCREENSHOTS_TMP is 1 (then only to the test's temp dir); the seven took about 12 s
    here, so the suite's run skips them."""
    if "1" not in (os.environ.get("FEDFEW_SCREENSHOTS"), os.environ.get("FEDFEW_SCREENSHOTS_TMP")):
        return
    path = tmp_path / f"{name}.png"
    if part is None:
        # Streamlit scrolls inside its main container, so a "full page" is the viewport: make it
        # as tall as the content for the shot.
        size = page.viewport_size
        content = page.evaluate(
            "Math.max(...Array.from(document.querySelectorAll('*')).map(e => e.scrollHeight))"
        )
        page.set_viewport_size({"width": size["width"], "height": max(size["height"], content)})
        page.wait_for_timeout(500)
        page.screenshot(path=str(path), full_page=True)
        page.set_viewport_size(size)
    else:
        part.screenshot(path=str(path))
    if os.environ.get("FEDFEW_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        small_png(path, SCREENSHOTS / path.name)


def log_in(page, url: str, username: str) -> None:
    page.goto(url)
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def idle(page) -> None:
    """Wait until Streamlit has finished the script run (its status widget disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def choose(page, label: str, option: str, *, tries: int = 3) -> None:
    """Pick the option containing ``option`` in the selectbox labelled ``label``."""
    from playwright.sync_api import Error

    box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True))
    # A rerun that replaced the widget (a new search's study list) can still show the old copy
    # beside the new one for a moment.
    _expect()(box).to_have_count(1)
    for attempt in range(tries):
        box.click()
        try:
            # The list can close under the pointer when a rerun redraws the box: open it again.
            page.get_by_role("option").filter(has_text=option).first.click(timeout=20_000)
            break
        except Error:
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")
            idle(page)
    idle(page)


def search_archive(page, *, patient: str = "", accession: str = "") -> None:
    panel = page.get_by_test_id("stExpander").filter(has_text="From the image archive")
    button = panel.get_by_role("button", name="Search the archive")
    # Open the panel if it is closed. On a loaded machine a rerun can redraw it between a look
    # and a click (a click on an opening panel closes it): look again after each click.
    for attempt in range(4):
        try:
            _expect()(button).to_be_visible(timeout=5_000 if attempt == 0 else 30_000)
            break
        except AssertionError:
            if attempt == 3:
                raise
            header = panel.get_by_text("From the image archive (DICOMweb)")
            # A rerun can still show the previous run's copy beside the new one.
            _expect()(header).to_have_count(1)
            header.click()
            idle(page)
    panel.get_by_label("Patient (name or ID)").fill(patient)
    panel.get_by_label("Accession number").fill(accession)
    panel.get_by_role("button", name="Search the archive").click()
    idle(page)


def expect_chosen(page, label: str, option: str) -> None:
    """The selectbox labelled ``label`` shows an option containing ``option``."""
    box = page.get_by_role("combobox", name=label, exact=True)
    _expect()(box).to_have_value(re.compile(re.escape(option)))


def pull(page, panel, *, target: str | None, added: str) -> None:
    """Pull the chosen study (choosing the target first when given) and wait for the message."""
    if target is not None:
        choose(page, "Add the images to", target)
    panel.get_by_role("button", name="Pull the images").click()
    _expect()(page.get_by_text(added)).to_be_visible()
    idle(page)


def save_someone_elses_adapter(registry: Path, *, version: int) -> None:
    """Another clinician's adapter, saved after ``version`` (so newer): the same cases again."""
    from app.dashboard import adapters

    adaptation, _ = adapters.load_adapter(registry, version)
    adapters.save_adapter(
        registry, adaptation, name="someone-elses", condition="other", author="another"
    )


def reports_in(archive: OrthancArchive, study: str) -> int:
    """Structured reports stored in ``study`` (QIDO-RS, as any viewer would look)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=archive.dicomweb)
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    return len(found)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(
    url: str, process: subprocess.Popen, log: Path, *, ca: Path | None = None
) -> None:
    """Wait until ``url`` answers 200 (over HTTPS trusting ``ca`` when given); fail the test
    with the process's log if it exits or is not up in :data:`START_TIMEOUT_S`."""
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"{url} exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            pytest.fail(f"{url} not up after {START_TIMEOUT_S} s: {log.read_text()}")
        time.sleep(0.5)


def stop_process(process: subprocess.Popen) -> None:
    """Stop a process started with its own session: SIGTERM to its group, then SIGKILL."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)
