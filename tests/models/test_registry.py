import pytest
import torch

from models.errors import RegistryError
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.registry import Registry


def _write_model(seed: int):
    torch.manual_seed(seed)
    backbone = BackboneConfig(image_size=32, width=8)
    model = build_backbone(backbone)

    def write(folder):
        save_model_dir(
            folder,
            model,
            backbone=backbone,
            pipeline=PipelineConfig(image_size=32),
            meta=MetaConfig(),
        )

    return model, write


def test_missing_registry_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="no model registry"):
        Registry.open(tmp_path / "nothing")


def test_publish_list_and_load_round_trip(tmp_path):
    registry = Registry.open(tmp_path / "reg", create=True)
    model, write = _write_model(0)
    first = registry.publish(
        write, kind="global", name="round-1", metrics={"acc": 0.5}, privacy={"a": {"eps": 1.0}}
    )
    _, write2 = _write_model(1)
    second = registry.publish(write2, kind="global", name="round-2", parent=first.id)
    reopened = Registry.open(tmp_path / "reg")
    assert [e.name for e in reopened.entries(kind="global")] == ["round-1", "round-2"]
    assert reopened.latest().id == second.id and reopened.get(second.id).parent == first.id
    assert reopened.get(first.id).privacy == {"a": {"eps": 1.0}}
    loaded = reopened.load_model(first.id)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_failed_write_leaves_no_version(tmp_path):
    registry = Registry.open(tmp_path / "reg", create=True)

    def broken(folder):
        folder.mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError):
        registry.publish(broken, kind="adapter", name="x")
    assert registry.entries() == []
    assert [p.name for p in (tmp_path / "reg").iterdir()] == ["registry.sqlite"]
    with pytest.raises(RegistryError, match="holds no global"):
        registry.latest()
