"""A federation on a frozen encoder trains only a small adapter, on features each node embeds once
(models/feature_adapter.py, models/feature_store.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from federation.inprocess_grid import InProcessGrid
from federation.node import run_round
from federation.node_config import NodeConfig
from federation.publishing import model_from_state
from federation.server_app import initial_state, run_federation
from federation.server_config import ServerConfig
from models.adaptation import embed
from models.efficientnet_lite import EfficientNetLite0
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import write_synthetic_npz

from .conftest import make_site, node


@pytest.fixture
def encoder_config(server_config: ServerConfig) -> ServerConfig:
    """EfficientNet-Lite0 (random weights: the architecture is what matters here) at 32 px,
    frozen, with a per-feature scale adapter."""
    return server_config.with_values(
        {
            "backbone.name": "efficientnet_lite0",
            "backbone.image-size": 32,
            "backbone.norm": "batch",
            "backbone.trainable": "none",
            "backbone.features": "multi-scale",
            "backbone.adapter": "scale",
        }
    )


@contextmanager
def encoder_calls() -> Iterator[list[int]]:
    """Counts the images the encoder embeds while the block runs (a global forward hook)."""
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, EfficientNetLite0):
            seen.append(len(args[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_a_node_embeds_once_then_trains_the_adapter_from_its_store(tmp_path, encoder_config):
    state = initial_state(encoder_config)
    node = NodeConfig.from_mapping(make_site(tmp_path, "a"))
    with encoder_calls() as first:
        reply = run_round(node, encoder_config.round_plan(1), state, requester="test", seed=0)
    assert sum(first) == 40  # every image of the site, once
    moved = {k for k, v in reply.delta.items() if np.any(v != 0)}
    assert moved == {"adapter.scale"}
    assert len(list(node.features_dir.glob("*.npz"))) == 1

    round_2 = {k: np.asarray(state[k] + reply.delta[k]) for k in state}
    with encoder_calls() as second:
        run_round(node, encoder_config.round_plan(2), round_2, requester="test", seed=1)
    assert second == []  # the encoder is the same: the features came from the store

    write_synthetic_npz(node.data, n_classes=4, per_class=10, seed=9)  # the site's data changed
    with encoder_calls() as third:
        run_round(node, encoder_config.round_plan(3), round_2, requester="test", seed=2)
    assert sum(third) == 40


def test_a_plain_public_start_gains_the_plans_adapter_at_identity(tmp_path, encoder_config):
    bare = encoder_config.with_values({"backbone.adapter": "none"}).backbone
    torch.manual_seed(0)
    encoder = build_backbone(bare)
    pipeline = PipelineConfig(image_size=bare.image_size)
    save_model_dir(tmp_path / "start", encoder, backbone=bare, pipeline=pipeline, meta=MetaConfig())
    config = dataclasses.replace(encoder_config, initial_model=str(tmp_path / "start"))
    state = initial_state(config)
    saved = encoder.state_dict()
    assert {k.removeprefix("encoder.") for k in state if k.startswith("encoder.")} == set(saved)
    assert all(np.array_equal(state[f"encoder.{k}"], v.numpy()) for k, v in saved.items())
    assert np.array_equal(state["adapter.scale"], np.ones(encoder.out_features, np.float32))


def test_an_adapter_needs_a_frozen_encoder():
    with pytest.raises(ValueError, match="adapter"):
        BackboneConfig(name="efficientnet_lite0", norm="batch", trainable="all", adapter="scale")
    with pytest.raises(ValueError, match="adapter"):
        BackboneConfig(name="efficientnet_lite0", norm="batch", trainable="none", adapter="big")


def test_the_server_embeds_its_evaluation_set_once_across_rounds(encoder_config):
    plan = encoder_config.round_plan(1)
    state = initial_state(encoder_config)
    images = torch.rand(6, 3, 32, 32)
    first = model_from_state(state, plan)
    with encoder_calls() as before:
        embed(first, images)
    later = {**state, "adapter.scale": 2 * state["adapter.scale"]}  # a round moved the adapter
    second = model_from_state(later, plan)
    with encoder_calls() as after:
        features = embed(second, images)
    assert sum(before) == 6 and after == []
    assert second.encoder is first.encoder
    torch.testing.assert_close(features, 2 * embed(first, images))
    changed = {k: v + 1 if k.endswith("_conv_stem.weight") else v for k, v in state.items()}
    assert model_from_state(changed, plan).encoder is not first.encoder  # another encoder


def test_two_federated_rounds_move_only_the_adapter_through_flower_messages(
    tmp_path, encoder_config
):
    sites = [make_site(tmp_path, s, seed=i) for i, s in enumerate("ab")]
    start = initial_state(encoder_config)
    final = run_federation(
        InProcessGrid({1: node(sites[0]), 2: node(sites[1])}), encoder_config, start
    )
    assert final.round == 2
    moved = {k for k in start if not np.array_equal(final.state[k], start[k])}
    assert moved == {"adapter.scale"}
    assert all(np.shape(final.state[k]) == np.shape(v) for k, v in start.items())  # 0-d kept
