"""Federation cost on a real deployment: round time split into node compute and framework overhead,
and bytes per round per node.

Three hospitals (the demo's synthetic split) run as SuperNodes beside a SuperLink on 127.0.0.1
with TLS and node keys; this project's ServerApp and ClientApp run with `flwr run`.

- round time: the ServerApp's wall time from sending a round's messages to holding every reply;
- node compute: the ClientApp handler's own time at each node (plan check, ledger, data, DP
  training, reply), which each node keeps on its disk;
- framework overhead: round time minus the slowest node's compute (process start of a fresh
  `flwr-clientapp` with its imports, serialisation, transport).

Settings: the demo's (``app.demo.DemoSettings``, every field that shapes a node's work: the
public encoder's input side, local steps, episodes, sample rate, learning rate, sigma, images per
class and the adapter DP trains), and the same at the encoder's own 224 px or with longer rounds
(40 local steps) to show how overhead amortises. Evaluation runs after a round's replies are in,
so fewer evaluation episodes than the demo's change the run's wall time, not the round time.
Run: ``python bench/federation_cost.py --settings demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, public_start, server_config, site_data, site_spec
from bench.common import RESULTS, Progress, write_result
from federation.checkpoint import load_checkpoint
from federation.deploy.flower_project import write_app_project
from federation.deploy.local_deployment import LocalFederation
from federation.deploy.server_provisioning import CLIENT_APP, SERVER_APP
from federation.errors import DeploymentError
from federation.node_config import NodeConfig

# Changes to the demo's run config (app/demo_run.toml); every other key is the file's own.
SETTINGS: dict[str, dict[str, Any]] = {
    "demo": {},
    "own-resolution": {"backbone.image-size": 224},
    "longer-rounds": {"steps": 40},
}


def label(name: str, settings: DemoSettings) -> str:
    """The row label: the setting and what shapes a node's work."""
    run = settings.run
    return (
        f"{name} (encoder at {run.backbone.image_size} px, {run.steps} steps x "
        f"{run.dp.episodes} episodes, q {run.dp.sample_rate:g}, {settings.images_per_class} "
        f"images per class, DP on the '{run.backbone.adapter}' adapter)"
    )


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


def measure(
    name: str,
    settings: DemoSettings,
    root: Path,
    echo: Callable[[str], None],
    *,
    initial_model: Path | None = None,
    attempts: int = 3,
) -> list[dict[str, Any]]:
    """Run one setting on a fresh deployment as `fedfew demo` sets it up; one row per round.

    ``initial_model``: a public start written earlier for these settings (else the operator's
    step runs here, as in the demo). A deployment that fails to start (another job on this
    machine taking a port between the check and the bind) is retried in a fresh folder.
    """
    sites = site_data(root, None, images_per_class=settings.images_per_class)
    start = initial_model or public_start(root, settings, echo)
    for attempt in range(1, attempts + 1):
        work = root / f"attempt-{attempt}"
        config = server_config(work, len(sites), settings, "synthetic", start)
        specs = {site: site_spec(work, site, path, settings) for site, path in sites.items()}
        app_dir = work / "flower-app"
        write_app_project(
            app_dir, serverapp=SERVER_APP, clientapp=CLIENT_APP, config=config.to_dict()
        )
        # The demo's thread split: the hospitals share this machine's cores.
        threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(specs)))}
        deployment = LocalFederation(
            work / "deployment", sites=specs, env=threads, federation=config.federation
        )
        try:
            deployment.start()
        except DeploymentError as exc:
            if attempt == attempts:
                raise
            echo(f"deployment did not start (attempt {attempt}): {str(exc).splitlines()[0]}")
            continue
        try:
            run = deployment.run(app_dir, timeout=3600).check()
        finally:
            deployment.stop()
        break
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
                "setting": label(name, settings),
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
    parser.add_argument("--eval-episodes", type=int, default=20, help="after each round")
    parser.add_argument("--out", default="federation_cost", help="result name in bench/results")
    parser.add_argument(
        "--initial-model", type=Path, help="a public start written earlier for these settings"
    )
    parser.add_argument("--replot", action="store_true", help="redraw the plot from --out's JSON")
    args = parser.parse_args()
    if args.replot:
        _plot(json.loads((RESULTS / f"{args.out}.json").read_text())["results"]["rounds"], args.out)
        return
    progress = Progress()
    imports = cold_import_seconds()
    progress(f"cold import of the ClientApp: {', '.join(f'{t:.1f}' for t in imports)} s")
    rows: list[dict[str, Any]] = []
    resolved: dict[str, dict[str, Any]] = {}
    threads = max(1, (os.cpu_count() or 1) // 3)  # what measure() gives each of 3 nodes
    for name in args.settings:
        demo = DemoSettings()
        changes = {"num-rounds": args.rounds, "eval.episodes": args.eval_episodes, **SETTINGS[name]}
        settings = dataclasses.replace(demo, run=demo.run.with_values(changes))
        resolved[name] = dataclasses.asdict(settings)
        root = Path(tempfile.mkdtemp(prefix="fedfew-bench-cost-"))
        rows += measure(name, settings, root, progress, initial_model=args.initial_model)
        for row in rows[-args.rounds :]:
            progress(
                f"{name} round {row['round']}: {row['round_s']:.1f} s, slowest node "
                f"{row['slowest_node_s']:.1f} s, overhead {100 * row['overhead_fraction']:.0f}%"
            )
        write_result(
            args.out,
            config=vars(args) | {"settings": resolved, "nodes": 3, "omp_threads_per_node": threads},
            results={"cold_import_s": imports, "rounds": rows},
            device=torch.device("cpu"),
        )
    _plot(rows, args.out)


# Earlier runs kept beside the new one, drawn under it for comparison (their demo rows).
EARLIER = {
    "federation_cost_3s_poll.json": "demo, the server pulling replies every 3 s (Flower's default)",
    "federation_cost_240_per_class.json": "demo at 240/class (32 episodes, 5 records per role)",
    "federation_cost_old_settings.json": "demo before the recipe change (8 episodes, 40/class)",
    "federation_cost_before.json": "demo before the lazy imports (8 episodes, 40/class, DP on all)",
}


def _plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = _mean_bars(rows)
    for source, text in EARLIER.items():
        path = RESULTS / source
        if path.is_file():
            earlier = json.loads(path.read_text())["results"]["rounds"]
            demo = [r for r in earlier if r["setting"].startswith("demo")]
            bars += [(text, c, o) for _, c, o in _mean_bars(demo)]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.8 * len(bars)))
    labels = [textwrap.fill(b[0], 48) for b in bars]
    compute = [b[1] for b in bars]
    overhead = [b[2] for b in bars]
    ax.barh(labels, compute, label="slowest node compute")
    ax.barh(labels, overhead, left=compute, label="framework overhead")
    for y, (c, o) in enumerate(zip(compute, overhead, strict=True)):
        ax.text(c + o, y, f" {100 * o / (c + o):.0f}%", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * max(c + o for c, o in zip(compute, overhead, strict=True)))
    ax.set_xlabel("seconds per round (mean of the rounds); label: overhead share of the round")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 / (1 + 0.3 * len(bars))), ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def _mean_bars(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """(setting, mean slowest-node compute, mean overhead) per setting, in order."""
    bars = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        compute = sum(r["slowest_node_s"] for r in mine) / len(mine)
        overhead = sum(r["overhead_s"] for r in mine) / len(mine)
        bars.append((setting, compute, overhead))
    return bars


if __name__ == "__main__":
    main()
