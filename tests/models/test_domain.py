"""Preparing a model for a modality from unlabelled images: labels never matter, the source model
is untouched, and every input kind loads."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from models.domain import (
    DOMAIN_METHODS,
    DomainConfig,
    adapt_domain,
    default_method,
    load_unlabeled,
)
from models.efficientnet_lite import INPUT_MEAN, INPUT_STD
from models.errors import DataError, NothingToTrainError
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.self_supervised import ContrastiveConfig, contrastive_train, contrastive_views, nt_xent
from models.synthetic import synthetic_arrays

PIPELINE = PipelineConfig(image_size=16)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(width=8, image_size=16))


def _tiny_batchnorm() -> torch.nn.Module:
    """A frozen encoder with BatchNorm statistics, as the public start (random weights)."""
    torch.manual_seed(0)
    config = BackboneConfig(
        name="efficientnet_lite0", image_size=16, norm="batch", trainable="none"
    )
    return build_backbone(config)


# methods that train nothing (their steps are 0); only batch-statistics changes the model
NO_TRAINING = ("statistics", "batch-statistics")


def _npz(path, labels_seed=None):
    arrays = synthetic_arrays(n_classes=3, per_class=6, size=16, seed=0)
    if labels_seed is not None:
        arrays["labels"] = np.random.default_rng(labels_seed).permutation(arrays["labels"])
    np.savez_compressed(path, **arrays)
    return path


def test_shuffled_labels_give_a_bit_identical_model(tmp_path):
    a = load_unlabeled(_npz(tmp_path / "a.npz"), PIPELINE)
    b = load_unlabeled(_npz(tmp_path / "b.npz", labels_seed=7), PIPELINE)
    config = DomainConfig(method="contrastive", steps=3)
    ra = adapt_domain(_tiny(), a.images, config=config)
    rb = adapt_domain(_tiny(), b.images, config=config)
    for (key, va), vb in zip(
        ra.model.state_dict().items(), rb.model.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), key
    assert torch.equal(ra.domain_mean, rb.domain_mean)
    assert a.digest == b.digest


@pytest.mark.parametrize("method", sorted(DOMAIN_METHODS))
def test_each_method_leaves_the_source_untouched_and_gives_the_domain_mean(tmp_path, method):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images
    source = _tiny_batchnorm() if method == "batch-statistics" else _tiny()
    before = copy.deepcopy(source.state_dict())
    result = adapt_domain(source, images, config=DomainConfig(method=method, steps=2))
    for key, value in source.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert result.domain_mean.shape == (source.out_features,)
    changed = any(not torch.equal(v, before[k]) for k, v in result.model.state_dict().items())
    assert changed == (method != "statistics")
    assert result.steps == (0 if method in NO_TRAINING else 2)


def test_batch_statistics_are_the_images_own_and_nothing_else_changes(tmp_path):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images[:16]  # one batch
    source = _tiny_batchnorm()
    result = adapt_domain(source, images, config=DomainConfig(method="batch-statistics"))
    adapted = result.model
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    before, after = source.state_dict(), adapted.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]) == (not key.endswith(statistics)), key
    # the first BatchNorm sees the stem convolution's output, which no statistic shapes
    with torch.no_grad():
        stem = adapted._conv_stem((torch.from_numpy(images) - INPUT_MEAN) / INPUT_STD)
    first = adapted._bn0
    assert torch.allclose(first.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(first.running_var, stem.var(dim=(0, 2, 3)), rtol=1e-4)
    assert not first.training and all(not m.training for m in adapted.modules())
    assert result.steps == 0


def test_batch_statistics_need_batchnorm_layers(tmp_path):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images
    with pytest.raises(DataError, match="BatchNorm"):
        adapt_domain(_tiny(), images, config=DomainConfig(method="batch-statistics"))


def test_norm_method_trains_only_normalisation_parameters(tmp_path):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images
    source = _tiny()
    result = adapt_domain(source, images, config=DomainConfig(method="contrastive-norm", steps=2))
    norm_names = {
        f"{name}.{p}"
        for name, m in source.named_modules()
        if isinstance(m, torch.nn.GroupNorm)
        for p, _ in m.named_parameters(recurse=False)
    }
    new = result.model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(value, new[key]) == (key not in norm_names), key


def test_folder_and_csv_sources_load_without_labels(tmp_path):
    folder = tmp_path / "studies" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"s{i}.png")
    from_folder = load_unlabeled(tmp_path / "studies", PIPELINE)
    assert from_folder.images.shape == (3, 3, 16, 16)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\nstudies/nested/s0.png\nstudies/nested/s2.png\n")
    assert load_unlabeled(manifest, PIPELINE).images.shape[0] == 2


def test_an_empty_or_unknown_source_is_a_typed_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_unlabeled(tmp_path / "empty", PIPELINE)
    with pytest.raises(DataError, match="npz"):
        load_unlabeled(tmp_path / "x.txt", PIPELINE)


def test_views_stay_in_range_and_differ_between_draws():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    v1 = contrastive_views(x, generator=g, crop_scale=(0.3, 1.0))
    v2 = contrastive_views(x, generator=g, crop_scale=(0.3, 1.0))
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1
    assert not torch.allclose(v1, v2)


def test_nt_xent_is_low_for_matching_pairs_and_high_for_swapped_ones():
    z = torch.eye(4) * 5
    matched = nt_xent(z, z.clone(), temperature=0.2)
    swapped = nt_xent(z, z.roll(1, dims=0), temperature=0.2)
    assert matched < 0.1 < 1.0 < swapped


def test_contrastive_training_lowers_its_loss(tmp_path):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images
    config = ContrastiveConfig(steps=25, batch_size=16, seed=0)
    losses = contrastive_train(_tiny(), images, config=config)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_a_frozen_encoder_defaults_to_statistics_and_refuses_training(tmp_path):
    images = load_unlabeled(_npz(tmp_path / "u.npz"), PIPELINE).images
    frozen, trainable = _tiny_batchnorm(), _tiny()
    assert default_method(frozen) == "statistics"
    assert default_method(trainable) == DomainConfig.method
    for method in ("contrastive", "contrastive-norm"):
        with pytest.raises(NothingToTrainError, match="frozen"):
            adapt_domain(frozen, images, config=DomainConfig(method=method, steps=2))
