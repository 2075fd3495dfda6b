"""What secure aggregation costs: round time and bytes per node, with and without SecAgg+.

One federated round per (mode, number of hospitals), in process: the production ClientApp train
path (``secure_aggregation_mod`` around ``train``: Flower's ``secaggplus_mod``, the ledger charge,
DP training) behind ``InProcessGrid``, and the production server side (``collect_round`` with its
gate, or ``collect_secure_round``: Flower's ``SecAggPlusWorkflow`` and the gate on the sum). The
SuperLink/SuperNode hop is skipped (tests/e2e/test_secure_aggregation.py runs the real one), so
"overhead" here is the protocol's computation and message handling, not the network or Flower's
per-message ClientApp process start. Nodes run one after another, so node compute adds up.

Bytes are counted on the messages themselves: arrays' bytes plus config values (a SecAgg+ stage
carries keys, shares and masked vectors as bytes). Also measured: how far the unmasked mean is from
the exact mean of the same clipped updates (SecAgg+ quantisation).

``--accuracy-rounds R`` also compares few-shot accuracy after R rounds of distributed noise
(each of 3 sites adds sigma/sqrt(3), ``dp-episodic-distributed``) against per-site noise (each
adds sigma) at the same per-site epsilon (accounted sigma/2, q, one step a round), from a public
start with DP on the norm-affine parameters. Both use the same one-step plain-SGD trainer (the
``dp-episodic-distributed`` one); the rounds are simulated without SecAgg+ (its unmasked mean
differs from the exact mean by < 1e-6, measured above), so only the noise differs.

Run: ``python bench/secure_aggregation.py [--hospitals 3 10] [--repeats 2] [--threads 1]
[--accuracy-rounds 30]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, Message, RecordDict
from safetensors.numpy import load_file

from bench.common import RESULTS, Progress, set_threads, write_result
from federation.client_app import app as client_app
from federation.inprocess_grid import InProcessGrid, set_task_identity
from federation.node_config import NodeConfig
from federation.rounds import collect_round
from federation.secure_aggregation import clip_before_masking
from federation.secure_node import stage_of
from federation.secure_server import collect_secure_round, content_bytes
from federation.server_app import initial_state
from federation.server_config import EvalConfig, SecureRoundsConfig, ServerConfig
from federation.strategies import strategy_for
from models.networks import BackboneConfig
from models.synthetic import write_synthetic_npz
from privacy.dp_config import DPSettings

MODES = ("plain", "secure")


@dataclasses.dataclass
class NodeMeter:
    """Time and bytes at one node across a round's messages."""

    seconds_by_stage: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0


def site(root: Path, index: int) -> dict[str, Any]:
    folder = root / f"site-{index:02d}"
    data = write_synthetic_npz(folder / "data.npz", n_classes=4, per_class=10, seed=index, size=32)
    return {
        "site-id": f"site-{index:02d}",
        "data": str(data),
        "ledger": str(folder / "ledger.db"),
        "registry": str(folder / "registry"),
        "budget-epsilon": 8.0,
        "budget-delta": 1e-5,
    }


def metered(node_config: dict[str, Any], node_id: int, meter: NodeMeter) -> Callable:
    context = Context(
        run_id=7, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )

    def handle(msg: Message) -> Message:
        stage = stage_of(msg) or "train"
        meter.bytes_in += content_bytes(msg.content)
        started = time.perf_counter()
        reply = client_app(msg, context)
        seconds = time.perf_counter() - started
        meter.seconds_by_stage[stage] = meter.seconds_by_stage.get(stage, 0.0) + seconds
        if not reply.has_error():
            meter.bytes_out += content_bytes(reply.content)
        return reply

    return handle


def one_round(config: ServerConfig, hospitals: int, root: Path) -> dict[str, Any]:
    state = initial_state(config)
    sites = [site(root, i) for i in range(hospitals)]
    meters = [NodeMeter() for _ in sites]
    grid = InProcessGrid({i + 1: metered(s, i + 1, meters[i]) for i, s in enumerate(sites)})
    strategy = strategy_for(config, state)
    started = time.perf_counter()
    row: dict[str, Any] = {}
    if config.secagg.enabled:
        result = collect_secure_round(grid, strategy, state, 1)
        row["contributors"] = result.gate.contributors
        row["quantisation_max_abs_error"] = _quantisation_error(sites, strategy, result.gate.mean)
    else:
        accepted, _, _ = collect_round(grid, strategy, state, 1)
        row["contributors"] = len(accepted)
    wall = time.perf_counter() - started
    training = sum(
        m.seconds_by_stage.get(k, 0.0) for m in meters for k in ("train", "collect_masked_vectors")
    )
    protocol = sum(
        s
        for m in meters
        for k, s in m.seconds_by_stage.items()
        if k not in ("train", "collect_masked_vectors")
    )
    row |= {
        "round_s": wall,
        "node_stages_s": {
            k: float(np.mean([m.seconds_by_stage.get(k, 0.0) for m in meters]))
            for k in sorted({k for m in meters for k in m.seconds_by_stage})
        },
        "server_and_grid_s": wall - training - protocol,
        "bytes_to_node": float(np.mean([m.bytes_in for m in meters])),
        "bytes_from_node": float(np.mean([m.bytes_out for m in meters])),
        "parameters": int(sum(a.size for a in state.values())),
    }
    return row


def _quantisation_error(sites, strategy, mean) -> float:
    clipped = []
    for s in sites:
        (path,) = NodeConfig.from_mapping(s).replies_dir.rglob("round-1-charge-*.safetensors")
        clipped.append(
            clip_before_masking(load_file(str(path)), norm_bound=strategy.norm_bound).delta
        )
    exact = {k: np.mean([c[k].astype(np.float64) for c in clipped], axis=0) for k in mean}
    return float(max(np.max(np.abs(mean[k].astype(np.float64) - exact[k])) for k in mean))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=32)  # the demo's Conv-4
    parser.add_argument("--accuracy-rounds", type=int, default=0)  # 0: skip the accuracy part
    parser.add_argument("--sgd-lr", type=float, default=0.5)  # one plain-SGD step per round
    args = parser.parse_args()
    threads = set_threads(args.threads)
    progress = Progress()
    set_task_identity(run_id=7)
    rows = []
    base: ServerConfig | None = None
    # Warm-up (discarded): the first round in a process pays imports and first-call costs.
    for mode in MODES:
        root = Path(tempfile.mkdtemp(prefix="fedfew-bench-secagg-warmup-"))
        one_round(_config(root, 2, mode == "secure", args.width), 2, root)
    progress("warm-up done")
    for hospitals in args.hospitals:
        for repeat in range(args.repeats):
            for mode in MODES:
                root = Path(tempfile.mkdtemp(prefix=f"fedfew-bench-secagg-{mode}-"))
                config = _config(root, hospitals, mode == "secure", args.width)
                base = base or config
                row = {"mode": mode, "hospitals": hospitals, "repeat": repeat}
                row |= one_round(config, hospitals, root)
                rows.append(row)
                progress(
                    f"{mode:6s} {hospitals:2d} hospitals: round {row['round_s']:.2f} s, "
                    f"{row['bytes_from_node'] / 1024:.0f} KiB from / "
                    f"{row['bytes_to_node'] / 1024:.0f} KiB to each node"
                )
    accuracy = (
        accuracy_runs(args.accuracy_rounds, args.sgd_lr, progress) if args.accuracy_rounds else []
    )
    summary = _summary(rows)
    for line in summary:
        progress(str(line))
    write_result(
        "secure_aggregation",
        config=vars(args) | {"torch_threads": threads, "server": base.to_dict() if base else {}},
        results={"rows": rows, "summary": summary, "accuracy": accuracy},
        device=torch.device("cpu"),
    )
    plot(summary)


def accuracy_runs(rounds: int, lr: float, progress: Progress) -> list[dict[str, Any]]:
    """Few-shot accuracy after ``rounds`` rounds, distributed vs per-site noise (3 sites)."""
    from federation.aggregation import apply_update
    from federation.demo_sites import DEMO_MIXES, split_by_patient, write_site
    from federation.publishing import model_from_state
    from federation.server_app import evaluate_state, public_eval_set
    from models.networks import BackboneConfig
    from models.pipeline import PipelineConfig
    from models.pretraining import write_pretrained
    from models.readers import load_dataset
    from models.synthetic import DEMO_TRAIN_CLASSES, public_set, synthetic_arrays
    from privacy.accounting import epsilon_for
    from privacy.mechanisms import DISTRIBUTED, MECHANISMS

    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-secagg-accuracy-"))
    pipeline = PipelineConfig(image_size=32)
    start = write_pretrained(
        root / "public-start",
        [public_set(config=pipeline)],
        objective="protonet",
        backbone=BackboneConfig(width=32, image_size=32),
        steps=100,
    )
    arrays = synthetic_arrays(n_classes=DEMO_TRAIN_CLASSES, per_class=40, seed=0, size=32)
    sets = [
        load_dataset(write_site(root / f"site-{i}.npz", part), pipeline)
        for i, part in enumerate(split_by_patient(arrays, DEMO_MIXES))
    ]
    out = []
    for mode in ("per-site", "distributed"):
        config = ServerConfig(
            federation="bench-secagg-accuracy",
            min_nodes=3,
            min_replies=3,
            steps=1,
            local_lr=lr,
            initial_model=str(start),
            workdir=str(root / mode),
            backbone=BackboneConfig(width=32, image_size=32, trainable="norm-affine"),
            secagg=SecureRoundsConfig(enabled=True, distributed_noise=True),
            eval=EvalConfig(episodes=200),
        )
        plan = config.round_plan(1, norm_bound=1.0)
        sigma = config.dp.noise_multiplier
        share = plan.dp.noise_multiplier if mode == "distributed" else sigma
        dp = dataclasses.replace(plan.dp, noise_multiplier=share)
        eval_set = public_eval_set(config)
        state = initial_state(config)
        before = evaluate_state(state, config, eval_set)
        for _ in range(rounds):
            deltas = []
            for data in sets:
                model = model_from_state(state, plan)
                MECHANISMS[DISTRIBUTED].build_trainer(
                    model, [data], dp=dp, meta=plan.meta, lr=lr, seed=None
                ).train(1)
                trained = {k: v.detach().numpy() for k, v in model.state_dict().items()}
                deltas.append({k: trained[k] - state[k] for k in state})
            mean = {
                k: np.mean([d[k] for d in deltas], axis=0).astype(state[k].dtype) for k in state
            }
            state = apply_update(state, mean, server_lr=1.0)
        after = evaluate_state(state, config, eval_set)
        q = config.dp.sample_rate
        row = {
            "mode": mode,
            "rounds": rounds,
            "sigma_per_site": share,
            "sigma_of_the_sum": share * math.sqrt(len(sets)),
            "epsilon_per_site_if_secagg_holds": epsilon_for(
                [(sigma / 2, q, rounds)], delta=1e-5, accountant="rdp"
            ),
            "epsilon_per_site_if_secagg_fails": epsilon_for(
                [(share / 2, q, rounds)], delta=1e-5, accountant="rdp"
            ),
            "before": before,
            "after": after,
        }
        out.append(row)
        progress(f"accuracy {mode}: {before} -> {after}")
    return out


def plot(summary: list[dict[str, Any]]) -> Path:
    """Round time and bytes from each node, by number of hospitals and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(8, 3))
    counts = sorted({r["hospitals"] for r in summary})
    for offset, mode in ((-0.2, "plain"), (0.2, "secure")):
        rows = {r["hospitals"]: r for r in summary if r["mode"] == mode}
        xs = [i + offset for i in range(len(counts))]
        time_ax.bar(xs, [rows[c]["round_s"] for c in counts], width=0.4, label=mode)
        bytes_ax.bar(xs, [rows[c]["bytes_from_node"] / 1024 for c in counts], width=0.4)
    for ax, label in ((time_ax, "round time (s, in process)"), (bytes_ax, "KiB from each node")):
        ax.set_xticks(range(len(counts)), [f"{c} hospitals" for c in counts])
        ax.set_ylabel(label)
    time_ax.legend()
    fig.suptitle("secure aggregation (SecAgg+) vs plain rounds")
    fig.tight_layout()
    out = RESULTS / "secure_aggregation.png"
    fig.savefig(out, dpi=120)
    return out


def _config(root: Path, hospitals: int, secure: bool, width: int) -> ServerConfig:
    return ServerConfig(
        federation="bench-secagg",
        num_rounds=1,
        min_nodes=hospitals,
        min_replies=hospitals,
        max_retries=0,
        steps=2,
        workdir=str(root / "server"),
        seed=0,
        dp=DPSettings(episodes=2),
        backbone=BackboneConfig(width=width, image_size=32),
        secagg=SecureRoundsConfig(enabled=secure),
    )


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over repeats per (hospitals, mode)."""
    out = []
    for hospitals in sorted({r["hospitals"] for r in rows}):
        for mode in MODES:
            group = [r for r in rows if r["hospitals"] == hospitals and r["mode"] == mode]
            if not group:
                continue
            out.append(
                {
                    "hospitals": hospitals,
                    "mode": mode,
                    "round_s": float(np.mean([r["round_s"] for r in group])),
                    "bytes_from_node": float(np.mean([r["bytes_from_node"] for r in group])),
                    "bytes_to_node": float(np.mean([r["bytes_to_node"] for r in group])),
                    "repeats": len(group),
                }
            )
    return out


if __name__ == "__main__":
    main()
