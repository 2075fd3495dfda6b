"""Summaries and plots of lever-by-lever accuracy rows (bench/new_modality.py,
bench/new_condition.py): means over folds with 95% intervals, and each row's gain over the pixel
nearest-centroid baseline on the same episodes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

BASELINE = ("pixel", "prototype")  # (encoder, lever) of nearest centroid on pixels


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (encoder, lever, ways, shots): mean accuracy over folds, its 95% interval
    (the folds' episode intervals combined, independent folds), and the mean paired gain over
    the pixel baseline of the same fold, ways and shots (same episodes)."""
    baseline = {
        (r["fold"], r["ways"], r["shots"]): r["accuracy"]
        for r in rows
        if (r["encoder"], r["lever"]) == BASELINE
    }
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["lever"], r["ways"], r["shots"]), []).append(r)
    out = []
    for (encoder, lever, ways, shots), members in groups.items():
        k = len(members)
        gains = [
            m["accuracy"] - baseline[(m["fold"], ways, shots)]
            for m in members
            if (m["fold"], ways, shots) in baseline
        ]
        out.append(
            {
                "encoder": encoder,
                "lever": lever,
                "ways": ways,
                "shots": shots,
                "folds": k,
                "accuracy": sum(m["accuracy"] for m in members) / k,
                "ci95": math.sqrt(sum(m["ci95"] ** 2 for m in members)) / k,
                "gain_vs_pixel": sum(gains) / len(gains) if gains else None,
                "per_fold": {m["fold"]: m["accuracy"] for m in members},
            }
        )
    return sorted(out, key=lambda e: (e["ways"], e["shots"], -e["accuracy"]))


def plot_levers(summary: list[dict[str, Any]], path: Path, *, title: str) -> bool:
    """Bar chart of 3-way 5-shot accuracy per (encoder, lever) with 95% intervals; False when
    matplotlib is missing or there is nothing to plot."""
    entries = [e for e in summary if (e["ways"], e["shots"]) == (3, 5)]
    if not entries:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted(entries, key=lambda e: e["accuracy"])
    labels = [f"{e['encoder']} + {e['lever']}" for e in entries]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(entries) + 1.2))
    ax.barh(
        labels,
        [100 * e["accuracy"] for e in entries],
        xerr=[100 * e["ci95"] for e in entries],
        color=["#c44" if (e["encoder"], e["lever"]) == BASELINE else "#4a7" for e in entries],
    )
    pixel = [e for e in entries if (e["encoder"], e["lever"]) == BASELINE]
    if pixel:
        ax.axvline(100 * pixel[0]["accuracy"], color="#c44", linestyle="--", linewidth=1)
    ax.set_xlabel("accuracy (%), mean over folds, 95% CI")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def merge(sources: list[Path], out: Path, *, title: str) -> Path:
    """One result from runs of the same benchmark over different folds (each run single-threaded
    in its own process, so folds run side by side on the cores).

    Raises:
        SystemExit: the runs used different settings or overlap in a fold.
    """
    payloads = [json.loads(p.read_text()) for p in sources]
    settings = [{k: v for k, v in p["config"].items() if k != "folds"} for p in payloads]
    if any(s != settings[0] for s in settings):
        raise SystemExit("the runs were made with different settings; they cannot be merged")
    rows = [r for p in payloads for r in p["results"]["rows"]]
    folds = [r["fold"] for p in payloads for r in p["results"]["rows"]]
    seen: dict[str, int] = {}
    for i, p in enumerate(payloads):
        for fold in {r["fold"] for r in p["results"]["rows"]}:
            if fold in seen:
                raise SystemExit(f"fold {fold} is in {sources[seen[fold]]} and {sources[i]}")
            seen[fold] = i
    summary = summarise(rows)
    merged = {
        "config": {**payloads[0]["config"], "folds": sorted(set(folds))},
        "environment": payloads[0]["environment"],
        "results": {"rows": rows, "summary": summary},
        "merged_from": [p.name for p in sources],
    }
    out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    plot_levers(summary, out.with_suffix(".png"), title=title)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python bench/lever_report.py OUT.json PART.json [PART.json ...] --title T``."""
    p = argparse.ArgumentParser(description="Merge fold-disjoint runs of a lever benchmark.")
    p.add_argument("out", type=Path)
    p.add_argument("parts", type=Path, nargs="+")
    p.add_argument("--title", default="3-way 5-shot")
    args = p.parse_args(argv)
    print(f"wrote {merge(args.parts, args.out, title=args.title)}")


if __name__ == "__main__":
    main()
