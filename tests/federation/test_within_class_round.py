"""dp-within-class rounds in process: three sites release through the real ClientApp; round 1
sets the domain's centre, later rounds its within-class metric; every charge is accounted with
the registered sensitivity, and the evaluation applies the released metric."""

import math

import numpy as np
import pytest
import torch

from federation.inprocess_grid import InProcessGrid
from federation.server_app import initial_state, run_federation
from federation.strategies import strategy_for
from federation.within_class_strategy import MOMENTS_FILE
from models.feature_adapter import feature_transform
from models.model_dir import load_model_dir
from models.registry import Registry
from models.synthetic import write_synthetic_npz
from privacy.accounting import epsilon_for
from privacy.dp_config import WITHIN_CLASS_SENSITIVITY
from privacy.ledger import Ledger
from privacy.mechanisms import WITHIN_CLASS
from privacy.within_class_release import STAGE_CENTRE, STAGE_METRIC

from .conftest import node

VOCABULARY = ("synthetic_disc_bright", "synthetic_ring_dark", "synthetic_ellipse_speckled")
SIGMA = 2.0  # accounted 2 / sqrt(1.125) = 1.89: three rounds within the cap of 8


@pytest.fixture
def config(server_config):
    return server_config.with_values(
        {
            "backbone.name": "efficientnet_lite0",
            "backbone.image-size": 32,
            "backbone.norm": "batch",
            "backbone.trainable": "none",
            "backbone.features": "multi-scale",
            "backbone.adapter": "within-class",
            "mechanism": WITHIN_CLASS,
            "steps": 1,
            "num-rounds": 3,
            "min-nodes": 3,
            "min-replies": 3,
            "dp.classes": ",".join(VOCABULARY),
            "dp.noise-multiplier": SIGMA,
            "dp.max-grad-norm": 1.0,
            "dp.sample-rate": 1.0,
        }
    )


def site(root, name, seed):
    folder = root / name
    folder.mkdir(parents=True)
    data = write_synthetic_npz(folder / "data.npz", n_classes=4, per_class=60, size=32, seed=seed)
    return {
        "site-id": name,
        "data": str(data),
        "ledger": str(folder / "ledger.db"),
        "registry": str(folder / "registry"),
        "budget-epsilon": 8.0,
        "budget-delta": 1e-5,
        "allowed-mechanisms": WITHIN_CLASS,
    }


def with_basis(state, size=64, seed=0):
    """The state with a public basis (the operator's step; random orthonormal here)."""
    width = state["adapter.centre"].shape[0]
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(width, size)))
    basis = np.zeros_like(state["adapter.basis"])
    basis[:, :size] = q
    return {**state, "adapter.basis": basis.astype(np.float32)}


def test_round_one_releases_the_centre_and_later_rounds_the_metric(tmp_path, config):
    sites = [site(tmp_path, s, seed=i) for i, s in enumerate("abc")]
    state = with_basis(initial_state(config))
    assert int(state["adapter.stage"]) == 0

    final = run_federation(
        InProcessGrid({i + 1: node(s) for i, s in enumerate(sites)}), config, state
    )

    assert final.round == 3
    versions = Registry.open(config.root / "registry").entries(kind="global")
    models = [load_model_dir(v.path).model for v in versions]
    stages = [int(m.adapter.stage) for m in models]
    assert stages == [0, STAGE_CENTRE, STAGE_METRIC, STAGE_METRIC]
    assert (
        float(models[1].adapter.centre.norm()) > 0 and float(models[0].adapter.centre.norm()) == 0
    )
    eye = torch.eye(len(models[0].adapter.inner))
    assert torch.equal(models[1].adapter.inner, eye)
    assert not torch.allclose(models[2].adapter.inner, eye, atol=1e-3)
    assert not torch.allclose(models[3].adapter.inner, models[2].adapter.inner)
    with np.load(config.root / MOMENTS_FILE) as kept:  # rounds 2 and 3, summed over sites
        assert sorted(kept.files) == sorted(
            f"{k}-{r}" for k in ("second-moments", "class-sums") for r in (2, 3)
        )
    expected = [
        epsilon_for([(SIGMA / WITHIN_CLASS_SENSITIVITY, 1.0, n)], delta=1e-5, accountant="rdp")
        for n in (1, 2, 3)
    ]
    for s in sites:
        entries = Ledger.open(s["ledger"]).entries()
        assert [(e.mechanism, e.steps, e.sample_rate) for e in entries] == [
            (WITHIN_CLASS, 1, 1.0)
        ] * 3
        assert all(e.sensitivity_factor == pytest.approx(math.sqrt(1.125)) for e in entries)
        assert [e.epsilon_after for e in entries] == pytest.approx(expected, rel=1e-6)
    # the released metric is what adaptation applies after its feature map
    mapped = torch.nn.functional.normalize(torch.randn(5, models[3].out_features), dim=1) * 4
    transform = feature_transform(models[3])
    assert transform is not None
    moved = transform(mapped)
    assert torch.allclose(moved.norm(dim=1), mapped.norm(dim=1), atol=1e-4)
    assert not torch.allclose(moved, mapped, atol=1e-3)
    assert torch.equal(feature_transform(models[1])(mapped), mapped)  # no metric yet


def test_the_server_refuses_the_mechanism_without_the_within_class_adapter(config):
    plain = config.with_values({"backbone.adapter": "scale"})
    with pytest.raises(ValueError, match=r"backbone\.adapter = 'within-class'"):
        strategy_for(plain, initial_state(plain))


def test_the_start_up_log_names_the_release_bound_not_a_delta_bound(config, caplog):
    strategy = strategy_for(config, initial_state(config))
    with caplog.at_level("INFO"):
        strategy.summary()
    assert f"summed releases, each at most {strategy.release_bound():.4g} long" in caplog.text
    assert "delta norm bound" not in caplog.text
