"""A dp-prototypes round in process: three sites release noisy class sums through the real
ClientApp, the server gates and sums them and keeps the prototypes with the round's version."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from safetensors.numpy import load_file

from federation.client_app import app as client_app
from federation.client_app import train
from federation.errors import PlanRefusedError
from federation.inprocess_grid import InProcessGrid
from federation.node_config import NodeConfig
from federation.plan import RoundPlan, check_policy
from federation.publishing import DIGEST_KEY, PROTOTYPES_DIGEST_KEY, model_from_state
from federation.records import FINAL_MODEL, RELEASE, REPORT, from_arrays, to_arrays
from federation.server_app import run_federation
from federation.server_config import ServerConfig
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from models.registry import Registry
from privacy.accounting import epsilon_for
from privacy.dp_prototypes import DPPrototypeRelease
from privacy.ledger import Ledger
from privacy.mechanisms import EPISODIC, PROTOTYPES
from privacy.prototype_release import PROTOTYPES_FILE, SUMS, PrototypeRelease

from .conftest import context, make_site, message

VOCABULARY = ("synthetic_disc_bright", "synthetic_ring_dark", "not_at_any_site")
SIGMA = 2.0  # accounted sigma 2 / sqrt(2) = 1.41, above the nodes' default minimum 0.8


@pytest.fixture
def config(server_config):
    return server_config.with_values(
        {
            "mechanism": PROTOTYPES,
            "num-rounds": 1,
            "min-nodes": 3,
            "min-replies": 2,
            "dp.classes": ",".join(VOCABULARY),
            "dp.noise-multiplier": SIGMA,
            "dp.max-grad-norm": 0.5,
        }
    )


def site(tmp_path, name, *, seed, allow=f"{EPISODIC},{PROTOTYPES}"):
    return {**make_site(tmp_path, name, seed=seed), "allowed-mechanisms": allow}


def node(site_config):
    return lambda msg: client_app(msg, context(site_config))


def run(config, state, grid):
    final = run_federation(grid, config, state)
    return final, Registry.open(config.root / "registry").entries(kind="global")


def kept_release(site_config, config) -> np.ndarray:
    """The release a node sent, as it kept it on its disk for replay."""
    folder = NodeConfig.from_mapping(site_config).replies_dir / config.federation
    (path,) = folder.glob("round-1-charge-*.safetensors")
    return load_file(str(path))[SUMS]


def test_three_sites_release_once_and_the_server_keeps_the_summed_prototypes(
    tmp_path, config, global_state
):
    sites = [site(tmp_path, s, seed=i) for i, s in enumerate("abc")]
    grid = InProcessGrid({i + 1: node(s) for i, s in enumerate(sites)})

    final, versions = run(config, global_state, grid)

    assert final.round == 1 and set(final.history[1]["sites"]) == {"a", "b", "c"}
    assert final.history[1]["prototypes"] == {"classes": list(VOCABULARY), "sites": ["a", "b", "c"]}
    expected = epsilon_for([(SIGMA / math.sqrt(2), 1.0, 1)], delta=1e-5, accountant="rdp")
    for s in sites:
        (entry,) = Ledger.open(s["ledger"]).entries()
        assert (entry.mechanism, entry.steps, entry.sample_rate) == (PROTOTYPES, 1, 1.0)
        assert entry.sensitivity_factor == pytest.approx(math.sqrt(2))
        assert entry.epsilon_after == pytest.approx(expected, rel=1e-9)
        assert final.history[1]["sites"][s["site-id"]]["mechanism"] == PROTOTYPES
    # The weights are not touched: round 1's version holds round 0's weights, plus the release.
    assert [v.info["round"] for v in versions] == [0, 1]
    assert versions[1].info[DIGEST_KEY] == versions[0].info[DIGEST_KEY]
    assert (
        PROTOTYPES_DIGEST_KEY in versions[1].info
        and not (versions[0].path / PROTOTYPES_FILE).exists()
    )
    release = PrototypeRelease.load(versions[1].path / PROTOTYPES_FILE)
    assert release.classes == VOCABULARY and release.sites == ("a", "b", "c")
    assert (release.clip, release.noise_multiplier) == (0.5, SIGMA)
    np.testing.assert_allclose(
        release.sums, sum(kept_release(s, config).astype(np.float64) for s in sites), rtol=1e-6
    )
    width = release.sums.shape[1] - 1
    assert release.prototypes().shape == (3, width) and np.all(np.isfinite(release.prototypes()))
    # The sum is the sites' noiseless sums plus noise of std sqrt(3) sigma C on every entry.
    model = model_from_state(global_state, config.round_plan(1))
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    dp = config.round_plan(1).dp
    noiseless = sum(
        DPPrototypeRelease(model, [load_dataset(s["data"], pipeline)], dp=dp).noiseless_sums()
        for s in sites
    )
    assert float(noiseless[:2, -1].min()) > 0 and float(noiseless[2].abs().max()) == 0.0
    noise = release.sums - noiseless.numpy()
    assert np.std(noise) == pytest.approx(math.sqrt(3) * SIGMA * 0.5, rel=0.3)
    for s in sites:  # each hospital keeps the final model with the release, for its clinicians
        np.testing.assert_array_equal(final_release(s).sums, release.sums)


def final_release(site_config) -> PrototypeRelease:
    """The release kept with the final model in a node's own registry (one final version)."""
    kept = Registry.open(Path(str(site_config["registry"]))).entries(kind="global")
    (final,) = [v for v in kept if "final" in v.name]
    return PrototypeRelease.load(final.path / PROTOTYPES_FILE)


def test_a_node_that_missed_the_final_model_gets_it_with_the_release_from_a_resumed_server(
    tmp_path, config, global_state
):
    sites = [site(tmp_path, s, seed=i) for i, s in enumerate("abc")]
    handlers = {i + 1: node(s) for i, s in enumerate(sites)}
    answer_c = handlers[3]
    handlers[3] = lambda msg: (
        None if msg.metadata.message_type.endswith(FINAL_MODEL) else answer_c(msg)
    )
    run(config, global_state, InProcessGrid(handlers))
    released = final_release(sites[0])
    with pytest.raises(ValueError):  # hospital c went silent before keeping the final model
        final_release(sites[2])

    handlers[3] = answer_c
    final, versions = run(config, global_state, InProcessGrid(handlers))  # a restarted server

    assert final.round == 1 and [v.info["round"] for v in versions] == [0, 1]
    assert final_release(sites[2]).digest() == released.digest()
    for s in sites:  # nothing charged again
        assert len(Ledger.open(s["ledger"]).entries()) == 1


def test_a_node_that_does_not_allow_prototypes_refuses_before_any_charge(
    tmp_path, config, global_state
):
    allowed = [site(tmp_path, s, seed=i) for i, s in enumerate("ab")]
    refusing = site(tmp_path, "c", seed=2, allow=EPISODIC)
    handlers = {1: node(allowed[0]), 2: node(allowed[1]), 3: node(refusing)}

    final, versions = run(config, global_state, InProcessGrid(handlers))

    assert set(final.history[1]["sites"]) == {"a", "b"}
    assert any("policy-refused" in p for p in final.history[1]["problems"])
    assert not Path(str(refusing["ledger"])).exists()  # refused before the ledger was opened
    assert PrototypeRelease.load(versions[1].path / PROTOTYPES_FILE).sites == ("a", "b")
    with pytest.raises(PlanRefusedError, match="not in this node's allowed-mechanisms"):
        check_policy(config.round_plan(1), NodeConfig.from_mapping(refusing))


def test_a_nan_or_misshapen_release_is_rejected_by_the_gate(tmp_path, config, global_state):
    good = [site(tmp_path, s, seed=i) for i, s in enumerate("ab")]

    def tampered(name, seed, change):
        def handler(msg: Message) -> Message:
            reply = train(msg, context(site(tmp_path, name, seed=seed)))
            release = from_arrays(reply.content.array_records[RELEASE])
            reply.content.array_records[RELEASE] = to_arrays(change(release))
            return reply

        return handler

    def nan(release):
        release[SUMS][0, 0] = np.nan
        return release

    def huge(release):
        return {SUMS: release[SUMS] * np.float32(1e9)}

    def misshapen(release):
        return {SUMS: release[SUMS][:, :-1].copy()}

    handlers = {1: node(good[0]), 2: node(good[1]), 3: tampered("c", 2, nan)}
    handlers |= {4: tampered("d", 3, huge), 5: tampered("e", 4, misshapen)}
    config = dataclasses.replace(config, min_nodes=5)

    final, versions = run(config, global_state, InProcessGrid(handlers))

    problems = " | ".join(final.history[1]["problems"])
    assert "non-finite" in problems and "exceeds the bound" in problems and "shape" in problems
    assert set(final.history[1]["sites"]) == {"a", "b"}
    release = PrototypeRelease.load(versions[1].path / PROTOTYPES_FILE)
    assert release.sites == ("a", "b") and np.all(np.isfinite(release.sums))


def test_the_run_config_forces_one_step_over_every_patient_and_a_plan_cannot_ask_more(config):
    plan = ServerConfig.from_run_config(
        {**config.to_dict(), "steps": 10, "dp.sample-rate": 0.1}
    ).round_plan(1)
    assert (plan.steps, plan.dp.sample_rate, plan.dp.classes) == (1, 1.0, VOCABULARY)
    assert RoundPlan.from_config(plan.to_config()) == plan
    flat = {**plan.to_config(), "steps": 2}
    with pytest.raises(PlanRefusedError, match="one-shot release: steps must be 1"):
        RoundPlan.from_config(flat)
    flat = {**plan.to_config(), "dp.sample-rate": 0.5}
    with pytest.raises(PlanRefusedError, match="sample_rate"):
        RoundPlan.from_config(flat)
    with pytest.raises(ValueError, match="classes"):
        config.with_values({"dp.classes": ""})


def test_a_replayed_round_sends_the_same_release_without_a_second_charge(
    tmp_path, config, global_state
):
    s = site(tmp_path, "a", seed=0)
    msg = message(global_state, config.round_plan(1))
    first = train(msg, context(s))
    again = train(message(global_state, config.round_plan(1)), context(s))
    assert not first.has_error() and not again.has_error()
    np.testing.assert_array_equal(
        from_arrays(first.content.array_records[RELEASE])[SUMS],
        from_arrays(again.content.array_records[RELEASE])[SUMS],
    )
    assert len(Ledger.open(s["ledger"]).entries()) == 1
    # Only the release and the accounted report leave the node: no delta, no counts.
    assert set(first.content.array_records) == {RELEASE}
    assert set(first.content.config_records) == {REPORT}


def test_the_sampling_limit_does_not_apply_to_a_one_shot_release_but_min_noise_does(
    tmp_path, config
):
    node_config = NodeConfig.from_mapping(site(tmp_path, "a", seed=0))
    assert node_config.max_sample_rate < 1.0
    check_policy(config.round_plan(1), node_config)  # q = 1 accepted for dp-prototypes
    episodic = config.with_values({"mechanism": EPISODIC, "dp.sample-rate": 1.0})
    with pytest.raises(PlanRefusedError, match="sample rate 1 exceeds"):
        check_policy(episodic.round_plan(1), node_config)
    quiet = config.with_values({"dp.noise-multiplier": 1.0})  # accounted 0.71 < 0.8
    with pytest.raises(PlanRefusedError, match="below this node's minimum"):
        check_policy(quiet.round_plan(1), node_config)
