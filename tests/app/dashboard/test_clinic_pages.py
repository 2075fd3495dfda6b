"""Clinician pages through AppTest: the adapt-save-classify flow on synthetic images, and every
bad input (unreadable, oversized, wrong format, one class, no case, mixed sizes, no registry)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.provenance import AuditLog
from app.dashboard.views import ADAPTATION_KEY
from models.registry import Registry
from tests.app.dashboard.conftest import photograph_bytes, png_bytes, texts
from tests.app.dashboard.pages import (
    SHOTS,
    adapt_page_with_cases,
    captions,
    finish_adapting,
    named_classes,
    upload,
)


def test_adapt_save_classify(registry, make_app, case_images, env) -> None:
    at, classes = adapt_page_with_cases(make_app, case_images)
    assert not at.exception
    assert "ε 2.50 (highest of 2 sites)" in at.selectbox(key="adapt_base").options[0]
    captions = [c for image in at.image for c in image.captions]
    assert captions == [f"{c}_{j}.png" for c in classes for j in range(SHOTS)]  # thumbnails
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert "of new cases like these would be classified right" in texts(at, "warning")
    assert not at.success  # never a green box for an estimate from a dozen cases
    assert "Intended use" in texts(at, "warning")
    at.text_input(key="adapt_name").input("three-lesions")
    next(b for b in at.button if b.label == "Save adapter").click().run()
    assert "Saved as v2 three-lesions" in texts(at, "success")
    adapters = Registry.open(env["registry"]).entries(kind="adapter")
    assert [(a.name, a.parent) for a in adapters] == [("three-lesions", registry)]
    assert adapters[0].info["classes"] == classes

    at.switch_page("screens/classify.py").run()
    assert not at.exception
    at.selectbox(key="classify_adapter").set_value(adapters[0].id).run()
    # One unseen case per class, then a copy of a labelled case of each class: the head was
    # fitted on those, so each copy's highest probability must be its own class (a classifier
    # that answers every case alike, or puts the columns in another order, fails here).
    new_cases = [(f"new_{i}.png", case_images[c][-1]) for i, c in enumerate(classes)]
    copies = [(f"copy_{i}.png", case_images[c][0]) for i, c in enumerate(classes)]
    uploaded = new_cases + copies
    upload(at, "classify_files", uploaded)
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["case"]) == [n for n, _ in uploaded]
    assert set(table["outcome"]) <= {*classes, "uncertain"}
    copied = table.iloc[len(new_cases) :]
    assert list(copied[classes].idxmax(axis=1)) == classes, copied
    assert "Intended use" in texts(at, "warning")
    np.testing.assert_allclose(table[classes].sum(axis=1), 1.0, atol=0.01)
    assert at.download_button(key="classify_csv").label == "Download results (CSV)"
    assert "Adapter: v2 three-lesions" in texts(at, "caption")
    (logged,) = AuditLog(env["users"]).entries()  # one classification, however many reruns
    assert (logged.user, logged.action, logged.adapter) == (
        "clinician",
        "classify",
        "v2 three-lesions",
    )
    assert logged.cases == len(uploaded) and sum(logged.outcomes.values()) == len(uploaded)
    assert all(name not in str(logged) for name, _ in uploaded)  # no file names in the log
    captions = [c for image in at.image for c in image.captions]
    assert any("regions that support" in c for c in captions)  # the explanation image


def test_unsaved_adaptation_classifies_too(registry, make_app, case_images) -> None:
    at, classes = adapt_page_with_cases(make_app, case_images, shots=2)
    at.radio(key="adapt_mode").set_value("finetune")
    finish_adapting(at.button(key="adapt_run").click().run())
    assert at.session_state[ADAPTATION_KEY].mode == "finetune"
    at.switch_page("screens/classify.py").run()
    upload(at, "classify_files", [("new.png", case_images[classes[0]][-1])])
    assert not at.exception
    assert len(at.dataframe[0].value) == 1


def test_unreadable_wrong_format_and_oversized_files_are_named(registry, make_app) -> None:
    at = named_classes(make_app(ROLE_CLINICIAN).run(), ["a", "b"])
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, format="PNG")  # 64 Mpixel: above the guard's cap
    upload(
        at,
        "adapt_files_0",
        [
            ("broken.png", b"\x89PNG not really"),
            ("notes.txt", b"hello"),
            ("huge.png", bomb.getvalue()),
        ],
    )
    assert not at.exception
    warning = texts(at, "warning")
    assert "3 file(s) could not be used" in warning
    assert "broken.png" in warning and "fedfew-upload" not in warning  # no temporary path
    assert "huge.png" in warning and "decompression bomb" in warning
    assert "notes.txt" in warning and "not allowed" in warning


def test_one_class_and_zero_cases_get_messages_and_keep_input(
    registry, make_app, case_images
) -> None:
    at = named_classes(make_app(ROLE_CLINICIAN).run(), ["only"])
    assert "at least 2 classes" in texts(at, "info")
    at.button(key="adapt_run").click().run()
    assert "at least 2 classes" in texts(at, "error")

    named_classes(at, ["a", "b"])
    name = sorted(case_images)[0]
    upload(at, "adapt_files_0", [("a.png", case_images[name][0])])
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert "no readable case for b" in texts(at, "error")
    # Nothing entered is lost: the classes and the uploaded case are still there.
    assert at.text_area(key="adapt_classes").value == "a\nb"
    assert [c for image in at.image for c in image.captions] == ["a.png"]


def test_single_case_class_warns_that_reliability_cannot_be_estimated(
    registry, make_app, case_images
) -> None:
    names = sorted(case_images)
    at = named_classes(make_app(ROLE_CLINICIAN).run(), names[:2])
    upload(at, "adapt_files_0", [(f"a{i}.png", d) for i, d in enumerate(case_images[names[0]][:3])])
    upload(at, "adapt_files_1", [("b.png", case_images[names[1]][0])])
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert "could not be estimated" in texts(at, "warning")


def test_mixed_sizes_and_channels_are_resized_with_a_note(registry, make_app) -> None:
    rng = np.random.default_rng(0)
    grey = png_bytes(rng.integers(0, 255, (40, 40), dtype=np.uint8))
    colour = png_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    at = named_classes(make_app(ROLE_CLINICIAN).run(), ["a", "b"])
    upload(at, "adapt_files_0", [("grey.png", grey), ("colour.png", colour)])
    note = texts(at, "info")
    assert "resized to 32x32" in note and "sizes differ" in note and "channel counts differ" in note


def test_cases_survive_a_page_switch_until_cleared(registry, make_app, case_images) -> None:
    at, classes = adapt_page_with_cases(make_app, case_images, shots=2)
    shown = captions(at)
    assert len(shown) == 2 * len(classes)

    at.switch_page("screens/classify.py").run()
    at.switch_page("screens/adapt.py").run()
    assert not at.exception
    assert at.text_area(key="adapt_classes").value == "\n".join(classes)
    assert at.text_input(key="adapt_condition").value == "lesions"
    assert captions(at) == shown  # decoded again from the kept uploads, in the same order
    assert "2 case(s) kept from earlier" in texts(at, "caption")
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert at.session_state[ADAPTATION_KEY].support.names == tuple(shown)

    # A new file joins the kept ones; the same file again is not counted twice.
    first = classes[0]
    again = [(f"{first}_0.png", case_images[first][0]), ("extra.png", case_images[first][5])]
    upload(at, "adapt_files_0", again)
    assert captions(at)[:3] == [f"{first}_0.png", f"{first}_1.png", "extra.png"]

    at.button(key="adapt_files_1_clear").click().run()  # the second class's kept cases only
    assert not any(c.startswith(f"{classes[1]}_") for c in captions(at))
    assert f"{classes[2]}_0.png" in captions(at)

    at.button(key="adapt_clear").click().run()  # start over
    assert not at.exception
    assert at.text_area(key="adapt_classes").value == ""
    assert captions(at) == []
    at.switch_page("screens/classify.py").run()
    at.switch_page("screens/adapt.py").run()
    at.text_area(key="adapt_classes").input("\n".join(classes)).run()
    assert captions(at) == []  # nothing comes back after starting over


def test_a_photograph_among_the_labelled_cases_is_named_and_must_be_confirmed(
    registry, make_app, case_images, env
) -> None:
    """Issue 24, item 9: a portrait photograph was accepted as a labelled lesion unremarked."""
    at, classes = adapt_page_with_cases(make_app, case_images)
    at.button(key="adapt_run").click().run()
    assert at.session_state[ADAPTATION_KEY].suspect == ()  # like cases: nothing to check
    assert "look unlike all the other labelled cases" not in texts(at, "warning")
    files = [(f"{classes[0]}_{j}.png", d) for j, d in enumerate(case_images[classes[0]][:SHOTS])]
    at.file_uploader(key="adapt_files_0").set_value(
        [
            *((n, d, "image/png") for n, d in files),
            ("portrait.jpg", photograph_bytes(), "image/jpeg"),
        ]
    )
    at.run()
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert at.session_state[ADAPTATION_KEY].suspect == ("portrait.jpg",)
    assert "1 labelled case(s) look unlike all the other labelled cases" in texts(at, "warning")
    assert "**portrait.jpg**" in texts(at, "warning")
    at.text_input(key="adapt_name").input("with-a-photo")
    next(b for b in at.button if b.label == "Save adapter").click().run()
    assert "Not saved: check the labelled cases" in texts(at, "error")
    assert Registry.open(env["registry"]).entries(kind="adapter") == []
    at.checkbox(key="adapt_confirm_suspect").check()
    next(b for b in at.button if b.label == "Save adapter").click().run()
    assert "Saved as" in texts(at, "success")


def test_classes_the_model_cannot_tell_apart_are_said_in_plain_words(
    registry, make_app, case_images
) -> None:
    """Issue 24, item 11: when calibration finds the classes inseparable, the pages say so and
    what would help, instead of a table of "uncertain" rows."""
    at = make_app(ROLE_CLINICIAN).run()
    same = case_images[sorted(case_images)[0]][:2]  # the same two images in every class
    named_classes(at, ["a", "b", "c"])
    for i in range(3):
        upload(at, f"adapt_files_{i}", [(f"same_{j}.png", d) for j, d in enumerate(same)])
    at.button(key="adapt_run").click().run()
    assert not at.exception
    assert "cannot tell these classes apart" in texts(at, "error")
    assert "more cases of each class" in texts(at, "error")
    assert "temperature" not in texts(at, "caption")  # no jargon
    at.switch_page("screens/classify.py").run()
    assert "cannot tell these classes apart" in texts(at, "error")
    assert not at.dataframe and not at.file_uploader  # nothing to classify with it
