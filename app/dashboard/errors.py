"""Typed errors of the dashboard. Every message says what was wrong and what to do."""

from __future__ import annotations

from models.errors import FedfewError


class DashboardError(FedfewError):
    """Base class of every dashboard error raised on purpose (shown as a message, never a trace)."""


class SettingsError(DashboardError):
    """A dashboard setting (environment variable or command-line option) is malformed."""


class AuthError(DashboardError):
    """A login failed: unknown user or wrong password (the message does not say which)."""


class RateLimitedError(AuthError):
    """Too many failed logins for one account from this computer; ``retry_after_s`` says when
    to try again."""

    def __init__(self, username: str, retry_after_s: float) -> None:
        wait = (
            f"{max(1, round(retry_after_s))} seconds"
            if retry_after_s < 90
            else f"about {round(retry_after_s / 60)} minutes"
        )
        super().__init__(
            f"too many failed logins for {username!r} from this computer: try again in {wait}, "
            "or ask an administrator to unlock the account (page Users)"
        )
        self.username = username
        self.retry_after_s = retry_after_s


class AccountError(DashboardError):
    """An account cannot be created or removed (bad role, duplicate, weak password)."""


class CaseError(DashboardError):
    """The cases given for adaptation or classification cannot be used as they are."""


class SourceError(DashboardError):
    """The unlabelled studies named for preparing a model (folder, CSV manifest, npz) cannot be
    used: missing, outside the allowed folders, or of an unknown kind."""
