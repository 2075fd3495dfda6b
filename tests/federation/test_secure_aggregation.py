"""Secure aggregation's pure parts: the node's clip-before-masking, the server's gate on the sum
(numpy references), the node's policy and unmask guard, and the config that turns it on."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from federation.errors import InvalidUpdateError, PlanRefusedError
from federation.node_config import NodeConfig
from federation.plan import RoundPlan
from federation.secure_aggregation import (
    SecureAggregationConfig,
    clip_before_masking,
    gate_sum,
    quantised_norm_bound,
    update_norm,
)
from federation.secure_node import SECURE_STATE, check_unmask
from federation.server_config import SecureRoundsConfig, ServerConfig

from .conftest import make_site

RNG = np.random.default_rng(3)


def update(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": (RNG.standard_normal((8, 5)) * scale).astype(np.float32),
        "b": (RNG.standard_normal(5) * scale).astype(np.float32),
    }


def test_clip_before_masking_scales_a_long_delta_onto_the_bound_and_keeps_a_short_one():
    long, short = update(10.0), update(1e-3)
    clipped = clip_before_masking(long, norm_bound=1.0)
    assert clipped.clipped and clipped.norm == pytest.approx(update_norm(long))
    assert update_norm(clipped.delta) <= 1.0
    assert update_norm(clipped.delta) == pytest.approx(1.0, rel=1e-5)
    direction = clipped.delta["w"] / long["w"]  # same direction: one scale factor everywhere
    np.testing.assert_allclose(direction, direction.flat[0], rtol=1e-5)
    kept = clip_before_masking(short, norm_bound=1.0)
    assert not kept.clipped
    np.testing.assert_array_equal(kept.delta["w"], short["w"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_before_masking_refuses_a_non_finite_delta_naming_the_array(bad):
    delta = update()
    delta["b"][2] = bad
    with pytest.raises(InvalidUpdateError, match="non-finite values in b"):
        clip_before_masking(delta, norm_bound=1.0)


def test_one_clipped_update_stays_within_the_quantised_bound_after_secaggs_round_trip():
    bound, q = 0.5, 2**10  # a coarse Q makes the rounding visible
    delta = clip_before_masking(update(3.0), norm_bound=bound).delta
    arrays = list(delta.values())
    back = dequantize(quantize(arrays, bound, q), bound, q)
    values = sum(a.size for a in arrays)
    moved = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(arrays, back, strict=True)))
    assert 0 < moved <= math.sqrt(values) * 2 * bound / q
    assert update_norm(dict(enumerate(back))) <= quantised_norm_bound(
        bound, values=values, quantization_range=q
    )


def secagg(**changes) -> SecureAggregationConfig:
    return SecureAggregationConfig(
        **{"enabled": True, "min_sites": 2, "norm_bound": 1.0, **changes}
    )


def test_the_gate_accepts_the_mean_of_clipped_updates_and_returns_it_in_the_models_dtypes():
    reference = update()
    clipped = [clip_before_masking(update(5.0), norm_bound=1.0).delta for _ in range(3)]
    mean = {k: np.mean([c[k].astype(np.float64) for c in clipped], axis=0) for k in reference}
    gate = gate_sum(mean, reference, contributors=3, secagg=secagg())
    assert gate.mean["w"].dtype == np.float32 and gate.contributors == 3
    expected = math.sqrt(sum(float(np.sum((3 * v) ** 2)) for v in mean.values()))
    assert gate.norm == pytest.approx(expected)
    assert gate.norm <= gate.bound


def test_the_gate_rejects_a_sum_longer_than_its_contributors_could_make():
    reference = update()
    # One node skipped its clip: its update is 10x the bound; two honest ones are on it.
    honest = [clip_before_masking(update(5.0), norm_bound=1.0).delta for _ in range(2)]
    rogue = update(50.0)
    mean = {k: (honest[0][k] + honest[1][k] + rogue[k]) / 3.0 for k in reference}
    with pytest.raises(InvalidUpdateError, match="exceeds 3 x"):
        gate_sum(mean, reference, contributors=3, secagg=secagg())


def test_the_gate_names_every_problem_of_a_sum():
    reference = update()
    mean = {"w": np.full((8, 5), np.nan), "extra": np.zeros(2)}
    with pytest.raises(InvalidUpdateError) as caught:
        gate_sum(mean, reference, contributors=1, secagg=secagg())
    text = str(caught.value)
    for part in ("1 contributors", "missing b", "unexpected extra", "w holds 40 non-finite"):
        assert part in text


def test_the_gate_on_a_sum_checks_dtypes_as_the_plain_gate_does():
    reference = update()
    clipped = [clip_before_masking(update(5.0), norm_bound=1.0).delta for _ in range(2)]
    mean = {k: np.mean([c[k].astype(np.float64) for c in clipped], axis=0) for k in reference}
    quantised = {**mean, "b": np.zeros(5, dtype=np.int64)}  # a sum never dequantised
    with pytest.raises(InvalidUpdateError, match="secure sum rejected: b has dtype int64"):
        gate_sum(quantised, reference, contributors=2, secagg=secagg())
    gate = gate_sum(mean, reference, contributors=2, secagg=secagg())  # float64: dequantised
    np.testing.assert_array_equal(gate.mean["b"], mean["b"].astype(np.float32))


def test_the_plan_carries_the_secure_component_through_its_flat_form():
    config = ServerConfig(min_replies=3, min_nodes=3, secagg=SecureRoundsConfig(enabled=True))
    plan = config.round_plan(2, norm_bound=0.25)
    flat = plan.to_config()
    assert flat["secagg.enabled"] is True and flat["secagg.norm-bound"] == 0.25
    assert flat["secagg.min-sites"] == 3
    assert RoundPlan.from_config(flat) == plan
    assert plan.digest() != ServerConfig().round_plan(2, norm_bound=0.25).digest()


def test_secure_aggregation_excludes_the_robust_defences_and_needs_a_real_boolean():
    with pytest.raises(ValueError, match="defence 'krum'"):
        ServerConfig.from_run_config(
            {"secagg.enabled": True, "aggregation.defence": "krum", "min-nodes": 4}
        )
    with pytest.raises(ValueError, match=r"secagg\.enabled must be true or false"):
        ServerConfig.from_run_config({"secagg.enabled": "false"})
    assert ServerConfig.from_run_config({"secagg.enabled": True}).secagg.enabled


def test_a_node_policy_other_than_the_three_is_a_config_error(tmp_path):
    site = {**make_site(tmp_path, "a"), "secure-aggregation": "sometimes"}
    with pytest.raises(ValueError, match="secure-aggregation must be one of allowed, required"):
        NodeConfig.from_mapping(site)


def unmask_message(active: list[int], dead: list[int] | None = None) -> Message:
    configs = ConfigRecord(
        {
            Key.STAGE: Stage.UNMASK,
            Key.ACTIVE_NODE_ID_LIST: active,
            Key.DEAD_NODE_ID_LIST: dead or [],
        }
    )
    content = RecordDict({RECORD_KEY_CONFIGS: configs})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_node_helps_unmask_one_set_of_at_least_min_sites_contributors_per_round(tmp_path):
    config = NodeConfig.from_mapping(make_site(tmp_path, "a"))
    state = RecordDict()
    context = Context(run_id=7, node_id=1, node_config={}, state=state, run_config={})
    with pytest.raises(PlanRefusedError, match="sent no masked update"):
        check_unmask(unmask_message([1, 2, 3]), context, config)
    state.config_records[SECURE_STATE] = ConfigRecord(
        {"federation": "unit", "round": 4, "min-sites": 3}
    )
    with pytest.raises(PlanRefusedError, match=r"nodes \[2\] are listed both"):
        check_unmask(unmask_message([1, 2, 3], dead=[2]), context, config)
    with pytest.raises(PlanRefusedError, match="2 contributors, the plan's minimum is 3"):
        check_unmask(unmask_message([1, 2]), context, config)
    check_unmask(unmask_message([3, 1, 2]), context, config)
    check_unmask(unmask_message([1, 2, 3]), context, config)  # the same set again: a retry
    # A+B+C unmasked, then A+B+D would hand the server C - D: refused.
    with pytest.raises(PlanRefusedError, match=r"already helped unmask it over \[1, 2, 3\]"):
        check_unmask(unmask_message([1, 2, 4]), context, config)


def test_the_demo_option_turns_on_secure_rounds_in_the_demos_run_config(tmp_path):
    import typer
    from typer.testing import CliRunner

    from app.demo import DemoSettings, demo_run_config, server_config
    from app.demo_cli import demo

    # SecAgg+ carries deltas: the secure demo runs its own run config, a delta mechanism
    secure = DemoSettings(run=demo_run_config(secure=True))
    config = server_config(tmp_path, 3, secure, "synthetic", secure_aggregation=True)
    assert config.secagg.enabled and config.round_plan(1).secagg.enabled
    assert not server_config(tmp_path, 3, DemoSettings(), "synthetic").secagg.enabled
    with pytest.raises(ValueError, match="secure aggregation does not carry"):
        # the default demo's release cannot run under SecAgg+
        server_config(tmp_path, 3, DemoSettings(), "synthetic", secure_aggregation=True)
    cli = typer.Typer()
    cli.command()(demo)
    assert "--secure-aggregation" in CliRunner().invoke(cli, ["--help"]).output
