"""The federated-DP-on-the-public-encoder tables (bench/federated_encoder.py), one per modality,
and their plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ORDER = (
    "public-start",
    "federated-nonprivate",
    "federated-dp-episodic",
    "central-dp",
    "federated-within-class-nonprivate",
    "federated-dp-within-class",
    "support-only",
    "dp-prototypes",
)
KNOWN_CLASS_ROWS = ("support-only", "dp-prototypes")  # compared with the support alone


def _label(row: dict[str, Any]) -> str:
    eps = row.get("epsilon")
    if row["method"] == "dp-prototypes" and eps is None:
        return "prototypes without noise (non-private reference)"
    return row["method"] + ("" if eps is None else f" (epsilon {eps:g})")


def federated_encoder_section(payload: dict[str, Any], source: str) -> list[str]:
    """One modality's rows: accuracy with 95% CI and the gain over its reference row."""
    config, every = payload["config"], payload["results"]["rows"]
    seconds = payload["results"].get("seconds", {})
    rows = sorted(_scored(every), key=lambda r: (ORDER.index(r["method"]), r.get("epsilon") or 0))
    attacks = [r for r in every if r["method"] == "membership-inference"]
    start = next(r["accuracy"] for r in rows if r["method"] == "public-start")
    alone = next((r["accuracy"] for r in rows if r["method"] == "support-only"), None)
    lines = [
        f"### Federated DP on the public encoder: {config['modality']}",
        "",
        f"From `bench/results/{source}`: three patient-disjoint sites and a held-out quarter, "
        f"EfficientNet-Lite0 at {config['side']} px with a '{config['adapter']}' adapter, "
        f"{config['rounds']} rounds x {config['local_steps']} steps, {config['step_episodes']} "
        f"episodes per step, q {config['sample_rate']}, C {config['clip']}; "
        f"{config['ways']}-way 5-shot on {config['episodes']} held-out episodes, 95% CI. The "
        "training rows use the default head (ridge, centred) and compare with the public start; "
        "the prototype rows (a class the federation knows) add the released prototypes to each "
        "episode's support and compare with the support alone.",
        "",
        "| row | accuracy | vs reference |",
        "|---|---|---|",
    ]
    for r in rows:
        reference = alone if r["method"] in KNOWN_CLASS_ROWS else start
        gain = 100 * (r["accuracy"] - reference) if reference is not None else float("nan")
        lines.append(
            f"| {_label(r)} | {100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f} | {gain:+.1f} |"
        )
    if attacks:
        lines += [
            "",
            f"Membership inference on the adapter after {config.get('mia_steps')} steps on half "
            f"of the sites' patients (privacy/audit.py; LiRA with {config.get('shadows')} shadow "
            "adapters):",
            "",
            "| training | attack | AUC | TPR at FPR |",
            "|---|---|---|---|",
            *(_attack_row(r) for r in attacks),
        ]
    if seconds:
        lines += [
            "",
            f"Seconds (2 cores, {config.get('threads') or 'all'} torch threads): embedding the "
            "three sites once "
            f"{seconds.get('embed-sites', float('nan')):.0f}; one DP step of the adapter on cached "
            f"features {seconds.get('adapter-dp-step', float('nan')):.2f}; one DP norm-affine "
            f"step of the encoder itself on images "
            f"{seconds.get('encoder-norm-affine-dp-step', float('nan')):.0f}.",
        ]
    return lines


def _attack_row(row: dict[str, Any]) -> str:
    training = "no noise" if row["epsilon"] is None else f"epsilon {row['epsilon']:g}"
    return (
        f"| {training} | {row['attack']} | {row['auc']:.3f} | "
        f"{row['tpr_at_low_fpr']:.3f} at {row['low_fpr']:.3f} |"
    )


def _scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "accuracy" in r]


def plot_federated_encoder(payloads: dict[str, dict[str, Any]], out: Path) -> None:
    """Bars with 95% CIs, one group per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(payloads), figsize=(5 * len(payloads), 4), squeeze=False)
    for ax, (name, payload) in zip(axes[0], payloads.items(), strict=True):
        rows = _scored(payload["results"]["rows"])
        labels = [_label(r) for r in rows]
        acc = np.array([100 * r["accuracy"] for r in rows])
        ci = np.array([100 * r["ci95"] for r in rows])
        ax.barh(range(len(rows)), acc, xerr=ci, color="tab:blue")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlim(max(0.0, acc.min() - 10), min(100.0, acc.max() + 5))
        ax.set_title(name)
        ax.set_xlabel("3-way 5-shot accuracy %")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _row(rows: list[dict[str, Any]], method: str, epsilon: float | None = None) -> str:
    found = [r for r in rows if r["method"] == method and r.get("epsilon") == epsilon]
    return f"{100 * found[0]['accuracy']:.1f} ± {100 * found[0]['ci95']:.1f}" if found else "-"


def render_federated_encoder_summary(folder: Path) -> list[str]:
    """README's table: one line per modality, the main rows at epsilon 8 (and 1)."""
    import json

    lines = [
        "| modality | public start | DP adapter: non-private federated | eps 1 / 8 | central, "
        "eps 8 | within-class metric: no noise | eps 1 / 8 | known class, + prototypes: no "
        "noise | eps 1 / 8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("federated_encoder_*.json")):
        payload = json.loads(path.read_text())
        rows = _scored(payload["results"]["rows"])
        lines.append(
            f"| {payload['config']['modality']} | {_row(rows, 'public-start')} | "
            f"{_row(rows, 'federated-nonprivate')} | {_row(rows, 'federated-dp-episodic', 1.0)} / "
            f"{_row(rows, 'federated-dp-episodic', 8.0)} | {_row(rows, 'central-dp', 8.0)} | "
            f"{_row(rows, 'federated-within-class-nonprivate')} | "
            f"{_row(rows, 'federated-dp-within-class', 1.0)} / "
            f"{_row(rows, 'federated-dp-within-class', 8.0)} | "
            f"{_row(rows, 'dp-prototypes')} | {_row(rows, 'dp-prototypes', 1.0)} / "
            f"{_row(rows, 'dp-prototypes', 8.0)} |"
        )
    return lines
