"""Reply latency of one exchange, Flower's grid against the ServerApp's PollingGrid, in one run.

A real SuperLink and ``--nodes`` SuperNodes over TLS (``LocalFederation``, as the runbook deploys
them); the app (``bench/reply_latency_app.py``) answers every query at once, so an exchange's
seconds are the framework's alone: the SuperNode's pull, a fresh ClientApp process, the reply's
push and the server's pull. Flower's ``send_and_receive`` pulls every 3 s, ``PollingGrid`` every
0.25 s; the two alternate within the same run (order swapped every pair), so load and warm-up hit
both alike.

Run from the repository root: ``python bench/reply_latency.py [--exchanges 12] [--nodes 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, Progress, write_result
from federation.deploy.flower_project import write_app_project
from federation.deploy.local_deployment import LocalFederation, SiteSpec
from models.synthetic import write_synthetic_npz

OUT = "reply_latency"


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, 95% CI half-width (normal) and median seconds per grid, and the paired difference."""
    out: dict[str, dict[str, float]] = {}
    for grid in ("flower", "polling"):
        s = [r["seconds"] for r in rows if r["grid"] == grid]
        out[grid] = {"mean": statistics.mean(s), "ci95": 1.96 * statistics.stdev(s) / len(s) ** 0.5,
                     "median": statistics.median(s), "n": len(s)}  # fmt: skip
    by_pair: dict[int, dict[str, float]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], {})[r["grid"]] = r["seconds"]
    diffs = [p["flower"] - p["polling"] for p in by_pair.values() if len(p) == 2]
    out["saved"] = {"mean": statistics.mean(diffs), "n": len(diffs),
                    "ci95": 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchanges", type=int, default=12, help="pairs of exchanges")
    p.add_argument("--nodes", type=int, default=3)
    args = p.parse_args()
    log = Progress()
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-latency-"))
    sites = {
        f"hospital-{i}": SiteSpec(
            data=write_synthetic_npz(root / f"h{i}" / "data.npz", n_classes=2, per_class=3, seed=i),
            budget_epsilon=1.0,
        )
        for i in range(args.nodes)
    }
    app = root / "app"
    write_app_project(
        app,
        serverapp="bench.reply_latency_app:serverapp",
        clientapp="bench.reply_latency_app:clientapp",
        config={
            "expected-nodes": args.nodes,
            "wait-timeout": 120.0,
            "exchanges": args.exchanges,
            "result-path": str(root / "rows.json"),
        },
    )
    with LocalFederation(root / "fed", sites=sites, env={"PYTHONPATH": str(REPO)}) as federation:
        log(f"{args.nodes} SuperNodes up; {args.exchanges} pairs of exchanges")
        federation.run(app, timeout=60.0 * args.exchanges + 300).check()
    rows = json.loads((root / "rows.json").read_text())
    result = {"rows": rows, "summary": summary(rows)}
    for grid, s in result["summary"].items():
        log(f"{grid}: {s['mean']:.2f} ± {s['ci95']:.2f} s (n {s['n']})")
    write_result(OUT, config=vars(args), results=result, device=torch.device("cpu"))
    plot(result)
    log(f"wrote bench/results/{OUT}.json and .png")


def plot(result: dict[str, Any]) -> None:
    """Seconds per exchange of each grid, every exchange a dot, the mean a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    for y, grid in enumerate(("flower", "polling")):
        s = result["summary"][grid]
        ax.barh(y, s["mean"], xerr=s["ci95"], color="#cccccc")
        seconds = [r["seconds"] for r in result["rows"] if r["grid"] == grid]
        ax.plot(seconds, [y] * len(seconds), "o", color="black", alpha=0.5, markersize=4)
    ax.set_yticks([0, 1], ["Flower's grid (3 s poll)", "PollingGrid (0.25 s)"])
    ax.set_xlabel("seconds per exchange (query to every node, empty replies)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{OUT}.png", dpi=120)


if __name__ == "__main__":
    main()
