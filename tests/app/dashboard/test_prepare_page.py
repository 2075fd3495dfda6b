"""The "Prepare for a new modality" page through AppTest, and the local versions it publishes:
in the registry with their domain statistics, offered (and labelled) on the adapt page, usable
as the base of a saved adapter, and never a global version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from app.dashboard import adapters, clinic, domain_prep, ui
from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, ROLE_IT
from app.dashboard.errors import SourceError
from app.dashboard.settings import ENV_DATA_ROOTS
from app.dashboard.views import PREPARE_JOB_KEY
from models.adaptation import ADAPT_MODES, embed
from models.domain import DOMAIN_METHODS, DomainConfig
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.readers import load_npz
from models.registry import KIND_LOCAL, Registry
from models.synthetic import write_synthetic_npz
from tests.app.dashboard.conftest import DEFAULT_PRIVACY, texts

UNLABELLED = 12  # 2 classes x 6: enough for a mean, fast to embed


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    """A small synthetic (not patient) image set standing in for a new modality's studies."""
    return write_synthetic_npz(
        tmp_path / "studies" / "new-modality.npz", n_classes=2, per_class=6, size=48, seed=5
    )


def prepare(at: AppTest, source: str, *, method: str = "statistics") -> AppTest:
    at.text_input(key="prepare_source").input(source)
    at.radio(key="prepare_method").set_value(method)
    at.button(key="prepare_run").click()
    return at.run()


def local_versions(registry: Path) -> list:
    return Registry.open(registry).entries(kind=KIND_LOCAL)


def test_statistics_preparation_publishes_a_local_version(registry, make_app, env, studies) -> None:
    at = make_app(ROLE_CLINICIAN).run()
    at.switch_page("screens/prepare.py").run()
    assert not at.exception
    assert at.radio(key="prepare_method").options == [
        domain_prep.METHOD_HELP[m] for m in DOMAIN_METHODS
    ]
    prepare(at, str(studies))
    assert not at.exception, at.exception
    [local] = local_versions(env["registry"])
    assert local.parent == registry and local.name == "global-round-2 prepared for new-modality.npz"
    assert local.info[domain_prep.INFO_LOCAL_ONLY] == domain_prep.LOCAL_ONLY
    assert local.info[domain_prep.INFO_AUTHOR] == ROLE_CLINICIAN
    record = local.info[domain_prep.INFO_DOMAIN]
    assert (record["method"], record["images"], record["steps_taken"]) == ("statistics", 12, 0)
    assert record["local_only"] is True and local.privacy == {}
    assert f"Published v{local.id} · prepared for new-modality.npz (statistics, 12 images)" in (
        texts(at, "success")
    )
    assert list(at.dataframe[0].value["version"]) == [local.id]

    # The version's domain mean is the base model's mean feature of the studies (statistics
    # leaves the weights as they are), and it comes back through Registry.load_model.
    reg = Registry.open(env["registry"])
    base, prepared = reg.load_model(registry), reg.load_model(local.id)
    images = torch.from_numpy(load_npz(studies, base.pipeline).images)
    assert prepared.domain_mean is not None and base.domain_mean is None
    torch.testing.assert_close(prepared.domain_mean, embed(base.model, images).mean(0))
    for name, weight in base.model.state_dict().items():
        torch.testing.assert_close(prepared.model.state_dict()[name], weight)
    # Only global versions go to the federation, whose code reads kind "global" alone.
    assert [e.id for e in reg.entries(kind="global")] == [registry]


def test_an_npz_of_images_only_is_prepared(registry, make_app, env, studies, tmp_path) -> None:
    """Issue 24, item 3: an unlabelled .npz was refused for its missing 'labels'."""
    with np.load(studies) as data:
        images = data["images"]
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, images=images)  # no labels, no classes
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    prepare(at, str(unlabelled))
    assert not at.exception and not at.error, texts(at, "error")
    [local] = local_versions(env["registry"])
    assert local.info[domain_prep.INFO_DOMAIN]["images"] == len(images)
    np.savez(tmp_path / "no-images.npz", labels=np.zeros(3, dtype=np.int64))
    prepare(at, str(tmp_path / "no-images.npz"))
    assert "no images (a key images or" in texts(at, "error") and "keys present: labels" in (
        texts(at, "error")
    )


def test_adapt_page_offers_and_names_the_local_version(registry, make_app, env, studies) -> None:
    prepared = domain_prep.prepare_model(
        env["registry"],
        base_version=registry,
        source=studies,
        config=DomainConfig(method="statistics"),
    )
    at = make_app(ROLE_CLINICIAN).run()
    assert not at.exception
    options = at.selectbox(key="adapt_base").options
    assert options[0] == (
        f"v{prepared.entry.id} · prepared for new-modality.npz (statistics, 12 images) · local, "
        f"from v{registry}"
    )
    assert options[1].startswith(f"v{registry} global-round-2 · ε 2.50")
    at.selectbox(key="adapt_base").set_value(prepared.entry.id).run()
    note = texts(at, "info")
    assert f"Using v{prepared.entry.id}: v{registry} prepared on this hospital's 12" in note
    assert domain_prep.CENTRE_ACTIVE in note and "Centring" not in note  # in plain words
    at.selectbox(key="adapt_base").set_value(registry).run()
    assert "without a domain preparation" in texts(at, "info")
    assert "on average at this hospital" not in texts(at, "info")


def test_centring_note_matches_what_adaptation_does(registry, env, studies) -> None:
    # The page's statement must follow clinic.adapt_cases: adapt with two different domain means
    # and see whether the result changes.
    prepared = domain_prep.prepare_model(
        env["registry"], base_version=registry, source=studies, config=DomainConfig("statistics")
    )
    model = Registry.open(env["registry"]).load_model(prepared.entry.id)
    images = load_npz(studies, model.pipeline)
    support = clinic.SupportSet(
        images=images.images[::2], labels=images.labels[::2], classes=("a", "b"), names=("x",) * 6
    )
    other = dataclasses.replace(model, domain_mean=model.domain_mean + 5.0)
    query = torch.from_numpy(images.images[1::2])
    for mode in ADAPT_MODES:
        logits = [
            clinic.adapt_cases(
                m, support, mode=mode, base_version=1, with_reliability=False
            ).classifier.logits(query)
            for m in (model, other)
        ]
        uses_mean = not torch.allclose(*logits)
        assert domain_prep.centring_active(mode, domain_mean=model.domain_mean) == uses_mean, mode
        assert not domain_prep.centring_active(mode, domain_mean=None)


def test_adapter_on_a_local_version_loads_with_its_domain_mean(
    registry, env, studies, case_images
) -> None:
    prepared = domain_prep.prepare_model(
        env["registry"], base_version=registry, source=studies, config=DomainConfig("statistics")
    )
    model = Registry.open(env["registry"]).load_model(prepared.entry.id)
    names = sorted(case_images)[:2]
    images = np.stack(
        [
            load_npz(studies, model.pipeline).images[0],
            load_npz(studies, model.pipeline).images[-1],
        ]
        * 2
    )
    support = clinic.SupportSet(
        images=images, labels=np.array([0, 1, 0, 1]), classes=tuple(names), names=("a",) * 4
    )
    adaptation = clinic.adapt_cases(
        model, support, mode="prototype", base_version=prepared.entry.id
    )
    saved = adapters.save_adapter(env["registry"], adaptation, name="on-local", condition="lesions")
    assert saved.parent == prepared.entry.id
    loaded, base = adapters.load_adapter(env["registry"], saved.id)
    assert base.domain_mean is not None
    torch.testing.assert_close(base.domain_mean, model.domain_mean)
    query = torch.from_numpy(images)
    torch.testing.assert_close(loaded.classifier.logits(query), adaptation.classifier.logits(query))


def test_bad_sources_give_a_message_and_publish_nothing(
    registry, make_app, env, studies, tmp_path, monkeypatch
) -> None:
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    prepare(at, str(tmp_path / "nowhere"))
    assert not at.exception
    assert "does not exist on this machine" in texts(at, "error")
    notes = tmp_path / "notes.txt"
    notes.write_text("not images")
    prepare(at, str(notes))
    assert "neither a folder" in texts(at, "error")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    prepare(at, str(empty))
    assert "cannot use these studies" in texts(at, "error") and "no image files" in texts(
        at, "error"
    )
    prepare(at, "")
    assert "give the folder" in texts(at, "error")
    assert local_versions(env["registry"]) == []

    monkeypatch.setenv(ENV_DATA_ROOTS, str(tmp_path / "archive"))
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    prepare(at, str(studies))
    assert "outside the folders this dashboard may read" in texts(at, "error")
    assert local_versions(env["registry"]) == []
    with pytest.raises(SourceError, match="outside"):
        domain_prep.resolve_source(
            str(tmp_path / "archive" / ".." / "studies"), roots=(tmp_path / "archive",)
        )


def test_prepare_page_roles_and_method_help() -> None:
    assert set(domain_prep.METHOD_HELP) == set(DOMAIN_METHODS)
    for role in (ROLE_CLINICIAN, ROLE_IT):
        assert ui.PREPARE_PAGE in ui.ROLE_PAGES[role]
    assert ui.PREPARE_PAGE not in ui.ROLE_PAGES[ROLE_ADMIN]


def test_prepare_page_without_a_model(env, store, make_app) -> None:
    at = make_app(ROLE_IT, ROLE_CLINICIAN).run()  # both roles: the page is listed once
    at.switch_page("screens/prepare.py").run()
    assert not at.exception
    assert "No model yet" in texts(at, "warning")
    files = [file for file, _, _ in ui.role_pages((ROLE_IT, ROLE_CLINICIAN))]
    assert files == ["federation.py", "prepare.py", "adapt.py", "classify.py"]


def test_training_preparation_reports_progress_and_changes_the_encoder(
    registry, env, studies
) -> None:
    seen: list[tuple[float, str]] = []
    prepared = domain_prep.prepare_model(
        env["registry"],
        base_version=registry,
        source=studies,
        config=DomainConfig(method="contrastive", steps=3),
        on_progress=lambda fraction, text: seen.append((fraction, text)),
    )
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "training: step 3 of at most 3" in [t for _, t in seen]
    assert prepared.steps == 3 and prepared.entry.info["domain"]["steps_taken"] == 3
    reg = Registry.open(env["registry"])
    base, local = reg.load_model(registry), reg.load_model(prepared.entry.id)
    changed = [
        name
        for name, weight in base.model.state_dict().items()
        if not torch.equal(local.model.state_dict()[name], weight)
    ]
    assert changed and local.domain_mean is not None


def test_no_folder_is_read_unless_it_names_it(registry, make_app, env, studies, monkeypatch):
    """Issue 24, item 12: with no data roots configured, any path was accepted."""
    monkeypatch.delenv(ENV_DATA_ROOTS)
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    assert "No folder is open to this dashboard" in texts(at, "caption")
    prepare(at, str(studies))
    assert "may read no folder yet" in texts(at, "error")
    assert local_versions(env["registry"]) == []


def test_a_running_preparation_can_be_cancelled(registry, make_app, env, studies) -> None:
    """Issue 24, item 12: Prepare had no Cancel."""
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    at.number_input(key="prepare_minutes").set_value(2.0)
    prepare(at, str(studies), method="contrastive")
    job = at.session_state[PREPARE_JOB_KEY]
    assert job.running and at.button(key="prepare_cancel")  # a progress bar and Cancel
    job.cancel()
    assert job.wait(60)
    at.run()
    assert "Preparation cancelled: nothing was published." in texts(at, "info")
    assert local_versions(env["registry"]) == []


def test_studies_pulled_from_the_archive_prepare_a_version(
    registry, make_app, env, orthanc_archive, monkeypatch
) -> None:
    """Issue 24, item 12: Prepare worked only from a server folder."""
    from pydicom.uid import generate_uid

    from app.dashboard import settings as dashboard_settings
    from tests.app.dashboard.orthanc import dicom_bytes
    from tests.app.dashboard.pages import search_archive

    tag = generate_uid()[-6:]
    rng = np.random.default_rng(2)
    for i in range(4):  # four one-image studies of one made-up patient
        pixels = rng.integers(0, 255, (40, 40)).astype(np.uint8)
        orthanc_archive.store(
            dicom_bytes(pixels, study=generate_uid(), series=generate_uid(), modality="US",
                        patient_id=f"PP-{tag}", accession=f"P{tag}-{i}")
        )  # fmt: skip
    monkeypatch.setenv(dashboard_settings.ENV_DICOMWEB, orthanc_archive.dicomweb)
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/prepare.py").run()
    at.radio(key="prepare_kind").set_value(at.radio(key="prepare_kind").options[1]).run()
    search_archive(at, key="prepare_archive", patient=f"PP-{tag}")
    at.button(key="prepare_archive_pull_all").click().run()
    assert not at.exception
    assert "4 image(s) from 4 studies added to the studies to prepare from" in texts(at, "success")
    at.radio(key="prepare_method").set_value("statistics")
    at.button(key="prepare_run").click().run()
    assert not at.exception, texts(at, "error")
    [local] = local_versions(env["registry"])
    record = local.info[domain_prep.INFO_DOMAIN]
    assert (record["images"], record["source"]) == (4, "4 studies from the archive or uploads")


def test_a_frozen_base_is_offered_statistics_first(env, make_app) -> None:
    """The public encoder has nothing to train: the page's default used to be a training method
    that ran for minutes and changed nothing."""
    config = BackboneConfig(
        name="efficientnet_lite0", image_size=32, norm="batch", trainable="none"
    )
    model = build_backbone(config)

    def write(folder: Path) -> None:
        save_model_dir(
            folder, model, backbone=config, pipeline=PipelineConfig(image_size=32),
            meta=MetaConfig(),
        )  # fmt: skip

    Registry.open(env["registry"], create=True).publish(
        write, kind="global", name="frozen", privacy=DEFAULT_PRIVACY
    )
    at = make_app(ROLE_CLINICIAN).run()
    at.switch_page("screens/prepare.py").run()
    assert not at.exception, at.exception
    assert at.radio(key="prepare_method").value == "statistics"
