"""The federation's DP prototype release reaches the dashboard: a real dp-prototypes round (three
sites, the real ClientApp in process) leaves the release beside the final model in a hospital's
registry; the Adapt page offers its classes with the epsilon the release cost, and a clinician's
class named like one takes its prototype beside the cases, as bench/federated_encoder.py does."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from app.dashboard import adapters, clinic, known_classes, predictions, views
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.errors import CaseError
from app.dashboard.uploads import LoadedCases, Upload, load_uploads
from federation.client_app import app as client_app
from federation.inprocess_grid import InProcessGrid, set_task_identity
from federation.server_app import initial_state, run_federation
from federation.server_config import ServerConfig
from models.adaptation import AdaptConfig, embed, feature_map, feature_parts, fit_head
from models.errors import RegistryError
from models.pipeline import PipelineConfig
from models.registry import Registry, RegistryEntry
from models.synthetic import synthetic_arrays
from privacy.accounting import epsilon_for
from privacy.mechanisms import EPISODIC, PROTOTYPES
from privacy.prototype_release import PROTOTYPES_FILE, PrototypeRelease
from tests.app.dashboard.conftest import png_bytes, texts
from tests.federation.conftest import context, make_site

VOCABULARY = ("synthetic_disc_bright", "synthetic_ring_dark", "not_at_any_site")
SIGMA, CLIP, DELTA = 2.0, 0.5, 1e-5
SIZE = 32  # the federation's network and pipeline
# The clinician's classes: two named like released classes (case, spaces and dashes aside), one
# the federation does not know.
CLASSES = ["Synthetic disc bright", "synthetic-ring-dark", "synthetic_spiculated_rim"]
SOURCE = ("synthetic_disc_bright", "synthetic_ring_dark", "synthetic_spiculated_rim")
SHOTS = 3


@contextmanager
def task_identity() -> Iterator[None]:
    """What Flower's runtime sets before any Message is built in a process."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    set_task_identity(run_id=7)
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def run_prototype_federation(root: Path, hospital_registry: Path) -> RegistryEntry:
    """One dp-prototypes round of three sites through the real ClientApp and server loop; site
    a's registry is ``hospital_registry``. Returns the final version site a keeps."""
    config = ServerConfig(
        federation="known",
        num_rounds=1,
        min_nodes=3,
        min_replies=3,
        node_wait=5,
        round_timeout=5,
        max_retries=1,
        workdir=str(root / "server"),
        seed=0,
    ).with_values(
        {
            "mechanism": PROTOTYPES,
            "dp.classes": ",".join(VOCABULARY),
            "dp.noise-multiplier": SIGMA,
            "dp.max-grad-norm": CLIP,
            "backbone.width": 8,
            "backbone.image-size": SIZE,
            "eval.episodes": 5,
        }
    )
    sites = []
    for i, name in enumerate("abc"):
        site = {**make_site(root, name, seed=i), "allowed-mechanisms": f"{EPISODIC},{PROTOTYPES}"}
        if name == "a":
            site["registry"] = str(hospital_registry)
        sites.append(site)
    grid = InProcessGrid(
        {i + 1: (lambda msg, s=s: client_app(msg, context(s))) for i, s in enumerate(sites)}
    )
    with task_identity():
        run_federation(grid, config, initial_state(config))
    (final,) = [e for e in Registry.open(hospital_registry).entries() if "final" in e.name]
    return final


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RegistryEntry]:
    root = tmp_path_factory.mktemp("federation")
    registry = root / "hospital-registry"
    return registry, run_prototype_federation(root, registry)


def cases(shots: int = SHOTS) -> tuple[list[LoadedCases], LoadedCases]:
    """Labelled cases of the clinician's three classes and four new cases (synthetic images)."""
    arrays = synthetic_arrays(n_classes=4, per_class=shots + 2, size=48, seed=11)
    names = [str(c) for c in arrays["classes"]]
    files: dict[str, list[bytes]] = {}
    for image, label in zip(arrays["images"], arrays["labels"], strict=True):
        files.setdefault(names[label], []).append(png_bytes(image))
    pipeline = PipelineConfig(image_size=SIZE)
    labelled = [
        load_uploads(
            [Upload(f"{c}_{j}.png", d) for j, d in enumerate(files[c][:shots])], pipeline=pipeline
        )
        for c in SOURCE
    ]
    new = load_uploads(
        [Upload(f"new_{c}_{j}.png", d) for c in SOURCE[:2] for j, d in enumerate(files[c][shots:])],
        pipeline=pipeline,
    )
    return labelled, new


def test_the_release_a_hospital_keeps_is_read_with_what_it_cost(hospital) -> None:
    registry, final = hospital
    released = known_classes.released_prototypes(final)

    assert released is not None and released.version == final.id
    assert released.classes == VOCABULARY and released.sites == ("a", "b", "c")
    kept = PrototypeRelease.load(final.path / PROTOTYPES_FILE)
    np.testing.assert_array_equal(released.prototypes, kept.prototypes())
    # The epsilon is what the sites' reports published with the model say the release cost.
    expected = epsilon_for([(SIGMA / math.sqrt(2), 1.0, 1)], delta=DELTA, accountant="rdp")
    assert released.epsilon == pytest.approx(expected, rel=1e-9)
    assert {r["mechanism"] for r in final.privacy.values()} == {PROTOTYPES}
    assert released.cost() == f"ε {expected:.2f} (δ 1e-05, the most any of 3 sites spent on it)"
    # The versions received for each round carry no release.
    others = [e for e in Registry.open(registry).entries() if e.id != final.id]
    assert others and all(known_classes.released_prototypes(e) is None for e in others)
    # Class names match with case, spaces, underscores and dashes aside.
    assert released.matches(CLASSES) == ((0, 0), (1, 1))
    assert released.for_classes(["normal", "finding"]) is None


def test_known_classes_take_their_prototype_beside_the_cases(hospital) -> None:
    registry, final = hospital
    model = Registry.open(registry).load_model(final.id)
    released = known_classes.released_prototypes(final)
    assert released is not None
    known = released.for_classes(CLASSES)
    labelled, new = cases()
    support = clinic.build_support(CLASSES, labelled)

    adaptation = clinic.adapt_cases(
        model, support, mode="ridge", base_version=final.id, condition="lesions", known=known
    )
    plain = clinic.adapt_cases(
        model, support, mode="ridge", base_version=final.id, condition="lesions"
    )

    # As bench/federated_encoder.py: the prototype at the features' scale, mapped like them,
    # five copies each in the support of the default head.
    config = AdaptConfig(mode="ridge")
    images, y = torch.from_numpy(support.images), torch.from_numpy(support.labels)
    raw = embed(model.model, images)
    fmap = feature_map(
        config, domain_mean=model.domain_mean, features=raw, parts=feature_parts(model.model)
    )
    rows = fmap(raw.norm(dim=1).mean() * torch.from_numpy(released.prototypes[:2]).float())
    head = fit_head(
        torch.cat([fmap(raw), rows.repeat(5, 1)]),
        torch.cat([y, torch.tensor([0, 1]).repeat(5)]),
        ways=3,
        config=config,
    )
    query = torch.from_numpy(new.images)
    expected = fmap(embed(model.model, query)) @ head["head.weight"].T + head["head.bias"]
    torch.testing.assert_close(adaptation.classifier.logits(query), expected)
    assert not torch.allclose(plain.classifier.logits(query), expected)
    # Only the clinician's cases are held out; the prototypes stay in every fold.
    assert adaptation.reliability is not None
    assert (adaptation.reliability.cases, adaptation.reliability.of) == (9, 9)
    assert adaptation.known == known and adaptation.inputs != plain.inputs
    assert len(predictions.classify_cases(adaptation, new)) == len(new.cases)
    # A result is bound to whether the prototypes were used.
    same = {"base_version": final.id, "mode": "ridge", "condition": "lesions"}
    assert (
        clinic.changed_inputs(adaptation, **same, classes=CLASSES, cases=labelled, known=known)
        == ""
    )
    assert "prototypes" in clinic.changed_inputs(
        adaptation, **same, classes=CLASSES, cases=labelled
    )
    # Modes that change the network itself cannot take them.
    with pytest.raises(CaseError, match="choose ridge, prototype or linear"):
        clinic.adapt_cases(model, support, mode="finetune", base_version=final.id, known=known)


def test_a_saved_adapter_takes_the_same_prototypes_again(hospital, tmp_path: Path) -> None:
    registry, final = hospital
    model = Registry.open(registry).load_model(final.id)
    released = known_classes.released_prototypes(final)
    assert released is not None
    labelled, new = cases()
    support = clinic.build_support(CLASSES, labelled)
    adaptation = clinic.adapt_cases(
        model,
        support,
        mode="prototype",
        base_version=final.id,
        condition="lesions",
        known=released.for_classes(CLASSES),
    )

    entry = adapters.save_adapter(registry, adaptation, name="known", condition="lesions")
    loaded, _ = adapters.load_adapter(registry, entry.id)

    assert entry.info["federation_prototypes"] == list(VOCABULARY[:2])
    assert loaded.known is not None and loaded.known.rows == ((0, 0), (1, 1))
    query = torch.from_numpy(new.images)
    torch.testing.assert_close(loaded.predict_proba(query), adaptation.predict_proba(query))
    origin = adapters.provenance_for(registry, loaded, adapter=entry, user="ana")
    assert "DP prototypes of synthetic_disc_bright, synthetic_ring_dark (ε " in origin.base_privacy

    # A release that is no longer the one the adapter used is refused, never silently swapped.
    kept = PrototypeRelease.load(final.path / PROTOTYPES_FILE)
    copy = tmp_path / "registry"
    shutil.copytree(registry, copy)
    changed = dataclasses.replace(kept, sums=kept.sums * 2)
    changed.save(Registry.open(copy).get(final.id).path / PROTOTYPES_FILE)
    with pytest.raises(RegistryError, match="no longer holds"):
        adapters.load_adapter(copy, entry.id)


def test_the_adapt_page_offers_the_known_classes_with_their_epsilon(
    tmp_path: Path, env, store, make_app
) -> None:
    final = run_prototype_federation(tmp_path / "federation", env["registry"])
    released = known_classes.released_prototypes(final)
    assert released is not None and released.epsilon is not None
    at = make_app(ROLE_CLINICIAN).run()
    assert at.selectbox(key="adapt_base").value == final.id  # the newest federated version

    shown = texts(at, "info")
    assert "The federation already knows 3 classes" in shown
    assert f"ε {released.epsilon:.2f} (δ 1e-05, the most any of 3 sites spent on it)" in shown
    at.text_input(key="adapt_condition").input("lesions")
    at.text_area(key="adapt_classes").input("\n".join(CLASSES)).run()
    captions = texts(at, "caption")
    assert (
        "the prototype of **synthetic_disc_bright** for your class **Synthetic disc bright**"
        in (captions)
    )
    arrays = synthetic_arrays(n_classes=4, per_class=SHOTS, size=48, seed=11)
    names = [str(c) for c in arrays["classes"]]
    for i, source in enumerate(SOURCE):
        files = [
            (f"{source}_{j}.png", png_bytes(image), "image/png")
            for j, image in enumerate(arrays["images"][arrays["labels"] == names.index(source)])
        ]
        at.file_uploader(key=f"adapt_files_{i}").set_value(files)
    at.run()
    at.button(key="adapt_run").click().run()

    adaptation = at.session_state[views.ADAPTATION_KEY]
    assert adaptation.known is not None and adaptation.known.names() == list(VOCABULARY[:2])
    assert "With the federation's prototypes of **synthetic_disc_bright**" in texts(at, "caption")

    at.checkbox(key="adapt_known").uncheck().run()  # the clinician declines them
    assert "the use of the federation's prototypes" in texts(at, "warning")
    at.radio(key="adapt_mode").set_value("finetune").run()
    at.checkbox(key="adapt_known").check().run()
    assert "Not used with **finetune**" in texts(at, "caption")
