"""The hospital's sign-in: OpenID Connect through ``st.login``, configured by one TOML file
(``fedfew dashboard --oidc CONFIG``).

The file names the identity provider (its issuer), this dashboard's client (id, secret, redirect
URI) and which ID-token claim (groups or roles) maps to which dashboard role. It is read once, at
start; :func:`streamlit_secrets` turns it into Streamlit's ``[auth]`` secrets, handed to the
server in memory (app/dashboard/server.py), so no secret is ever written to a file by fedfew. A
fresh cookie secret is drawn at every start: restarting the dashboard signs everyone out.

Example::

    issuer = "https://login.hospital.example/realms/clinic"
    client_id = "fedfew-dashboard"
    client_secret_file = "/etc/fedfew/oidc-client-secret"   # or client_secret = "..."
    redirect_uri = "https://fedfew.hospital.example:8501/oauth2callback"
    role_claim = "groups"
    scope = "openid email profile"
    ca_file = "/etc/fedfew/hospital-ca.pem"                 # optional
    [roles]
    "fedfew-clinicians" = "clinician"
    "fedfew-admins" = "administrator"
    "fedfew-it" = "it"
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.dashboard.auth import ROLES
from app.dashboard.errors import SettingsError

SECRETS_SECTION = "fedfew_oidc"  # st.secrets[...]: role_claim and roles (read by ui.py)
DISCOVERY_PATH = "/.well-known/openid-configuration"  # OpenID Connect Discovery 1.0, section 4
CALLBACK_PATH = "/oauth2callback"  # Streamlit's fixed callback route
COOKIE_SECRET_BYTES = 32
# Ask for the password at every dashboard sign-in (OIDC Core 3.1.2.1 prompt=login): on a shared
# ward computer the provider's own session may still belong to the previous clinician.
DEFAULT_PROMPT = "login"
DEFAULT_SCOPE = "openid email profile"
DEFAULT_ROLE_CLAIM = "roles"
_KEYS = frozenset(
    {
        "issuer",
        "client_id",
        "client_secret",
        "client_secret_file",
        "redirect_uri",
        "role_claim",
        "roles",
        "scope",
        "prompt",
        "ca_file",
    }
)


@dataclass(frozen=True)
class OidcConfig:
    """One identity provider and this dashboard's client at it."""

    issuer: str
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    roles: Mapping[str, str]  # claim value -> dashboard role
    role_claim: str = DEFAULT_ROLE_CLAIM
    scope: str = DEFAULT_SCOPE
    prompt: str = DEFAULT_PROMPT  # "": the provider decides
    ca_file: Path | None = None  # the provider's CA when the system does not trust it

    def __post_init__(self) -> None:
        for name in ("issuer", "redirect_uri"):
            url = urlsplit(getattr(self, name))
            if url.scheme != "https" or not url.netloc:
                raise SettingsError(
                    f"OIDC {name} must be an https:// URL, got {getattr(self, name)!r}"
                )
        if urlsplit(self.redirect_uri).path != CALLBACK_PATH:
            raise SettingsError(
                f"OIDC redirect_uri must end in {CALLBACK_PATH} (Streamlit's callback), got "
                f"{self.redirect_uri!r}"
            )
        if not self.client_id or not self.client_secret:
            raise SettingsError(
                "OIDC client_id and client_secret (or client_secret_file) are needed"
            )
        if not self.roles:
            raise SettingsError(
                "OIDC [roles] must map at least one claim value to a role, e.g. "
                '"fedfew-clinicians" = "clinician"'
            )
        for value, role in self.roles.items():
            if role not in ROLES:
                raise SettingsError(
                    f"OIDC [roles] {value!r} = {role!r}: the role must be one of {', '.join(ROLES)}"
                )
        if self.ca_file is not None and not self.ca_file.is_file():
            raise SettingsError(f"OIDC ca_file {self.ca_file} does not exist")

    @property
    def server_metadata_url(self) -> str:
        """The provider's discovery document."""
        return self.issuer.rstrip("/") + DISCOVERY_PATH


def load_oidc_config(path: Path) -> OidcConfig:
    """Read and check an OIDC config file.

    Raises:
        SettingsError: unreadable file, unknown or missing key, or a bad value (named).
    """
    try:
        raw: dict[str, Any] = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"cannot read the OIDC config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"the OIDC config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SettingsError(
            f"unknown key(s) {', '.join(unknown)} in the OIDC config {path}; known: "
            f"{', '.join(sorted(_KEYS))}"
        )
    missing = sorted({"issuer", "client_id", "redirect_uri", "roles"} - set(raw))
    if missing:
        raise SettingsError(f"the OIDC config {path} lacks {', '.join(missing)}")
    secret = raw.get("client_secret")
    if secret is None and "client_secret_file" in raw:
        secret_path = Path(raw["client_secret_file"]).expanduser()
        try:
            secret = secret_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(
                f"cannot read the OIDC client_secret_file {secret_path}: {exc.strerror}"
            ) from None
    if not isinstance(raw["roles"], dict):
        raise SettingsError(f"[roles] in {path} must be a table of claim value = role")
    ca_file = raw.get("ca_file")
    return OidcConfig(
        issuer=str(raw["issuer"]),
        client_id=str(raw["client_id"]),
        client_secret=str(secret or ""),
        redirect_uri=str(raw["redirect_uri"]),
        roles={str(k): str(v) for k, v in raw["roles"].items()},
        role_claim=str(raw.get("role_claim", DEFAULT_ROLE_CLAIM)),
        scope=str(raw.get("scope", DEFAULT_SCOPE)),
        prompt=str(raw.get("prompt", DEFAULT_PROMPT)),
        ca_file=Path(ca_file).expanduser() if ca_file else None,
    )


def streamlit_secrets(config: OidcConfig, *, cookie_secret: str | None = None) -> dict[str, Any]:
    """Streamlit's ``[auth]`` section for ``config`` (one default provider) and the dashboard's
    own ``[fedfew_oidc]`` section (the role mapping)."""
    client_kwargs = {"scope": config.scope}
    if config.prompt:
        client_kwargs["prompt"] = config.prompt
    return {
        "auth": {
            "redirect_uri": config.redirect_uri,
            "cookie_secret": cookie_secret or secrets.token_hex(COOKIE_SECRET_BYTES),
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "server_metadata_url": config.server_metadata_url,
            "client_kwargs": client_kwargs,
        },
        SECRETS_SECTION: {"role_claim": config.role_claim, "roles": dict(config.roles)},
    }
