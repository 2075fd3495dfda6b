"""Adaptation modes offered per base model, background jobs with Cancel, and measured times,
without Streamlit (real models, real adaptations, a real SQLite file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.dashboard import clinic, modes
from app.dashboard.errors import CaseError
from app.dashboard.jobs import Job
from app.dashboard.timings import NOT_MEASURED, TimingLog
from models.meta import MetaConfig
from models.model_dir import LoadedModel
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset

SIZE = 32


def loaded(*, learner: str = "protonet", frozen: bool = False) -> LoadedModel:
    backbone = BackboneConfig(image_size=SIZE, width=8)
    model = build_backbone(backbone)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    return LoadedModel(
        model=model.eval(),
        backbone=backbone,
        pipeline=PipelineConfig(image_size=SIZE),
        meta=MetaConfig(learner=learner),
        config={},
    )


def support(per_class: int = 3) -> clinic.SupportSet:
    data = synthetic_imageset(
        config=PipelineConfig(image_size=SIZE), n_classes=2, per_class=per_class, size=SIZE
    )
    return clinic.SupportSet(
        images=data.images,
        labels=data.labels,
        classes=data.classes,
        names=tuple(f"case_{i}.png" for i in range(len(data.labels))),
    )


def test_maml_is_offered_only_for_maml_trained_models_and_says_why() -> None:
    protonet = loaded()
    assert "maml" not in modes.offered_modes(protonet)
    assert "trained with protonet, not MAML" in modes.unsupported_modes(protonet)["maml"]
    assert "maml" in modes.offered_modes(loaded(learner="fomaml"))
    assert modes.offered_modes(protonet)[0] == "ridge"  # the default mode comes first


def test_finetune_needs_trainable_weights_and_two_cases_per_class() -> None:
    assert "finetune" in modes.offered_modes(loaded())
    frozen = loaded(frozen=True)
    assert "finetune" not in modes.offered_modes(frozen)
    assert "all frozen" in modes.unsupported_modes(frozen)["finetune"]
    assert modes.cases_problem("finetune", [2, 3], ["a", "b"]) == ""
    assert "b has fewer" in modes.cases_problem("finetune", [2, 1], ["a", "b"])
    assert modes.cases_problem("prototype", [1, 1], ["a", "b"]) == ""


def test_a_cancelled_adaptation_leaves_no_result_and_the_base_model_unchanged() -> None:
    model, cases = loaded(), support()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    started = []

    def endless(progress: clinic.ProgressFn) -> clinic.Adaptation:
        while True:  # real finetune adaptations, one after another, until cancelled
            clinic.adapt_cases(
                model,
                cases,
                mode="finetune",
                base_version=1,
                on_progress=lambda f, t: (started.append(f), progress(f, t)),
            )

    job: Job[clinic.Adaptation] = Job(endless, what="adaptation (finetune)")
    while not started:
        job.wait(0.05)
    assert job.running
    job.cancel()
    assert job.wait(60)
    assert job.cancelled and job.result is None and job.error == "" and job.seconds is None
    for key, value in model.model.state_dict().items():
        assert value.equal(before[key]), key


def test_a_finished_job_has_its_result_time_and_progress_at_one() -> None:
    model, cases = loaded(), support(per_class=2)
    job = Job(
        lambda progress: clinic.adapt_cases(
            model, cases, mode="prototype", base_version=1, on_progress=progress
        ),
        what="adaptation (prototype)",
    )
    assert job.wait(120)
    assert job.result is not None and job.result.mode == "prototype"
    assert job.seconds is not None and job.seconds > 0
    assert job.progress() == (1.0, "done")


def test_a_failing_job_says_what_failed_in_plain_words() -> None:
    def typed(progress: clinic.ProgressFn) -> None:
        raise CaseError("no readable case for b: upload at least one per class")

    def bug(progress: clinic.ProgressFn) -> None:
        {}["missing"]  # a KeyError, as a bug would raise

    first, second = Job(typed, what="adaptation (prototype)"), Job(bug, what="adaptation (linear)")
    assert first.wait(10) and second.wait(10)
    assert first.error == "no readable case for b: upload at least one per class"
    assert second.error.startswith("The adaptation (linear) failed unexpectedly")
    assert "KeyError" not in second.error and "missing" not in second.error


def test_timings_are_kept_per_mode_and_summarised_for_similar_support_sets(tmp_path: Path) -> None:
    log = TimingLog(tmp_path / "users.sqlite")
    assert log.summary("finetune") is None and log.sentence("finetune") == NOT_MEASURED
    for seconds in (30.0, 41.0, 12.0):
        log.record("finetune", cases=15, seconds=seconds)
    log.record("finetune", cases=100, seconds=300.0)
    log.record("prototype", cases=15, seconds=0.2)
    similar = log.summary("finetune", cases=12)
    assert similar is not None
    assert (similar.runs, similar.median_s, similar.low_s, similar.high_s) == (3, 30.0, 12.0, 41.0)
    assert similar.sentence() == (
        "measured here: median 30 s (12 s to 41 s) over 3 runs with 15 cases"
    )
    everything = log.summary("finetune")
    assert everything is not None and everything.runs == 4 and everything.most_cases == 100
    assert log.sentence("prototype") == "measured here once: 0.2 s with 15 cases"
    # No run of a similar size: all runs of the mode are better than nothing.
    assert log.summary("prototype", cases=500) == log.summary("prototype")


@pytest.mark.parametrize("seconds,text", [(0.43, "0.4 s"), (41.2, "41 s"), (125.0, "2 min 5 s")])
def test_seconds_in_words(seconds: float, text: str) -> None:
    from app.dashboard.timings import seconds_text

    assert seconds_text(seconds) == text


def test_progress_covers_the_adaptation_then_the_reliability_folds() -> None:
    seen: list[tuple[float, str]] = []
    clinic.adapt_cases(
        loaded(),
        support(per_class=2),
        mode="prototype",
        base_version=1,
        on_progress=lambda f, t: seen.append((f, t)),
    )
    fractions = [f for f, _ in seen]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(np.diff(fractions) >= 0)  # never goes back
    # Start, the head's one step (a fifth: 4 folds follow, each about one adaptation), 4 folds.
    assert (
        fractions[1] == pytest.approx(1 / 5) and seen[1][1] == "adapting (prototype): step 1 of 1"
    )
    assert [t for _, t in seen[2:6]] == [
        f"checking reliability: case {i} of 4" for i in range(1, 5)
    ]


class _Stop(Exception):
    """Raised by a progress callback, as a Cancel button's does."""


def test_cancel_reaches_the_steps_of_the_reliability_folds() -> None:
    seen: list[str] = []

    def progress(fraction: float, text: str) -> None:
        seen.append(text)
        if text == "checking reliability: case 1 of 4, step 2 of 25":
            raise _Stop

    with pytest.raises(_Stop):
        clinic.adapt_cases(
            loaded(), support(per_class=2), mode="finetune", base_version=1, on_progress=progress
        )
    assert "adapting (finetune): step 25 of 25" in seen  # the adaptation itself finished
    assert seen[-2:] == [
        "checking reliability: case 1 of 4, step 1 of 25",
        "checking reliability: case 1 of 4, step 2 of 25",
    ]  # stopped inside the first fold, not after it
