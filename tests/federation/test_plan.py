"""The round plan: nested component configs, its flat ConfigRecord form, its digest, and the
node's policy (allowed mechanisms refused before anything is charged)."""

import dataclasses
import random

import numpy as np
import pytest

from federation.errors import NodeConfigError, PlanRefusedError
from federation.node import run_round
from federation.node_config import NodeConfig
from federation.plan import RoundPlan, check_policy
from federation.server_config import ServerConfig
from privacy.dp_config import DPConfig, DPPretrainConfig, DPSettings
from privacy.ledger import Ledger
from privacy.mechanisms import EPISODIC, SUPERVISED

from .conftest import make_site


def _plan(mechanism: str = EPISODIC, **dp) -> RoundPlan:
    return ServerConfig(mechanism=mechanism, dp=DPSettings(**dp)).round_plan(3)


def _node(tmp_path, **values) -> NodeConfig:
    return NodeConfig.from_mapping({**make_site(tmp_path, "a"), **values})


@pytest.mark.parametrize("mechanism", [EPISODIC, SUPERVISED])
def test_flat_form_round_trips_with_the_same_digest(mechanism):
    plan = _plan(mechanism)

    flat = plan.to_config()
    back = RoundPlan.from_config(dict(random.Random(0).sample(sorted(flat.items()), len(flat))))

    assert back == plan and back.digest() == plan.digest()
    assert all(isinstance(v, int | float | str | bool) for v in flat.values())
    assert flat["mechanism"] == mechanism and flat["dp.noise-multiplier"] == 2.0


def test_server_config_builds_each_component_once_into_the_plan():
    config = ServerConfig(mechanism=SUPERVISED).with_values(
        {"dp.max-grad-norm": 0.5, "backbone.width": 16, "meta.learner": "fomaml"}
    )

    plan = config.round_plan(2)

    assert isinstance(plan.dp, DPPretrainConfig) and plan.dp.max_grad_norm == 0.5
    assert plan.dp.expected_patients == config.dp.expected_patients
    assert (plan.backbone.width, plan.meta.learner, plan.round) == (16, "fomaml", 2)
    assert isinstance(_plan().dp, DPConfig) and _plan().dp.episodes == DPSettings.episodes


def test_an_int_where_a_float_is_expected_gives_the_same_digest():
    assert _plan(noise_multiplier=2).digest() == _plan(noise_multiplier=2.0).digest()


def test_digest_changes_with_every_numeric_field():
    plan = _plan()
    flat = plan.to_config()
    digests = {plan.digest()}
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        changed = {**flat, key: value * 2 if isinstance(value, int) else value * 0.5}
        digests.add(RoundPlan.from_config(changed).digest())
    numeric = [v for v in flat.values() if isinstance(v, int | float) and not isinstance(v, bool)]
    assert len(digests) == len(numeric) + 1
    assert _plan(SUPERVISED).digest() != plan.digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: {k: v for k, v in f.items() if k != "dp.max-grad-norm"},
            "missing dp.max-grad-norm",
        ),
        (lambda f: {**f, "dp.secret": 1}, "unknown key"),
        (lambda f: {**f, "steps": "10"}, "steps must be int"),
        (lambda f: {**f, "dp.sample-rate": 1.5}, "sample_rate is out of range"),
        (lambda f: {**f, "mechanism": "dp-magic"}, "unknown DP mechanism 'dp-magic'"),
        # a supervised plan carrying the episodic config: its keys do not fit
        (lambda f: {**f, "mechanism": SUPERVISED}, "missing dp.expected-patients"),
    ],
)
def test_a_malformed_plan_is_refused_naming_the_problem(change, message):
    with pytest.raises(PlanRefusedError, match=message):
        RoundPlan.from_config(change(_plan().to_config()))


def test_server_config_refuses_an_unknown_mechanism_at_start():
    with pytest.raises(ValueError, match="dp-magic"):
        ServerConfig.from_run_config({"mechanism": "dp-magic"})
    assert ServerConfig.from_run_config({"mechanism": SUPERVISED}).mechanism == SUPERVISED


def test_nodes_allow_only_the_episodic_mechanism_unless_told(tmp_path):
    default = _node(tmp_path)
    listed = _node(tmp_path, **{"allowed-mechanisms": f"{EPISODIC}, {SUPERVISED}"})
    from_toml_list = _node(tmp_path, **{"allowed-mechanisms": [SUPERVISED]})

    assert default.allowed_mechanisms == (EPISODIC,)
    assert listed.allowed_mechanisms == (EPISODIC, SUPERVISED)
    assert from_toml_list.allowed_mechanisms == (SUPERVISED,)
    with pytest.raises(NodeConfigError, match="allowed-mechanisms"):
        _node(tmp_path, **{"allowed-mechanisms": "dp-episodic,dp-magic"})


def test_policy_refuses_a_mechanism_the_node_does_not_allow(tmp_path):
    check_policy(_plan(), _node(tmp_path))
    with pytest.raises(PlanRefusedError, match="mechanism dp-supervised is not in"):
        check_policy(_plan(SUPERVISED), _node(tmp_path))
    check_policy(_plan(SUPERVISED), _node(tmp_path, **{"allowed-mechanisms": SUPERVISED}))


def test_policy_accounts_noise_with_the_mechanisms_sensitivity(tmp_path):
    node = _node(tmp_path, **{"allowed-mechanisms": f"{EPISODIC},{SUPERVISED}", "min-noise": 0.8})
    # sigma 1.0: accounted 0.5 at sensitivity 2C (refused), 1.0 at sensitivity C (allowed)
    with pytest.raises(PlanRefusedError, match=r"noise 0\.5 \(accounted"):
        check_policy(_plan(noise_multiplier=1.0), node)
    check_policy(_plan(SUPERVISED, noise_multiplier=1.0), node)


def test_a_refused_mechanism_charges_nothing_and_reads_no_data(tmp_path):
    node = _node(tmp_path)
    node.data.unlink()  # refusing must not need the data

    with pytest.raises(PlanRefusedError, match="allowed-mechanisms"):
        run_round(node, _plan(SUPERVISED), {}, requester="test")

    assert not node.ledger.exists()


def test_a_node_runs_the_plans_mechanism_and_charges_it_by_name(
    tmp_path, server_config, global_state
):
    node = _node(tmp_path, **{"allowed-mechanisms": SUPERVISED})
    plan = dataclasses.replace(server_config, mechanism=SUPERVISED).round_plan(1)

    reply = run_round(node, plan, global_state, requester="test", seed=0)

    (entry,) = Ledger.open(node.ledger).entries()
    assert (entry.mechanism, entry.sensitivity_factor) == (SUPERVISED, 1.0)
    assert entry.accounted_noise_multiplier == plan.dp.noise_multiplier
    assert reply.delta.keys() == global_state.keys()
    assert any(np.abs(d).max() > 0 for d in reply.delta.values())
