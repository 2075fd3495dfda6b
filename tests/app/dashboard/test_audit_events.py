"""The audit log has one row per user action (issue 24, item 13): a pull that adds cases records
the new cases only, and account events are recorded: login, failed login, throttling, logout and
what administrators change."""

from __future__ import annotations

import sqlite3

from app.dashboard import provenance
from app.dashboard.auth import MAX_FAILURES, ROLE_ADMIN, ROLE_CLINICIAN
from app.dashboard.provenance import AuditLog
from app.dashboard.ui import TOKEN_KEY
from models.registry import Registry
from tests.app.dashboard.conftest import PASSWORD, texts
from tests.app.dashboard.pages import adapt_page_with_cases, login, reload, upload


def test_cases_added_to_a_batch_are_recorded_once(registry, make_app, case_images, env) -> None:
    at, classes = adapt_page_with_cases(make_app, case_images, shots=2)
    at.button(key="adapt_run").click().run()
    at.switch_page("screens/classify.py").run()
    new = [(f"n{i}.png", case_images[c][-1]) for i, c in enumerate(classes)]
    upload(at, "classify_files", new[:2])
    upload(at, "classify_files", new)  # one more case, as a second pull adds one
    at.run()  # a rerun (another case to explain, a download) is not a classification
    rows = [e for e in AuditLog(env["users"]).entries() if e.action == provenance.ACTION_CLASSIFY]
    assert [r.cases for r in rows] == [1, 2]  # newest first: the added case, then the first two
    assert not set(rows[0].case_digests) & set(rows[1].case_digests)


def _events(env) -> list[tuple[str, str, str]]:
    return [(e.user, e.action, e.detail) for e in reversed(AuditLog(env["users"]).entries())]


def test_account_events_are_recorded(store, registry, make_app, env, monkeypatch) -> None:
    for _ in range(MAX_FAILURES):
        login(monkeypatch, ROLE_CLINICIAN, "not the password")
    login(monkeypatch, ROLE_CLINICIAN, PASSWORD)  # refused: this computer must wait now
    events = _events(env)
    failed = [e for e in events if e[1] == provenance.ACTION_LOGIN_FAILED]
    assert len(failed) == MAX_FAILURES + 1 and all(e[0] == ROLE_CLINICIAN for e in failed)
    assert "wrong username or password" in failed[0][2] and "refused, throttled" in failed[-1][2]
    assert [e[1] for e in events].count(provenance.ACTION_LOCKED) == 1

    admin = login(monkeypatch, ROLE_ADMIN, PASSWORD)
    admin.switch_page("screens/users.py").run()
    admin.selectbox(key="users_pick").set_value(ROLE_CLINICIAN).run()
    admin.button(key="users_unlock").click().run()
    admin.button(key="users_disable").click().run()
    admin.switch_page("screens/account.py").run()
    admin.sidebar.button(key="signout").click().run()
    assert _events(env)[len(events) :] == [
        (ROLE_ADMIN, provenance.ACTION_LOGIN, "local, from unknown"),
        (ROLE_ADMIN, provenance.ACTION_UNLOCKED, f"account {ROLE_CLINICIAN}"),
        (ROLE_ADMIN, provenance.ACTION_DISABLED, f"account {ROLE_CLINICIAN}"),
        (ROLE_ADMIN, provenance.ACTION_LOGOUT, ""),
    ]


def test_an_audit_log_from_before_account_events_still_opens(env) -> None:
    with sqlite3.connect(env["users"]) as conn:  # the table as it was, with one row
        conn.execute(provenance._SCHEMA.replace(",\n    detail TEXT NOT NULL DEFAULT ''", ""))
        conn.execute(
            "INSERT INTO audit (time, user, action, adapter, adapter_version, base_model, "
            "condition, cases, case_digests, outcomes) VALUES "
            "('t', 'ana', 'classify', 'v2 a', 2, 'v1', 'c', 0, '[]', '{}')"
        )
    log = AuditLog(env["users"])
    log.record_event(user="ana", action=provenance.ACTION_LOGOUT)
    assert [(e.action, e.detail) for e in log.entries()] == [("logout", ""), ("classify", "")]


def test_a_reload_does_not_record_the_same_classification_again(
    registry, make_app, case_images, env, monkeypatch
) -> None:
    at = login(monkeypatch, ROLE_CLINICIAN, PASSWORD)
    token = at.session_state[TOKEN_KEY]
    names = sorted(case_images)
    at.text_input(key="adapt_condition").input("lesions")
    at.text_area(key="adapt_classes").input("\n".join(names)).run()
    for i, name in enumerate(names):
        upload(at, f"adapt_files_{i}", [(f"{name}_{j}.png", case_images[name][j]) for j in (0, 1)])
    at.button(key="adapt_run").click().run()
    at.text_input(key="adapt_name").input("lesions-1")
    next(b for b in at.button if b.label == "Save adapter").click().run()
    at.switch_page("screens/classify.py").run()
    (saved,) = Registry.open(env["registry"]).entries(kind="adapter")
    at.selectbox(key="classify_adapter").set_value(saved.id).run()
    upload(at, "classify_files", [(f"n{i}.png", case_images[c][-1]) for i, c in enumerate(names)])
    assert at.dataframe, texts(at, "info")

    again = reload(monkeypatch, token)  # a browser reload: a new session, the same login and draft
    again.switch_page("screens/classify.py").run()
    assert not again.exception and again.dataframe  # classified again, with the same adapter
    rows = [e for e in AuditLog(env["users"]).entries() if e.action == provenance.ACTION_CLASSIFY]
    assert [r.cases for r in rows] == [len(names)]  # recorded once
