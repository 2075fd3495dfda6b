"""A SecAgg+ round on a real deployment (SuperLink, two TLS SuperNodes, `flwr run`): it
completes, and one hospital's masked update appears nowhere on the server's side (ServerApp
output, SuperLink log and database, registry, status.json, checkpoint) except inside the sum."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from federation.checkpoint import load_checkpoint
from federation.secure_aggregation import clip_before_masking
from federation.server_app import initial_state
from federation.strategies import strategy_for
from tests.e2e.test_egress import server_side_files
from tests.e2e.test_federation import (
    RUN_TIMEOUT,
    app,
    charged_rounds,
    deployment,
    sites,
    tiny_config,
)

pytestmark = pytest.mark.slow


def markers(update: dict[str, np.ndarray], *, count: int = 12) -> list[bytes]:
    """Byte patterns of an update: runs of three consecutive float32 values (12 bytes), from
    its largest arrays. DP-noised values make each run as unique as a planted random marker."""
    found = []
    for name in sorted(update, key=lambda k: -update[k].size)[:4]:
        flat = np.ascontiguousarray(update[name].ravel(), dtype=np.float32)
        nonzero = np.flatnonzero(flat)
        for start in nonzero[: count // 4]:
            if start + 3 <= flat.size and np.all(flat[start : start + 3] != 0):
                found.append(flat[start : start + 3].tobytes())
    return found


def test_a_secure_round_completes_and_a_sites_update_reaches_the_server_only_summed(tmp_path):
    # Two sites (SecAgg+'s smallest federation): each stage starts a ClientApp process per node.
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-c": 8.0})
    config = tiny_config(tmp_path, num_rounds=1, min_nodes=2, min_replies=2, seed=0).with_values(
        {"secagg.enabled": True}
    )  # seed: round 0 is rebuilt below to check the sum
    with deployment(tmp_path, nodes) as federation:
        result = federation.run(app(tmp_path, config), timeout=RUN_TIMEOUT)
    result.check()

    final = load_checkpoint(config.root / "checkpoint", federation=config.federation)
    assert final is not None and final.round == 1
    record = final.history[1]
    assert record["secure-aggregation"]["contributors"] == 2
    assert record["secure-aggregation"]["sum-norm"] <= record["secure-aggregation"]["sum-bound"]
    assert set(record["sites"]) == set(nodes) and record["clipped"] == []
    for site in nodes:
        assert charged_rounds(tmp_path, site) == [1]

    # What each node masked: its kept delta, clipped as its node clipped it before masking.
    round0 = initial_state(config)
    bound = strategy_for(config, round0).norm_bound
    masked = {
        site: clip_before_masking(load_file(str(kept)), norm_bound=bound).delta
        for site in nodes
        for kept in (tmp_path / site / "state").rglob("round-1-charge-*.safetensors")
    }
    assert set(masked) == set(nodes)
    patterns = markers(masked["hospital-c"])
    assert len(patterns) >= 8
    kept_c = next((tmp_path / "hospital-c" / "state").rglob("round-1-charge-*.safetensors"))
    assert any(p in kept_c.read_bytes() for p in patterns)  # the search finds them where they are
    leaked = [
        path.relative_to(tmp_path)
        for path in server_side_files(tmp_path)
        if any(p in path.read_bytes() for p in patterns)
    ]
    assert not leaked, f"hospital-c's update reached the server side: {leaked}"
    assert not any(p in result.output.encode() for p in patterns)

    # Inside the sum: the round-1 model is round 0 plus the mean of the two masked updates.
    for name, value in final.state.items():
        mean = np.mean([m[name].astype(np.float64) for m in masked.values()], axis=0)
        moved = value.astype(np.float64) - round0[name].astype(np.float64)
        np.testing.assert_allclose(moved, mean, atol=1e-5)
