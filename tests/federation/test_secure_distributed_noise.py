"""Distributed noise under SecAgg+: each site adds its share, the ledger and report record the
guarantee if secure aggregation holds and the one each site keeps if it fails."""

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from safetensors.numpy import load_file

from federation.errors import PlanRefusedError
from federation.inprocess_grid import InProcessGrid
from federation.node_config import NodeConfig
from federation.plan import RoundPlan
from federation.publishing import model_from_state
from federation.reasons import ReasonCode
from federation.secure_node import check_masking_range, prepare_for_masking
from federation.secure_server import collect_secure_round
from federation.server_app import initial_state
from federation.strategies import strategy_for
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from privacy.accounting import epsilon_for
from privacy.ledger import Ledger
from privacy.mechanisms import DISTRIBUTED, EPISODIC, MECHANISMS

from .conftest import make_site, secure_node

ALLOW = f"{EPISODIC},{DISTRIBUTED}"


@pytest.fixture
def distributed_config(server_config):
    return dataclasses.replace(server_config, steps=1, num_rounds=1, min_nodes=3).with_values(
        {"secagg.enabled": True, "secagg.distributed-noise": True}
    )


def kept_delta(site: dict) -> dict[str, np.ndarray]:
    (path,) = NodeConfig.from_mapping(site).replies_dir.rglob("round-1-charge-*.safetensors")
    return load_file(str(path))


def test_the_plan_asks_each_site_for_its_share_and_accounts_the_sum(distributed_config):
    plan = distributed_config.round_plan(1, norm_bound=1.0)
    sigma = distributed_config.dp.noise_multiplier
    assert plan.mechanism == DISTRIBUTED and plan.secagg.min_sites == 2
    assert plan.dp.noise_multiplier == pytest.approx(sigma / math.sqrt(2))  # the site's share
    assert plan.accounted_noise_multiplier == pytest.approx(sigma / 2)  # the sum's, sensitivity 2C
    with pytest.raises(ValueError, match="steps = 1"):
        dataclasses.replace(distributed_config, steps=2)
    with pytest.raises(ValueError, match=r"secagg\.enabled = true"):
        distributed_config.with_values({"secagg.enabled": False})
    two_steps = {**plan.to_config(), "steps": 2}
    with pytest.raises(PlanRefusedError, match="exactly 1 step"):
        RoundPlan.from_config(two_steps)


def test_distributed_noise_charges_the_sum_reports_the_fallback_and_needs_the_sites_consent(
    tmp_path, distributed_config
):
    state = initial_state(distributed_config)
    sites = [make_site(tmp_path, s, seed=i) for i, s in enumerate("abc")]
    for site in sites[:2]:  # c keeps the default allow-list: per-site noise only
        site["allowed-mechanisms"] = ALLOW
    grid = InProcessGrid({i + 1: secure_node(s, i + 1) for i, s in enumerate(sites)})
    strategy = strategy_for(distributed_config, state)
    result = collect_secure_round(grid, strategy, state, 1)
    assert result.gate.contributors == 2
    assert f"node 3 (masked vectors): {ReasonCode.POLICY_REFUSED.value}" in result.problems
    assert not (tmp_path / "c" / "ledger.db").exists()  # refused before its ledger
    # Unclipped and unscaled: the mean is exactly the mean of what a and b kept.
    kept = [kept_delta(s) for s in sites[:2]]
    for name, value in result.gate.mean.items():
        np.testing.assert_allclose(value, np.mean([k[name] for k in kept], axis=0), atol=1e-6)
    sigma = distributed_config.dp.noise_multiplier
    (entry,) = Ledger.open(sites[0]["ledger"]).entries()
    assert entry.mechanism == DISTRIBUTED
    assert entry.noise_multiplier == pytest.approx(sigma / math.sqrt(2))  # what the site added
    assert entry.accounted_noise_multiplier == pytest.approx(sigma / 2)  # the sum's guarantee
    report = next(r.report for r in result.replies.values() if r.site_id == "a")
    q = distributed_config.dp.sample_rate
    holds = epsilon_for([(sigma / 2, q, 1)], delta=1e-5, accountant="rdp")
    fails = epsilon_for([(sigma / math.sqrt(2) / 2, q, 1)], delta=1e-5, accountant="rdp")
    assert report.epsilon_round == pytest.approx(holds)
    assert report.epsilon_round_if_secagg_fails == pytest.approx(fails)
    assert report.epsilon_spent_if_secagg_fails == pytest.approx(fails) and fails > holds


def test_a_distributed_update_is_not_scaled_and_a_range_that_clips_its_noise_is_refused(
    distributed_config,
):
    state = initial_state(distributed_config)
    plan = distributed_config.round_plan(1, norm_bound=1.0)
    values = sum(v.size for v in state.values())
    needed, _ = plan.secure_ranges(contributors=2, values=values)
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"clipping_range": needed / 2})
    with pytest.raises(PlanRefusedError, match="would clip this site's distributed noise"):
        check_masking_range(plan, state, context)
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"clipping_range": needed})
    check_masking_range(plan, state, context)
    noisy = {k: np.full_like(v, 3.0) for k, v in state.items()}  # far outside the clip bound
    assert all(np.all(v == 3.0) for v in prepare_for_masking(plan, noisy).values())


def test_the_distributed_trainers_step_is_linear_in_the_clipped_sum(tmp_path, distributed_config):
    # With negligible noise one plain-SGD step moves the model by lr * sum_e clip(g_e) / E, of
    # norm <= lr * C; Adam's first step would move every coordinate by about lr.
    plan = distributed_config.round_plan(1, norm_bound=1.0)
    dp = dataclasses.replace(plan.dp, noise_multiplier=1e-6)
    site = make_site(tmp_path, "a")
    data = load_dataset(site["data"], PipelineConfig(image_size=plan.backbone.image_size))
    state = initial_state(distributed_config)
    model = model_from_state(state, plan)
    MECHANISMS[DISTRIBUTED].build_trainer(
        model, [data], dp=dp, meta=plan.meta, lr=plan.local_lr, seed=0
    ).train(1)
    moved = math.sqrt(
        sum(
            float(np.sum((v.detach().numpy() - state[k]) ** 2))
            for k, v in model.state_dict().items()
        )
    )
    assert 0 < moved <= plan.local_lr * dp.max_grad_norm * (1 + 1e-4)
