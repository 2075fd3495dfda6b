"""Secure rounds with the real ClientApp (Flower's secaggplus_mod, this node's checks, DP
training, the ledger) and Flower's SecAgg+ workflow, behind the in-process Grid."""

import dataclasses

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from safetensors.numpy import load_file

from federation.client_app import train
from federation.errors import InvalidUpdateError
from federation.inprocess_grid import InProcessGrid
from federation.node_config import NodeConfig
from federation.reasons import ReasonCode
from federation.secure_aggregation import clip_before_masking, update_norm
from federation.secure_node import fit_instructions, train_masked
from federation.secure_server import collect_secure_round
from federation.strategies import strategy_for
from privacy.ledger import Ledger

from .conftest import make_site, message, secure_node


@pytest.fixture
def secure_config(server_config):
    return dataclasses.replace(server_config, num_rounds=1).with_values({"secagg.enabled": True})


def kept_update(site: dict, bound: float) -> dict[str, np.ndarray]:
    """The delta the node kept for round 1, clipped as the node clipped it before masking."""
    (path,) = NodeConfig.from_mapping(site).replies_dir.rglob("round-1-charge-*.safetensors")
    return clip_before_masking(load_file(str(path)), norm_bound=bound).delta


def charges(site: dict) -> list[int]:
    return [e.round for e in Ledger.open(site["ledger"]).entries() if e.kind == "charge"]


def test_the_server_gets_the_sum_without_a_forbidding_node_and_a_dropped_nodes_masks(
    tmp_path, secure_config, global_state
):
    sites = [make_site(tmp_path, s, seed=i) for i, s in enumerate("abcd")]
    sites[2]["secure-aggregation"] = "forbidden"
    grid = InProcessGrid(
        {
            1: secure_node(sites[0], 1),
            2: secure_node(sites[1], 2),
            3: secure_node(sites[2], 3),
            4: secure_node(sites[3], 4, drop_masked_in_attempts=(1,)),  # trained, then died
        }
    )
    strategy = strategy_for(secure_config, global_state)
    result = collect_secure_round(grid, strategy, global_state, 1)
    assert result.gate.contributors == 2 and result.attempts == 1
    assert {r.site_id for r in result.replies.values()} == {"a", "b"}
    assert "node 3 (setup): policy-refused" in result.problems
    assert "node 4 (masked vectors): no reply" in result.problems
    # The unmasked mean is a's and b's clipped updates averaged: d's masks were removed from
    # their vectors with its reconstructed key, and c made no key at all.
    a, b = (kept_update(s, strategy.norm_bound) for s in sites[:2])
    for name, value in result.gate.mean.items():
        np.testing.assert_allclose(value, (a[name] + b[name]) / 2, atol=1e-6)
    assert not (tmp_path / "c" / "ledger.db").exists()  # refused before its ledger was opened
    assert charges(sites[3]) == [1]  # d's charge stands: its update was computed, never revealed


def test_below_the_threshold_the_round_fails_and_its_retry_charges_nobody_twice(
    tmp_path, secure_config, global_state
):
    config = dataclasses.replace(secure_config, min_nodes=2, min_replies=2, max_retries=1)
    sites = [make_site(tmp_path, s, seed=i) for i, s in enumerate("ab")]
    grid = InProcessGrid(
        {1: secure_node(sites[0], 1), 2: secure_node(sites[1], 2, drop_masked_in_attempts=(1,))}
    )
    strategy = strategy_for(config, global_state)
    result = collect_secure_round(grid, strategy, global_state, 1)
    assert result.attempts == 2 and result.gate.contributors == 2
    assert any("SecAgg+ halted" in p for p in result.problems)
    assert [charges(s) for s in sites] == [[1], [1]]  # the retry replayed both stored updates
    a, b = (kept_update(s, strategy.norm_bound) for s in sites)
    for name, value in result.gate.mean.items():
        np.testing.assert_allclose(value, (a[name] + b[name]) / 2, atol=1e-6)


def masked_stage_message(state, plan) -> Message:
    content = compat.fitins_to_recorddict(fit_instructions(state, plan.to_config()), True)
    return Message(content, dst_node_id=3, message_type="train")


def test_the_node_clips_to_the_plans_bound_before_masking(tmp_path, secure_config, global_state):
    site = make_site(tmp_path, "a")
    plan = secure_config.round_plan(1, norm_bound=1e-4)  # far below what 2 Adam steps move
    context = Context(run_id=7, node_id=3, node_config=site, state=RecordDict(), run_config={})
    reply = train_masked(
        masked_stage_message(global_state, plan), context, NodeConfig.from_mapping(site)
    )
    sent = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, True).parameters)
    assert update_norm(dict(enumerate(sent))) <= 1e-4
    (kept,) = NodeConfig.from_mapping(site).replies_dir.rglob("round-1-*.safetensors")
    assert update_norm(load_file(str(kept))) > 1e-3  # so the clip did act


def test_a_non_finite_update_is_refused_before_masking_with_a_public_code(
    tmp_path, secure_config, global_state
):
    site = make_site(tmp_path, "a")
    broken = {k: v.copy() for k, v in global_state.items()}
    name = next(k for k, v in broken.items() if v.dtype.kind == "f" and v.ndim > 1)
    broken[name].flat[0] = np.nan  # training from it yields a NaN delta
    plan = secure_config.round_plan(1, norm_bound=1.0)
    context = Context(run_id=7, node_id=3, node_config=site, state=RecordDict(), run_config={})
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        train_masked(masked_stage_message(broken, plan), context, NodeConfig.from_mapping(site))


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_round_before_its_ledger(
    tmp_path, server_config, secure_config, global_state
):
    site = {**make_site(tmp_path, "a"), "secure-aggregation": "required"}
    context = Context(run_id=7, node_id=3, node_config=site, state=RecordDict(), run_config={})
    plain = train(message(global_state, server_config.round_plan(1)), context)
    assert plain.has_error() and plain.error.reason == ReasonCode.POLICY_REFUSED.value
    assert not (tmp_path / "a" / "ledger.db").exists()
    # A secure plan in a plain message would send the delta unmasked: refused as invalid.
    relaxed = {**site, "secure-aggregation": "allowed"}
    context = Context(run_id=7, node_id=3, node_config=relaxed, state=RecordDict(), run_config={})
    unmasked = train(message(global_state, secure_config.round_plan(1)), context)
    assert unmasked.error.reason == ReasonCode.PLAN_INVALID.value
