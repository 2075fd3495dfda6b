import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from models.errors import BatchNormError, WeightsError
from models.freezing import (
    FrozenBatchNorm2d,
    check_batchnorm_frozen,
    is_fully_frozen,
    trainable_parameters,
)
from models.meta import MetaConfig
from models.model_dir import CONFIG, load_model_dir, save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.public_backbones import BATCHNORM_BACKBONES
from models.weights import WeightsRecord, has_batchnorm_statistics, load_weights, start_backbone

SIZE = 32  # every public backbone downsamples 32 px to at least 1x1


def _randomise_statistics(model):
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen))
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("name", sorted(BATCHNORM_BACKBONES))
def test_frozen_batchnorm_statistics_never_update_in_train_mode(name):
    model = _randomise_statistics(
        build_backbone(BackboneConfig(name=name, image_size=SIZE, norm="batch"))
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, SIZE, SIZE, generator=gen).expand(2, -1, -1, -1)
    x = x * torch.tensor([1.0, 5.0])[:, None, None, None]  # two very different images

    model.train()
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(2)])

    check_batchnorm_frozen(model)
    assert before  # the backbone does hold BatchNorm statistics
    for key, value in model.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_trainable_batchnorm_is_refused_with_its_name():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    with pytest.raises(BatchNormError, match=r"1 \(BatchNorm2d\)"):
        check_batchnorm_frozen(model)


def test_config_refuses_batchnorm_without_public_statistics_and_unknown_subsets():
    with pytest.raises(ValueError, match="norm"):
        BackboneConfig(name="conv4", norm="batch")
    with pytest.raises(ValueError, match="norm"):
        BackboneConfig(name="vit_tiny", norm="batch")
    with pytest.raises(ValueError, match="trainable"):
        BackboneConfig(name="resnet10", trainable="most")


def test_vit_refuses_an_image_size_off_its_patch_grid():
    with pytest.raises(ValueError, match="patch"):
        build_backbone(BackboneConfig(name="vit_tiny", image_size=36))


def _resnet10_batch_file(tmp_path, *, prefix, suffix):
    source = _randomise_statistics(
        build_backbone(BackboneConfig(name="resnet10", image_size=SIZE, norm="batch"))
    )
    state = {prefix + k: v.detach().clone() for k, v in source.state_dict().items()}
    state[prefix + "fc.weight"] = torch.zeros(10, 512)  # the source's classifier
    path = tmp_path / f"public{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    return source, path


@pytest.mark.parametrize(
    ("prefix", "suffix"), [("encoder.", ".safetensors"), ("module.backbone.", ".pth")]
)
def test_weights_round_trip_through_a_local_file_with_prefixes(tmp_path, prefix, suffix):
    source, path = _resnet10_batch_file(tmp_path, prefix=prefix, suffix=suffix)
    target = build_backbone(BackboneConfig(name="resnet10", image_size=SIZE, norm="batch"))

    record = load_weights(target, path)

    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.file == path.name
    assert record.ignored == (prefix + "fc.weight",)
    assert record.missing == () and record.unexpected == ()
    assert record.loaded == len([k for k in source.state_dict() if "num_batches" not in k])
    assert has_batchnorm_statistics(path)


def test_batchnorm_statistics_into_a_groupnorm_backbone_are_refused(tmp_path):
    _, path = _resnet10_batch_file(tmp_path, prefix="", suffix=".safetensors")
    target = build_backbone(BackboneConfig(name="resnet10", image_size=SIZE))

    with pytest.raises(WeightsError, match="norm='batch'"):
        load_weights(target, path)


def test_weights_that_fit_nothing_or_the_wrong_shape_are_refused(tmp_path):
    small = build_backbone(BackboneConfig(width=16, image_size=SIZE))
    wide = tmp_path / "wide.safetensors"
    save_file(build_backbone(BackboneConfig(width=32, image_size=SIZE)).state_dict(), str(wide))
    other = tmp_path / "other.pt"
    torch.save({"decoder.weight": torch.zeros(3)}, other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    pickled_code = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled_code)  # a whole module: needs unpickling code

    with pytest.raises(WeightsError, match="wrong shape"):
        load_weights(small, wide)
    with pytest.raises(WeightsError, match="no tensor fits"):
        load_weights(small, other)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(small, garbage)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(small, pickled_code)


def test_partial_files_load_and_report_missing_keys_unless_strict(tmp_path):
    source = build_backbone(BackboneConfig(width=16, image_size=SIZE))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.3.")}
    state["projector.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    target = build_backbone(BackboneConfig(width=16, image_size=SIZE))

    record = load_weights(target, path)

    assert record.missing and all(k.startswith("blocks.3.") for k in record.missing)
    assert record.unexpected == ("projector.weight",)
    assert torch.equal(
        target.state_dict()["blocks.0.0.conv.weight"], state["blocks.0.0.conv.weight"]
    )
    with pytest.raises(WeightsError, match="strict"):
        load_weights(target, path, strict=True)


def test_model_directory_records_the_weights_file_and_keeps_frozen_parts(tmp_path):
    source, path = _resnet10_batch_file(tmp_path, prefix="", suffix=".safetensors")
    config = BackboneConfig(name="resnet10", image_size=SIZE, norm="batch", trainable="none")
    model = build_backbone(config)
    record = load_weights(model, path)

    save_model_dir(
        tmp_path / "m",
        model,
        backbone=config,
        pipeline=PipelineConfig(image_size=SIZE),
        meta=MetaConfig(),
        weights=record,
    )
    loaded = load_model_dir(tmp_path / "m")

    saved = json.loads((tmp_path / "m" / CONFIG).read_text())
    assert WeightsRecord.from_dict(saved["weights"]) == record
    assert saved["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.backbone == config
    assert is_fully_frozen(loaded.model)
    assert trainable_parameters(loaded.model) == {}
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_start_backbone_switches_to_frozen_batchnorm_for_files_with_statistics(tmp_path):
    _, path = _resnet10_batch_file(tmp_path, prefix="", suffix=".safetensors")

    started = start_backbone(BackboneConfig(name="resnet10", image_size=SIZE), weights=path)

    assert started.config.norm == "batch" and started.weights.loaded > 0
    check_batchnorm_frozen(started.model)
    with pytest.raises(WeightsError, match="no BatchNorm form"):
        start_backbone(BackboneConfig(width=16, image_size=SIZE), weights=path)
    plain = start_backbone(BackboneConfig(width=16, image_size=SIZE))
    assert plain.weights is None and plain.config == BackboneConfig(width=16, image_size=SIZE)
