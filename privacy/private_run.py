"""A DP training run as a site runs it: calibrate sigma for a target epsilon, charge the ledger
first (a refusal means nothing is computed), then train for exactly the charged steps."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from models.imageset import ImageSet
from models.meta import MetaConfig
from privacy.accounting import calibrate_noise_multiplier, worst_epsilon
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig, DPMetaTrainer
from privacy.ledger import ChargeRequest, Ledger, LedgerEntry


@dataclass(frozen=True)
class PrivateRunReport:
    """What was charged and run; every number comes from the accountant fed with what ran."""

    dp: DPConfig
    steps: int
    target_epsilon: float
    run_epsilon: float  # this run alone, worst of RDP and PRV
    run_epsilon_accountant: str
    entry: LedgerEntry

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with the model."""
        return {
            "dp": self.dp.to_dict(),
            "accounted_noise_multiplier": self.dp.accounted_noise_multiplier,
            "steps": self.steps,
            "target_epsilon": self.target_epsilon,
            "run_epsilon": self.run_epsilon,
            "run_epsilon_accountant": self.run_epsilon_accountant,
            "ledger_entry": self.entry.as_dict(),
        }


def plan_private_run(
    *, ledger: Ledger, target_epsilon: float, steps: int, dp: DPConfig, accountant: str
) -> DPConfig:
    """The DP config whose noise makes ``steps`` steps spend ``target_epsilon`` at the ledger's
    delta (calibrated on the accounted multiplier, then scaled by the sensitivity factor)."""
    accounted = calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=ledger.delta,
        sample_rate=dp.sample_rate,
        steps=steps,
        accountant=accountant,
    )
    return dataclasses.replace(dp, noise_multiplier=accounted * EPISODIC_SENSITIVITY)


def charge_private_run(
    *,
    ledger: Ledger,
    target_epsilon: float,
    steps: int,
    dp: DPConfig,
    meta: MetaConfig,
    accountant: str,
    requester: str,
    round_number: int = 0,
    run_id: str | None = None,
) -> tuple[DPConfig, LedgerEntry]:
    """Calibrate sigma for ``target_epsilon`` and charge the ledger; nothing touches data.

    Raises:
        BudgetExhaustedError: the ledger refused (the refusal is recorded).
    """
    planned = plan_private_run(
        ledger=ledger, target_epsilon=target_epsilon, steps=steps, dp=dp, accountant=accountant
    )
    entry = ledger.charge(
        ChargeRequest(
            run_id=run_id or f"train-{uuid.uuid4().hex[:12]}",
            round=round_number,
            mechanism=f"dp-episodic-{meta.learner}",
            noise_multiplier=planned.noise_multiplier,
            sensitivity_factor=EPISODIC_SENSITIVITY,
            sample_rate=planned.sample_rate,
            steps=steps,
            requester=requester,
        )
    )
    return planned, entry


def run_charged_training(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    planned: DPConfig,
    entry: LedgerEntry,
    target_epsilon: float,
    delta: float,
    meta: MetaConfig,
    lr: float = 1e-3,
    seed: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> PrivateRunReport:
    """Train ``model`` in place for exactly the steps that ``entry`` charged."""
    trainer = DPMetaTrainer(model, sets, dp=planned, meta=meta, lr=lr, seed=seed)
    trainer.train(entry.steps, on_step=on_step)
    epsilon, which = worst_epsilon(
        [(planned.accounted_noise_multiplier, planned.sample_rate, entry.steps)], delta=delta
    )
    return PrivateRunReport(
        dp=planned,
        steps=entry.steps,
        target_epsilon=target_epsilon,
        run_epsilon=epsilon,
        run_epsilon_accountant=which,
        entry=entry,
    )
