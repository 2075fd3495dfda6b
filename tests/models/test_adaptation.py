"""Invariants of the adaptation stack: embedding (flip TTA), feature map, heads, modes."""

import copy

import pytest
import torch
from torch import nn

from models.adaptation import (
    ADAPT_MODES,
    FEATURE_NORM,
    AdaptConfig,
    FeatureMap,
    adapt,
    embed,
    feature_map,
    fit_head,
    refine_prototypes,
)
from models.networks import BackboneConfig, build_backbone


def _blobs(ways=3, per_class=6, dim=8, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ways, dim, generator=g) * 2
    y = torch.arange(ways).repeat_interleave(per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_feature_map_centres_then_scales_to_the_cosine_norm():
    features = torch.randn(10, 5) + 3.0
    fmap = feature_map(AdaptConfig(centre=True), domain_mean=None, features=features)
    mapped = fmap(features)
    assert torch.allclose(fmap.mean, features.mean(0))
    assert torch.allclose(mapped.norm(dim=1), torch.full((10,), FEATURE_NORM), atol=1e-5)
    assert (
        feature_map(AdaptConfig(centre=False), domain_mean=None, features=features) == FeatureMap()
    )


def test_a_given_domain_mean_is_used_instead_of_the_images_at_hand():
    features = torch.randn(6, 4)
    mean = torch.full((4,), 7.0)
    fmap = feature_map(AdaptConfig(centre=True), domain_mean=mean, features=features)
    assert torch.equal(fmap.mean, mean)


def test_flip_averaged_embedding_is_invariant_to_flips_of_the_input():
    model = build_backbone(BackboneConfig(width=8, image_size=16))
    x = torch.rand(3, 3, 16, 16)
    plain = embed(model, x, tta=True)
    flipped = embed(model, x.flip(-1), tta=True)
    assert torch.allclose(plain, flipped, atol=1e-5)
    assert not torch.allclose(embed(model, x), embed(model, x.flip(-1)), atol=1e-5)


def test_refinement_with_unlabelled_points_of_a_class_pulls_its_prototype_towards_them():
    support, y = _blobs(ways=2, per_class=2, dim=2, spread=0.0)
    target = support[y == 0].mean(0) + torch.tensor([0.5, 0.5])
    unlabeled = target.repeat(20, 1)
    before = support[y == 0].mean(0)
    after = refine_prototypes(support, y, unlabeled, ways=2, steps=3)[0]
    assert (after - target).norm() < (before - target).norm()


def test_linear_head_fits_the_support_set_at_least_as_well_as_prototypes():
    x, y = _blobs(spread=1.5, seed=3)
    proto = fit_head(x, y, ways=3, config=AdaptConfig(mode="prototype"))
    linear = fit_head(x, y, ways=3, config=AdaptConfig(mode="linear", linear_steps=200))

    def right(head):
        return int(((x @ head["head.weight"].T + head["head.bias"]).argmax(1) == y).sum())

    assert right(linear) >= right(proto)
    assert right(linear) >= 0.8 * len(y)


def _patterns(side: int = 16) -> torch.Tensor:
    rows = (torch.arange(side) // 2 % 2).float()
    horizontal = rows[:, None].expand(side, side)
    checker = (rows[:, None] + rows[None, :]) % 2
    return torch.stack([horizontal, horizontal.T, checker])[:, None].expand(3, 3, side, side)


@pytest.mark.parametrize("mode", sorted(ADAPT_MODES))
@pytest.mark.parametrize("centre", [False, True])
def test_no_mode_mutates_the_base_model_and_each_separates_easy_classes(mode, centre):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=8, image_size=16))
    before = copy.deepcopy(model.state_dict())
    # Horizontal stripes, vertical stripes, a checkerboard: any sane head tells them apart.
    y = torch.arange(3).repeat_interleave(4)
    x = _patterns()[y] + 0.05 * torch.rand(
        12, 3, 16, 16, generator=torch.Generator().manual_seed(1)
    )
    config = AdaptConfig(mode=mode, centre=centre, finetune_steps=3, linear_steps=20)
    classifier = adapt(model, x, y, ways=3, config=config, unlabeled_x=x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    probs = classifier.predict_proba(x)
    assert torch.allclose(probs.sum(1), torch.ones(12), atol=1e-5)
    if mode != "maml":  # MAML's few inner steps from a random net need not separate them
        assert (probs.argmax(1) == y).float().mean() >= 0.9


def test_unknown_mode_lists_the_registered_ones():
    with pytest.raises(ValueError, match="prototype"):
        AdaptConfig(mode="nearest")


class _Offset(nn.Module):
    """Features shifted far from the origin: centring must remove the shift."""

    out_features = 2

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :2] + 100.0


def test_centring_removes_a_shared_offset_that_dominates_raw_distances():
    # Two classes differing in direction, not in norm, around a large shared offset.
    sx = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]).view(4, 2, 1, 1)
    sy = torch.tensor([0, 0, 1, 1])
    qx = torch.tensor([[0.8, 0.0], [0.0, 0.8]]).view(2, 2, 1, 1)
    classifier = adapt(_Offset(), sx, sy, ways=2, config=AdaptConfig(centre=True), unlabeled_x=qx)
    assert classifier.logits(qx).argmax(1).tolist() == [0, 1]


class _Stop(Exception):
    """Raised by a step hook, as a Cancel button's hook does."""


@pytest.mark.parametrize("mode", sorted(ADAPT_MODES))
def test_every_mode_reports_its_steps_and_a_raising_hook_stops_it_leaving_the_base(mode):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=8, image_size=16))
    before = copy.deepcopy(model.state_dict())
    y = torch.arange(3).repeat_interleave(2)
    x = _patterns()[y]
    config = AdaptConfig(mode=mode, finetune_steps=4, linear_steps=5)
    seen: list[tuple[int, int]] = []
    adapt(model, x, y, ways=3, config=config, on_step=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]  # ends at "all steps done"
    if mode in ("finetune", "linear"):
        steps = config.finetune_steps if mode == "finetune" else config.linear_steps
        assert seen[:steps] == [(i, steps) for i in range(1, steps + 1)]

    calls: list[int] = []

    def stop_at_first(done: int, total: int) -> None:
        calls.append(done)
        raise _Stop

    with pytest.raises(_Stop):
        adapt(model, x, y, ways=3, config=config, on_step=stop_at_first)
    assert calls == [1]  # stopped at the first step, not after the loop
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_step_hook_block_hears_adaptations_started_by_other_functions():
    from models.adaptation import step_hook

    model = build_backbone(BackboneConfig(width=8, image_size=16))
    y = torch.arange(3).repeat_interleave(2)
    heard: list[tuple[int, int]] = []
    with step_hook(lambda d, t: heard.append((d, t))):
        adapt(model, _patterns()[y], y, ways=3, config=AdaptConfig(mode="linear", linear_steps=3))
    adapt(model, _patterns()[y], y, ways=3, config=AdaptConfig(mode="linear", linear_steps=3))
    assert heard == [(1, 3), (2, 3), (3, 3), (1, 1)]  # only inside the block


def test_finetuning_a_fully_frozen_encoder_embeds_the_support_once_with_the_same_result(
    monkeypatch,
):
    config = BackboneConfig(
        name="efficientnet_lite0", image_size=32, norm="batch", trainable="none"
    )
    torch.manual_seed(0)
    model = build_backbone(config).eval()
    support = torch.rand(6, 3, 32, 32)
    labels = torch.arange(3).repeat_interleave(2)
    queries = torch.rand(4, 3, 32, 32)
    adapt_config = AdaptConfig(mode="finetune", finetune_steps=5, centre=True)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    fast = adapt(model, support, labels, ways=3, config=adapt_config)
    passes = len(calls)
    monkeypatch.setattr("models.adaptation._features_fixed", lambda *_: False)
    slow = adapt(model, support, labels, ways=3, config=adapt_config)

    assert passes == 1  # the support, embedded once; the steps run on its features
    assert len(calls) - passes == 1 + adapt_config.finetune_steps  # without: once per step
    assert torch.allclose(fast.logits(queries), slow.logits(queries), atol=1e-4)
