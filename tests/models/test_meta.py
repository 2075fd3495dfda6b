import copy

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


@pytest.mark.parametrize("learner", ["maml", "fomaml"])
def test_maml_meta_gradient_matches_finite_differences(learner):
    torch.manual_seed(0)
    model = TinyNet().double()
    params, buffers = split_params(model)
    meta = MetaLearner(MetaConfig(learner=learner, inner_steps=2, inner_lr=0.5))
    batch = _episode()

    def loss_of(p):
        return meta.episode_loss(model, p, buffers, batch, 3)

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    analytic = torch.autograd.grad(loss_of(p), list(p.values()))
    eps = 1e-6
    for (name, value), g in zip(params.items(), analytic, strict=True):
        flat = value.flatten()
        for i in range(0, flat.numel(), 3):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            lp = loss_of({**params, name: plus.view_as(value)})
            lm = loss_of({**params, name: minus.view_as(value)})
            numeric = (lp - lm) / (2 * eps)
            if learner == "maml":
                assert abs(float(numeric) - float(g.flatten()[i])) < 1e-6, (name, i)
    if learner == "fomaml":
        # first-order drops the inner Hessian term: it must differ from the exact gradient
        exact = MetaLearner(MetaConfig(learner="maml", inner_steps=2, inner_lr=0.5))
        p2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        exact_g = torch.autograd.grad(
            exact.episode_loss(model, p2, buffers, batch, 3), list(p2.values())
        )
        assert any(not torch.allclose(a, b) for a, b in zip(analytic, exact_g, strict=True))


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
