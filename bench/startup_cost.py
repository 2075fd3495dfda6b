"""Startup cost: wall-clock seconds of the command line and of a ClientApp process before any work.

Every case runs in a fresh process, ``--repeats`` times after one unmeasured warm-up (which fills
the page cache and writes any missing ``.pyc``); the median is reported.

- ``python``: ``python -c pass``, the interpreter's own floor.
- ``help``: ``fedfew --help`` (the installed console script).
- ``budget_verify``: ``fedfew budget verify --ledger L`` on a ledger made by ``fedfew budget
  init``.
- ``client_app_ready``: ``import federation.client_app`` and get its ``app``, what every
  ``flwr-clientapp`` process (one per Flower message) does before it handles the message.
- ``client_app_message_imports``: in the same kind of process, the further seconds to import what
  handling a message needs (``federation.node``, ``privacy.mechanisms``, ``privacy.dp_meta``),
  measured inside the process.

Each case also records which of torch, opacus, monai, flwr and matplotlib it imported (one extra
run with an ``atexit`` hook). ``--label before|after`` stores the numbers under that label and keeps
the other label's from the existing result file, so a change's before and after sit side by side.
Run from the repository root: ``python bench/startup_cost.py --label after``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, Progress, write_result

PYTHON = sys.executable
FEDFEW = str(Path(sys.executable).parent / "fedfew")
HEAVY = ("torch", "opacus", "monai", "flwr", "matplotlib")
# The targets on 2 idle cores (seconds); this machine is often loaded, so compare relative.
TARGETS = {"help": 1.5, "budget_verify": 1.5, "client_app_ready": 5.0}
MESSAGE_MODULES = ("federation.node", "privacy.mechanisms", "privacy.dp_meta")
_READY = "import federation.client_app as m; assert m.app is not None"
_MESSAGE = (
    "import importlib, json, time; "
    + _READY
    + "; t = time.perf_counter(); "
    + "; ".join(f"importlib.import_module({m!r})" for m in MESSAGE_MODULES)
    + "; print(json.dumps(time.perf_counter() - t))"
)
# Prints, at exit, which heavy top-level packages the process imported (as a JSON list).
_MODULES_HOOK = (
    "import atexit, json, sys; atexit.register(lambda: print('HEAVY=' + json.dumps("
    f"sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)); "
)


def _run(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    return time.perf_counter() - started, done


def _heavy(argv: list[str]) -> list[str]:
    """The heavy packages a command imports: run it once through the ``atexit`` hook."""
    if argv[0] == FEDFEW:
        code = (
            f"{_MODULES_HOOK}sys.argv = {['fedfew', *argv[1:]]!r}; from app.cli import main; main()"
        )
    else:
        code = _MODULES_HOOK + argv[-1]
    _, done = _run([PYTHON, "-c", code])
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("HEAVY=")]
    return json.loads(lines[-1].removeprefix("HEAVY=")) if lines else ["<unknown>"]


def measure(name: str, argv: list[str], repeats: int, log: Progress) -> dict[str, Any]:
    """Median wall-clock seconds of ``argv`` over ``repeats`` fresh processes, after a warm-up."""
    _run(argv)
    times: list[float] = []
    inner: list[float] = []
    for _ in range(repeats):
        seconds, done = _run(argv)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
        times.append(seconds)
        if name == "client_app_message_imports":
            inner.append(float(done.stdout.strip().splitlines()[-1]))
    row: dict[str, Any] = {
        "case": name,
        "argv": [Path(a).name if a in (PYTHON, FEDFEW) else a for a in argv],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "imports": _heavy(argv),
    }
    if inner:  # the in-process import time is the number; the process wall-clock is context
        row["process_median_s"] = row["median_s"]
        row["median_s"] = statistics.median(inner)
        row["min_s"] = min(inner)
        row["times_s"] = inner
    log(f"{name}: median {row['median_s']:.2f} s over {repeats}; imports {row['imports']}")
    return row


def make_ledger(folder: Path) -> Path:
    """A fresh ledger made through the command line, as an administrator makes one."""
    path = folder / "ledger.db"
    argv = [FEDFEW, "budget", "init", "--ledger", str(path), "--site", "bench"]
    _, done = _run([*argv, "--cap-epsilon", "8", "--delta", "1e-5"])
    if done.returncode != 0:
        raise RuntimeError(f"fedfew budget init failed: {done.stderr.strip()}")
    return path


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


def run_all(repeats: int, log: Progress) -> dict[str, Any]:
    """Every case, measured once each in order; the ledger lives in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="fedfew-startup-") as tmp:
        ledger = make_ledger(Path(tmp))
        cases = {
            "python": [PYTHON, "-c", "pass"],
            "help": [FEDFEW, "--help"],
            "budget_verify": [FEDFEW, "budget", "verify", "--ledger", str(ledger)],
            "client_app_ready": [PYTHON, "-c", _READY],
            "client_app_message_imports": [PYTHON, "-c", _MESSAGE],
        }
        rows = [measure(name, argv, repeats, log) for name, argv in cases.items()]
    return {"commit": _commit(), "repeats": repeats, "cases": rows}


def plot(results: dict[str, Any], path: Path) -> None:
    """Median seconds per case, one bar per label (before / after), with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in ("before", "after") if label in results]
    names = [row["case"] for row in results[labels[-1]]["cases"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        medians = {row["case"]: row["median_s"] for row in results[label]["cases"]}
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [medians.get(n, 0.0) for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for j, name in enumerate(names):
        if name in TARGETS:
            ax.hlines(TARGETS[name], j - 0.45, j + 0.45, colors="black", linestyles="--")
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylabel("median seconds (fresh process)")
    ax.set_title("fedfew startup cost (dashed: target on 2 idle cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Measure and write bench/results/startup_cost.json and startup_cost.png."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="measured runs per case (median)")
    p.add_argument("--label", choices=("before", "after"), default="after")
    p.add_argument("--name", default="startup_cost")
    args = p.parse_args(argv)
    log = Progress()
    log(f"startup cost, {args.repeats} fresh processes per case, label {args.label!r}")
    measured = run_all(args.repeats, log)
    previous = RESULTS / f"{args.name}.json"
    results: dict[str, Any] = {}
    if previous.is_file():
        results = dict(json.loads(previous.read_text()).get("results", {}))
    results[args.label] = measured
    config = {"repeats": args.repeats, "targets_s": TARGETS, "message_modules": MESSAGE_MODULES}
    path = write_result(args.name, config=config, results=results, device=torch.device("cpu"))
    plot(results, RESULTS / f"{args.name}.png")
    log(f"done: {path} and {RESULTS / args.name}.png")


if __name__ == "__main__":
    main()
