"""Checks shared by `fedfew server` and `fedfew node`: addresses, the CA, a site's data, and
the small TOML/path helpers of the deployment files.

Every check raises a typed error whose message names the file, the value and the fix: the
runbook (`deploy/README.md`) quotes them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509

from federation.deploy.certificates import check_certificate, check_validity
from federation.errors import CertificateError, ProvisioningError
from models.errors import DataError, UnreadableImageError
from models.readers import load_dataset, load_manifest

LOG_DIR = "logs"
FLOWER_HOME_DIR = "flwr-home"  # Flower's own files (installed FABs); must be writable
CONNECTION = "fedfew"  # the SuperLink connection name in $FLWR_HOME/config.toml
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_SHOWN_ERRORS = 5


@dataclass(frozen=True)
class DataSummary:
    """What a site's training set holds.

    Attributes:
        path: The set (.npz, folder of class subfolders, or CSV manifest).
        counts: Images per class name.
        patients: Distinct patients (images without a patient id count as their own).
    """

    path: Path
    counts: dict[str, int]
    patients: int

    @property
    def total(self) -> int:
        """Number of images."""
        return sum(self.counts.values())


def check_address(address: str, *, what: str = "--superlink") -> str:
    """Check a `host:port` address and return it.

    Raises:
        ProvisioningError: It is not `host:port` with a port in 1-65535.
    """
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise ProvisioningError(
            f"{what} {address!r} is not HOST:PORT: give the SuperLink's name and port as its "
            "certificate names it, e.g. fedfew.example.org:8000 or 127.0.0.1:8000"
        )
    return address


def check_ca_certificate(path: Path, *, now: dt.datetime | None = None) -> x509.Certificate:
    """Check that `path` is the federation's CA: a PEM CA certificate, self-signed, valid now.

    Raises:
        CertificateError: missing, not PEM, expired, not yet valid, not a CA, or not
            self-signed; the message says what to ask the federation operator for.
    """
    path = Path(path)
    if not path.is_file():
        raise CertificateError(
            f"CA certificate {path} does not exist: copy the federation's ca.crt (made by "
            "`fedfew server init`, in its certs/ folder) to this machine and give its path"
        )
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertificateError(
            f"{path} is not a PEM certificate: give the federation's ca.crt, the file that "
            "starts with '-----BEGIN CERTIFICATE-----'"
        ) from err
    moment = now or dt.datetime.now(dt.UTC)
    check_validity(
        certificate,
        path,
        now=moment,
        what="CA certificate",
        renew="ask the federation operator for the current ca.crt (after a new `fedfew server "
        "init`) and rerun `fedfew node init`",
    )
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(
            f"{path} is not a CA certificate (subject {certificate.subject.rfc4514_string()}): "
            "give the federation's ca.crt, not the SuperLink's server.pem"
        )
    return check_certificate(path, ca=path, now=moment)


def inspect_data(path: Path) -> DataSummary:
    """Load a site's training set once: count images per class, reject unreadable files.

    Args:
        path: A `.npz`, a folder with one subfolder per class, or a CSV manifest.

    Returns:
        The counts.

    Raises:
        DataError: The path is missing, unreadable, empty, holds unreadable images (listed,
            the first few) or fewer than two classes. The ClientApp would refuse the same set
            at its first round, so this is found at provisioning time.
    """
    path = Path(path).absolute()
    formats = "an .npz, a folder with one subfolder of images per class, or a CSV manifest"
    if not path.exists():
        raise DataError(f"data path {path} does not exist: give the site's training set, {formats}")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise DataError(
            f"data path {path} is not readable by this user (uid {os.getuid()}): grant read "
            "access to the user the node runs as (e.g. `setfacl -R -m u:fedfew:rX PATH`)"
        )
    if (path.is_dir() and not any(path.iterdir())) or (path.is_file() and not path.stat().st_size):
        raise DataError(
            f"data path {path} is empty: copy the site's training set there ({formats})"
        )
    errors: list[UnreadableImageError] = []
    try:
        if path.suffix.lower() == ".npz":
            image_set = load_dataset(path)
        else:
            image_set, errors = load_manifest(path)
    except DataError as err:
        raise DataError(f"data path {path} cannot be used: {err}") from err
    except OSError as err:  # e.g. a file the user may list but not read
        raise DataError(
            f"data path {path} cannot be read ({type(err).__name__}: {err}): give {formats}"
        ) from err
    if errors:
        shown = "; ".join(str(e) for e in errors[:_SHOWN_ERRORS])
        raise DataError(
            f"data path {path}: {len(errors)} of {len(errors) + len(image_set)} images are "
            f"unreadable ({shown}): fix or remove them, then run this again (training refuses "
            "a set with unreadable images)"
        )
    labels = np.asarray(image_set.labels)
    counts = {name: int((labels == i).sum()) for i, name in enumerate(image_set.classes)}
    if len(counts) < 2:
        raise DataError(
            f"data path {path} holds {len(counts)} class(es) {sorted(counts)}: few-shot "
            "episodes need at least 2 classes"
        )
    return DataSummary(path=path, counts=counts, patients=len(set(image_set.patients.tolist())))


def check_site_name(site: str) -> str:
    """Return `site` if it is a usable site and key name.

    Raises:
        ProvisioningError: empty or with characters other than letters, digits, '.', '_', '-'.
    """
    if not SITE_NAME.fullmatch(site):
        raise ProvisioningError(
            f"site name {site!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' or '-', e.g. hospital-a"
        )
    return site


def read_toml(path: Path, *, made_by: str) -> dict[str, Any]:
    if not path.is_file():
        raise ProvisioningError(f"{path} does not exist: create it with `{made_by}`")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ProvisioningError(f"{path} is not readable TOML ({err}): fix or recreate it") from err


def relative_path(path: Path, folder: Path) -> str:
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(folder))
    except ValueError:
        return str(absolute)


def resolve_path(value: object, folder: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else folder / path


def flower_program(name: str) -> str:
    """The path of a Flower console script next to this interpreter, else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: `FLWR_HOME`, no telemetry or update check, and this
    interpreter's folder first on `PATH` (Flower starts its helpers by name)."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # hospital networks: no calls home
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
