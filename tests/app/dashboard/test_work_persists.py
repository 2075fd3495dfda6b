"""Work that persists: a result is bound to the inputs that produced it; choosing another case to
explain does not classify again. (A reload resuming the sign-in and the draft from the session
cookie: test_signin.py.)"""

from __future__ import annotations

from app.dashboard.views import PREDICTIONS_KEY
from tests.app.dashboard.conftest import texts
from tests.app.dashboard.pages import adapt_page_with_cases, captions, upload


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
