"""Fixtures of the dashboard tests: a tiny model in a temporary registry, ledgers, accounts,
synthetic case files, and an AppTest of the entry file wired to them through the environment."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.dashboard import settings
from app.dashboard.auth import ROLES, Session, UserStore
from app.dashboard.ui import SESSION_KEY
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.registry import Registry
from models.synthetic import synthetic_arrays
from privacy.errors import BudgetExhaustedError
from privacy.ledger import ChargeRequest, Ledger
from privacy.site_report import SitePrivacyReport


@pytest.fixture(autouse=True)
def _restore_main_module() -> Iterator[None]:
    """Streamlit's script runner installs the page script as ``__main__`` and leaves it there;
    later tests that start processes with spawn/forkserver would re-run that page in the child."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


ENTRY = Path(__file__).resolve().parents[3] / "app" / "dashboard" / "main.py"
PASSWORD = "correct horse battery"
TEST_KDF_N = 2**10  # cheap scrypt: the tests check the logic, not the cost
TIMEOUT = 60  # seconds per AppTest run (the first one imports torch and MONAI)
SIZE = 32
CLASSES = 3
PER_CLASS = 10


def site_report(site: str, epsilon: float, *, head_check: str = "unsigned") -> dict:
    """A site's privacy report as the federation records it (privacy.site_report)."""
    return SitePrivacyReport(
        site=site,
        weight=1.0,
        round=2,
        replayed=False,
        ledger_entry=2,
        epsilon_round=epsilon / 2,
        epsilon_spent=epsilon,
        epsilon_cap=8.0,
        delta=1e-5,
        accountant="rdp",
        mechanism="dp-episodic",
        noise_multiplier=2.0,
        sample_rate=0.1,
        steps=2,
        head_hash="0" * 64,
        head_entries=2,
        head_check=head_check,
    ).to_dict()


# Two sites' reports in the federation's one report format.
DEFAULT_PRIVACY = {
    "site-a": site_report("site-a", 1.25, head_check="registered-key"),
    "site-b": site_report("site-b", 2.5),
}


def photograph_bytes() -> bytes:
    """A portrait photograph (matplotlib's sample ``grace_hopper.jpg``, a dependency): what a
    clinician might pick by mistake as a labelled case."""
    import matplotlib

    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an (H, W) or (H, W, 3) uint8 array as PNG."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="session")
def case_images() -> dict[str, list[bytes]]:
    """PNG files of 3 synthetic classes (not real patients), 10 per class, 48 px."""
    arrays = synthetic_arrays(n_classes=CLASSES, per_class=PER_CLASS, size=48, seed=3)
    files: dict[str, list[bytes]] = {}
    for image, label in zip(arrays["images"], arrays["labels"], strict=True):
        files.setdefault(str(arrays["classes"][label]), []).append(png_bytes(image))
    return files


def write_tiny_model(registry: Path, *, privacy: dict | None = None) -> int:
    """Publish a small random Conv-4 (32 px, width 8) as a global version; return its id."""
    torch.manual_seed(0)
    backbone = BackboneConfig(image_size=SIZE, width=8)
    model = build_backbone(backbone)

    def write(folder: Path) -> None:
        save_model_dir(
            folder,
            model,
            backbone=backbone,
            pipeline=PipelineConfig(image_size=SIZE),
            meta=MetaConfig(),
        )

    entry = Registry.open(registry, create=True).publish(
        write,
        kind="global",
        name="global-round-2",
        metrics={"accuracy": 0.61, "loss": 1.2},
        privacy=DEFAULT_PRIVACY if privacy is None else privacy,
        info={"federation": "test", "round": 2},
    )
    return entry.id


def charge_request(round_no: int, *, steps: int = 50) -> ChargeRequest:
    """A DP-episodic charge as a federation node would make it."""
    return ChargeRequest(
        run_id=f"run-{round_no}",
        round=round_no,
        mechanism="dp-episodic",
        noise_multiplier=4.0,
        sensitivity_factor=2.0,
        sample_rate=0.05,
        steps=steps,
        requester="node-a",
    )


def write_ledger(path: Path, *, site: str, charges: int, refusal: bool = False) -> Ledger:
    """A ledger with ``charges`` charges (one per round), then optionally a refused one."""
    ledger = Ledger.create(path, site=site, cap_epsilon=8.0, delta=1e-5)
    for r in range(charges):
        ledger.charge(charge_request(r))
    if refusal:
        with pytest.raises(BudgetExhaustedError):
            ledger.charge(charge_request(charges, steps=1_000_000))
    return ledger


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point every dashboard setting at tmp_path (no registry, no ledger, no account yet)."""
    paths = {
        "registry": tmp_path / "registry",
        "users": tmp_path / "users.sqlite",
        "status": tmp_path / "federation" / "status.json",
    }
    for var in settings.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(settings.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.setenv(settings.ENV_REGISTRY, str(paths["registry"]))
    monkeypatch.setenv(settings.ENV_USERS_DB, str(paths["users"]))
    monkeypatch.setenv(settings.ENV_FEDERATION_STATUS, str(paths["status"]))
    monkeypatch.setenv(settings.ENV_DATA_ROOTS, str(tmp_path))  # the Prepare page reads here
    return paths


@pytest.fixture
def store(env: dict[str, Path]) -> UserStore:
    """The account database with one user per role (name = role)."""
    users = UserStore(env["users"], kdf_n=TEST_KDF_N)
    for role in ROLES:
        users.add(role, PASSWORD, role=role)
    return users


@pytest.fixture
def registry(env: dict[str, Path]) -> int:
    """A registry holding one tiny global model; returns its version id."""
    return write_tiny_model(env["registry"])


@pytest.fixture
def make_app(store: UserStore) -> Iterator[Callable[..., AppTest]]:
    """Build an AppTest of the entry file, logged in with the given roles (or logged out)."""

    def make(*roles: str, hours: float = 8.0) -> AppTest:
        at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
        if roles:
            at.session_state[SESSION_KEY] = Session(
                username=roles[0], roles=roles, expires_at=time.time() + hours * 3600
            )
        return at

    yield make


def texts(at: AppTest, kind: str) -> str:
    """All values of one element kind (error, warning, info, success, markdown...) joined."""
    return "\n".join(str(e.value) for e in getattr(at, kind))


# The image archive (a real Orthanc on 127.0.0.1), shared with the browser test (tests/e2e).
from tests.app.dashboard.orthanc import orthanc_archive, studies  # noqa: E402, F401
