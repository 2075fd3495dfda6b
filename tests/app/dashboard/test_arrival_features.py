"""Cases are embedded when they arrive, so the clicks only fit and apply the head: the work moves,
the results do not change, and nothing is embedded where it would be done twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.dashboard import clinic, predictions
from app.dashboard.uploads import LoadedCases, Upload, load_uploads
from models.adaptation import EMBED_BATCH
from models.meta import MetaConfig
from models.model_dir import LoadedModel, save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.registry import Registry
from tests.app.dashboard.conftest import SIZE, write_tiny_model

PIPELINE = PipelineConfig(image_size=SIZE)
SHOTS = 4


def write_frozen_model(registry: Path) -> int:
    """A small random Conv-4 with every weight frozen (as the public encoder is): its features
    are kept per image."""
    torch.manual_seed(0)
    backbone = BackboneConfig(image_size=SIZE, width=8, trainable="none")
    model = build_backbone(backbone)

    def write(folder: Path) -> None:
        save_model_dir(folder, model, backbone=backbone, pipeline=PIPELINE, meta=MetaConfig())

    registry_ = Registry.open(registry, create=True)
    return registry_.publish(write, kind="global", name="frozen", info={"round": 0}).id


def cases_of(
    case_images: dict[str, list[bytes]],
) -> tuple[list[str], list[LoadedCases], LoadedCases]:
    """The labelled cases per class (first SHOTS files) and the rest as new cases."""
    names = sorted(case_images)
    labelled = [
        load_uploads(
            [Upload(f"{c}_{j}.png", d) for j, d in enumerate(case_images[c][:SHOTS])],
            pipeline=PIPELINE,
        )
        for c in names
    ]
    new = load_uploads(
        [
            Upload(f"new_{c}_{j}.png", d)
            for c in names
            for j, d in enumerate(case_images[c][SHOTS:])
        ],
        pipeline=PIPELINE,
    )
    return names, labelled, new


def forward_calls(model: LoadedModel) -> list[int]:
    """Images per forward pass of ``model``'s network, recorded from now on."""
    calls: list[int] = []
    model.model.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize("mode", ["ridge", "prototype"])
def test_cases_embedded_on_arrival_leave_the_clicks_nothing_to_embed(
    tmp_path: Path, case_images: dict[str, list[bytes]], mode: str
) -> None:
    registry = tmp_path / "registry"
    version = write_frozen_model(registry)
    warm = Registry.open(registry).load_model(version)
    cold = Registry.open(registry).load_model(version)  # another object: its own cache
    names, labelled, new = cases_of(case_images)
    calls = forward_calls(warm)

    assert all(clinic.embed_on_arrival(warm, batch, mode=mode) for batch in labelled)
    assert calls == [SHOTS] * len(names)
    calls.clear()
    support = clinic.build_support(names, labelled)
    adaptation = clinic.adapt_cases(warm, support, mode=mode, base_version=version)
    assert calls == []  # the click fitted the head and ran the checks on cached features
    assert adaptation.caches_features
    assert clinic.embed_new_cases(adaptation, new)
    assert sum(calls) == len(new.cases) and max(calls) <= EMBED_BATCH  # each new case once
    calls.clear()
    shown = predictions.classify_cases(adaptation, new)
    assert calls == []

    # The same results as without embedding on arrival.
    reference = clinic.adapt_cases(cold, support, mode=mode, base_version=version)
    assert adaptation.reliability == reference.reliability
    assert adaptation.suspect == reference.suspect
    expected = predictions.classify_cases(reference, new)
    for got, want in zip(shown, expected, strict=True):
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-6)
        assert got.ood_score == pytest.approx(want.ood_score, abs=1e-5)
        assert [n.index for n in got.nearest] == [n.index for n in want.nearest]


def test_nothing_is_embedded_on_arrival_where_it_would_be_embedded_again(
    tmp_path: Path, case_images: dict[str, list[bytes]]
) -> None:
    frozen = Registry.open(tmp_path / "a", create=True)
    frozen_model = frozen.load_model(write_frozen_model(tmp_path / "a"))
    trainable_version = write_tiny_model(tmp_path / "b")
    trainable = Registry.open(tmp_path / "b").load_model(trainable_version)
    names, labelled, new = cases_of(case_images)
    calls = forward_calls(frozen_model) + forward_calls(trainable)

    # Finetune embeds with the copy it trains; a trainable network keeps no features.
    assert not clinic.embed_on_arrival(frozen_model, labelled[0], mode="finetune")
    assert not clinic.embed_on_arrival(trainable, labelled[0], mode="ridge")
    assert not clinic.embed_on_arrival(frozen_model, LoadedCases(), mode="ridge")
    assert calls == []
    support = clinic.build_support(names, labelled)
    adaptation = clinic.adapt_cases(
        trainable, support, mode="ridge", base_version=trainable_version
    )
    assert not adaptation.caches_features
    assert not clinic.embed_new_cases(adaptation, new)
