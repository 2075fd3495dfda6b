"""DP episodic meta-training: sensitivity, sampling, per-episode gradients, the private run, and
averaging of its iterates."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from scipy import stats

from models.freezing import frozen_parameters, trainable_parameters
from models.imageset import ImageSet
from models.meta import EpisodeBatch, MetaConfig, MetaLearner, split_params
from models.networks import BackboneConfig, build_backbone
from privacy.dp_meta import (
    DPConfig,
    DPMetaTrainer,
    IterateAveraging,
    iterate_weights,
    pack,
    per_episode_grads,
)
from privacy.mechanisms import EPISODIC, MECHANISMS
from privacy.sampling import assign_patients, draw_plan, poisson_sample
from tests.privacy.patients import random_set, without

TINY = BackboneConfig(width=8, image_size=16)


def _clipped_sum(model, data: ImageSet, config: DPConfig, key: int, learner: str) -> torch.Tensor:
    """Opacus's own clipped sum (noise 0, no normalisation) of one step's episode gradients."""
    plan = draw_plan(
        [np.arange(len(data.classes))], episodes=config.episodes, ways=config.ways, key=key
    )
    assignments = assign_patients(
        data,
        plan,
        sample_rate=config.sample_rate,
        key=key,
        support_fraction=0.5,
        max_shots=config.max_shots,
        max_queries=config.max_queries,
    )
    packed = pack(data, assignments, config, augment_seed=None)
    params, buffers = split_params(model)
    grads = per_episode_grads(
        model,
        MetaLearner(MetaConfig(learner=learner, inner_steps=1)),
        params,
        buffers,
        packed,
        config.ways,
    )
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=config.episodes,
        loss_reduction="sum",
    )
    for name, p in model.named_parameters():
        p.grad_sample = grads[name]
    optimizer.pre_step()
    flat = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    optimizer.zero_grad()
    return flat


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), learner=st.sampled_from(["protonet", "fomaml"]))
def test_one_patient_moves_the_clipped_sum_by_at_most_2C(seed, learner):
    torch.manual_seed(seed)
    model = build_backbone(TINY)
    data = random_set(seed, n_patients=30)
    config = DPConfig(
        noise_multiplier=1.0,
        max_grad_norm=0.5,
        sample_rate=0.9,
        episodes=4,
        ways=2,
        max_shots=3,
        max_queries=3,
    )
    victim = f"p{seed % 30}"

    with_patient = _clipped_sum(model, data, config, key=seed, learner=learner)
    without_patient = _clipped_sum(model, without(data, victim), config, key=seed, learner=learner)

    bound = MECHANISMS[EPISODIC].sensitivity * config.max_grad_norm  # the registered 2C
    assert float((with_patient - without_patient).norm()) <= bound + 1e-5


def test_sensitivity_bound_is_attained_not_vacuous():
    """The bound must be near-tight somewhere, or the test above could not fail."""
    worst = 0.0
    for seed in range(6):
        torch.manual_seed(seed)
        model = build_backbone(TINY)
        data = random_set(seed, n_patients=12)
        config = DPConfig(
            noise_multiplier=1.0,
            max_grad_norm=0.01,
            sample_rate=1.0,
            episodes=2,
            ways=2,
            max_shots=3,
            max_queries=3,
        )
        a = _clipped_sum(model, data, config, key=seed, learner="protonet")
        for victim in np.unique(data.patients):
            b = _clipped_sum(model, without(data, victim), config, key=seed, learner="protonet")
            worst = max(worst, float((a - b).norm()) / config.max_grad_norm)
    assert worst > 1.0  # more than C: a patient can flip an episode's whole clipped gradient


def test_patient_sampling_is_poisson_with_rate_q():
    ids = np.array([f"p{i}" for i in range(40)])
    q, trials = 0.1, 3000
    draws = np.array([poisson_sample(ids, sample_rate=q, key=k) for k in range(trials)])

    per_patient = draws.sum(0)
    # each patient's inclusion count is Binomial(trials, q)
    p_values = [stats.binomtest(int(c), trials, q).pvalue for c in per_patient]
    assert min(p_values) > 1e-4
    # pairwise independence: P(i and j) = q^2
    joint = (draws[:, :-1] & draws[:, 1:]).mean()
    assert abs(joint - q * q) < 4 * np.sqrt(q * q / trials)
    # batch size ~ Binomial(40, q), empty batches included
    sizes = draws.sum(1)
    assert (sizes == 0).any()
    expected_empty = (1 - q) ** len(ids)
    assert abs((sizes == 0).mean() - expected_empty) < 4 * np.sqrt(expected_empty / trials)
    assert abs(sizes.mean() - q * len(ids)) < 0.1


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("learner", ["protonet", "maml", "fomaml"])
def test_episode_gradients_equal_autograd(learner, vectorized):
    torch.manual_seed(0)
    model = build_backbone(TINY)
    data = random_set(1, n_patients=40)
    config = DPConfig(
        noise_multiplier=1.0, sample_rate=1.0, episodes=3, ways=2, max_shots=2, max_queries=2
    )
    plan = draw_plan([np.arange(4)], episodes=3, ways=2, key=5)
    packed = pack(
        data,
        assign_patients(
            data, plan, sample_rate=1.0, key=5, support_fraction=0.5, max_shots=2, max_queries=2
        ),
        config,
        augment_seed=None,
    )
    meta = MetaLearner(MetaConfig(learner=learner, inner_steps=1))
    params, buffers = split_params(model)

    grads = per_episode_grads(model, meta, params, buffers, packed, 2, vectorized=vectorized)

    for e in range(3):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        batch = EpisodeBatch(*(t[e] for t in packed))
        ref = torch.autograd.grad(
            meta.episode_loss(model, p, buffers, batch, 2), list(p.values()), allow_unused=True
        )
        for (name, _), r in zip(p.items(), ref, strict=True):
            expected = torch.zeros_like(grads[name][e]) if r is None else r
            torch.testing.assert_close(grads[name][e], expected, rtol=1e-3, atol=2e-5)


def test_degenerate_episode_has_zero_gradient():
    torch.manual_seed(0)
    model = build_backbone(TINY)
    x = torch.rand(1, 4, 3, 16, 16)
    y = torch.zeros(1, 4, dtype=torch.long)
    packed = EpisodeBatch(x, y, x, y, torch.ones(1, 4), torch.ones(1, 4))  # one class only
    params, buffers = split_params(model)
    grads = per_episode_grads(model, MetaLearner(MetaConfig()), params, buffers, packed, 2)
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())


def test_dp_step_updates_model_and_fixed_seed_reproduces():
    data = random_set(3, n_patients=30)
    config = DPConfig(
        noise_multiplier=1.0, sample_rate=0.5, episodes=2, ways=2, max_shots=2, max_queries=2
    )
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_backbone(TINY)
        before = [p.detach().clone() for p in model.parameters()]
        DPMetaTrainer(model, [data], dp=config, meta=MetaConfig(), seed=7).train(2)
        after = [p.detach().clone() for p in model.parameters()]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        results.append(after)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_production_noise_is_not_reproducible():
    data = random_set(3, n_patients=30)
    config = DPConfig(
        noise_multiplier=1.0, sample_rate=0.5, episodes=2, ways=2, max_shots=2, max_queries=2
    )
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_backbone(TINY)
        DPMetaTrainer(model, [data], dp=config, meta=MetaConfig(), augment=False).train(1)
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(outs[0], outs[1])


def _averaging_run(averaging: IterateAveraging, steps: int):
    """A seeded tiny run (DP on norm-affine only): the iterates seen by ``on_step``, the final
    parameters, the frozen ones before, the noise draws and the accountant's steps."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=8, image_size=16, trainable="norm-affine"))
    dp = DPConfig(
        noise_multiplier=1.0, sample_rate=0.5, episodes=2, ways=2, max_shots=2, max_queries=2
    )
    trainer = DPMetaTrainer(
        model, [random_set(3, 30)], dp=dp, meta=MetaConfig(), lr=0.05, seed=7, averaging=averaging
    )
    accountant = RDPAccountant()
    trainer.optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(dp.sample_rate))
    noise_draws = []
    add_noise = trainer.optimizer.add_noise
    trainer.optimizer.add_noise = lambda: (noise_draws.append(1), add_noise())[1]  # type: ignore[method-assign]
    frozen = {k: v.detach().clone() for k, v in frozen_parameters(model).items()}
    iterates: list[dict[str, torch.Tensor]] = []

    def record(_: int) -> None:
        iterates.append({k: v.detach().clone() for k, v in trainable_parameters(model).items()})

    trainer.train(steps, on_step=record)
    final = {k: v.detach().clone() for k, v in model.named_parameters()}
    accounted = sum(n for _, _, n in accountant.history)
    return iterates, final, frozen, len(noise_draws), accounted


@pytest.mark.parametrize(
    "averaging", [IterateAveraging("ema", decay=0.9), IterateAveraging("tail")], ids=str
)
def test_averaging_leaves_the_average_of_the_recorded_iterates(averaging):
    steps = 5
    iterates, final, frozen, noise_draws, accounted = _averaging_run(averaging, steps)

    if averaging.mode == "ema":  # the recursion, independent of iterate_weights
        expected = dict(iterates[0])
        for it in iterates[1:]:
            expected = {
                k: averaging.decay * expected[k] + (1 - averaging.decay) * it[k] for k in it
            }
    else:
        tail = iterates[steps - math.ceil(steps / 2) :]
        expected = {k: torch.stack([it[k] for it in tail]).mean(0) for k in iterates[0]}
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(final[name], iterates[-1][name])  # the average, not the last
    for name, value in frozen.items():
        assert torch.equal(final[name], value)
    assert noise_draws == steps and accounted == steps  # averaging is free post-processing


def test_averaging_off_keeps_the_last_iterate_and_the_same_trajectory():
    steps = 4
    plain, plain_final, _, plain_draws, plain_accounted = _averaging_run(IterateAveraging(), steps)
    averaged, _, _, draws, accounted = _averaging_run(IterateAveraging("ema", 0.5), steps)

    for name, value in plain[-1].items():
        assert torch.equal(plain_final[name], value)
    for a, b in zip(plain, averaged, strict=True):  # the average never feeds back into training
        for name in a:
            assert torch.equal(a[name], b[name])
    assert plain_draws == draws == steps and plain_accounted == accounted == steps


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 40), decay=st.floats(0.0, 0.99), mode=st.sampled_from(["ema", "tail"]))
def test_iterate_weights_are_a_convex_combination(steps, decay, mode):
    weights = iterate_weights(IterateAveraging(mode, decay=decay), steps)

    assert len(weights) == steps and (weights >= 0).all()
    assert math.isclose(weights.sum(), 1.0, rel_tol=1e-9)
    if mode == "tail":
        assert np.count_nonzero(weights) == math.ceil(steps / 2)


@pytest.mark.parametrize("bad", [{"mode": "swa"}, {"mode": "ema", "decay": 1.0}])
def test_averaging_config_names_a_bad_field(bad):
    with pytest.raises(ValueError, match="IterateAveraging"):
        IterateAveraging(**bad)
