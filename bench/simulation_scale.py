"""Scale with Flower's simulation engine: many virtual hospitals on one machine.

Each virtual hospital is a Flower simulation node running this project's ClientApp handler on its
own synthetic data, ledger and registry (Flower gives a virtual node only a partition id, so a thin
wrapper maps it to the site's node config). The ServerApp body is the production one
(``federation.server_app.serve``). Measures wall time and the peak resident memory of the whole
process tree (driver plus Ray workers), sampled every 0.2 s.

Needs the simulation extra: ``pip install -e ".[simulation]"``.
Run: ``python bench/simulation_scale.py [--hospitals 50] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from bench.common import RESULTS, Progress, write_result
from federation.client_app import train
from federation.server_app import serve
from federation.server_config import ServerConfig
from models.synthetic import write_synthetic_npz


def site_configs(root: Path, hospitals: int) -> list[dict[str, Any]]:
    """One small synthetic set, ledger and registry per virtual hospital."""
    configs = []
    for i in range(hospitals):
        folder = root / f"site-{i:03d}"
        data = write_synthetic_npz(folder / "data.npz", n_classes=4, per_class=10, seed=i, size=32)
        configs.append(
            {
                "site-id": f"site-{i:03d}",
                "data": str(data),
                "ledger": str(folder / "ledger.db"),
                "registry": str(folder / "registry"),
                "budget-epsilon": 8.0,
                "budget-delta": 1e-5,
            }
        )
    return configs


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = next(
            (
                int(line.split()[1]) * 1024
                for line in status.splitlines()
                if line.startswith("VmRSS")
            ),
            0,
        )
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hospitals", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    args = parser.parse_args()
    progress = Progress()
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-sim-"))
    sites = site_configs(root, args.hospitals)
    config = ServerConfig(
        federation="simulation",
        num_rounds=args.rounds,
        min_nodes=args.hospitals,
        min_replies=args.hospitals,
        steps=2,
        workdir=str(root / "server"),
    ).with_values(
        {"dp.episodes": 2, "backbone.width": 16, "backbone.image-size": 32, "eval.episodes": 20}
    )

    client_app = ClientApp()

    @client_app.train()
    def virtual_hospital(msg: Message, context: Context) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        own = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=site,
            state=context.state,
            run_config=context.run_config,
        )
        return train(msg, own)

    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        serve(grid, config)

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=args.hospitals,
        backend_config={"client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    charged = sum(1 for s in sites if Path(str(s["ledger"])).exists())
    results = {
        "hospitals": args.hospitals,
        "rounds": args.rounds,
        "wall_s": wall,
        "wall_per_round_s": wall / args.rounds,
        "peak_rss_mib": peak[0] / 2**20,
        "ledgers_written": charged,
        "cpu_count": os.cpu_count(),
    }
    write_result("simulation_scale", config=vars(args) | {"server": config.to_dict()},
                 results=results, device=torch.device("cpu"))  # fmt: skip
    progress(f"{args.hospitals} virtual hospitals, {args.rounds} rounds: {results}")
    _plot(results)


def _plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(7, 3))
    a.bar(["wall time"], [results["wall_s"]])
    a.set_ylabel("seconds")
    b.bar(["peak RSS"], [results["peak_rss_mib"]], color="tab:orange")
    b.set_ylabel("MiB")
    fig.suptitle(f"{results['hospitals']} virtual hospitals, {results['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(RESULTS / "simulation_scale.png", dpi=120)


if __name__ == "__main__":
    main()
