"""A federation that starts from a public model and lets DP touch only a parameter subset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from federation.errors import ModelMismatchError
from federation.node import run_round
from federation.node_config import NodeConfig
from federation.server_app import initial_state, publish_version
from models.meta import MetaConfig
from models.model_dir import load_model_dir, save_model_dir
from models.networks import build_backbone
from models.pipeline import PipelineConfig
from models.registry import Registry
from privacy.round_record import RoundRecord

from .conftest import make_site


def write_start(path, config, *, seed: int = 3):
    """A model directory of the run config's network, as `fedfew pretrain` writes one."""
    torch.manual_seed(seed)
    backbone = config.round_plan(1).backbone
    model = build_backbone(backbone)
    save_model_dir(
        path,
        model,
        backbone=backbone,
        pipeline=PipelineConfig(image_size=backbone.image_size),
        meta=MetaConfig(),
    )
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_the_initial_model_is_the_public_start_not_a_fresh_network(tmp_path, server_config):
    saved = write_start(tmp_path / "start", server_config)
    config = dataclasses.replace(server_config, initial_model=str(tmp_path / "start"))
    state = initial_state(config)
    assert set(state) == set(saved)
    assert all(np.array_equal(state[k], saved[k]) for k in saved)
    fresh = initial_state(server_config)
    assert any(not np.array_equal(fresh[k], saved[k]) for k in saved)


def test_a_public_start_of_another_network_is_refused_by_name(tmp_path, server_config):
    write_start(tmp_path / "start", server_config)
    config = dataclasses.replace(server_config, initial_model=str(tmp_path / "start")).with_values(
        {"backbone.width": 2 * server_config.backbone.width}
    )
    with pytest.raises(ModelMismatchError, match="width"):
        initial_state(config)


def test_dp_touches_only_the_norm_affine_subset(tmp_path, server_config):
    config = server_config.with_values({"backbone.trainable": "norm-affine"})
    state = initial_state(config)
    plan = config.round_plan(1)
    node = NodeConfig.from_mapping(make_site(tmp_path, "a"))
    reply = run_round(node, plan, state, requester="test", seed=0)
    model = build_backbone(plan.backbone)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))
    moved = {k for k, v in reply.delta.items() if np.any(v != 0)}
    assert moved and moved <= trainable


def test_round_0_is_published_as_the_public_start_and_not_as_dp_trained(tmp_path, server_config):
    write_start(tmp_path / "start", server_config)
    config = dataclasses.replace(server_config, initial_model=str(tmp_path / "start"))
    registry = Registry.open(tmp_path / "registry", create=True)
    record = RoundRecord(0, seconds=0.0, bytes_sent_per_node=0, attempts=0)
    entry = publish_version(registry, initial_state(config), record, config)
    assert entry.name.endswith("(public start start)")
    assert load_model_dir(entry.path).config["private"] is False
