"""Federation cost on a real deployment: round time split into node compute and framework overhead,
and bytes per round per node.

Three hospitals (the demo's synthetic split) run as SuperNodes beside a SuperLink on 127.0.0.1
with TLS and node keys; this project's ServerApp and ClientApp run with `flwr run`.

- round time: the ServerApp's wall time from sending a round's messages to holding every reply;
- node compute: the ClientApp handler's own time at each node (plan check, ledger, data, DP
  training, reply), which each node keeps on its disk;
- framework overhead: round time minus the slowest node's compute (process start of a fresh
  `flwr-clientapp` with its imports, serialisation, transport).

Settings: the demo's (Conv-4 width 32, 10 local steps), a larger model (width 64), and longer
rounds (40 local steps) to show how overhead amortises. Run: ``python bench/federation_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, server_config, site_data, site_spec
from bench.common import RESULTS, Progress, write_result
from federation.checkpoint import load_checkpoint
from federation.deploy.flower_project import write_app_project
from federation.deploy.local_deployment import LocalFederation
from federation.deploy.server_provisioning import CLIENT_APP, SERVER_APP
from federation.node_config import NodeConfig

SETTINGS = {
    "demo (width 32, 10 steps)": {"width": 32, "local_steps": 10},
    "larger model (width 64, 10 steps)": {"width": 64, "local_steps": 10},
    "longer rounds (width 32, 40 steps)": {"width": 32, "local_steps": 40},
}


def cold_import_seconds(repeats: int = 3) -> list[float]:
    """Wall time of a fresh interpreter importing the ClientApp (what every message pays)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import federation.client_app"], check=True, capture_output=True
        )
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, changes: dict[str, Any], rounds: int, root: Path) -> list[dict[str, Any]]:
    """Run one setting on a fresh deployment; one row per round."""
    settings = DemoSettings(rounds=rounds, eval_episodes=20, **changes)
    sites = site_data(root, None)
    config = server_config(root, len(sites), settings, "synthetic")
    specs = {site: site_spec(root, site, path, settings) for site, path in sites.items()}
    app_dir = root / "flower-app"
    write_app_project(app_dir, serverapp=SERVER_APP, clientapp=CLIENT_APP, config=config.to_dict())
    threads = {"OMP_NUM_THREADS": "1"}
    deployment = LocalFederation(root / "deployment", sites=specs, env=threads)
    with deployment as federation:
        run = federation.run(app_dir, timeout=3600).check()
    checkpoint = load_checkpoint(config.root / "checkpoint", federation=config.federation)
    if checkpoint is None:
        raise RuntimeError(f"{name}: no checkpoint after the run")
    compute = {site: _compute_times(f.node) for site, f in deployment.node_files.items()}
    rows = []
    for record in checkpoint.history[1:]:  # round 0 is the initial model
        r = record["round"]
        node_seconds = {site: times[r] for site, times in compute.items() if r in times}
        slowest = max(node_seconds.values())
        rows.append(
            {
                "setting": name,
                "round": r,
                "round_s": record["seconds"],
                "node_compute_s": node_seconds,
                "slowest_node_s": slowest,
                "overhead_s": record["seconds"] - slowest,
                "overhead_fraction": (record["seconds"] - slowest) / record["seconds"],
                "bytes_sent_per_node": record["bytes-sent-per-node"],
                "bytes_received": record["bytes-received"],
                "run_wall_s": run.wall_s,
            }
        )
    return rows


def _compute_times(config: NodeConfig) -> dict[int, float]:
    path = config.replies_dir.parent / "compute-times.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return {int(e["round"]): float(e["seconds"]) for e in lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    progress = Progress()
    imports = cold_import_seconds()
    progress(f"cold import of the ClientApp: {', '.join(f'{t:.1f}' for t in imports)} s")
    rows: list[dict[str, Any]] = []
    for name in args.settings:
        root = Path(tempfile.mkdtemp(prefix="fedfew-bench-cost-"))
        rows += measure(name, SETTINGS[name], args.rounds, root)
        for row in rows[-args.rounds :]:
            progress(
                f"{name} round {row['round']}: {row['round_s']:.1f} s, slowest node "
                f"{row['slowest_node_s']:.1f} s, overhead {100 * row['overhead_fraction']:.0f}%"
            )
        write_result(
            "federation_cost",
            config=vars(args) | {"settings": SETTINGS, "nodes": 3, "omp_threads_per_node": 1},
            results={"cold_import_s": imports, "rounds": rows},
            device=torch.device("cpu"),
        )
    _plot(rows)


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["setting"] for r in rows))
    compute = [sum(r["slowest_node_s"] for r in rows if r["setting"] == n) for n in names]
    overhead = [sum(r["overhead_s"] for r in rows if r["setting"] == n) for n in names]
    count = [sum(1 for r in rows if r["setting"] == n) for n in names]
    compute = [c / k for c, k in zip(compute, count, strict=True)]
    overhead = [o / k for o, k in zip(overhead, count, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(names, compute, label="slowest node compute")
    ax.barh(names, overhead, left=compute, label="framework overhead")
    ax.set_xlabel("seconds per round (mean)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "federation_cost.png", dpi=120)


if __name__ == "__main__":
    main()
