"""The within-class metric adapter (models/feature_adapter.py ``WithinClassMetric``): the identity
until a metric is released, a norm-keeping metric after it, kept in a model directory, and
applied by the few-shot adaptation's feature map after centring and part normalisation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from models.adaptation import AdaptConfig, FeatureMap, adapt, embed, feature_map, feature_parts
from models.episodes import EpisodeConfig
from models.evaluation import EpisodeLogits, evaluate
from models.feature_adapter import (
    AdaptedEncoder,
    WithinClassMetric,
    feature_transform,
    normalise_parts,
)
from models.meta import MetaConfig
from models.model_dir import LoadedModel, load_model_dir, save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset

SIZE = 32
BACKBONE = BackboneConfig(image_size=SIZE, width=8, trainable="none", adapter="within-class")


def _orthonormal(d: int, p: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, p, generator=generator))
    return q


def _model() -> AdaptedEncoder:
    torch.manual_seed(0)
    model = build_backbone(BACKBONE)
    assert isinstance(model, AdaptedEncoder) and isinstance(model.adapter, WithinClassMetric)
    return model.eval()


def _strong_metric(metric: WithinClassMetric, seed: int = 0) -> None:
    """Stage 2 with a full basis and an inner that keeps one direction and all but removes the
    rest: far from the identity."""
    d, p = metric.basis.shape
    metric.basis.copy_(_orthonormal(d, p, seed))
    inner = torch.full((p,), 0.02)
    inner[0] = 1.0
    metric.inner.copy_(torch.diag(inner))
    metric.stage.fill_(2)


def test_at_stage_0_the_metric_is_the_identity_and_forward_normalises_parts() -> None:
    parts = (3, 5)
    metric = WithinClassMetric(parts)
    features = torch.randn(6, 8, 1, 1)
    torch.testing.assert_close(metric(features), normalise_parts(features.flatten(1), parts))
    mapped = torch.randn(6, 8)
    assert metric.transform(mapped) is mapped
    metric.stage.fill_(1)  # a released centre, no metric yet
    assert metric.transform(mapped) is mapped


def test_at_stage_2_the_metric_keeps_norms_and_shrinks_a_down_weighted_direction() -> None:
    d, p = 8, 4
    metric = WithinClassMetric((d,), basis_size=p)
    basis = _orthonormal(d, p)
    metric.basis.copy_(basis)
    metric.inner.copy_(torch.diag(torch.tensor([0.1, 1.0, 1.0, 1.0])))
    metric.stage.fill_(2)
    mapped = torch.randn(20, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    out = metric.transform(mapped)

    assert out.dtype == mapped.dtype
    torch.testing.assert_close(out.norm(dim=-1), mapped.norm(dim=-1))
    b = basis.double()
    # the down-weighted direction's share of each row drops against every other direction's
    before = (mapped @ b[:, 0]).abs() / (mapped @ b[:, 1:]).norm(dim=-1)
    after = (out @ b[:, 0]).abs() / (out @ b[:, 1:]).norm(dim=-1)
    torch.testing.assert_close(after, 0.1 * before, rtol=1e-5, atol=1e-6)
    # outside the basis the metric is the identity (up to the row's rescale to its norm)
    unscaled = mapped + (mapped @ b) @ (metric.inner.double() - torch.eye(p).double()) @ b.T
    scale = mapped.norm(dim=-1, keepdim=True) / unscaled.norm(dim=-1, keepdim=True)
    outside = torch.eye(d, dtype=torch.float64) - b @ b.T
    torch.testing.assert_close(out @ outside, scale * (mapped @ outside), rtol=1e-5, atol=1e-6)


def test_fit_public_basis_sets_orthonormal_columns() -> None:
    metric = WithinClassMetric((5, 7), basis_size=6)
    metric.fit_public_basis(torch.randn(40, 12, generator=torch.Generator().manual_seed(2)))
    basis = metric.basis.double()
    torch.testing.assert_close(
        basis.T @ basis, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_the_metric_round_trips_through_a_model_directory(tmp_path: Path) -> None:
    model = _model()
    metric = model.adapter
    _strong_metric(metric)
    metric.centre.copy_(torch.randn(metric.centre.shape))
    path = save_model_dir(
        tmp_path / "model",
        model,
        backbone=BACKBONE,
        pipeline=PipelineConfig(image_size=SIZE),
        meta=MetaConfig(),
    )

    loaded = load_model_dir(path).model

    assert isinstance(loaded, AdaptedEncoder) and isinstance(loaded.adapter, WithinClassMetric)
    for name in ("stage", "inner", "basis", "centre"):
        torch.testing.assert_close(getattr(loaded.adapter, name), getattr(metric, name))
    assert int(loaded.adapter.stage) == 2
    mapped = torch.randn(3, metric.out_features)
    torch.testing.assert_close(loaded.adapter.transform(mapped), metric.transform(mapped))


def test_feature_transform_is_the_within_class_adapters_and_none_otherwise() -> None:
    model = _model()
    assert feature_transform(model) == model.adapter.transform
    assert feature_transform(build_backbone(BackboneConfig(image_size=SIZE, width=8))) is None
    scale = build_backbone(
        BackboneConfig(image_size=SIZE, width=8, trainable="none", adapter="scale")
    )
    assert feature_transform(scale) is None


def test_the_feature_map_applies_the_transform_after_normalisation_only() -> None:
    model = _model()
    _strong_metric(model.adapter)
    raw = torch.randn(10, model.out_features)
    transform = feature_transform(model)

    fmap = feature_map(AdaptConfig(), domain_mean=None, features=raw, transform=transform)
    plain = FeatureMap(mean=raw.mean(0), normalise=True)

    torch.testing.assert_close(fmap(raw), model.adapter.transform(plain(raw)))
    torch.testing.assert_close(fmap(raw).norm(dim=-1), plain(raw).norm(dim=-1))
    assert not torch.allclose(fmap(raw), plain(raw), atol=1e-3)
    # no centring: the identity, with no transform
    off = feature_map(
        AdaptConfig(centre=False), domain_mean=None, features=raw, transform=transform
    )
    assert off == FeatureMap()
    # no normalisation: never the transform
    torch.testing.assert_close(FeatureMap(transform=transform)(raw), raw)


def _episode_logits(model: AdaptedEncoder, data) -> list[EpisodeLogits]:
    seen: list[EpisodeLogits] = []
    evaluate(
        model,
        data,
        episode=EpisodeConfig(3, 3, 4),
        episodes=3,
        seed=0,
        on_logits=seen.append,
    )
    return seen


def test_evaluation_and_adaptation_apply_the_metric_end_to_end() -> None:
    data = synthetic_imageset(
        config=PipelineConfig(image_size=SIZE), n_classes=4, per_class=8, size=SIZE
    )
    model = _model()

    before = _episode_logits(model, data)
    images = torch.from_numpy(data.images[:12])
    labels = torch.from_numpy(data.labels[:12]) % 2
    plain = adapt(model, images, labels, ways=2).logits(images)
    _strong_metric(model.adapter)
    after = _episode_logits(model, data)
    classifier = adapt(model, images, labels, ways=2)

    # evaluate's frozen path (models/evaluation.py) and its held-out logits (models/calibration.py)
    for b, a in zip(before, after, strict=True):
        assert not np.allclose(b.query_logits, a.query_logits, atol=1e-4)
        assert not np.allclose(b.held_out.logits, a.held_out.logits, atol=1e-4)
    # adapt's frozen modes (models/adaptation.py): the classifier maps with the metric
    assert classifier._features.transform == model.adapter.transform
    assert not torch.allclose(plain, classifier.logits(images), atol=1e-4)
    # back at stage 0 the same model gives the plain logits again
    model.adapter.stage.fill_(0)
    torch.testing.assert_close(_episode_logits(model, data)[0].query_logits, before[0].query_logits)


def test_the_dashboards_known_class_adaptation_maps_with_the_metric() -> None:
    from app.dashboard.known_classes import adapt_with_prototypes

    model = _model()
    _strong_metric(model.adapter)
    loaded = LoadedModel(
        model=model,
        backbone=BACKBONE,
        pipeline=PipelineConfig(image_size=SIZE),
        meta=MetaConfig(),
        config={},
    )
    images = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    protos = np.random.default_rng(0).normal(size=(1, model.out_features)).astype(np.float32)
    known = SimpleNamespace(release=SimpleNamespace(prototypes=protos), rows=((1, 0),))
    config = AdaptConfig(mode="ridge")

    fit = adapt_with_prototypes(
        loaded,
        images,
        labels,
        ways=2,
        config=config,
        known=known,  # type: ignore[arg-type]
    )

    raw = embed(model, images)
    expected = feature_map(
        config,
        domain_mean=None,
        features=raw,
        parts=feature_parts(model),
        transform=model.adapter.transform,
    )(raw)
    torch.testing.assert_close(fit.mapped, expected)
    plain = FeatureMap(mean=raw.mean(0), normalise=True, parts=feature_parts(model))
    assert not torch.allclose(fit.mapped, plain(raw), atol=1e-3)
