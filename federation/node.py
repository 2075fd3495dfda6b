"""One round at a hospital node, without Flower: check the plan, charge the ledger, train with DP,
reply with the model delta and accounted numbers only (or, for a mechanism that releases its own
arrays, dp-prototypes, that release instead of a delta).

Privacy of what leaves the node (docs/privacy.md, "Federation"): the delta is
``theta_local - theta_global`` where ``theta_global`` is public and ``theta_local`` is Adam
post-processing of the DP-SGD outputs of the plan's registered mechanism
(``privacy.mechanisms``), so it is as private as those outputs: the ledger charge composed with
every earlier charge bounds it. The report holds only the plan (public) and epsilons computed
from the charged ``(sigma, q, steps)`` history: nothing in it depends on the data. No counts,
losses or accuracies leave the node.

Replay: a reply is written to the node's disk before it is sent. If the same round with the same
global model and plan is asked again (a server resumed from its checkpoint), the stored reply is
sent again, which is post-processing and costs nothing; a charge whose reply was never written
(the node died mid-training) is reused, since no output of it ever left the node.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

from federation.errors import BudgetRefusedError, NodeConfigError, SiteDataError
from federation.node_config import NodeConfig
from federation.plan import RoundPlan, check_policy
from federation.publishing import model_from_state, publish_state, state_digest
from models.feature_adapter import AdaptedEncoder
from models.feature_store import FeatureStore
from models.imageset import ImageSet
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from models.registry import Registry, RegistryEntry
from privacy.distributed_noise import fallback_epsilons, has_noise_shares
from privacy.errors import BudgetExhaustedError
from privacy.ledger import KIND_CHARGE, ChargeRequest, Ledger, LedgerEntry
from privacy.ledger_head import LedgerHead, load_signing_key, read_head, sign_head
from privacy.mechanisms import OUTPUT_DELTA, OUTPUT_RELEASE
from privacy.prototype_release import PrototypeRelease
from privacy.site_report import SitePrivacyReport

State = dict[str, np.ndarray]


OUTPUT_KEY = "output"  # a kept reply's metadata: the mechanism's kind of output


@dataclass(frozen=True)
class NodeReply:
    """What the node sends back: the mechanism's output (the model delta, or for a mechanism
    that releases arrays, its release) and accounted, data-independent numbers."""

    arrays: State  # what leaves the node
    report: SitePrivacyReport
    output: str = OUTPUT_DELTA  # which of them (Mechanism.output): also the reply's record key

    @property
    def delta(self) -> State:
        """The model delta ({} for a release)."""
        return self.arrays if self.output == OUTPUT_DELTA else {}

    @property
    def release(self) -> State:
        """The release ({} for a delta): dp-prototypes' class sums."""
        return self.arrays if self.output == OUTPUT_RELEASE else {}


def open_ledger(config: NodeConfig) -> Ledger:
    """The node's ledger, created with the configured cap on first use.

    Raises:
        NodeConfigError: an existing ledger belongs to another site or has another cap or delta.
    """
    # Two first rounds at once must not both create the file (or open it half-made).
    with _exclusive(config.ledger.with_name(f".{config.ledger.name}.create-lock")):
        if not config.ledger.exists():
            return Ledger.create(
                config.ledger,
                site=config.site_id,
                cap_epsilon=config.budget_epsilon,
                delta=config.budget_delta,
                accountant=config.accountant,
            )
    ledger = Ledger.open(config.ledger)
    mismatch = {
        "site-id": (ledger.site, config.site_id),
        "budget-epsilon": (ledger.cap_epsilon, config.budget_epsilon),
        "budget-delta": (ledger.delta, config.budget_delta),
    }
    for key, (recorded, configured) in mismatch.items():
        if recorded != configured:
            raise NodeConfigError(
                f"ledger {config.ledger} records {key} {recorded!r} but the node config says "
                f"{configured!r}; a ledger's cap is fixed when it is created: set {key} to "
                f"{recorded!r}, or start a new ledger file for a new budget period"
            )
    return ledger


def run_round(
    config: NodeConfig,
    plan: RoundPlan,
    global_state: State,
    *,
    requester: str,
    seed: int | None = None,
) -> NodeReply:
    """Run one federated round at this node.

    Raises:
        PlanRefusedError: the node's policy or its budget refuses the plan; nothing was computed
            (a budget refusal is recorded on the ledger).
        DataError / NodeConfigError: the node's data or configuration is unusable.
    """
    check_policy(plan, config)
    ledger = open_ledger(config)
    replies = config.replies_dir / plan.federation
    # One attempt at a time per round: a retry that arrives while an earlier attempt still runs
    # waits, then replays that attempt's reply instead of releasing a second output.
    with _exclusive(replies / f"round-{plan.round}.lock"):
        return _run_locked(config, plan, global_state, ledger, replies, requester, seed)


def _run_locked(
    config: NodeConfig,
    plan: RoundPlan,
    global_state: State,
    ledger: Ledger,
    replies: Path,
    requester: str,
    seed: int | None,
) -> NodeReply:
    model_hash = state_digest(global_state)
    replay_key = hashlib.sha256(f"{model_hash}|{plan.digest()}".encode()).hexdigest()[:16]
    charges = [e for e in ledger.entries() if _charged_for(e, plan)]
    for entry in charges:
        kept = replies / f"round-{plan.round}-charge-{entry.id}.safetensors"
        if kept.is_file():
            arrays, meta = _read_reply(kept)
            if meta.get("replay-key") == replay_key:
                report = _report(config, ledger, plan, entry, replayed=True)
                return NodeReply(arrays, report, meta.get(OUTPUT_KEY, OUTPUT_DELTA))
    unused = [e for e in charges if not any(replies.glob(f"round-{plan.round}-charge-{e.id}.*"))]
    entry = unused[0] if unused else _charge(ledger, plan, requester=requester)
    publish_state(  # the node keeps every global model it received
        Registry.open(config.registry, create=True),
        global_state,
        plan,
        name=f"{plan.federation} global before round {plan.round}",
        extra={"federation": plan.federation, "received-for-round": plan.round},
        info={"federation": plan.federation, "round": plan.round - 1},
    )

    model = model_from_state(global_state, plan)
    pipeline = PipelineConfig(image_size=plan.backbone.image_size)
    learner, data = training_view(model, config, pipeline)
    trainer = plan.dp_mechanism.build_trainer(
        learner, [data], dp=plan.dp, meta=plan.meta, lr=plan.local_lr, seed=seed
    )
    output = trainer.train(entry.steps)
    mechanism = plan.dp_mechanism
    trained = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays = mechanism.reply_arrays(output, model=trained, start=global_state)
    kept = replies / f"round-{plan.round}-charge-{entry.id}.safetensors"
    _write_reply(kept, arrays, replay_key, output=mechanism.output)
    report = _report(config, ledger, plan, entry, replayed=False)
    return NodeReply(arrays, report, mechanism.output)


def training_view(
    model: nn.Module, config: NodeConfig, pipeline: PipelineConfig
) -> tuple[nn.Module, ImageSet]:
    """What trains, on what: an adapter on a frozen encoder trains on the site's features, which
    are embedded once per encoder and data version and kept in the node's state
    (models/feature_store.py; the second round runs no encoder); any other model trains on the
    images. Either way the module returned is part of ``model`` and trains it in place.

    Raises:
        SiteDataError: the site's data is unreadable.
    """

    def images() -> ImageSet:
        return load_dataset(config.data, pipeline)

    try:
        if isinstance(model, AdaptedEncoder):
            store = FeatureStore(config.features_dir)
            return model.adapter, store.features(model.encoder, config.data, pipeline, images)
        return model, images()
    except OSError as exc:  # DataError maps to the same public reason by itself
        raise SiteDataError(f"site data {config.data} is unreadable: {exc}") from exc


def keep_final_model(
    config: NodeConfig,
    plan: RoundPlan,
    state: State,
    *,
    privacy: dict[str, Any],
    metrics: dict[str, Any],
    prototypes: PrototypeRelease | None = None,
) -> RegistryEntry:
    """Keep the federation's model after its last round (``plan.round``) in this node's registry,
    beside the versions it received for each round, with the privacy reports and metrics the
    server published for it and the last round's prototype release if it made one (kept as
    ``prototypes.safetensors`` in the version's folder); nothing is trained or charged, and
    keeping the same model again returns the entry it already has."""
    return publish_state(
        Registry.open(config.registry, create=True),
        state,
        plan,
        name=f"{plan.federation} global after round {plan.round} (final)",
        extra={"federation": plan.federation, "final-after-round": plan.round},
        info={"federation": plan.federation, "round": plan.round},
        privacy=privacy,
        metrics=metrics,
        prototypes=prototypes,
    )


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (released when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _charged_for(entry: LedgerEntry, plan: RoundPlan) -> bool:
    return (
        entry.kind == KIND_CHARGE
        and entry.run_id == plan.federation
        and entry.round == plan.round
        and entry.mechanism == plan.mechanism
        and entry.noise_multiplier == plan.dp.noise_multiplier
        and entry.sample_rate == plan.dp.sample_rate
        and entry.steps == plan.steps
    )


def _charge(ledger: Ledger, plan: RoundPlan, *, requester: str) -> LedgerEntry:
    try:
        return ledger.charge(
            ChargeRequest(
                run_id=plan.federation,
                round=plan.round,
                mechanism=plan.mechanism,
                noise_multiplier=plan.dp.noise_multiplier,
                sensitivity_factor=plan.sensitivity_factor,
                sample_rate=plan.dp.sample_rate,
                steps=plan.steps,
                requester=requester,
            )
        )
    except BudgetExhaustedError as exc:
        raise BudgetRefusedError(f"site {ledger.site} refuses round {plan.round}: {exc}") from exc


def _report(
    config: NodeConfig, ledger: Ledger, plan: RoundPlan, entry: LedgerEntry, *, replayed: bool
) -> SitePrivacyReport:
    report = SitePrivacyReport.of_charge(
        entry,
        signed_head(config, ledger),
        site=config.site_id,
        weight=config.weight,
        round=plan.round,
        replayed=replayed,
    )
    entries = ledger.entries()
    if any(has_noise_shares(e) for e in entries):
        fails_round, fails_spent = fallback_epsilons(
            entries, entry, delta=ledger.delta, accountant=ledger.accountant
        )
        if entries[-1].id != entry.id:  # a replayed charge: the spend is up to the ledger's end
            _, fails_spent = fallback_epsilons(
                entries, entries[-1], delta=ledger.delta, accountant=ledger.accountant
            )
    else:  # per-site noise only: secure aggregation adds hiding, the guarantees coincide
        fails_round, fails_spent = report.epsilon_round, report.epsilon_spent
    return dataclasses.replace(
        report,
        epsilon_round_if_secagg_fails=fails_round,
        epsilon_spent_if_secagg_fails=fails_spent,
    )


def signed_head(config: NodeConfig, ledger: Ledger) -> LedgerHead:
    """The ledger's current head, signed with the node's key when ``node-key`` is configured."""
    head = read_head(ledger)
    return sign_head(head, load_signing_key(config.node_key)) if config.node_key else head


def _write_reply(path: Path, arrays: State, replay_key: str, *, output: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file(arrays, tmp, metadata={"replay-key": replay_key, OUTPUT_KEY: output})
    os.replace(tmp, path)


def _read_reply(path: Path) -> tuple[State, dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta
