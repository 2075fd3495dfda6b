import copy
import dataclasses

import pytest
import torch
from torch import nn

from models.adaptation import AdaptConfig, adapt
from models.meta import (
    META_LEARNERS,
    EpisodeBatch,
    MetaConfig,
    MetaLearner,
    cross_entropy,
    head_features,
    maml_adapt,
    split_params,
)
from models.networks import BackboneConfig, build_backbone


class TinyNet(nn.Module):
    """A tiny smooth embedding so finite differences are accurate in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _episode(ways=3, shots=2, queries=2, dim=4, dtype=torch.float64, seed=0) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ways, dim, generator=g, dtype=dtype) * 2
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    sx = centers[sy] + 0.3 * torch.randn(len(sy), dim, generator=g, dtype=dtype)
    qx = centers[qy] + 0.3 * torch.randn(len(qy), dim, generator=g, dtype=dtype)
    return EpisodeBatch(sx, sy, qx, qy)


def _finite_difference(loss_of, params, name: str, i: int, eps: float = 1e-6) -> float:
    value = params[name]
    plus, minus = value.flatten().clone(), value.flatten().clone()
    plus[i] += eps
    minus[i] -= eps
    lp = loss_of({**params, name: plus.view_as(value)})
    lm = loss_of({**params, name: minus.view_as(value)})
    return float((lp - lm) / (2 * eps))


def test_maml_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = TinyNet().double()
    params, buffers = split_params(model)
    meta = MetaLearner(MetaConfig(learner="maml", inner_steps=2, inner_lr=0.5))
    batch = _episode()

    def loss_of(p):
        return meta.episode_loss(model, p, buffers, batch, 3)

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    analytic = torch.autograd.grad(loss_of(p), list(p.values()))
    for (name, value), g in zip(params.items(), analytic, strict=True):
        for i in range(0, value.numel(), 3):
            numeric = _finite_difference(loss_of, params, name, i)
            assert abs(numeric - float(g.flatten()[i])) < 1e-6, (name, i)


def test_fomaml_gradient_is_the_query_gradient_at_the_adapted_weights():
    # First-order MAML (Finn et al. 2017, sec. 5.2; Nichol et al. 2018) treats the inner updates
    # as constants: the meta-gradient is dL_query/dtheta' at the adapted theta', applied to theta.
    torch.manual_seed(0)
    model = TinyNet().double()
    params, buffers = split_params(model)
    config = MetaConfig(learner="fomaml", inner_steps=2, inner_lr=0.5, inner_body_lr=0.05)
    batch = _episode()
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    analytic = torch.autograd.grad(
        MetaLearner(config).episode_loss(model, p, buffers, batch, 3), list(p.values())
    )
    adapted = maml_adapt(
        model,
        params,
        buffers,
        batch.support_x,
        batch.support_y,
        ways=3,
        steps=config.inner_steps,
        lr=config.inner_lr,
        body_lr=config.inner_body_lr,
        first_order=True,
    )

    def query_loss(fast):  # the query loss as a function of the adapted weights alone
        body = {k: v for k, v in fast.items() if not k.startswith("head.")}
        feats = head_features(torch.func.functional_call(model, (body, buffers), (batch.query_x,)))
        return cross_entropy(feats @ fast["head.weight"].T + fast["head.bias"], batch.query_y)

    for (name, value), g in zip(params.items(), analytic, strict=True):
        for i in range(value.numel()):
            numeric = _finite_difference(query_loss, adapted, name, i)
            assert abs(numeric - float(g.flatten()[i])) < 1e-6, (name, i)
    # ... and it is not the exact (second-order) gradient, which the inner Hessian changes.
    exact = MetaLearner(dataclasses.replace(config, learner="maml"))
    p2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    exact_g = torch.autograd.grad(
        exact.episode_loss(model, p2, buffers, batch, 3), list(p2.values())
    )
    assert max(float((a - b).abs().max()) for a, b in zip(analytic, exact_g, strict=True)) > 1e-4


@pytest.mark.parametrize("learner", META_LEARNERS)
def test_meta_gradients_are_nonzero_and_finite(learner):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    g = torch.Generator().manual_seed(1)
    batch = EpisodeBatch(
        torch.randn(6, 3, 32, 32, generator=g),
        torch.arange(3).repeat_interleave(2),
        torch.randn(6, 3, 32, 32, generator=g),
        torch.arange(3).repeat_interleave(2),
    )
    params = dict(model.named_parameters())
    _, buffers = split_params(model)
    loss = MetaLearner(MetaConfig(learner=learner)).episode_loss(model, params, buffers, batch, 3)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    norms = [gr.norm() for gr in grads if gr is not None]
    assert norms and all(torch.isfinite(n) for n in norms)
    assert sum(float(n) for n in norms) > 0


def test_maml_inner_loop_lowers_support_loss():
    torch.manual_seed(0)
    model = TinyNet().double()
    params, buffers = split_params(model)
    batch = _episode()
    fast = maml_adapt(
        model,
        params,
        buffers,
        batch.support_x,
        batch.support_y,
        ways=3,
        steps=5,
        lr=0.05,
        body_lr=0.05,
        first_order=True,
    )
    body = {k: v for k, v in fast.items() if not k.startswith("head.")}
    with torch.no_grad():
        feats = head_features(
            torch.func.functional_call(model, (body, buffers), (batch.support_x,))
        )
        after = cross_entropy(feats @ fast["head.weight"].T + fast["head.bias"], batch.support_y)
    assert float(after) < float(torch.log(torch.tensor(3.0)))  # zero head gives exactly log(3)


@pytest.mark.parametrize("mode", ["prototype", "finetune", "maml"])
def test_adaptation_never_mutates_base_model_and_fits_support(mode):
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(2)
    sx = torch.randn(9, 3, 32, 32, generator=g)
    sy = torch.arange(3).repeat_interleave(3)

    clf = adapt(model, sx, sy, ways=3, config=AdaptConfig(mode=mode, finetune_steps=10))
    with torch.no_grad():
        loss = cross_entropy(clf.logits(sx), sy)

    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert float(loss) < float(torch.log(torch.tensor(3.0)))
    probs = clf.predict_proba(sx)
    torch.testing.assert_close(probs.sum(-1), torch.ones(9))


def test_finetune_lowers_support_loss_below_prototypes():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    g = torch.Generator().manual_seed(3)
    sx = torch.randn(10, 3, 32, 32, generator=g)
    sy = torch.arange(2).repeat_interleave(5)
    proto = adapt(model, sx, sy, ways=2, config=AdaptConfig(mode="prototype"))
    tuned = adapt(model, sx, sy, ways=2, config=AdaptConfig(mode="finetune", finetune_steps=30))
    proto_acc = (proto.logits(sx).argmax(-1) == sy).float().mean()
    tuned_acc = (tuned.logits(sx).argmax(-1) == sy).float().mean()
    assert tuned_acc >= proto_acc
    assert float(tuned_acc) == 1.0
