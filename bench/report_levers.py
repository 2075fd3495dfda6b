"""Markdown of the lever-by-lever accuracy benchmarks (``new_modality.json``,
``new_condition.json``) for the README's bench section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.lever_report import BASELINE

TITLES = {
    "new_modality.json": "New modality (leave one modality out; unlabelled pool of the held-out "
    "modality for domain preparation; scored on its other half)",
    "new_condition.json": "New condition in a known modality (three held-out conditions each in "
    "skin (HAM10000 only), blood cells and brain MRI)",
}
MAIN_ROWS = (  # (encoder, lever) shown at every ways/shots
    BASELINE,
    ("random", "prototype"),
    ("supervised", "prototype"),
    ("supervised", "stack"),
    ("supervised+contrastive", "stack"),
)


def _pct(value: float | None, ci: float | None = None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text + (f" ± {100 * ci:.1f}" if ci is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def lever_section(payload: dict[str, Any], source: str) -> list[str]:
    """Tables of one lever benchmark: every lever at 3-way 5-shot per fold, main rows by shots."""
    config = payload["config"]
    summary = payload["results"]["summary"]
    env = payload.get("environment", {})
    folds = sorted({f for e in summary for f in e["per_fold"]})
    out = [
        f"### {TITLES.get(source, source)}",
        "",
        f"From `bench/results/{source}` ({env.get('device', 'cpu')}, torch "
        f"{env.get('torch', '?')}, {str(env.get('date', ''))[:10]}). Conv-4; supervised "
        f"pre-training {config['sup_steps']} steps; domain preparation "
        f"{', '.join(config['domain_methods'])} ({config['domain_steps']} steps); "
        f"{config['episodes']} episodes per row ({config['finetune_episodes']} for finetune), "
        f"{config['queries']} queries per class; the same episodes for every row of a fold. "
        "Accuracy % (95% CI over episodes, combined over folds); *gain* is the mean paired "
        "difference to pixel nearest centroid on the same episodes.",
        "",
        "**3-way 5-shot, every lever** (`encoder + lever`):",
        "",
    ]
    rows = [e for e in summary if (e["ways"], e["shots"]) == (3, 5)]
    table = [
        [
            f"{e['encoder']} + {e['lever']}",
            *[_pct(e["per_fold"].get(f)) if f in e["per_fold"] else "-" for f in folds],
            _pct(e["accuracy"], e["ci95"]),
            _pct(e["gain_vs_pixel"], signed=True),
        ]
        for e in rows
    ]
    out += _table(["row", *folds, "mean", "gain"], table)
    grid = sorted({(e["ways"], e["shots"]) for e in summary})
    by_key = {(e["encoder"], e["lever"], e["ways"], e["shots"]): e for e in summary}
    out += ["", "**Main rows by ways and shots** (mean over folds, gain in brackets):", ""]
    table = []
    for encoder, lever in MAIN_ROWS:
        cells = []
        for ways, shots in grid:
            e = by_key.get((encoder, lever, ways, shots))
            cells.append(
                "-"
                if e is None
                else f"{_pct(e['accuracy'])} ({_pct(e['gain_vs_pixel'], signed=True)})"
            )
        table.append([f"{encoder} + {lever}", *cells])
    out += _table(["row", *[f"{w}-way {k}-shot" for w, k in grid]], table)
    png = source.replace(".json", ".png")
    return [*out, "", f"![{source}](bench/results/{png})"]


def render_levers(folder: Path) -> list[str]:
    """Sections of every lever benchmark present in ``folder``."""
    parts: list[str] = []
    for source in TITLES:
        if (folder / source).is_file():
            parts += [*lever_section(json.loads((folder / source).read_text()), source), ""]
    return parts
