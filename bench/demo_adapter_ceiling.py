"""What adapter training can add to the demo's public start, without DP and with it (issue 26).

The demo's own data and settings (``app/demo_run.toml``): three hospitals' synthetic images,
ImageNet EfficientNet-Lite0 frozen at 128 px, each hospital's features embedded once; the adapter
trained by FedAvg of local episodic steps, in process, without noise or clipping (two learning
rates and lengths) and at the demo's DP recipe; each row scored by the server's own evaluation
(5-way, 200 episodes of the synthetic classes no hospital has). A row without noise bounds what
the DP rounds can reach.

    python bench/demo_adapter_ceiling.py [--adapters scale low-rank]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, demo_run_config, public_start, server_config, site_data
from bench.common import Progress, set_threads, write_result
from bench.federated_encoder import NO_CLIP, NO_NOISE, site_features, train_adapter
from federation.server_app import evaluate_state, initial_state, public_eval_set

# row -> (local lr, steps per round, DP: the demo's noise and clip, else none)
ROWS: dict[str, tuple[float | None, int, bool]] = {
    "no noise, the demo's lr, 3 x 10 steps": (None, 10, False),
    "no noise, lr 0.05, 3 x 100 steps": (0.05, 100, False),
    "DP, the demo's recipe": (None, 10, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", nargs="+", default=["scale", "low-rank"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    log = Progress()
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-demo-adapter-"))
    # the adapter recipe (app/demo_run_secure.toml) at the hospitals' size these results used
    demo = DemoSettings(run=demo_run_config(secure=True), images_per_class=150)
    sites = site_data(root, None, images_per_class=demo.images_per_class)
    rows: list[dict[str, Any]] = []
    for adapter in args.adapters:
        settings = dataclasses.replace(
            demo, run=demo.run.with_values({"backbone.adapter": adapter})
        )
        config = server_config(
            root / adapter, 3, settings, "synthetic", public_start(root / adapter, settings, log)
        )
        nodes = [
            {"site-id": name, "data": str(path), "registry": str(root / name / "registry"),
             "state-dir": str(root / name)}
            for name, path in sites.items()
        ]  # fmt: skip
        features = [[f] for f in site_features(config, nodes)]  # embedded once, then cached
        eval_set = public_eval_set(config)
        rows.append({"adapter": adapter, "row": "public start",
                     **evaluate_state(initial_state(config), config, eval_set)})  # fmt: skip
        for name, (lr, steps, private) in ROWS.items():
            run = dataclasses.replace(config, local_lr=lr or config.local_lr)
            started = time.perf_counter()
            state = train_adapter(
                run,
                features,
                sigma=config.dp.noise_multiplier if private else NO_NOISE,
                clip=config.dp.max_grad_norm if private else NO_CLIP,
                steps_per_round=steps,
                rounds=config.num_rounds,
            )
            metrics = evaluate_state(state, config, eval_set)
            rows.append({"adapter": adapter, "row": name, "seconds": time.perf_counter() - started,
                         **metrics})  # fmt: skip
            log(f"{adapter} / {name}: {metrics}")
        write_result("demo_adapter_ceiling", config=vars(args), results=rows,
                     device=torch.device("cpu"))  # fmt: skip


if __name__ == "__main__":
    main()
