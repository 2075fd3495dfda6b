"""Helpers shared by several test modules."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.views import ADAPT_JOB_KEY
from app.dashboard.web_session import SESSION_COOKIE
from tests.app.dashboard.signin_helpers import browser_with, post_login, route_client

SHOTS = 4


def named_classes(at: AppTest, names: list[str], condition: str = "lesions") -> AppTest:
    at.text_input(key="adapt_condition").input(condition)
    return at.text_area(key="adapt_classes").input("\n".join(names)).run()


def upload(at: AppTest, key: str, files: list[tuple[str, bytes]]) -> AppTest:
    at.file_uploader(key=key).set_value([(name, data, "image/png") for name, data in files])
    return at.run()


def finish_adapting(at: AppTest) -> AppTest:
    """Wait for an adaptation running in the background (finetune) to end, as the page's
    progress bar does, then rerun the page to show how it ended."""
    if ADAPT_JOB_KEY in at.session_state:
        at.session_state[ADAPT_JOB_KEY].wait(120)
        at.run()
    return at


def adapt_page_with_cases(make_app, case_images, shots: int = SHOTS) -> tuple[AppTest, list[str]]:
    at = make_app(ROLE_CLINICIAN).run()
    classes = sorted(case_images)
    named_classes(at, classes)
    for i, name in enumerate(classes):
        at.file_uploader(key=f"adapt_files_{i}").set_value(
            [
                (f"{name}_{j}.png", data, "image/png")
                for j, data in enumerate(case_images[name][:shots])
            ]
        )
    return at.run(), classes


def captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def search_archive(at, *, key: str, **fields: str) -> None:
    for name, value in fields.items():
        at.text_input(key=f"{key}_{name}").input(value)
    next(b for b in at.button if b.label == "Search the archive").click().run()


def study_box(at, *, key: str):
    """The Study list of the panel's latest search (a new widget per search and page)."""
    return next(s for s in at.selectbox if s.label == "Study" and s.key.startswith(key))


def pull_from_archive(at, *, key: str, target: str | None = None) -> None:
    if target is not None:
        at.selectbox(key=f"{key}_target").set_value(target)
    at.button(key=f"{key}_pull").click().run()


def login(monkeypatch: pytest.MonkeyPatch, username: str, password: str) -> AppTest:
    """Sign in through the route, then open the dashboard with its cookie."""
    response = post_login(route_client(client="127.0.0.1"), username, password)
    return browser_with(monkeypatch, dict(response.cookies)).run()


def reload(monkeypatch: pytest.MonkeyPatch, token: str) -> AppTest:
    """What a browser reload does: a new session, with only the session cookie kept."""
    return browser_with(monkeypatch, {SESSION_COOKIE: token}).run()
