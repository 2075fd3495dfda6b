"""The dashboard end to end in headless Chromium: `fedfew dashboard` on 127.0.0.1 with a registry,
ledger and accounts made here, fed from a real Orthanc (tests/app/dashboard/orthanc.py). A
clinician pulls labelled cases from the archive, adapts, saves, pulls new cases, classifies,
exports, writes the results back, switches pages and finds the work still there; an administrator
checks the budget and the audit log and unlocks a throttled account. With FEDFEW_SCREENSHOTS=1 it
takes screenshots into docs/screenshots/ (shrunk to under 200 KB; FEDFEW_SCREENSHOTS_TMP=1: only
into the test's temp dir).
"""

from __future__ import annotations

import csv
import io
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
from app.dashboard.errors import AuthError
from app.dashboard.settings import ENV_DICOMWEB
from tests.app.dashboard.conftest import (
    PASSWORD,
    TEST_KDF_N,
    png_bytes,
    write_ledger,
    write_tiny_model,
)
from tests.app.dashboard.orthanc import OrthancArchive, dicom_bytes

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
START_TIMEOUT_S = 180  # the server imports torch and MONAI before it answers
STEP_TIMEOUT_MS = 120_000  # one page action on a 2-core machine busy with other tests
SHOTS = 4
NEW_CASES = 3
THROTTLED = "nurse"  # an account a stranger's wrong passwords have throttled
NEW_ACCESSION = "E2E-NEW"  # the study of new cases to classify
PATIENT_ID = "E2E-0001"  # the made-up patient of every archive study here
SCREENSHOT_BYTES = 200_000  # the README's images stay small
SCREENSHOT_WIDTH = 1100  # px, after shrinking

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
    users.add(THROTTLED, PASSWORD, role=ROLE_CLINICIAN)
    for _ in range(10):  # wrong passwords from a stranger's computer, until it must wait
        if users.throttled_clients(THROTTLED):
            break
        with pytest.raises(AuthError):
            users.authenticate(THROTTLED, "not the password", client="10.9.9.9")
    assert users.throttled_clients(THROTTLED) == 1
    arrays = synthetic_arrays(n_classes=3, per_class=SHOTS + 1, size=48, seed=5)
    cases = root / "cases"
    for i, (image, label) in enumerate(zip(arrays["images"], arrays["labels"], strict=True)):
        folder = cases / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"case_{i:02d}.png").write_bytes(png_bytes(image))
    return {"root": root, "cases": cases}


def _archive_studies(archive: OrthancArchive, cases: Path) -> dict[str, str]:
    """One study per class (SHOTS images, accession E2E-<class>) and one of new cases (one image
    per class, accession NEW_ACCESSION), all of a made-up patient; returns accession -> study."""
    import numpy as np
    from PIL import Image
    from pydicom.uid import generate_uid

    new_study, new_series = generate_uid(), generate_uid()
    studies = {NEW_ACCESSION: new_study}
    for day, folder in enumerate(sorted(cases.iterdir()), start=1):
        study, series = generate_uid(), generate_uid()
        studies[f"E2E-{folder.name}"] = study
        files = sorted(folder.iterdir())
        for number, path in enumerate(files):
            pixels = np.asarray(Image.open(path))
            is_new = number == SHOTS
            archive.store(
                dicom_bytes(
                    pixels,
                    study=new_study if is_new else study,
                    series=new_series if is_new else series,
                    patient_name="E2E^Synthetic",
                    patient_id=PATIENT_ID,
                    accession=NEW_ACCESSION if is_new else f"E2E-{folder.name}",
                    study_date="20240110" if is_new else f"202401{day:02d}",
                    description="New cases" if is_new else f"Cases of {folder.name}",
                )
            )
    return studies


@pytest.fixture(scope="module")
def archive(orthanc_archive: OrthancArchive, site: dict[str, Path]) -> dict[str, str]:
    """The site's cases stored in Orthanc as DICOM studies; accession -> Study Instance UID."""
    return _archive_studies(orthanc_archive, site["cases"])


@pytest.fixture(scope="module")
def server(
    site: dict[str, Path], orthanc_archive: OrthancArchive, archive: dict[str, str]
) -> Iterator[str]:
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
        env={
            **os.environ,
            "FEDFEW_HOME": str(root / "home"),
            ENV_DICOMWEB: orthanc_archive.dicomweb,
        },
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


def _small_png(source: Path, target: Path) -> None:
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


def _shot(page, tmp_path: Path, name: str, *, part=None) -> None:
    """Screenshot the whole page, or only ``part`` (a locator), when FEDFEW_SCREENSHOTS is 1 or
    FEDFEW_SCREENSHOTS_TMP is 1 (then only to the test's temp dir); the seven took about 12 s
    here, so the suite's run skips them."""
    if "1" not in (os.environ.get("FEDFEW_SCREENSHOTS"), os.environ.get("FEDFEW_SCREENSHOTS_TMP")):
        return
    path = tmp_path / f"{name}.png"
    if part is None:
        page.screenshot(path=str(path), full_page=True)
    else:
        part.screenshot(path=str(path))
    if os.environ.get("FEDFEW_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        _small_png(path, SCREENSHOTS / path.name)


def _log_in(page, url: str, username: str) -> None:
    page.goto(url)
    page.get_by_label("Username", exact=True).fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def _idle(page) -> None:
    """Wait until Streamlit has finished the script run (its status widget disappears)."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden")


def _choose(page, label: str, option: str) -> None:
    """Pick the option containing ``option`` in the selectbox labelled ``label``."""
    box = page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True))
    box.click()
    page.get_by_role("option").filter(has_text=option).first.click()
    _idle(page)


def _search_archive(page, *, patient: str = "", accession: str = "") -> None:
    panel = page.get_by_test_id("stExpander").filter(has_text="From the image archive")
    if not panel.get_by_role("button", name="Search the archive").is_visible():
        header = panel.get_by_text("From the image archive (DICOMweb)")
        # On a loaded machine a rerun can still show the previous run's copy beside the new one.
        playwright_api.expect(header).to_have_count(1)
        header.click()
    panel.get_by_label("Patient (name or ID)").fill(patient)
    panel.get_by_label("Accession number").fill(accession)
    panel.get_by_role("button", name="Search the archive").click()
    _idle(page)


def test_clinician_from_archive_to_export_then_admin_unlocks(
    server, site, archive, orthanc_archive, page, tmp_path
):
    expect = playwright_api.expect
    page.goto(server)
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    _shot(page, tmp_path, "dashboard-login", part=page.get_by_test_id("stMain"))
    _log_in(page, server, ROLE_CLINICIAN)
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_text("stay on this hospital's machine")).to_be_visible()

    # Support cases: each class's study pulled from the archive.
    classes = sorted(p.name for p in site["cases"].iterdir())
    page.get_by_label("Condition", exact=True).fill("e2e lesions")
    page.get_by_label("Condition", exact=True).press("Enter")
    _idle(page)
    area = page.get_by_label("Classes, one per line")
    area.fill("\n".join(classes))
    area.press("Control+Enter")
    _idle(page)
    _search_archive(page, patient="e2e synth")
    panel = page.get_by_test_id("stExpander").filter(has_text="From the image archive")
    expect(panel.get_by_test_id("stDataFrame")).to_have_count(1)
    for name in classes:  # the target moves on to the next class without cases by itself
        _choose(page, "Study", f"E2E-{name}")
        panel.get_by_role("button", name="Pull the images").click()
        expect(page.get_by_text(f"{SHOTS} image(s) added to the cases of {name}")).to_be_visible()
        _idle(page)
    # every class's thumbnails, and the viewer's one image
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes) + 1)
    expect(page.get_by_text("48x48 pixels, window")).to_be_visible()
    _shot(page, tmp_path, "dashboard-archive", part=panel)

    page.get_by_role("button", name="Adapt", exact=True).click()
    expect(page.get_by_text("would be classified right")).to_be_visible()
    expect(page.get_by_text("Intended use").first).to_be_visible()
    page.get_by_label("Save as").fill("e2e-lesions")
    page.get_by_role("button", name="Save adapter").click()
    expect(page.get_by_text("Saved as v2 e2e-lesions")).to_be_visible()
    _idle(page)
    _shot(page, tmp_path, "dashboard-adapt")

    # A reload keeps the login, the condition, the classes and the pulled cases.
    page.reload()
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_label("Condition", exact=True)).to_have_value("e2e lesions")
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))

    # New cases from the archive: classify, export, write back.
    page.get_by_role("link", name="Classify cases").click()
    expect(page.get_by_role("heading", name="Classify cases")).to_be_visible()
    _choose(page, "Adapter", "v2 e2e-lesions")
    _search_archive(page, accession=NEW_ACCESSION)
    page.get_by_role("button", name="Pull the images").click()
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect(page.get_by_text("regions that support")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download results (CSV)").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == NEW_CASES
    assert {r["adapter"] for r in rows} == {"v2 e2e-lesions"}
    assert all(r["user"] == ROLE_CLINICIAN and "not a diagnosis" in r["notice"] for r in rows)
    page.get_by_role("button", name="Write the results to the archive").click()
    expect(page.get_by_text(f"{NEW_CASES} structured report(s) stored")).to_be_visible()
    _idle(page)
    _shot(page, tmp_path, "dashboard-classify")
    assert _reports_in(orthanc_archive, archive[NEW_ACCESSION]) == NEW_CASES

    # Another page and back: the work is still there.
    page.get_by_role("link", name="Adapt to a new condition").click()
    expect(page.get_by_label("Condition", exact=True)).to_have_value("e2e lesions")
    # (no viewer: the pulls were made before the reload, in the browser session before it)
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))
    page.get_by_role("link", name="Classify cases").click()
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect(page.get_by_text(f"{NEW_CASES} structured report(s) stored")).to_be_visible()

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
    _idle(page)
    _shot(page, tmp_path, "dashboard-audit", part=page.get_by_test_id("stMain"))

    # The account a stranger throttled is unlocked in the browser.
    page.get_by_role("link", name="Users").click()
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    _choose(page, "Account", THROTTLED)
    page.get_by_role("button", name="Unlock").click()
    expect(page.get_by_text(f"{THROTTLED} may log in again from every computer")).to_be_visible()
    users = UserStore(site["root"] / "users.sqlite", kdf_n=TEST_KDF_N)
    assert users.throttled_clients(THROTTLED) == 0

    # The patient's name and ID were on the clinician's screen, never in the server's log.
    log = (site["root"] / "server.log").read_text().lower()
    assert "synthetic" not in log and PATIENT_ID.lower() not in log
    _idle(page)
    _shot(page, tmp_path, "dashboard-users", part=page.get_by_test_id("stMain"))


def _reports_in(archive: OrthancArchive, study: str) -> int:
    """Structured reports stored in ``study`` (QIDO-RS, as any viewer would look)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=archive.dicomweb)
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    return len(found)
