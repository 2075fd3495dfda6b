"""Choices that stay put (issue 24, items 6 and 7): the adapter and the base model are each user's
own, kept across page switches, reloads and logins, and change only when the user changes them;
without a choice, the base model is the newest federated version (else the public encoder) and
the adapter is this session's adaptation or none, never the newest one whoever made it."""

from __future__ import annotations

from pathlib import Path

from app.dashboard import adapters, clinic, preferences
from app.dashboard.auth import ROLE_CLINICIAN, UserStore
from app.dashboard.uploads import Upload, load_uploads
from models.pipeline import PipelineConfig
from models.registry import KIND_GLOBAL, KIND_LOCAL, KIND_PUBLIC, Registry, RegistryEntry
from tests.app.dashboard.conftest import PASSWORD, SIZE, texts, write_tiny_model


def _save_adapter(registry: Path, version: int, case_images, *, name: str, author: str) -> int:
    """An adapter of ``version`` saved by ``author`` (prototypes on 2 cases per class)."""
    model = Registry.open(registry).load_model(version)
    names = sorted(case_images)
    cases = [
        load_uploads(
            [Upload(f"{c}_{j}.png", d) for j, d in enumerate(case_images[c][:2])],
            pipeline=PipelineConfig(image_size=SIZE),
        )
        for c in names
    ]
    support = clinic.build_support(names, cases)
    adaptation = clinic.adapt_cases(
        model, support, mode="prototype", base_version=version, condition=name
    )
    return adapters.save_adapter(registry, adaptation, name=name, condition=name, author=author).id


def _entry(id_: int, kind: str) -> RegistryEntry:
    return RegistryEntry(
        id=id_,
        kind=kind,
        name=f"m{id_}",
        created="2026-01-01T00:00:00Z",
        parent=None,
        code_version="",
        metrics={},
        privacy={},
        info={},
        path=Path("."),
    )


def test_default_base_is_the_newest_federated_else_the_public_one() -> None:
    newest_first = [_entry(5, KIND_LOCAL), _entry(4, KIND_PUBLIC), _entry(3, KIND_GLOBAL)]
    assert adapters.default_base(newest_first) == 3  # not the newer local or public version
    assert adapters.default_base([_entry(5, KIND_LOCAL), _entry(4, KIND_PUBLIC)]) == 4
    assert adapters.default_base([_entry(5, KIND_LOCAL)]) is None  # a local one: only chosen


def test_the_adapter_stays_chosen_and_is_never_someone_elses_newest(
    registry, env, store: UserStore, make_app, case_images
) -> None:
    older = _save_adapter(env["registry"], registry, case_images, name="mine", author="clinician")
    _save_adapter(env["registry"], registry, case_images, name="theirs", author="other")
    at = make_app(ROLE_CLINICIAN).run()
    at.switch_page("screens/classify.py").run()
    box = at.selectbox(key="classify_adapter")
    assert box.value is None  # nothing chosen yet: not the newest adapter
    assert "Choose the adapter" in texts(at, "info")
    box.set_value(older).run()
    assert not at.exception
    at.switch_page("screens/adapt.py").run()
    at.switch_page("screens/classify.py").run()
    assert at.selectbox(key="classify_adapter").value == older  # after a page switch
    again = make_app(ROLE_CLINICIAN).run()  # a reload or the next login: a new session
    again.switch_page("screens/classify.py").run()
    assert again.selectbox(key="classify_adapter").value == older
    store.add("nurse", PASSWORD, role=ROLE_CLINICIAN)
    assert preferences.Preferences(env["users"]).get("nurse", preferences.ADAPTER) is None


def test_the_base_model_stays_chosen_across_sessions(registry, env, make_app) -> None:
    newer = write_tiny_model(env["registry"])  # another federated version, published later
    at = make_app(ROLE_CLINICIAN).run()
    assert at.selectbox(key="adapt_base").value == newer  # the newest federated version
    at.selectbox(key="adapt_base").set_value(registry).run()
    assert not at.exception
    at.switch_page("screens/classify.py").run()
    at.switch_page("screens/adapt.py").run()
    assert at.selectbox(key="adapt_base").value == registry
    write_tiny_model(env["registry"])  # a third version arrives: the choice does not move
    again = make_app(ROLE_CLINICIAN).run()
    assert again.selectbox(key="adapt_base").value == registry


def test_an_empty_registry_offers_the_public_base(env, store, make_app) -> None:
    """The one dashboard test that touches the public encoder (registering it, not running it
    on images)."""
    at = make_app(ROLE_CLINICIAN).run()
    assert not at.exception
    box = at.selectbox(key="adapt_base")
    (entry,) = Registry.open(env["registry"]).entries()
    assert entry.kind == KIND_PUBLIC and box.value == entry.id
    assert "trained on no patient's data" in box.options[0]
    at.switch_page("screens/classify.py").run()
    assert not at.exception
    assert "No adapter yet" in texts(at, "info")
