"""Markdown sections of the federation benchmarks (used by bench/report.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def federation_cost_section(payload: dict[str, Any], source: str) -> list[str]:
    """Round time split into node compute and framework overhead, bytes per node."""
    env, results = payload["environment"], payload["results"]
    imports = ", ".join(f"{t:.1f}" for t in results["cold_import_s"])
    out = [
        "### Federation cost (real SuperLink and 3 SuperNodes over TLS)",
        "",
        f"From `bench/results/{source}` ({env['cpu_count']} CPU cores, one torch thread per node, "
        f"{env['date']}). Overhead = round time minus the slowest node's own compute (a fresh "
        f"`flwr-clientapp` process per message importing torch, Opacus and MONAI: {imports} s "
        "cold here; serialisation; transport).",
        "",
    ]
    rows = []
    for r in results["rounds"]:
        sent = r["bytes_sent_per_node"] / 2**20
        received = sum(r["bytes_received"].values()) / len(r["bytes_received"]) / 2**20
        rows.append(
            [
                r["setting"],
                str(r["round"]),
                f"{r['round_s']:.1f}",
                f"{r['slowest_node_s']:.1f}",
                f"{r['overhead_s']:.1f}",
                f"{100 * r['overhead_fraction']:.0f}%",
                f"{sent:.2f} / {received:.2f}",
            ]
        )
    header = ["setting", "round", "round s", "slowest node s", "overhead s", "overhead",
              "MiB per node down / up"]  # fmt: skip
    return [
        *out,
        *_table(header, rows),
        "",
        "![federation cost](bench/results/federation_cost.png)",
    ]


def federated_accuracy_section(payload: dict[str, Any], source: str) -> list[str]:
    """Federated DP accuracy vs epsilon against central training on pooled data."""
    config, env = payload["config"], payload["environment"]
    rows = payload["results"]
    keys = sorted(k for k in rows[0] if k.startswith("accuracy-"))
    out = [
        "### Federated DP accuracy vs epsilon, against central training",
        "",
        f"From `bench/results/{source}` ({env['date']}): 3 hospitals (synthetic, different class "
        f"mixes), {config['rounds']} rounds x {config['local_steps']} DP steps per site, Conv-4 "
        f"width {config['width']}; central = the same data pooled, as many steps as all sites "
        f"together. Accuracy on 8 unseen classes, {config['eval_episodes']} episodes, 95% CI.",
        "",
    ]
    table = []
    for r in rows:
        eps = "inf" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        if r["method"] == "random-init":
            eps = "-"
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k.replace('accuracy-', 'ci95-')]:.1f}" for k in keys]
        table.append([r["method"], eps, *cells])
    header = ["model", "epsilon", *(k.removeprefix("accuracy-") for k in keys)]
    plot = "![federated accuracy](bench/results/federated_accuracy.png)"
    return [*out, *_table(header, table), "", plot]


def simulation_section(payload: dict[str, Any], source: str) -> list[str]:
    """Virtual hospitals per machine with Flower's simulation engine."""
    r, env = payload["results"], payload["environment"]
    return [
        "### Simulation scale (Flower simulation engine, Ray)",
        "",
        f"From `bench/results/{source}` ({env['date']}): {r['hospitals']} virtual hospitals on "
        f"{r['cpu_count']} CPU cores, {r['rounds']} rounds of the production ServerApp and "
        f"ClientApp handler: {r['wall_s']:.0f} s wall ({r['wall_per_round_s']:.0f} s per round), "
        f"peak resident memory of the whole process tree {r['peak_rss_mib']:.0f} MiB, "
        f"{r['ledgers_written']} site ledgers charged.",
        "",
        "![simulation scale](bench/results/simulation_scale.png)",
    ]


def startup_section(payload: dict[str, Any], source: str) -> list[str]:
    """Start-up seconds of the CLI and of a ClientApp, before and after the lazy imports."""
    results, env = payload["results"], payload["environment"]
    labels = [label for label in ("before", "after") if label in results]
    cases = {label: {c["case"]: c for c in results[label]["cases"]} for label in labels}
    table = []
    for name in cases[labels[-1]]:
        cells = []
        for label in labels:
            case = cases[label].get(name)
            if case is None or (label == "before" and name == "client_app_message_imports"):
                cells.append("-" if case is None else "(in the start)")
            else:
                cells.append(f"{case['median_s']:.2f}")
        latest = cases[labels[-1]][name]
        heavy = ", ".join(latest["imports"]) or "none"
        table.append([f"`{' '.join(latest['argv'][:4])}`" if name != "client_app_message_imports"
                      else "imports a message needs (node, mechanisms, DP trainer)",
                      *cells, heavy])  # fmt: skip
    commits = ", ".join(f"{label} {results[label]['commit']}" for label in labels)
    return [
        "### Start-up cost of the CLI and of a ClientApp",
        "",
        f"From `bench/results/{source}` ({env['date']}; {commits}): median seconds of "
        f"{results[labels[-1]]['repeats']} fresh processes on this 2-core machine while other "
        "jobs loaded it. Flower starts one `flwr-clientapp` process per message, so the "
        "ClientApp's start is paid every round.",
        "",
        *_table(["what", *(f"{label} (s)" for label in labels), "heavy modules loaded"], table),
        "",
        "![start-up cost](bench/results/startup_cost.png)",
    ]


def render_federation(folder: Path) -> list[str]:
    """Every federation section whose JSON is in ``folder``."""
    sections = (
        ("federation_cost.json", federation_cost_section),
        ("federated_accuracy.json", federated_accuracy_section),
        ("simulation_scale.json", simulation_section),
        ("startup_cost.json", startup_section),
    )
    parts: list[str] = []
    for name, section in sections:
        if (folder / name).is_file():
            parts += ["", *section(json.loads((folder / name).read_text()), name)]
    return parts
