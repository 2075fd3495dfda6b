"""The adapt page's model card (issue 24, item 11): what the base model is, what it learnt from,
how well it did and where, from the model directory, the registry and the shipped benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

from app.dashboard import model_card
from app.dashboard.auth import ROLE_CLINICIAN
from federation.server_config import EvalConfig, ServerConfig
from models.adaptation import AdaptConfig
from models.registry import KIND_GLOBAL, KIND_LOCAL, KIND_PUBLIC, RegistryEntry
from tests.app.dashboard.conftest import texts


def _entry(id_: int, kind: str, **fields) -> RegistryEntry:
    values = {
        "name": f"m{id_}",
        "created": "2026-01-01T00:00:00Z",
        "parent": None,
        "code_version": "",
        "metrics": {},
        "privacy": {},
        "info": {},
        "path": Path("."),
    }
    return RegistryEntry(id=id_, kind=kind, **{**values, **fields})


def _bench(folder: Path) -> Path:
    row = {"encoder": "multi-scale@224", "lever": "ridge-domain", "ways": 3, "shots": 5}
    rows = [
        {**row, "fold": "blood_cells_bccd", "accuracy": 0.72, "ci95": 0.04, "episodes": 40},
        {**row, "fold": "blood_cells_bccd", "accuracy": 0.7, "ci95": 0.04, "episodes": 40},
        {**row, "fold": "blood_cells_bccd", "shots": 1, "accuracy": 0.5, "ci95": 0.1},
        {**row, "encoder": "pixel", "fold": "brain_tumor_mri", "accuracy": 0.4, "ci95": 0.1},
        {**row, "lever": "prototype", "fold": "brain_mri", "accuracy": 0.6, "ci95": 0.1},
    ]
    (folder / "smoke_encoder.json").write_text(json.dumps({"results": {"rows": rows}}))
    return folder


def test_public_card_names_its_data_and_its_measured_modalities(tmp_path: Path) -> None:
    card = model_card.model_card(
        _entry(4, KIND_PUBLIC, name="public-efficientnet-lite0-imagenet"),
        config={"backbone": {"name": "efficientnet-lite0", "image_size": 224}},
        bench=_bench(tmp_path),
    )
    assert AdaptConfig().mode == "ridge"  # the default mode, which the card quotes
    assert "ImageNet" in card.trained_on and "no patient's data" in card.trained_on
    assert card.measured == (
        "blood-cell microscopy: 72% right (± 4) telling 3 classes apart from 5 labelled cases "
        "each with ridge, after a preparation for the modality (its statistics), over 40 "
        "trials (bench/results/smoke_encoder.json)",
    )  # the best 5-shot row; not the 1-shot row, another mode's or another encoder's
    assert model_card.UNTESTED in card.markdown()


def test_federated_and_local_cards(tmp_path: Path) -> None:
    config = {
        "backbone": {"name": "conv4", "image_size": 64},
        "federation": ServerConfig(
            eval=EvalConfig(data="synthetic", ways=5)
        ).to_dict(),  # as published
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    base = _entry(
        3, KIND_GLOBAL, name="fed round 2", metrics={"accuracy": 0.61}, info={"round": 2},
        path=tmp_path,
    )  # fmt: skip
    card = model_card.model_card(base, privacy="ε 2.50 (highest of 2 sites)", bench=tmp_path)
    assert card.measured == (
        "61% right on the federation's public evaluation set (synthetic), telling 5 classes "
        "apart, after round 2 (this node's registry)",
    )
    assert "never left them" in card.trained_on and card.privacy.startswith("ε 2.50")
    local = _entry(
        7, KIND_LOCAL, parent=3,
        info={"domain": {"source": "ct.npz", "images": 12, "method": "statistics"}},
    )  # fmt: skip
    card = model_card.model_card(local, config={}, base=base, privacy="ε 2.50", bench=tmp_path)
    assert "prepared for ct.npz on 12 of this hospital's unlabelled studies" in card.what
    assert "never shared" in card.privacy and card.measured[0].startswith("61% right")


def test_the_adapt_page_shows_the_card(registry, make_app) -> None:
    at = make_app(ROLE_CLINICIAN).run()
    assert not at.exception
    (about,) = [e for e in at.expander if e.label.startswith("About this base model")]
    text = "\n".join(str(m.value) for m in about.markdown)
    assert "**What it is.**" in text and "61% right" in text and "only measure" in text
    assert "Centring" not in texts(at, "info")


def test_the_shipped_benchmark_is_quoted() -> None:
    """The card reads the results the project ships (bench/results/new_modality_encoder.json)."""
    rows = model_card.encoder_rows(model_card.BENCH_RESULTS)
    assert rows and {r["source"] for r in rows} == {"bench/results/new_modality_encoder.json"}
    card = model_card.model_card(
        _entry(4, KIND_PUBLIC), config={"backbone": {"name": "efficientnet-lite0"}}
    )
    assert any(line.startswith("brain MRI: ") for line in card.measured)
