"""Clinician pages through AppTest (issue 14, items 6 and 7): modes offered with their measured
times, progress and Cancel of a long adaptation, the note on huge images on both pages, unusual
images flagged instead of classified, and no message naming an exception class."""

from __future__ import annotations

import re

import numpy as np
from streamlit.testing.v1 import AppTest

from app.dashboard import clinic
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.jobs import Job
from app.dashboard.predictions import OUTCOME_UNUSUAL
from app.dashboard.timings import NOT_MEASURED
from app.dashboard.views import ADAPT_JOB_KEY, ADAPTATION_KEY
from models.registry import Registry
from tests.app.dashboard.conftest import png_bytes, texts, write_tiny_model
from tests.app.dashboard.pages import adapt_page_with_cases, named_classes, upload

# An exception class name as Python prints one, or a traceback: never shown to a user.
CLASS_NAME = re.compile(r"\b[A-Z]\w*(?:Error|Exception)\b|Traceback")


def shown(at: AppTest) -> str:
    """Every message, caption and text on the page."""
    kinds = ("error", "warning", "info", "success", "caption", "markdown", "exception")
    return "\n".join(texts(at, kind) for kind in kinds)


def gradient_png(side: int) -> bytes:
    """A smooth grey ramp (compresses to a small PNG however large)."""
    yy, xx = np.mgrid[:side, :side]
    return png_bytes(((yy + xx) * 255 // (2 * side)).astype(np.uint8))


def test_modes_show_measured_times_and_a_long_run_can_be_cancelled(
    registry, make_app, case_images, env
) -> None:
    at, _ = adapt_page_with_cases(make_app, case_images, shots=2)
    radio = at.radio(key="adapt_mode")
    assert [o.split(":")[0] for o in radio.options] == ["ridge", "prototype", "linear", "finetune"]
    assert "**maml**, because this base model was trained with protonet" in texts(at, "caption")
    assert list(radio.proto.captions) == [f"time {NOT_MEASURED}"] * 4
    at.button(key="adapt_run").click().run()
    assert at.session_state[ADAPTATION_KEY].mode == "ridge"  # the first (default) mode
    at.run()  # the mode captions are drawn before the run that adapts: the next run shows it
    radio = at.radio(key="adapt_mode")
    assert radio.proto.captions[0].startswith("time measured here once: ")
    assert radio.proto.captions[1] == f"time {NOT_MEASURED}"
    assert "**ridge** with 6 cases: measured here once" in texts(at, "caption")

    # A long run (real finetune adaptations, one after another, until cancelled).
    first = at.session_state[ADAPTATION_KEY]
    model = Registry.open(env["registry"]).load_model(registry)

    def endless(progress: clinic.ProgressFn) -> clinic.Adaptation:
        while True:
            clinic.adapt_cases(
                model, first.support, mode="finetune", base_version=registry, on_progress=progress
            )

    job: Job[clinic.Adaptation] = Job(endless, what="adaptation (finetune)")
    at.session_state[ADAPT_JOB_KEY] = job
    at.run()
    assert not at.exception
    assert at.get("progress"), "no progress bar while adapting"
    assert at.button(key="adapt_run").disabled  # one run at a time
    assert not [s for s in at.subheader if s.value == "Result"]  # no stale result meanwhile
    at.button(key="adapt_cancel").click().run()
    assert job.wait(60)
    at.run()
    assert not at.exception
    assert "Adaptation cancelled: nothing was changed" in texts(at, "info")
    assert at.session_state[ADAPTATION_KEY] is first  # the earlier result, not half a new one
    assert ADAPT_JOB_KEY not in at.session_state
    assert not at.button(key="adapt_run").disabled  # the page is usable again
    at.button(key="adapt_run").click().run()
    assert not at.exception and at.session_state[ADAPTATION_KEY] is not first


def test_huge_images_get_a_note_on_both_pages_and_unusual_images_no_label(
    registry, make_app, case_images
) -> None:
    # 4 cases a class: with 3, the random tiny model is no better than guessing (then the
    # classify page says so instead of classifying; test_clinic_pages checks that).
    at, classes = adapt_page_with_cases(make_app, case_images, shots=4)
    at.button(key="adapt_run").click().run()
    huge = ("huge.png", gradient_png(2000))
    upload(at, "adapt_files_0", [huge])
    assert "1 case(s) are much larger than the model's input" in texts(at, "info")
    assert "huge.png, is 2000x2000 pixels" in texts(at, "info")

    at.switch_page("screens/classify.py").run()
    rng = np.random.default_rng(0)
    noise = ("noise.png", png_bytes(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)))
    usual = ("usual.png", case_images[classes[0]][-1])
    upload(at, "classify_files", [huge, noise, usual])
    assert not at.exception
    assert "reduced to 32x32 pixels" in texts(at, "info")
    table = at.dataframe[0].value.set_index("case")
    assert table.loc["noise.png", "outcome"] == OUTCOME_UNUSUAL
    assert table.loc[["noise.png"], list(classes)].isna().all(axis=None)  # no probabilities
    assert table.loc["usual.png", "outcome"] != OUTCOME_UNUSUAL
    warning = texts(at, "warning")
    assert f"flagged as **{OUTCOME_UNUSUAL}**" in warning and "noise.png" in warning
    assert "usual.png" not in warning


def test_no_message_names_an_exception_class(registry, make_app, env) -> None:
    broken = write_tiny_model(env["registry"])  # the newest version, chosen first
    weights = Registry.open(env["registry"]).get(broken).path / "weights.safetensors"
    weights.write_bytes(b"not weights")
    at = make_app(ROLE_CLINICIAN).run()
    assert not at.exception
    assert "cannot be loaded" in texts(at, "error")
    assert not CLASS_NAME.search(shown(at)), shown(at)

    at.selectbox(key="adapt_base").set_value(registry).run()
    named_classes(at, ["a", "b"])
    upload(
        at,
        "adapt_files_0",
        [("broken.png", b"\x89PNG\r\n\x1a\n not really"), ("photo.jpg", b"GIF89a not a jpeg")],
    )
    assert not at.exception
    assert "2 file(s) could not be used" in texts(at, "warning")
    assert not CLASS_NAME.search(shown(at)), shown(at)
