"""README section of ``bench/calibration.py``: calibration error and "uncertain" outcomes of the
dashboard's confidence, before and after calibration (models/calibration.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SOURCE = "calibration.json"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def calibration_section(payload: dict[str, Any], source: str) -> list[str]:
    """One row per (held-out modality, adaptation mode)."""
    config, env, rows = payload["config"], payload["environment"], payload["results"]["rows"]
    table = [
        [
            r["fold"], r["mode"], f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}",
            f"{r['ece_before']:.3f}", f"{r['ece_after']:.3f}",
            f"{100 * r['uncertain_before']:.0f}", f"{100 * r['uncertain_after']:.0f}",
            f"{100 * r['confident_accuracy_after']:.1f}",
        ]
        for r in rows
    ]  # fmt: skip
    return [
        "### Honest confidence: calibration error before and after",
        "",
        f"From `bench/results/{source}` ({env['date']}): leave one modality out, "
        f"{config['ways']}-way {config['shots']}-shot, {config['episodes']} episodes per row, "
        f"Conv-4 with {config['sup_steps']} supervised steps on the other modalities. ECE over "
        f"{config['calibration']['bins']} bins; 'uncertain' = calibrated top probability below "
        f"{config['calibration']['min_confidence']:g} (the dashboard then shows no label); "
        "'labelled right' = accuracy of the cases that do get a label. Target: ECE <= 0.10.",
        "",
        *_table(
            [
                "held-out modality",
                "mode",
                "accuracy %",
                "ECE before",
                "ECE after",
                "uncertain % before",
                "uncertain % after",
                "labelled right %",
            ],
            table,
        ),
    ]


def render_calibration(folder: Path) -> list[str]:
    """The section, when its JSON is in ``folder``."""
    path = folder / SOURCE
    if not path.is_file():
        return []
    return ["", *calibration_section(json.loads(path.read_text()), SOURCE)]
