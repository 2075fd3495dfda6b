"""Administrator (privacy budgets) and IT (federation) pages through AppTest, and the OIDC login
branch with roles from a claim."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.dashboard import budgets, settings, signin
from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, ROLE_IT, ROLES
from app.dashboard.errors import AuthError
from app.dashboard.provenance import ACTION_CLASSIFY, AuditLog, Provenance
from app.dashboard.ui import SESSION_KEY
from tests.app.dashboard.conftest import ENTRY, PASSWORD, TIMEOUT, texts, write_ledger


@pytest.fixture
def ledgers(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    folder = env["registry"].parent
    busy = write_ledger(folder / "a.db", site="hospital-a", charges=3, refusal=True).path
    empty = write_ledger(folder / "b.db", site="hospital-b", charges=0).path
    missing = folder / "missing.db"
    monkeypatch.setenv(settings.ENV_LEDGERS, f"{busy},{empty},{missing}")
    return [busy, empty, missing]


def test_privacy_page_shows_each_site(store, ledgers, make_app) -> None:
    at = make_app(ROLE_ADMIN).run()
    assert not at.exception
    assert at.title[0].value == "Privacy budgets"
    assert [s.value for s in at.subheader][1:] == ["Site hospital-a", "Site hospital-b"]
    assert "no ledger at" in texts(at, "error") and "missing.db" in texts(at, "error")
    caps = [m.value for m in at.metric if m.label == "Cap (epsilon)"]
    assert caps == ["8", "8"]
    charges = at.dataframe[0].value
    assert list(charges["round"]) == [0, 1, 2]
    assert set(charges["mechanism"]) == {"dp-episodic"} and "noise_multiplier" in charges
    refusals = at.dataframe[1].value
    assert list(refusals["steps"]) == [1_000_000]
    assert "Empty ledger" in texts(at, "info")
    assert len(at.get("vega_lite_chart")) == 1  # epsilon over rounds
    labels = {b.label for b in at.download_button}
    assert labels == {"Budget report (HTML)", "Budget report (CSV)"}


def test_privacy_page_draws_caps_forecasts_rounds_left_and_alerts_at_the_threshold(
    store, ledgers, make_app
) -> None:
    busy = budgets.read_budget(ledgers[0])
    assert isinstance(busy, budgets.SiteBudget)
    latest = busy.charges[-1].epsilon_after - busy.charges[-1].epsilon_before
    expected = int(busy.remaining // latest)

    caps = budgets.cap_rows([busy])
    at = make_app(ROLE_ADMIN).run()
    forecasts = [m.value for m in at.metric if m.label == "Rounds left (forecast)"]
    quiet = not at.warning
    at.number_input(key="privacy_alert").set_value(10).run()

    assert {(r["site"], r["epsilon"]) for r in caps} == {("hospital-a cap", busy.cap)}
    assert [r["round"] for r in caps] == [0, 2] and forecasts == [str(expected), "-"]
    assert quiet and 100 * busy.fraction_spent >= 10
    assert f"about {expected} more round(s)" in texts(at, "warning")
    assert "hospital-b" not in texts(at, "warning")  # nothing spent: no alert


def test_verify_button_checks_the_hash_chain(store, ledgers, make_app) -> None:
    at = make_app(ROLE_ADMIN).run()
    at.button(key="privacy_verify_0").click().run()
    assert not at.exception
    assert "Record intact: all 4 entries" in texts(at, "success")


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        ("UPDATE entries SET epsilon_after = epsilon_after / 2", "record 1 changed"),
        ("UPDATE meta SET cap_epsilon = cap_epsilon * 100", "its settings (cap, site or delta)"),
    ],
)
def test_a_tampered_ledger_shows_a_warning_and_no_numbers(
    store, ledgers, make_app, edit: str, where: str
) -> None:
    with sqlite3.connect(ledgers[0]) as conn:  # an edit that lowers the spend or raises the cap
        conn.execute(edit)
    conn.close()

    at = make_app(ROLE_ADMIN).run()

    assert not at.exception
    errors = texts(at, "error")
    assert f"Ledger `{ledgers[0]}`" in errors
    assert "failed its integrity check" in errors and where in errors
    assert "cannot be trusted and are not shown" in errors and "restore the ledger" in errors
    # Only the intact ledger is presented: its heading, its cap, its two report buttons.
    assert [s.value for s in at.subheader][1:] == ["Site hospital-b"]
    assert [m.value for m in at.metric if m.label == "Cap (epsilon)"] == ["8"]
    assert len(at.download_button) == 2
    assert not at.dataframe  # hospital-a's charges and refusals are not listed either


def test_audit_page_lists_who_classified_what(store, env, make_app) -> None:
    log = AuditLog(env["users"])
    origin = Provenance("v2 lesions", 2, "v1 global", "ε 1.00 (1 site)", "lesions", "ana", "t1", "")
    log.record(origin, action=ACTION_CLASSIFY, case_digests=["ab" * 32], outcomes=["x"])
    other = dataclasses.replace(origin, user="bo", time="t2")
    log.record(other, action=ACTION_CLASSIFY, case_digests=["cd" * 32] * 2, outcomes=["x", "y"])
    assert [e.user for e in log.entries()] == ["bo", "ana"]  # newest first

    at = make_app(ROLE_ADMIN).run()
    at.switch_page("screens/audit.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["user"]) == ["bo", "ana"] and list(table["cases"]) == [2, 1]
    at.text_input(key="audit_user").input("ana").run()
    assert list(at.dataframe[0].value["user"]) == ["ana"]


def test_administrator_manages_accounts_in_the_browser(store, make_app) -> None:
    for _ in range(6):
        with pytest.raises(AuthError):
            store.authenticate(ROLE_CLINICIAN, "wrong password!", client="stranger")
    at = make_app(ROLE_ADMIN).run()
    at.switch_page("screens/users.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["user"]) == sorted(ROLES) and set(table["status"]) == {"active"}
    assert dict(zip(table["user"], table["throttled computers"], strict=True))[ROLE_CLINICIAN] == 1

    at.selectbox(key="users_pick").set_value(ROLE_CLINICIAN).run()
    at.button(key="users_disable").click().run()
    assert "clinician is disabled and logged out" in texts(at, "info")
    with pytest.raises(AuthError, match="disabled"):
        store.authenticate(ROLE_CLINICIAN, PASSWORD)
    at.button(key="users_enable").click().run()
    assert store.authenticate(ROLE_CLINICIAN, PASSWORD).username == ROLE_CLINICIAN
    at.button(key="users_unlock").click().run()
    assert store.throttled_clients(ROLE_CLINICIAN) == 0

    at.text_input(key="users_new_password").input("a new long password")
    next(b for b in at.button if b.label == "Reset password").click().run()
    assert "has a new password" in texts(at, "info")
    assert store.authenticate(ROLE_CLINICIAN, "a new long password").role == ROLE_CLINICIAN

    at.text_input(key="users_add_name").input("dora")
    at.text_input(key="users_add_password").input("short")
    next(b for b in at.button if b.label == "Add").click().run()
    assert "Not done: password must have at least" in texts(at, "info")
    assert not at.exception and "Error" not in texts(at, "info")  # no exception class names
    at.selectbox(key="users_pick").set_value(ROLE_ADMIN).run()
    assert at.button(key="users_disable").disabled  # not oneself


def test_privacy_page_without_ledgers(store, make_app) -> None:
    at = make_app(ROLE_ADMIN).run()
    assert not at.exception
    assert "No ledger configured" in texts(at, "warning")


def test_federation_page(store, registry, env, make_app, monkeypatch) -> None:
    monkeypatch.setenv(settings.ENV_SUPERLINK, "127.0.0.1:9")  # discard port: nothing listens
    at = make_app(ROLE_IT).run()
    assert not at.exception
    assert "127.0.0.1:9 unreachable" in texts(at, "error")
    assert "No federation status yet" in texts(at, "info")
    versions = at.dataframe[0].value
    assert list(versions["version"]) == [registry]
    assert versions["metrics.accuracy"][0] == pytest.approx(0.61)
    privacy = at.dataframe[1].value
    assert list(privacy["site"]) == ["site-a", "site-b"]
    assert list(privacy["epsilon-spent"]) == [1.25, 2.5]
    assert "verified with the site's registered key" in privacy["head-check"][0]
    assert "Unsigned ledger heads from site-b" in texts(at, "warning")

    # A report from two hours ago says what it said then, not that 3 nodes are connected now.
    env["status"].parent.mkdir(parents=True)
    old = datetime.now(UTC) - timedelta(hours=2)
    rounds = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": "n/a"}]  # mixed types
    write_status(env["status"], nodes=3, updated=old, rounds=rounds)
    at.run()
    assert not at.exception
    warning = texts(at, "warning")
    assert "Last report 2 h 0 min ago (round 2, 3 node(s) connected then)" in warning
    assert "the SuperLink does not answer" in warning and "connected now: unknown" in warning
    assert list(at.dataframe[0].value["accuracy"]) == ["0.5", "n/a"]  # shown as text, no trace
    write_status(env["status"], nodes=2, updated=datetime.now(UTC), rounds=rounds)
    at.run()
    assert "Running: round 2, 2 node(s) connected (reported" in texts(at, "success")


def write_status(path: Path, *, nodes: int, updated: datetime, rounds: list[dict]) -> None:
    """The status file as federation/rounds.py writes it."""
    status = {
        "federation": "test",
        "round": 2,
        "nodes-connected": nodes,
        "updated": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rounds": rounds,
    }
    path.write_text(json.dumps(status))


def test_federation_page_reachable_superlink_and_bad_status(store, env, make_app, monkeypatch):
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv(settings.ENV_SUPERLINK, f"127.0.0.1:{server.getsockname()[1]}")
        env["status"].parent.mkdir(parents=True)
        env["status"].write_text("{not json")
        at = make_app(ROLE_IT).run()
    assert not at.exception
    assert "reachable" in texts(at, "success")
    assert "is unreadable" in texts(at, "error")
    assert "No model yet" in texts(at, "warning")  # no registry


def test_bad_setting_is_a_message(store, make_app, monkeypatch) -> None:
    monkeypatch.setenv(settings.ENV_SUPERLINK, "no-port")
    at = make_app(ROLE_IT).run()
    assert not at.exception
    assert "must be host:port" in texts(at, "error")


def test_oidc_login_maps_the_role_claim(env, registry, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    at.secrets = {
        "auth": {
            "client_id": "dashboard",
            "server_metadata_url": "https://idp.invalid/.well-known",
        },
        "fedfew_oidc": {"role_claim": "groups", "roles": {"radiology": ROLE_CLINICIAN}},
    }
    at.user = {
        "is_logged_in": True,
        "email": "dr@hospital.example",
        "groups": ["radiology"],
        "iat": int(time.time()),  # a sign-in just now
    }
    monkeypatch.setattr(signin, "request_cookies", lambda: {signin.IDENTITY_COOKIE: "signed"})
    at.run()
    assert not at.exception
    session = at.session_state[SESSION_KEY]
    assert session.source == "oidc" and session.roles == (ROLE_CLINICIAN,)
    assert at.title[0].value == "Adapt to a new condition"


def test_oidc_login_button_when_logged_out(env) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    at.secrets = {"auth": {"client_id": "dashboard"}}
    at.user = {"is_logged_in": False}
    at.run()
    assert not at.exception
    assert at.button[0].label == "Log in with your hospital account"


def test_model_quality_is_charted_per_round(store, registry, env, make_app) -> None:
    """Issue 24, item 4: the chart had one point per line (the registry's one version) while
    the rounds' metrics sat in the status file."""
    at = make_app(ROLE_IT).run()
    assert not at.get("arrow_vega_lite_chart") and not at.get("vega_lite_chart")
    assert "one round so far: accuracy 0.61 (round 2), loss 1.2 (round 2)" in texts(at, "caption")
    env["status"].parent.mkdir(parents=True)
    rounds = [
        {"round": r, "seconds": 20.0 + r, "metrics": {"accuracy": 0.4 + r / 10, "loss": 2.0 - r}}
        for r in range(3)
    ]
    write_status(env["status"], nodes=2, updated=datetime.now(UTC), rounds=rounds)
    at.run()
    assert not at.exception
    (chart,) = at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    spec = json.loads(chart.proto.spec)
    import pyarrow as pa

    points = pa.ipc.open_stream(chart.proto.data.data).read_all().to_pylist()
    assert spec["encoding"]["x"]["type"] == "ordinal"  # whole rounds on the axis
    assert sorted((p["round"], p["metric"], round(p["value"], 3)) for p in points) == [
        (0, "accuracy", 0.4),
        (0, "loss", 2.0),
        (1, "accuracy", 0.5),
        (1, "loss", 1.0),
        (2, "accuracy", 0.6),  # the status file's round 2 wins over the registry's copy
        (2, "loss", 0.0),
    ]


def test_what_each_site_did_in_words(store, registry, env, make_app) -> None:
    """Issue 24, item 14: the rounds were a raw flattened table."""
    report = {"epsilon_spent": 1.5}
    rounds = [
        {"round": 0, "sites": {}, "problems": [], "clipped": []},
        {"round": 1, "sites": {"site-a": report, "site-b": report}, "problems": []},
        {
            "round": 2,
            "sites": {"site-a": {"epsilon_spent": 2.0}},
            "problems": ["node 7: no reply within 600 s"],
            "clipped": ["site-a"],
        },
        {"round": 3, "sites": {"site-a": {"epsilon_spent": 2.5}}, "problems": []},
    ]
    env["status"].parent.mkdir(parents=True)
    write_status(env["status"], nodes=1, updated=datetime.now(UTC), rounds=rounds)
    at = make_app(ROLE_IT).run()
    assert not at.exception
    text = "\n".join(str(m.value) for m in at.markdown)
    assert "**site-a**: took part in round(s) 1-3; last seen in round 3 (the latest, reported" in (
        text
    )
    assert (
        "ago); its update was clipped to the bound in round(s) 2; its last report says ε 2.50 "
        "spent." in text
    )
    assert (
        "**site-b**: took part in round(s) 1; missed 2-3; last seen in round 1 (the latest is "
        "3); its last report says ε 1.50 spent." in text
    )
    assert "Problem in round 2: node 7: no reply within 600 s." in text
