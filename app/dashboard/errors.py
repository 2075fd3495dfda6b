"""Typed errors of the dashboard. Every message says what was wrong and what to do."""

from __future__ import annotations

import re

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


class AdaptationCancelled(DashboardError):
    """The clinician pressed Cancel: raised inside a running adaptation to unwind it before any
    result exists (app.dashboard.jobs)."""


# An exception class name as Python prints it ("UnidentifiedImageError: ", "KeyError",
# "sqlite3.OperationalError: "), which lower layers sometimes quote in their messages.
_CLASS_NAME = re.compile(
    r"\b(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Warning|Interrupt|Exit)\b(?::\s*)?"
)
TRACEBACK = "Traceback (most recent call last)"
NO_DETAILS = "something went wrong; the details are in the dashboard's log: tell IT if it recurs"


def user_message(error: BaseException | str) -> str:
    """What a user is shown for ``error``: its message, without any exception class name or
    traceback (those go to the log only). Every message the pages show passes through here."""
    text = str(error)
    if TRACEBACK in text:
        text = text.split(TRACEBACK, 1)[0]
    text = _CLASS_NAME.sub("", text).strip(" :")
    return text or NO_DETAILS


def unexpected_failure(what: str) -> str:
    """The message for a bug (an exception no layer raised on purpose) while doing ``what``."""
    return (
        f"The {what} failed unexpectedly and nothing was changed. Try again; if it fails again, "
        "tell IT (the details are in the dashboard's log)."
    )
