"""Work that persists: a reload resumes the login and the clinician's draft; a result is bound to
the inputs that produced it; choosing another case to explain does not classify again."""

from __future__ import annotations

import time

from streamlit.testing.v1 import AppTest

from app.dashboard.auth import ROLE_CLINICIAN, Session
from app.dashboard.persistence import QUERY_PARAM, Draft, SessionStore
from app.dashboard.uploads import Upload
from app.dashboard.views import PREDICTIONS_KEY
from tests.app.dashboard.conftest import ENTRY, PASSWORD, TIMEOUT, texts
from tests.app.dashboard.test_clinic_pages import adapt_page_with_cases, captions, upload


def reload(token: str) -> AppTest:
    """What a browser reload does: a new session, with only the URL kept."""
    at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    at.query_params[QUERY_PARAM] = token
    return at.run()


def test_reload_resumes_the_login_and_the_draft(store, registry, make_app, case_images) -> None:
    at = make_app().run()
    at.text_input(key="login_username").input(ROLE_CLINICIAN)
    at.text_input(key="login_password").input(PASSWORD)
    at.button[0].click().run()
    token = at.query_params[QUERY_PARAM]
    name = sorted(case_images)[0]
    at.text_input(key="adapt_condition").input("lesions")
    at.text_area(key="adapt_classes").input("a\nb").run()
    upload(at, "adapt_files_0", [("a0.png", case_images[name][0])])

    again = reload(token)

    assert not again.exception
    assert again.title[0].value == "Adapt to a new condition"
    assert again.text_input(key="adapt_condition").value == "lesions"
    assert again.text_area(key="adapt_classes").value == "a\nb"
    assert captions(again) == ["a0.png"]
    # Logging out ends the server-side session: the same URL no longer logs anyone in.
    again.switch_page("screens/account.py").run()
    again.button(key="logout").click().run()
    after = reload(token)
    assert not after.exception and after.text_input(key="login_username")
    assert SessionStore(store.path).load_draft(token).uploads == {}


def test_a_session_resumes_only_for_its_client_and_not_after_expiry(store) -> None:
    sessions = SessionStore(store.path)
    session = Session(ROLE_CLINICIAN, (ROLE_CLINICIAN,), time.time() + 60)
    token = sessions.create(session, client="10.0.0.12")
    sessions.save_draft(token, Draft({"adapt_condition": "x"}, {"s": [Upload("a.png", b"1")]}))
    assert sessions.resume(token, client="10.0.0.12") == session
    assert sessions.resume(token, client="10.0.0.66") is None  # a URL passed to someone else
    assert sessions.resume(token, client="10.0.0.12", now=time.time() + 120) is None
    assert sessions.load_draft(token) == Draft()
    assert sessions.resume("not-a-token") is None


def test_a_result_is_saved_only_for_the_inputs_that_produced_it(
    registry, make_app, case_images
) -> None:
    at, _ = adapt_page_with_cases(make_app, case_images, shots=2)
    at.text_input(key="adapt_condition").input("").run()
    at.button(key="adapt_run").click().run()
    assert "name the condition first" in texts(at, "error")

    at.text_input(key="adapt_condition").input("lesions").run()
    at.button(key="adapt_run").click().run()
    at.text_input(key="adapt_condition").input("").run()  # changed after adapting
    assert "before the condition changed" in texts(at, "warning")
    assert not [b for b in at.button if b.label == "Save adapter"]
    at.text_input(key="adapt_condition").input("lesions").run()
    save = next(b for b in at.button if b.label == "Save adapter")
    save.click().run()
    assert "give the adapter a name" in texts(at, "error")


def test_choosing_another_case_does_not_classify_again(registry, make_app, case_images) -> None:
    at, classes = adapt_page_with_cases(make_app, case_images, shots=2)
    at.button(key="adapt_run").click().run()
    at.switch_page("screens/classify.py").run()
    upload(at, "classify_files", [(f"n{i}.png", case_images[c][-1]) for i, c in enumerate(classes)])
    first = at.session_state[PREDICTIONS_KEY][1]
    at.selectbox(key="classify_case").set_value(1).run()
    assert not at.exception
    assert at.session_state[PREDICTIONS_KEY][1] is first
    assert any(c.startswith("n1.png: regions that support") for c in captions(at))
    # The new cases stay through a page switch (and "Start over" there leaves them alone).
    at.switch_page("screens/adapt.py").run()
    at.button(key="adapt_clear").click().run()
    at.switch_page("screens/classify.py").run()
    assert not at.exception
    assert list(at.dataframe[0].value["case"]) == [f"n{i}.png" for i in range(len(classes))]
