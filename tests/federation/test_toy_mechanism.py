"""Adding a DP mechanism is one file (tests/federation/toy_mechanism.py) plus one registry line:
with nothing else changed, the server plans it, the node checks, charges and runs it, and the
round's version records it."""

import dataclasses

import numpy as np
import pytest

from federation.inprocess_grid import InProcessGrid
from federation.plan import RoundPlan
from federation.server_app import run_federation
from models.registry import Registry
from privacy import mechanisms
from privacy.ledger import Ledger
from privacy.mechanisms import register_mechanism

from .conftest import make_site, node
from .toy_mechanism import NAME, TOY, ToyConfig


@pytest.fixture
def toy():
    register_mechanism(TOY)  # the one registry line
    yield TOY
    del mechanisms._REGISTRY[NAME]  # the registry is process-wide: leave it as other tests see it


def test_a_registered_toy_mechanism_runs_a_federated_round_unchanged(
    toy, tmp_path, server_config, global_state
):
    config = dataclasses.replace(server_config, mechanism=NAME, num_rounds=1, local_lr=0.01)
    plan = config.round_plan(1)
    assert plan.dp == ToyConfig(noise_multiplier=2.0, max_grad_norm=1.0, sample_rate=0.1)
    assert RoundPlan.from_config(plan.to_config()) == plan
    sites = [
        {**make_site(tmp_path, s, seed=i), "allowed-mechanisms": NAME} for i, s in enumerate("ab")
    ]

    final = run_federation(
        InProcessGrid({1: node(sites[0]), 2: node(sites[1])}), config, global_state
    )

    assert final.round == 1
    moved = max(float(np.max(np.abs(final.state[k] - global_state[k]))) for k in global_state)
    assert moved > 0  # the toy's noise reached the global model through the averaged deltas
    version = Registry.open(config.root / "registry").latest()
    assert {r["mechanism"] for r in version.privacy.values()} == {NAME}
    for site in sites:
        (entry,) = Ledger.open(site["ledger"]).entries()
        assert (entry.mechanism, entry.sensitivity_factor) == (NAME, 1.0)
        assert entry.accounted_noise_multiplier == 2.0  # sigma over the toy's sensitivity C
