"""A DP training run as a site runs it: calibrate sigma for a target epsilon, charge the ledger
first (a refusal means nothing is computed), then train for exactly the charged steps with the
registered mechanism's trainer (``privacy.mechanisms``)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from privacy.accounting import calibrate_noise_multiplier, worst_epsilon
from privacy.dp_config import MechanismConfig
from privacy.ledger import ChargeRequest, Ledger, LedgerEntry
from privacy.mechanisms import Mechanism

if TYPE_CHECKING:
    from torch import nn

    from models.imageset import ImageSet
    from models.meta import MetaConfig


@dataclass(frozen=True)
class PrivateRunReport:
    """What was charged and run; every number comes from the accountant fed with what ran."""

    mechanism: Mechanism
    dp: MechanismConfig
    steps: int
    target_epsilon: float
    run_epsilon: float  # this run alone, worst of RDP and PRV
    run_epsilon_accountant: str
    entry: LedgerEntry

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with the model."""
        return {
            "mechanism": self.mechanism.name,
            "mechanism_description": self.mechanism.description,
            "sensitivity_factor": self.mechanism.sensitivity,
            "dp": self.dp.to_dict(),
            "accounted_noise_multiplier": self.mechanism.accounted_noise_multiplier(
                self.dp.noise_multiplier
            ),
            "steps": self.steps,
            "target_epsilon": self.target_epsilon,
            "run_epsilon": self.run_epsilon,
            "run_epsilon_accountant": self.run_epsilon_accountant,
            "ledger_entry": self.entry.as_dict(),
        }


def plan_private_run(
    mechanism: Mechanism,
    *,
    ledger: Ledger,
    target_epsilon: float,
    steps: int,
    dp: MechanismConfig,
    accountant: str,
) -> MechanismConfig:
    """The DP config whose noise makes ``steps`` steps spend ``target_epsilon`` at the ledger's
    delta (calibrated on the accounted multiplier, then scaled by the mechanism's sensitivity).

    Raises:
        ValueError: the mechanism releases arrays rather than training a model (dp-prototypes
            runs in a federated round, where the server keeps its release).
    """
    if mechanism.releases_arrays:
        raise ValueError(
            f"{mechanism.name} releases class sums, it trains no model: run it in a federated "
            f"round (server run config mechanism = {mechanism.name!r})"
        )
    mechanism.check_config(dp)
    accounted = calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=ledger.delta,
        sample_rate=dp.sample_rate,
        steps=steps,
        accountant=accountant,
    )
    planned: MechanismConfig = dataclasses.replace(
        dp,  # type: ignore[type-var]  # every MechanismConfig is a dataclass
        noise_multiplier=mechanism.noise_for(accounted),
    )
    return planned


def charge_private_run(
    mechanism: Mechanism,
    *,
    ledger: Ledger,
    target_epsilon: float,
    steps: int,
    dp: MechanismConfig,
    accountant: str,
    requester: str,
    round_number: int = 0,
    run_id: str | None = None,
) -> tuple[MechanismConfig, LedgerEntry]:
    """Calibrate sigma for ``target_epsilon`` and charge the ledger; nothing touches data.

    Raises:
        BudgetExhaustedError: the ledger refused (the refusal is recorded).
    """
    planned = plan_private_run(
        mechanism,
        ledger=ledger,
        target_epsilon=target_epsilon,
        steps=steps,
        dp=dp,
        accountant=accountant,
    )
    entry = ledger.charge(
        ChargeRequest(
            run_id=run_id or f"train-{uuid.uuid4().hex[:12]}",
            round=round_number,
            mechanism=mechanism.name,
            noise_multiplier=planned.noise_multiplier,
            sensitivity_factor=mechanism.sensitivity,
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
    mechanism: Mechanism,
    planned: MechanismConfig,
    entry: LedgerEntry,
    target_epsilon: float,
    delta: float,
    meta: MetaConfig,
    lr: float = 1e-3,
    seed: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> PrivateRunReport:
    """Train ``model`` in place for exactly the steps that ``entry`` charged.

    Raises:
        ValueError: ``entry`` charged another mechanism or other noise than ``planned``.
    """
    if entry.mechanism != mechanism.name or entry.noise_multiplier != planned.noise_multiplier:
        raise ValueError(
            f"ledger entry {entry.id} charged {entry.mechanism} at sigma "
            f"{entry.noise_multiplier}, not {mechanism.name} at {planned.noise_multiplier}: "
            "charge the run you are about to train"
        )
    trainer = mechanism.build_trainer(model, sets, dp=planned, meta=meta, lr=lr, seed=seed)
    trainer.train(entry.steps, on_step=on_step)
    history: list[tuple[float, float, int]] = [
        (entry.accounted_noise_multiplier, entry.sample_rate, entry.steps)
    ]
    epsilon, which = worst_epsilon(history, delta=delta)
    return PrivateRunReport(
        mechanism=mechanism,
        dp=planned,
        steps=entry.steps,
        target_epsilon=target_epsilon,
        run_epsilon=epsilon,
        run_epsilon_accountant=which,
        entry=entry,
    )
