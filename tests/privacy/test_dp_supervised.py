"""DP supervised training (``dp-supervised``): sensitivity C, per-patient gradients, the
registered mechanism and its private run."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.optimizers import DPOptimizer

from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from privacy.accounting import epsilon_for
from privacy.dp_supervised import Classifier, DPPretrainConfig, DPPretrainer, per_patient_grads
from privacy.ledger import Ledger
from privacy.mechanisms import MECHANISMS, SUPERVISED
from privacy.private_run import charge_private_run, run_charged_training
from tests.privacy.patients import random_set, without

TINY = BackboneConfig(width=8, image_size=16)


def _clipped_sum(data: ImageSet, config: DPPretrainConfig, *, key: int, init: int) -> torch.Tensor:
    """Opacus's own clipped sum (noise 0, no normalisation) of one step's per-patient gradients,
    with the network's initialisation and the step key fixed."""
    torch.manual_seed(init)
    trainer = DPPretrainer(build_backbone(TINY), [data], dp=config, augment=False, seed=0)
    trainer.model.head.weight.data.normal_()  # a head that has learnt: the encoder gets gradients
    grads = trainer.patient_gradients(key)
    optimizer = DPOptimizer(
        torch.optim.SGD(trainer.model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=config.max_grad_norm,
        expected_batch_size=1,
        loss_reduction="sum",
    )
    for name, p in trainer.model.named_parameters():
        p.grad_sample = grads[name]
    optimizer.pre_step()
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_one_patient_moves_the_clipped_sum_by_at_most_C(seed):
    data = random_set(seed, n_patients=20)
    victim = f"p{seed % 20}"
    config = DPPretrainConfig(noise_multiplier=1.0, max_grad_norm=0.05, sample_rate=0.8)

    difference = _clipped_sum(data, config, key=seed, init=seed) - _clipped_sum(
        without(data, victim), config, key=seed, init=seed
    )

    bound = MECHANISMS[SUPERVISED].sensitivity * config.max_grad_norm  # the registered C
    assert float(difference.norm()) <= bound + 1e-6


def test_sensitivity_bound_is_attained_not_vacuous():
    """A sampled patient moves the sum by its whole clipped gradient (about C), so the test above
    fails for a mechanism whose real sensitivity is above C (e.g. clipping per image)."""
    config = DPPretrainConfig(noise_multiplier=1.0, max_grad_norm=0.01, sample_rate=1.0)
    data = random_set(3, n_patients=8)
    full = _clipped_sum(data, config, key=3, init=0)
    moves = [
        float((full - _clipped_sum(without(data, p), config, key=3, init=0)).norm())
        for p in np.unique(data.patients)
    ]
    assert max(moves) > 0.99 * config.max_grad_norm


def test_the_head_starts_at_zero_so_the_first_step_moves_only_the_head():
    """A fresh random head would pull the public encoder towards random classes; at zero, the
    encoder's first per-patient gradients vanish and the head learns first."""
    config = DPPretrainConfig(noise_multiplier=1.0, sample_rate=1.0)
    trainer = DPPretrainer(build_backbone(TINY), [random_set(1, n_patients=6)], dp=config, seed=0)
    grads = trainer.patient_gradients(key=1)
    assert all(float(g.abs().max()) == 0 for k, g in grads.items() if k.startswith("backbone."))
    assert float(grads["head.weight"].abs().max()) > 0


def test_augmented_copies_are_averaged_per_record_before_clipping():
    """With K copies, a patient's term is the mean of its records' K augmented gradients: the
    same scale as one copy (not K times larger), from that patient's records only."""
    data = random_set(2, n_patients=6)
    torch.manual_seed(0)
    backbone = build_backbone(TINY)
    one, three = (
        DPPretrainer(
            backbone,
            [data],
            dp=DPPretrainConfig(noise_multiplier=1.0, sample_rate=1.0, augmentations=k),
            seed=0,
        )
        for k in (1, 3)
    )
    for trainer in (one, three):
        trainer.model.head = one.model.head  # the same (non-zero) head for both
    one.model.head.weight.data.normal_()
    x1, _, owner1, _ = one.clipped_inputs(key=5)
    x3, _, owner3, _ = three.clipped_inputs(key=5)
    assert len(x3) == 3 * len(x1)
    assert torch.equal(owner3, owner1.repeat(3))
    g1, g3 = one.patient_gradients(key=5), three.patient_gradients(key=5)
    norms1 = torch.stack([g.flatten(1).norm(dim=1) for g in g1.values()]).norm(dim=0)
    norms3 = torch.stack([g.flatten(1).norm(dim=1) for g in g3.values()]).norm(dim=0)
    assert float(norms3.max()) < 2 * float(norms1.max())  # averaged, not summed over copies
    assert not torch.allclose(norms3, norms1)  # the copies are really different augmentations


def test_per_patient_gradient_sums_the_patients_records():
    torch.manual_seed(0)
    model = Classifier(build_backbone(TINY), 3)
    x = torch.rand(5, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1])
    owner = torch.tensor([0, 0, 1, 2, 2])
    grads = per_patient_grads(model, x, y, owner, 3, chunk=2)
    for patient, rows in ((0, [0, 1]), (1, [2]), (2, [3, 4])):
        expected = [torch.zeros_like(p) for p in model.parameters()]
        for r in rows:
            loss = torch.nn.functional.cross_entropy(model(x[r : r + 1]), y[r : r + 1])
            for e, g in zip(
                expected, torch.autograd.grad(loss, list(model.parameters())), strict=True
            ):
                e += g
        for (name, _), e in zip(model.named_parameters(), expected, strict=True):
            torch.testing.assert_close(grads[name][patient], e, rtol=1e-3, atol=1e-5)


def test_private_run_charges_the_registered_mechanism_and_trains_the_backbone(tmp_path):
    mechanism = MECHANISMS[SUPERVISED]
    ledger = Ledger.create(tmp_path / "ledger.db", site="a", cap_epsilon=10.0, delta=1e-5)
    dp = mechanism.dp_config({"noise_multiplier": 1.0, "sample_rate": 0.5, "ways": 3})

    planned, entry = charge_private_run(
        mechanism,
        ledger=ledger,
        target_epsilon=4.0,
        steps=3,
        dp=dp,
        accountant="rdp",
        requester="test",
    )
    torch.manual_seed(0)
    model = build_backbone(TINY)
    before = [p.detach().clone() for p in model.parameters()]
    report = run_charged_training(
        model,
        [random_set(1, n_patients=12)],
        mechanism=mechanism,
        planned=planned,
        entry=entry,
        target_epsilon=4.0,
        delta=ledger.delta,
        meta=MetaConfig(),
        seed=0,
    )

    assert isinstance(planned, DPPretrainConfig)
    assert (entry.mechanism, entry.sensitivity_factor) == (SUPERVISED, 1.0)
    # sensitivity C: the accountant sees sigma itself, and sigma spends the target epsilon
    assert entry.accounted_noise_multiplier == planned.noise_multiplier
    spent = epsilon_for(
        [(planned.noise_multiplier, planned.sample_rate, 3)], delta=1e-5, accountant="rdp"
    )
    assert spent == pytest.approx(4.0, rel=0.02)
    assert report.to_dict()["mechanism"] == SUPERVISED
    assert "per-patient" in report.to_dict()["mechanism_description"]
    after = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_charge_for_another_mechanism_is_not_trained(tmp_path):
    ledger = Ledger.create(tmp_path / "ledger.db", site="a", cap_epsilon=10.0, delta=1e-5)
    episodic = MECHANISMS["dp-episodic"]
    planned, entry = charge_private_run(
        episodic,
        ledger=ledger,
        target_epsilon=2.0,
        steps=2,
        dp=episodic.dp_config({"noise_multiplier": 1.0}),
        accountant="rdp",
        requester="test",
    )
    supervised = MECHANISMS[SUPERVISED]
    with pytest.raises(ValueError, match="charged dp-episodic"):
        run_charged_training(
            build_backbone(TINY),
            [random_set(1, n_patients=6)],
            mechanism=supervised,
            planned=supervised.dp_config({"noise_multiplier": planned.noise_multiplier}),
            entry=entry,
            target_epsilon=2.0,
            delta=ledger.delta,
            meta=MetaConfig(),
        )
