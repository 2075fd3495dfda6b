"""The clinician logic without Streamlit: uploads, support checks, reliability, adapters in the
registry, classification, CSV export and the occlusion map."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from app.dashboard import adapters, clinic, explain, predictions
from app.dashboard.errors import CaseError
from app.dashboard.uploads import LoadedCase, LoadedCases, Upload, load_uploads, resize_note
from models.adaptation import AdaptConfig
from models.evaluation import leave_one_out
from models.guard import GuardConfig
from models.pipeline import PipelineConfig
from models.registry import Registry
from tests.app.dashboard.conftest import (
    CLASSES,
    PER_CLASS,
    SIZE,
    png_bytes,
    site_report,
    write_tiny_model,
)

PIPELINE = PipelineConfig(image_size=SIZE)


def batches(case_images: dict[str, list[bytes]], shots: int) -> tuple[list[str], list[LoadedCases]]:
    names = sorted(case_images)
    loaded = [
        load_uploads(
            [Upload(f"{c}_{j}.png", d) for j, d in enumerate(case_images[c][:shots])],
            pipeline=PIPELINE,
        )
        for c in names
    ]
    return names, loaded


@pytest.fixture(scope="module")
def separable_images() -> dict[str, list[bytes]]:
    """PNG files of 3 classes a random network tells apart: a bright disc of radius 3, 12 or 22
    px near the centre of a 48 px image, in noise (the synthetic lesions need a trained model)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    files: dict[str, list[bytes]] = {}
    for k, radius in enumerate((3, 12, 22)[:CLASSES]):
        for _ in range(PER_CLASS):
            cy, cx = 24 + rng.integers(-4, 5, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            image = np.clip(40 + 150 * disc + rng.normal(0, 12, disc.shape), 0, 255)
            files.setdefault(f"class-{k}", []).append(png_bytes(image.astype(np.uint8)))
    return files


@pytest.fixture
def model(tmp_path: Path):
    registry = tmp_path / "registry"
    version = write_tiny_model(registry)
    return registry, version, Registry.open(registry).load_model(version)


def test_uploads_are_decoded_cached_and_errors_named(case_images) -> None:
    cache: dict = {}
    good = next(iter(case_images.values()))[0]
    uploads = [Upload("a.png", good), Upload("b.png", b"nope"), Upload("c.bmp", good)]
    first = load_uploads(uploads, pipeline=PIPELINE, cache=cache)
    assert first.names == ["a.png"] and first.images.shape == (1, 3, SIZE, SIZE)
    assert [e.path for e in first.errors] == ["b.png", "c.bmp"]
    assert "not allowed" in first.errors[1].reason
    assert len(cache) == 3
    again = load_uploads(uploads, pipeline=PIPELINE, cache=cache)  # from the cache
    np.testing.assert_array_equal(again.images, first.images)


def test_oversized_file_is_refused_before_decoding(case_images) -> None:
    data = next(iter(case_images.values()))[0]
    out = load_uploads(
        [Upload("a.png", data)], pipeline=PIPELINE, guard=GuardConfig(max_file_bytes=100)
    )
    assert not out.cases and "above the limit of 100 bytes" in out.errors[0].reason


def test_resize_note_only_when_cases_differ() -> None:
    image = np.zeros((3, SIZE, SIZE), np.float32)
    same = [LoadedCase("a", image, (40, 40)), LoadedCase("b", image, (40, 40))]
    assert resize_note(same, PIPELINE) is None
    mixed = [*same, LoadedCase("c", image, (50, 60, 3))]
    assert "resized to 32x32" in resize_note(mixed, PIPELINE)


def test_resize_note_says_what_a_huge_case_loses_even_when_all_are_alike() -> None:
    image = np.zeros((3, SIZE, SIZE), np.float32)
    huge = [LoadedCase("scan.png", image, (3000, 2000)), LoadedCase("b", image, (3000, 2000))]
    note = resize_note(huge, PIPELINE)
    assert note is not None
    assert "2 case(s) are much larger" in note and "scan.png, is 3000x2000" in note
    assert "reduced to 32x32" in note and "about 94 of its pixels" in note  # ceil(3000 / 32)
    just_large = [LoadedCase("a", image, (4 * SIZE, 4 * SIZE))] * 2  # not beyond HUGE_FACTOR
    assert resize_note(just_large, PIPELINE) is None


def test_support_checks() -> None:
    one = LoadedCases(cases=[LoadedCase("a", np.zeros((3, SIZE, SIZE), np.float32), (32, 32))])
    with pytest.raises(CaseError, match="at least 2 classes"):
        clinic.build_support(["x"], [one])
    with pytest.raises(CaseError, match="must differ"):
        clinic.build_support(["x", "x"], [one, one])
    with pytest.raises(CaseError, match="no readable case for y"):
        clinic.build_support(["x", "y"], [one, LoadedCases()])
    support = clinic.build_support(["x", "y"], [one, one])
    assert support.counts() == [1, 1]
    assert "cannot be computed" in clinic.support_warnings(support)[0]


def test_held_out_order_takes_classes_in_turn() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert clinic.held_out_order(labels) == [0, 3, 5, 1, 4, 2]


def test_prototype_reliability_equals_the_reference_leave_one_out(model, case_images) -> None:
    _, _, loaded = model
    names, cases = batches(case_images, shots=4)
    support = clinic.build_support(names, cases)
    prototype = AdaptConfig(mode="prototype")
    fast = clinic.reliability(loaded, support, config=prototype)
    reference = leave_one_out(
        loaded.model,
        torch.from_numpy(support.images),
        torch.from_numpy(support.labels),
        ways=3,
        adapt_config=prototype,
    )
    assert fast.cases == 12 and fast.accuracy == pytest.approx(reference.accuracy)


def test_slow_modes_hold_out_at_most_the_limit(model, case_images) -> None:
    _, _, loaded = model
    names, cases = batches(case_images, shots=5)
    support = clinic.build_support(names, cases)
    seen: list[float] = []
    score = clinic.reliability(
        loaded, support, config=AdaptConfig(mode="maml"), on_progress=lambda f, _: seen.append(f)
    )
    assert score.cases == clinic.SLOW_MODE_FOLDS and score.of == 15
    assert seen[-1] == 1.0
    assert f"{clinic.SLOW_MODE_FOLDS} of the 15 cases were held out" in score.sentence()


def test_adapter_round_trip_and_classification(model, separable_images) -> None:
    registry, version, loaded = model
    case_images = separable_images
    names, cases = batches(case_images, shots=4)
    support = clinic.build_support(names, cases)
    adaptation = clinic.adapt_cases(loaded, support, mode="prototype", base_version=version)
    held_out = [(label, data) for label, c in enumerate(names) for data in case_images[c][4:]]
    queries = load_uploads(
        [Upload(f"q{i}.png", data) for i, (_, data) in enumerate(held_out)], pipeline=PIPELINE
    )
    before = predictions.classify_cases(adaptation, queries)
    # The synthetic classes are separable: most held-out cases (6 per class) must be right.
    right = sum(p.predicted == label for p, (label, _) in zip(before, held_out, strict=True))
    assert right >= 0.8 * len(held_out), f"{right} of {len(held_out)} right"

    with pytest.raises(CaseError, match="name the condition"):
        adapters.save_adapter(registry, adaptation, name="lesions", condition=" ")
    entry = adapters.save_adapter(
        registry, adaptation, name="lesions", condition="test", author="ana"
    )
    assert entry.kind == "adapter" and entry.parent == version
    assert entry.metrics["loo_cases"] == 12 and entry.info["classes"] == names
    assert [e.id for e in adapters.saved_adapters(registry)] == [entry.id]
    rebuilt, _ = adapters.load_adapter(registry, entry.id)
    after = predictions.classify_cases(rebuilt, queries)
    np.testing.assert_allclose(
        [p.probabilities for p in after], [p.probabilities for p in before], atol=1e-6
    )
    assert rebuilt.reliability == adaptation.reliability
    assert entry.metrics["temperature"] == adaptation.temperature

    first = before[0]
    assert sum(first.probabilities) == pytest.approx(1.0)
    assert len(first.nearest) == predictions.NEAREST
    assert [n.distance for n in first.nearest] == sorted(n.distance for n in first.nearest)
    assert first.nearest[0].name in support.names

    origin = adapters.provenance_for(registry, rebuilt, adapter=entry, user="ana")
    assert origin.condition == "test" and origin.base_privacy.startswith("ε 2.50")
    text = predictions.predictions_csv(names, before, provenance=origin)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(held_out)
    assert rows[0]["outcome"] == first.outcome(names)
    assert rows[0]["most_likely"] == names[first.predicted]
    for row in rows:  # every row says where it came from
        assert row["adapter"] == entry.label and row["adapter_version"] == str(entry.id)
        assert row["base_model"] == f"v{version} global-round-2" and row["user"] == "ana"
        assert row["condition"] == "test" and row["time"].endswith("Z")
        assert row["reliability"].startswith("Between") and "not a diagnosis" in row["notice"]


def test_calibrated_probabilities_and_uncertain_outcome(model, case_images) -> None:
    # A random network on the synthetic lesions: held-out cases are mostly wrong, so the
    # calibrated probabilities must be near uniform and no case may get a label.
    _, version, loaded = model
    names, cases = batches(case_images, shots=4)
    support = clinic.build_support(names, cases)
    adaptation = clinic.adapt_cases(loaded, support, mode="prototype", base_version=version)
    score = adaptation.reliability
    assert score is not None and score.low
    assert score.sentence().startswith(f"Between {round(100 * score.interval.low)}% and")
    queries = load_uploads(
        [Upload(f"q{c}.png", case_images[c][-1]) for c in names], pipeline=PIPELINE
    )
    raw = adaptation.classifier.predict_proba(torch.from_numpy(queries.images)).numpy()
    shown = predictions.classify_cases(adaptation, queries)
    calibrated = np.array([p.probabilities for p in shown])
    assert calibrated.max() < raw.max()  # the raw prototype scores claim more than they know
    np.testing.assert_array_equal(calibrated.argmax(1), raw.argmax(1))
    assert all(p.outcome(names) == predictions.OUTCOME_UNCERTAIN for p in shown)


def test_loading_a_global_version_as_adapter_is_refused(model) -> None:
    registry, version, _ = model
    with pytest.raises(Exception, match="not an adapter"):
        adapters.load_adapter(registry, version)


def test_epsilon_label(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    write_tiny_model(registry, privacy={"a": site_report("a", 3.0)})
    write_tiny_model(registry, privacy={"a": site_report("a", 1.0), "b": site_report("b", 2.0)})
    write_tiny_model(registry, privacy={})
    write_tiny_model(registry, privacy={"a": {"epsilon": 3.0}})  # no guessing of other formats
    unreadable, empty, two, one = adapters.base_models(registry)
    assert adapters.epsilon_label(one) == "ε 3.00 (1 site)"
    assert adapters.epsilon_label(two) == "ε 2.00 (highest of 2 sites)"
    # A round's output with no report is a copy a node received (the server publishes every
    # round with its sites' reports): DP-trained, not "not trained with DP".
    assert "trained with DP by the federation; this copy has no privacy report" in (
        adapters.epsilon_label(empty)
    )
    assert "unreadable" in adapters.epsilon_label(unreadable)


def test_occlusion_map_finds_the_evidence() -> None:
    # A "classifier" whose class-1 score is the mean of the top-left quarter: only it matters.
    def predict_proba(x: torch.Tensor) -> torch.Tensor:
        score = x[:, :, :16, :16].mean(dim=(1, 2, 3)) * 10
        return torch.softmax(torch.stack([torch.zeros_like(score), score], dim=1), dim=1)

    image = np.zeros((3, SIZE, SIZE), np.float32)
    image[:, :16, :16] = 1.0
    heat = explain.occlusion_map(predict_proba, image, target=1)
    assert heat.shape == (SIZE, SIZE) and heat.max() == 1.0
    assert heat[:12, :12].mean() > 0.5 and heat[20:, 20:].max() == 0.0
    picture = explain.overlay(image, heat)
    assert picture.shape == (SIZE, SIZE, 3) and picture.dtype == np.uint8
    with pytest.raises(ValueError, match="must be"):
        explain.occlusion_map(predict_proba, image[0], target=1)


def test_the_overlay_has_a_colour_scale() -> None:
    strip = explain.colour_scale(width=100, height=8)
    assert strip.shape == (8, 100, 3) and strip.dtype == np.uint8
    assert np.all(strip[:, 0] == 128)  # left: no evidence, the plain (mid-grey) image
    assert not np.array_equal(strip[:, -1], strip[:, 0])  # right: the strongest colour
