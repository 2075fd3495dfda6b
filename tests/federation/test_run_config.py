"""One strict converter (models/run_config.py) for the server's run config, the node's config,
the round plan and the DP config: a misspelt or mistyped key is an error naming the key."""

import pytest

from federation.errors import NodeConfigError
from federation.node_config import NodeConfig
from federation.server_config import ServerConfig
from privacy.dp_config import DEFAULT_SAMPLE_RATE, DPConfig, DPPretrainConfig
from privacy.mechanisms import EPISODIC, SUPERVISED, get_mechanism

from .conftest import make_site


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-rounds": 2.7}, "run config: num-rounds must be int, got 2.7"),
        ({"num-rounds": "5"}, "run config: num-rounds must be int, got '5'"),
        ({"num-rounds": True}, "run config: num-rounds must be int, got True"),
        ({"dp.max-grad-norm": "1.0"}, "run config: dp.max-grad-norm must be float, got '1.0'"),
        ({"backbone.width": 8.0}, "run config: backbone.width must be int, got 8.0"),
        ({"federation": 3}, "run config: federation must be str, got 3"),
        ({"secagg.enabled": 1}, "run config: secagg.enabled must be true or false"),
        ({"num-round": 2}, "run config: unknown key.* num-round;"),
        ({"dp.noise-multiplir": 2.0}, "run config: unknown key.* dp.noise-multiplir;"),
        ({"noise-multiplier": 2.0}, "run config: unknown key.* noise-multiplier;"),
        ({"dp.noise-multiplier": -1.0}, "run config: dp: DPSettings.noise_multiplier"),
        ({"eval.ways": 0}, "run config: eval: EvalConfig.ways must be > 0"),
    ],
)
def test_the_run_config_refuses_a_mistyped_or_misspelt_key_naming_it(values, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig.from_run_config(values)


def test_the_run_config_reads_its_own_flat_form_and_widens_only_int_to_float():
    config = ServerConfig(num_rounds=5, node_wait=30.0, min_replies=2).with_values(
        {"secagg.enabled": True, "backbone.width": 16, "dp.classes": "a,b"}
    )
    assert ServerConfig.from_run_config(config.to_dict()) == config
    assert (config.secagg.enabled, config.backbone.width, config.dp.classes) == (True, 16, "a,b")
    widened = ServerConfig.from_run_config(
        {"node-wait": 30, "num-rounds": 5, "dp.max-grad-norm": 2}
    )
    assert widened.node_wait == 30.0 and isinstance(widened.node_wait, float)
    assert widened.dp.max_grad_norm == 2.0 and isinstance(widened.dp.max_grad_norm, float)


def test_the_run_config_is_one_tree_whose_components_are_the_plans():
    config = ServerConfig().with_values({"backbone.width": 16, "meta.learner": "fomaml"})
    plan = config.round_plan(1)
    assert plan.backbone is config.backbone and plan.meta is config.meta
    assert all(key.split(".")[0] in ("dp", "backbone", "meta", "aggregation", "secagg", "eval")
               for key in config.to_dict() if "." in key)  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max-steps-per-round": 2.5}, "node config: max-steps-per-round must be int, got 2.5"),
        ({"budget-epsilon": "8"}, "node config: budget-epsilon must be float, got '8'"),
        ({"allowed-mechanisms": [EPISODIC, 3]}, "allowed-mechanisms must be str, got 3"),
        ({"budget-epsilonn": 3}, "node config: unknown key.* budget-epsilonn;"),
    ],
)
def test_the_node_config_refuses_a_mistyped_or_misspelt_key_naming_it(tmp_path, values, message):
    with pytest.raises(NodeConfigError, match=message):
        NodeConfig.from_mapping({**make_site(tmp_path, "a"), **values})


def test_the_node_config_takes_a_comma_separated_list_and_paths_as_strings(tmp_path):
    site = make_site(tmp_path, "a")
    config = NodeConfig.from_mapping(
        {**site, "allowed-mechanisms": f"{EPISODIC}, {SUPERVISED}", "state-dir": "~/state"}
    )
    assert config.allowed_mechanisms == (EPISODIC, SUPERVISED)
    assert config.state_dir is not None and config.state_dir.is_absolute()
    assert str(config.data) == site["data"]


def test_a_dp_key_no_mechanism_has_is_an_error_and_one_for_another_mechanism_is_left_to_it():
    with pytest.raises(ValueError, match=r"unknown key.* max_grad_nrom;"):
        get_mechanism(EPISODIC).dp_config({"noise_multiplier": 1.0, "max_grad_nrom": 0.5})
    supervised = get_mechanism(SUPERVISED).dp_config({"noise_multiplier": 1.0, "ways": 4})
    assert supervised == DPPretrainConfig(noise_multiplier=1.0)


def test_sample_rate_has_one_default():
    assert DEFAULT_SAMPLE_RATE == 0.1
    assert ServerConfig().dp.sample_rate == DEFAULT_SAMPLE_RATE
    assert DPConfig(noise_multiplier=1.0).sample_rate == DEFAULT_SAMPLE_RATE
    assert DPPretrainConfig(noise_multiplier=1.0).sample_rate == DEFAULT_SAMPLE_RATE
    supervised = ServerConfig(mechanism=SUPERVISED).round_plan(1)
    assert supervised.dp.sample_rate == DEFAULT_SAMPLE_RATE
