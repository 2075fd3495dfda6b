"""The node's side of a secure round, around Flower's ``secaggplus_mod``.

Flower's mod runs the SecAgg+ stages (keys, shares, masking, unmasking) and calls the node's
training only in the masked-vectors stage, through the legacy ``FitIns``/``FitRes`` form. What
this module adds, all in the node's own code:

- at setup, the node's policy: a node whose ``secure-aggregation`` is ``forbidden`` refuses
  before it makes a key (:func:`check_setup`);
- the training step (:func:`train_masked`): the plan must ask for secure aggregation, the round
  runs through :func:`federation.node.run_round` (policy, ledger charge, replay), and the delta
  is clipped to the plan's bound and checked finite before Flower quantises and masks it;
- at unmask (:func:`check_unmask`): the node helps reveal a sum only if it has at least the
  plan's ``min_sites`` contributors, and, per round, only the sum over one set of contributors.
  Replay resends the same delta on a retry, so two sums over different sets (``A+B+C`` then
  ``A+B``) would give the server ``C``; the first unmasked set is kept on the node's disk.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)
from flwr.compat.common import recorddict_compat as compat

from federation.errors import PlanInvalidError, PlanRefusedError
from federation.node_config import NodeConfig
from federation.records import contiguous
from federation.secure_aggregation import check_finite, check_secure_policy, clip_before_masking

if TYPE_CHECKING:
    from federation.plan import RoundPlan

MODEL_NAMES = "model-names"  # FitIns config key: JSON list of the arrays' names, in order
SECURE_STATE = "fedfew-secure"  # ConfigRecord in the node's Context state, across the stages
UNMASKED = "round-{round}-unmasked.json"  # beside the kept replies: the set first unmasked

State = dict[str, np.ndarray]


def fit_instructions(state: State, plan_config: dict[str, Any]) -> FitIns:
    """The legacy ``FitIns`` of a secure round (server side): the model's arrays in order and
    the plan."""
    names = list(state)
    config = {**plan_config, MODEL_NAMES: json.dumps(names)}
    return FitIns(ndarrays_to_parameters([contiguous(state[n]) for n in names]), config)


def read_fit_instructions(fitins: FitIns) -> tuple[State, dict[str, Any]]:
    """Inverse of :func:`fit_instructions`: the global model and the plan's flat keys.

    Raises:
        ValueError: the names are missing or do not match the arrays.
    """
    config = dict(fitins.config)
    names = json.loads(str(config.pop(MODEL_NAMES)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if not isinstance(names, list) or len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays but names {names!r}")
    return dict(zip(names, arrays, strict=True)), config


def stage_of(msg: Message) -> str | None:
    """The SecAgg+ stage a message belongs to, or ``None`` for a plain round's message."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE, ""))


def check_setup(config: NodeConfig, msg: Message) -> None:
    """Refuse SecAgg+ at its first stage when the node's policy forbids it.

    Raises:
        PlanRefusedError: the node's ``secure-aggregation`` policy is ``forbidden``.
    """
    round_number = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0
    check_secure_policy(True, config.secure_aggregation, site=config.site_id, round=round_number)


def train_masked(msg: Message, context: Context, config: NodeConfig) -> Message:
    """The masked-vectors stage's training: run the round, clip, reply in ``FitRes`` form.

    Raises:
        PlanInvalidError: the message is not a secure round's instructions.
        PlanRefusedError / DataError / ...: as :func:`federation.node.run_round`.
        InvalidUpdateError: the delta is not finite (it is not masked or sent).
    """
    from federation.node import run_round
    from federation.plan import RoundPlan

    try:
        global_state, values = read_fit_instructions(
            compat.recorddict_to_fitins(msg.content, keep_input=True)
        )
        plan = RoundPlan.from_config(values)
    except (KeyError, TypeError, ValueError, PlanRefusedError) as exc:
        raise PlanInvalidError(f"secure round instructions are malformed: {exc}") from exc
    if not plan.secagg.enabled:
        raise PlanInvalidError("a SecAgg+ round whose plan does not ask for secure aggregation")
    check_masking_range(plan, global_state, context)  # before the ledger is charged
    reply = run_round(
        config,
        plan,
        global_state,
        requester=f"flower run {context.run_id} node {context.node_id} (SecAgg+)",
    )
    delta = prepare_for_masking(plan, reply.delta)
    _remember(context, plan)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([delta[name] for name in global_state]),
        num_examples=1,  # every site counts once in the sum (the weight is public anyway)
        metrics=dict(reply.report.to_dict()),
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def check_masking_range(plan: RoundPlan, global_state: State, context: Context) -> None:
    """Under distributed noise, refuse a SecAgg+ clipping range (the server's setup message,
    kept by Flower's mod in the node's state) that would clip the noise's tail: the clip is not
    linear, and the sum must stay the sum of the noisy sums.

    Raises:
        PlanRefusedError: a range below the plan's :meth:`~federation.plan.RoundPlan.secure_ranges`.
    """
    if plan.dp_mechanism.clips_before_masking:
        return  # per-site noise: the update is clipped to the range itself
    state = context.state.config_records.get(RECORD_KEY_STATE)
    agreed = float(cast(float, state["clipping_range"])) if state else 0.0
    values = sum(int(a.size) for a in global_state.values())
    needed, _ = plan.secure_ranges(contributors=plan.secagg.min_sites, values=values)
    if agreed < needed:
        raise PlanRefusedError(
            f"SecAgg+ clipping range {agreed:.4g} would clip this site's distributed noise "
            f"(needs >= {needed:.4g}); nothing was charged or computed"
        )


def prepare_for_masking(plan: RoundPlan, delta: State) -> State:
    """The node's own checks before Flower masks its update; no plan field skips them.

    Per-site noise: finite, then clipped into the plan's L2 ball. Distributed noise: finite and
    not scaled (the sum must stay the sum of the noisy sums).

    Raises:
        InvalidUpdateError: a non-finite value.
    """
    if plan.dp_mechanism.clips_before_masking:
        return clip_before_masking(delta, norm_bound=plan.secagg.norm_bound).delta
    check_finite(delta)
    return {k: np.array(v) for k, v in delta.items()}


def _remember(context: Context, plan: RoundPlan) -> None:
    context.state.config_records[SECURE_STATE] = ConfigRecord(
        {"federation": plan.federation, "round": plan.round, "min-sites": plan.secagg.min_sites}
    )


def check_unmask(msg: Message, context: Context, config: NodeConfig) -> None:
    """Help unmask only a large enough sum, per round only one set of contributors, and never
    a node listed both as contributor and as dropped (its private mask seed and its key would
    both be revealed, and with them its update).

    Raises:
        PlanRefusedError: too few contributors, another set than the one already unmasked, or
            a node in both lists.
        PlanInvalidError: no masked update of this node in this run to unmask.
    """
    remembered = context.state.config_records.get(SECURE_STATE)
    if remembered is None:
        raise PlanInvalidError("unmask asked, but this node sent no masked update in this run")
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    active = sorted(cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST]))
    dead = set(cast(list[int], configs[Key.DEAD_NODE_ID_LIST]))
    if dead & set(active):  # Flower's mod does not check: both shares of a node unmask it alone
        raise PlanRefusedError(
            f"site {config.site_id} refuses to unmask: nodes {sorted(dead & set(active))} are "
            "listed both as contributors and as dropped"
        )
    min_sites = int(cast(int, remembered["min-sites"]))
    round_number = int(cast(int, remembered["round"]))
    if len(active) < min_sites:
        raise PlanRefusedError(
            f"site {config.site_id} refuses to unmask round {round_number}: the sum would have "
            f"{len(active)} contributors, the plan's minimum is {min_sites}"
        )
    path = config.replies_dir / str(remembered["federation"]) / UNMASKED.format(round=round_number)
    if path.is_file():
        first = json.loads(path.read_text(encoding="utf-8"))["active"]
        if first != active:
            raise PlanRefusedError(
                f"site {config.site_id} refuses to unmask round {round_number} over nodes "
                f"{active}: it already helped unmask it over {first}, and two sums over "
                "different sets would reveal a difference of updates"
            )
        return
    _write_atomic(path, {"active": active})


def _write_atomic(path: Path, value: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)
