"""The dashboard end to end in headless Chromium: `fedfew dashboard` on 127.0.0.1 with a registry,
ledger and accounts made here, fed from a real Orthanc (tests/app/dashboard/orthanc.py). A
clinician chooses an older base model, pulls labelled cases from the archive (a search over two
pages of results, five pulls in a row into one class that keep the class, then a second and a
third search), gets a photograph among the labelled cases named, adapts, saves, pulls new cases,
classifies with the adapter they chose (not a newer one someone else saved), exports, writes the
results back, switches pages and reloads and finds the work and the choices still there, and pulls
the study again without the reports; an administrator checks the budget and the audit log and
unlocks a throttled account. With FEDFEW_SCREENSHOTS=1 it
takes screenshots into docs/screenshots/ (shrunk to under 200 KB; FEDFEW_SCREENSHOTS_TMP=1: only
into the test's temp dir).
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, UserStore
from app.dashboard.errors import AuthError
from app.dashboard.settings import ENV_DICOMWEB
from app.dashboard.web_session import SESSION_COOKIE
from tests.app.dashboard.conftest import (
    PASSWORD,
    TEST_KDF_N,
    photograph_bytes,
    png_bytes,
    write_ledger,
    write_tiny_model,
)
from tests.app.dashboard.orthanc import OrthancArchive, dicom_bytes
from tests.e2e.dashboard_pages import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    REPO,
    STEP_TIMEOUT_MS,
    choose,
    expect_chosen,
    idle,
    log_in,
    pull,
    reports_in,
    save_someone_elses_adapter,
    search_archive,
    shot,
    stop_process,
    wait_until_up,
)

SHOTS = 5  # labelled cases per class; the first class's are five studies, pulled one by one
NEW_CASES = 3
FILLERS = 50  # older studies of the same patient: the search has two pages of results
PAGE_SIZE = 50  # app/dashboard/archive_view.PAGE_SIZE
THROTTLED = "nurse"  # an account a stranger's wrong passwords have throttled
NEW_ACCESSION = "E2E-NEW"  # the study of new cases to classify
PATIENT_ID = "E2E-0001"  # the made-up patient of every archive study here

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
    write_tiny_model(root / "registry")  # v1: the clinician's choice
    write_tiny_model(root / "registry")  # v2: newer, the default until the clinician chooses
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
    (root / "portrait.jpg").write_bytes(photograph_bytes())
    return {"root": root, "cases": cases}


def _archive_studies(archive: OrthancArchive, cases: Path) -> dict[str, str]:
    """All of one made-up patient: the first class's cases as SHOTS one-image studies from 2022
    (accession E2E-<class>-<n>: the oldest, on the second page of results), each other class's
    as one study (accession E2E-<class>), one study of new cases (one image per class, accession
    NEW_ACCESSION) and FILLERS one-image studies from 2023; returns accession -> study UID."""
    import numpy as np
    from PIL import Image
    from pydicom.uid import generate_uid

    def store(pixels: np.ndarray, *, study: str, series: str, accession: str, date: str) -> None:
        archive.store(
            dicom_bytes(
                pixels,
                study=study,
                series=series,
                patient_name="E2E^Synthetic",
                patient_id=PATIENT_ID,
                accession=accession,
                study_date=date,
                description="Synthetic study",
            )
        )

    new_study, new_series = generate_uid(), generate_uid()
    studies = {NEW_ACCESSION: new_study}
    for day, folder in enumerate(sorted(cases.iterdir()), start=1):
        study, series = generate_uid(), generate_uid()
        files = sorted(folder.iterdir())
        for number, path in enumerate(files):
            pixels = np.asarray(Image.open(path))
            if number == SHOTS:  # the class's new case
                store(pixels, study=new_study, series=new_series, accession=NEW_ACCESSION,
                      date="20240110")  # fmt: skip
            elif day == 1:  # the first class: one study per case, oldest of all
                accession = f"E2E-{folder.name}-{number}"
                studies[accession] = generate_uid()
                store(pixels, study=studies[accession], series=generate_uid(),
                      accession=accession, date=f"202201{number + 1:02d}")  # fmt: skip
            else:
                studies[f"E2E-{folder.name}"] = study
                store(pixels, study=study, series=series, accession=f"E2E-{folder.name}",
                      date=f"202401{day:02d}")  # fmt: skip
    rng = np.random.default_rng(0)
    for number in range(FILLERS):
        store(rng.integers(0, 255, (16, 16)).astype(np.uint8), study=generate_uid(),
              series=generate_uid(), accession=f"E2E-OLD-{number:02d}",
              date=f"2023{number // 28 + 1:02d}{number % 28 + 1:02d}")  # fmt: skip
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
        wait_until_up(f"{url}/_stcore/health", process, root / "server.log")
        yield url
    finally:
        stop_process(process)
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


def test_clinician_from_archive_to_export_then_admin_unlocks(
    server, site, archive, orthanc_archive, page, tmp_path
):
    try:
        _walkthrough(server, site, archive, orthanc_archive, page, tmp_path)
    except BaseException:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)  # to see why
        raise


def _walkthrough(server, site, archive, orthanc_archive, page, tmp_path) -> None:
    expect = playwright_api.expect
    page.goto(server)
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    shot(page, tmp_path, "dashboard-login", part=page.get_by_test_id("stMain"))
    log_in(page, server, ROLE_CLINICIAN)
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_text(f"Signed in as {ROLE_CLINICIAN} ({ROLE_CLINICIAN})")).to_be_visible()
    # The session is in an HttpOnly, Secure, SameSite=Strict cookie, never in the address bar.
    (cookie,) = [c for c in page.context.cookies(server) if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert cookie["value"] not in page.url and "session" not in page.url
    expect(page.get_by_text("stay on this hospital's machine")).to_be_visible()
    expect_chosen(page, "Base model", "v2 global-round-2")  # the newest
    choose(page, "Base model", "v1 global-round-2")  # the clinician's choice

    # Support cases from the archive. A search over two pages of results; the first class's
    # five studies are the oldest, on the second page, pulled one by one: the class stays.
    classes = sorted(p.name for p in site["cases"].iterdir())
    first, others = classes[0], classes[1:]
    page.get_by_label("Condition", exact=True).fill("e2e lesions")
    page.get_by_label("Condition", exact=True).press("Enter")
    idle(page)
    area = page.get_by_label("Classes, one per line")
    area.fill("\n".join(classes))
    area.press("Control+Enter")
    idle(page)
    search_archive(page, patient="e2e synth")
    panel = page.get_by_test_id("stExpander").filter(has_text="From the image archive")
    expect(panel.get_by_test_id("stDataFrame")).to_have_count(1)
    found = FILLERS + SHOTS + len(others) + 1
    choose(page, "Results", f"studies {PAGE_SIZE + 1}-{found} of {found}")
    for number in range(SHOTS):
        choose(page, "Study", f"E2E-{first}-{number}")
        target = f"the cases of {first}" if number == 0 else None  # chosen once
        pull(page, panel, target=target, added=f"1 image(s) added to the cases of {first}")
        expect_chosen(page, "Add the images to", f"the cases of {first}")
    shot(page, tmp_path, "dashboard-archive", part=panel)  # two pages of results, five pulls
    # A second and a third search: each study is the new search's, and pulls without a crash.
    for name in others:
        search_archive(page, accession=f"E2E-{name}")
        expect_chosen(page, "Study", f"E2E-{name}")
        pull(page, panel, target=f"the cases of {name}", added=f"{SHOTS} image(s) added")
    # every class's thumbnails, and the viewer's one image
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes) + 1)
    expect(page.get_by_text("48x48 pixels, window")).to_be_visible()
    expect(page.get_by_text(f"E2E-{first}-0 · E2E Synthetic").first).to_be_visible()

    # A photograph among the labelled cases is named after Adapt; removed, and adapted again.
    uploader = page.get_by_test_id("stFileUploader").filter(has_text=f"Cases of {first}")
    uploader.locator('input[type="file"]').set_input_files(str(site["root"] / "portrait.jpg"))
    idle(page)
    page.get_by_role("button", name="Adapt", exact=True).click()
    expect(page.get_by_text("look unlike all the other labelled cases")).to_be_visible()
    expect(page.get_by_text("portrait.jpg").first).to_be_visible()
    uploader.get_by_test_id("stFileChipDeleteBtn").click()
    idle(page)
    page.get_by_role("button", name="Adapt", exact=True).click()
    expect(page.get_by_text("would be classified right")).to_be_visible()
    expect(page.get_by_text("look unlike all the other labelled cases")).to_have_count(0)
    expect(page.get_by_text("Intended use").first).to_be_visible()
    page.get_by_label("Save as").fill("e2e-lesions")
    page.get_by_role("button", name="Save adapter").click()
    expect(page.get_by_text("Saved as v3 e2e-lesions")).to_be_visible()
    idle(page)
    shot(page, tmp_path, "dashboard-adapt")

    # A reload keeps the login (the cookie), the base model chosen, the condition, classes and
    # pulled cases.
    page.reload()
    assert "session" not in page.url
    expect(page.get_by_role("heading", name="Adapt to a new condition")).to_be_visible()
    expect(page.get_by_label("Condition", exact=True)).to_have_value("e2e lesions")
    expect_chosen(page, "Base model", "v1 global-round-2")
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))

    # Someone else saves a newer adapter meanwhile: it must not replace the clinician's choice.
    save_someone_elses_adapter(site["root"] / "registry", version=3)

    # New cases from the archive: classify, export, write back.
    page.get_by_role("link", name="Classify cases").click()
    expect(page.get_by_role("heading", name="Classify cases")).to_be_visible()
    expect(page.get_by_text("Choose the adapter to classify with").first).to_be_visible()
    choose(page, "Adapter", "v3 e2e-lesions")
    search_archive(page, accession=NEW_ACCESSION)
    page.get_by_role("button", name="Pull the images").click()
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect(page.get_by_text("regions that support")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download results (CSV)").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(rows) == NEW_CASES
    assert {r["adapter"] for r in rows} == {"v3 e2e-lesions"}
    assert {(r["accession"], r["patient"], r["patient_id"]) for r in rows} == {
        (NEW_ACCESSION, "E2E Synthetic", PATIENT_ID)
    }
    assert all(r["case"].startswith(f"{NEW_ACCESSION} · E2E Synthetic · ") for r in rows)
    assert all(r["user"] == ROLE_CLINICIAN and "not a diagnosis" in r["notice"] for r in rows)
    page.get_by_role("button", name="Write the results to the archive").click()
    expect(page.get_by_text(f"{NEW_CASES} structured report(s) stored")).to_be_visible()
    idle(page)
    shot(page, tmp_path, "dashboard-classify")
    assert reports_in(orthanc_archive, archive[NEW_ACCESSION]) == NEW_CASES

    # Another page and back: the work and the choices are still there.
    page.get_by_role("link", name="Adapt to a new condition").click()
    expect(page.get_by_label("Condition", exact=True)).to_have_value("e2e lesions")
    expect_chosen(page, "Base model", "v1 global-round-2")
    # (no viewer: the pulls were made before the reload, in the browser session before it)
    expect(page.locator('[data-testid="stImage"]')).to_have_count(SHOTS * len(classes))
    page.get_by_role("link", name="Classify cases").click()
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect_chosen(page, "Adapter", "v3 e2e-lesions")
    expect(page.get_by_text(f"{NEW_CASES} structured report(s) stored")).to_be_visible()
    # A reload on this page: the same adapter, not the newer one.
    page.reload()
    expect(page.get_by_role("heading", name="Predictions")).to_be_visible()
    expect_chosen(page, "Adapter", "v3 e2e-lesions")
    # The study pulled again brings its images, not the reports written back into it.
    page.get_by_role("button", name="Clear kept cases").click()
    idle(page)
    search_archive(page, accession=NEW_ACCESSION)
    page.get_by_role("button", name="Pull the images").click()
    expect(page.get_by_text(f"{NEW_CASES} image(s) added to the new cases")).to_be_visible()

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    page.reload()  # signed out for good: the cookie left in the browser opens nothing
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    log_in(page, server, ROLE_ADMIN)
    expect(page.get_by_role("heading", name="Privacy budgets")).to_be_visible()
    expect(page.get_by_role("heading", name="Site hospital-a")).to_be_visible()
    expect(page.get_by_text("Refusals (1)")).to_be_visible()
    page.get_by_role("button", name="Verify the record").click()
    expect(page.get_by_text("Record intact: all 4 entries")).to_be_visible()
    idle(page)
    shot(page, tmp_path, "dashboard-privacy")

    # The clinician's classification is in the audit log (a table, so: not the empty notice).
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("heading", name="Audit log")).to_be_visible()
    expect(page.locator('[data-testid="stDataFrame"]')).to_have_count(1)
    expect(page.get_by_text("Nothing recorded yet")).to_have_count(0)
    idle(page)
    shot(page, tmp_path, "dashboard-audit", part=page.get_by_test_id("stMain"))

    # The account a stranger throttled is unlocked in the browser.
    page.get_by_role("link", name="Users").click()
    expect(page.get_by_role("heading", name="Users")).to_be_visible()
    choose(page, "Account", THROTTLED)
    page.get_by_role("button", name="Unlock").click()
    expect(page.get_by_text(f"{THROTTLED} may log in again from every computer")).to_be_visible()
    users = UserStore(site["root"] / "users.sqlite", kdf_n=TEST_KDF_N)
    assert users.throttled_clients(THROTTLED) == 0

    # The patient's name and ID were on the clinician's screen, never in the server's log.
    log = (site["root"] / "server.log").read_text().lower()
    assert "synthetic" not in log and PATIENT_ID.lower() not in log
    idle(page)
    shot(page, tmp_path, "dashboard-users", part=page.get_by_test_id("stMain"))
