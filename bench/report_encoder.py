"""Markdown of the public encoder's benchmarks (bench/new_modality_encoder.py): one table per task,
every number from its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TASKS = {
    "new_modality_encoder.json": "A modality it never saw (leave one modality out)",
    "new_condition_encoder.json": "New conditions in a known modality (three held out each)",
}


def _pct(value: float | None, ci: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def encoder_section(payload: dict[str, Any], source: str, title: str) -> list[str]:
    """A table of every (encoder, lever) row: the 5-shot and 1-shot means over the folds with
    95% CIs, the gain over pixels, each fold, the confident share, ECE and the head's time."""
    config, env, results = payload["config"], payload["environment"], payload["results"]
    summary = results["summary"]
    shots = sorted({r["shots"] for r in summary})
    main, low = max(shots), min(shots)
    by_key = {(r["encoder"], r["lever"], r["shots"]): r for r in summary}
    folds = list(config["folds"])
    out = [
        f"### Public encoder: {title}",
        "",
        f"From `bench/results/{source}` ({env['device_name']}, torch {env['torch']}, "
        f"{env['date']}): {config['ways']}-way, {config['queries']} queries per class, "
        f"{config['episodes']} episodes per fold, the same episodes for every row; each "
        f"modality split by patient into an unlabelled pool (its mean centres the `-domain` "
        f"rows, as `fedfew adapt-domain` statistics do) and an evaluation half. Confident share "
        f"and ECE after the dashboard's calibration, over the first "
        f"{config['calibrated_episodes']} episodes of each fold. Accuracy % with 95% CI.",
        "",
        f"| encoder / head | {main}-shot | gain vs pixels | "
        + " | ".join(folds)
        + f" | {low}-shot | confident | ECE | head ms |",
        "|" + "---|" * (len(folds) + 7),
    ]
    for r in [r for r in summary if r["shots"] == main]:
        one = by_key.get((r["encoder"], r["lever"], low))
        cells = [
            f"{r['encoder']} / {r['lever']}",
            _pct(r["accuracy"], r["ci95"]),
            _signed(r["gain_vs_pixel"]),
            *(_pct(r["per_fold"].get(f)) for f in folds),
            _pct(one["accuracy"], one["ci95"]) if one else "n/a",
            _pct(r["confident_share"]),
            f"{r['ece']:.3f}" if r["ece"] is not None else "n/a",
            f"{r['head_ms_per_episode']:.1f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    rows = results["rows"]
    sides = sorted(
        {
            (r["encoder"].split("@")[1], r["encoder_ms_per_image"])
            for r in rows
            if "@" in r["encoder"]
        }
    )
    if sides:
        per_side: dict[str, list[float]] = {}
        for side, ms in sides:
            per_side.setdefault(side, []).append(ms)
        out += [
            "",
            "Encoder cost per image (embedded once, then cached), mean over the modalities: "
            + "; ".join(f"{s} px {sum(v) / len(v):.0f} ms" for s, v in per_side.items())
            + " (measured while other jobs shared the 2 cores).",
        ]
    return out


SIDES = "new_modality_encoder_sides.json"  # the same benchmark at other input sides


def sides_line(folder: Path) -> list[str]:
    """The default row (multi-scale, ridge, domain centring, 5-shot) at every input side
    measured, from the sweep and the main run (the same episodes)."""
    rows = []
    for source in (SIDES, "new_modality_encoder.json"):
        path = folder / source
        if path.is_file():
            summary = json.loads(path.read_text())["results"]["summary"]
            rows += [
                r
                for r in summary
                if r["encoder"].startswith("multi-scale@")
                and r["lever"] == DEFAULT[1]
                and r["shots"] == 5
            ]
    if len(rows) < 2:
        return []
    rows.sort(key=lambda r: int(r["encoder"].split("@")[1]))
    cells = ", ".join(
        f"{r['encoder'].split('@')[1]} px {_pct(r['accuracy'], r['ci95'])}" for r in rows
    )
    return ["", f"Input side, the default row at 5 shots (`{SIDES}` and the run above): {cells}."]


LEVERS = ("encoder_levers_new_modality.json", "encoder_levers_new_condition.json")
LEVERS_DEFAULT = "lite0@224 ms id / ridge l1"  # bench/encoder_levers.py's Row(): the default path


def _accuracy(row: dict[str, Any]) -> float:
    return float(row["accuracy"])


def _other(row: dict[str, Any] | None, folds: int) -> str:
    if row is None:
        return "n/a"
    if row["folds"] < folds:
        return f"({row['folds']} of {folds} folds)"
    return _pct(row["accuracy"], row["ci95"])


def levers_section(folder: Path) -> list[str]:
    """The levers on the public encoder (bench/encoder_levers.py): each row's 5-shot mean on
    both tasks with 95% CIs, the gain over pixels, each new-modality fold and the encoder's cost
    per image, rows in the order of the new-modality mean."""
    payloads = [json.loads((folder / f).read_text()) for f in LEVERS if (folder / f).is_file()]
    if not payloads:
        return []
    tasks = {p["config"]["task"]: p for p in payloads}
    main = tasks.get("new-modality", payloads[0])
    config, env = main["config"], main["environment"]
    five = {
        task: {r["encoder"]: r for r in p["results"]["summary"] if r["shots"] == 5}
        for task, p in tasks.items()
    }
    costs: dict[str, list[float]] = {}
    for r in main["results"]["rows"]:
        if r.get("encoder_ms_per_image"):
            costs.setdefault(r["encoder"], []).append(r["encoder_ms_per_image"])
    cost = {k: sum(v) / len(v) for k, v in costs.items()}
    folds = list(config["folds"])
    other = [t for t in five if t != config["task"]]
    out = [
        "",
        "### Public encoder: levers on its features, each alone and stacked (issue 23)",
        "",
        f"From `bench/results/{LEVERS[0]}` and `{LEVERS[1]}` (`bench/encoder_levers.py`; "
        f"{env['device_name']}, torch {env['torch']}, {env['date']}): the episodes, pools and "
        f"halves of the tables above ({config['ways']}-way 5-shot, {config['queries']} queries "
        f"per class, {config['episodes']} episodes per fold). A row is encoder@side, taps "
        "(`ms`: blocks ending the 14x14 and 7x7 stages and the head, the default), views averaged "
        "(`h`/`v`: horizontal/vertical flip), transform, part weights, then head and ridge "
        "lambda; every row centres on the pool's mean and normalises each part. `ridge-trans` "
        "refits ridge with the episode's queries soft-labelled (transductive: needs the cases "
        "as a batch). Encoder ms per image: all views, measured while other jobs shared the 2 "
        "cores (compare rows measured at the same time only). Accuracy % with 95% CI.",
        "",
        "| row | new modality | gain vs pixels | "
        + " | ".join(folds)
        + "".join(f" | {t}" for t in other)
        + " | encoder ms |",
        "|" + "---|" * (len(folds) + len(other) + 4),
    ]
    for label, r in five[config["task"]].items():
        partial = r["folds"] < len(folds)  # compare such a row fold by fold
        cells = [
            label,
            f"({r['folds']} of {len(folds)} folds)" if partial else _pct(r["accuracy"], r["ci95"]),
            "" if partial else _signed(r["gain_vs_pixel"]),
            *(_pct(r["per_fold"].get(f)) for f in folds),
            *(_other(five[t].get(label), len(tasks[t]["config"]["folds"])) for t in other),
            f"{cost[label]:.0f}" if cost.get(label) else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    rows = five[config["task"]]
    default = rows.get(LEVERS_DEFAULT)
    complete = [r for r in rows.values() if r["folds"] == len(folds) and r["encoder"] != "pixel"]
    if default is not None and complete:
        best = max((r for r in complete if "trans" not in r["encoder"]), key=_accuracy)
        trans = [r for r in complete if "trans" in r["encoder"]]
        out += [
            "",
            f"Against the default row (`{LEVERS_DEFAULT}`, {_pct(default['accuracy'])}): the "
            f"best inductive row `{best['encoder']}` "
            f"{_signed(best['accuracy'] - default['accuracy'])}"
            + (
                f", the best transductive `{max(trans, key=_accuracy)['encoder']}` "
                f"{_signed(max(trans, key=_accuracy)['accuracy'] - default['accuracy'])}"
                if trans
                else ""
            )
            + f" (the means' 95% CI: ±{100 * default['ci95']:.1f}).",
        ]
    path = folder / "encoder_levers_cost.json"
    if path.is_file():
        timed = json.loads(path.read_text())
        results, env = timed["results"], timed["environment"]
        base = results.get("lite0@224 batch 16 channels-last")
        out += [
            "",
            f"Encoder cost, every case in turn in one process (`encoder_levers_cost.json`, "
            f"{env['date']}; median of {timed['config']['repeats']}, 2 threads; the ratio to "
            "Lite0@224 is what transfers to a quiet machine): "
            + "; ".join(
                f"{k} {v:.0f} ms" + (f" ({v / base:.2f}x)" if base else "")
                for k, v in results.items()
            )
            + ".",
        ]
    return out


def render_encoder(folder: Path) -> list[str]:
    """Sections for every encoder result present in ``folder``."""
    parts: list[str] = []
    for source, title in TASKS.items():
        path = folder / source
        if path.is_file():
            parts += ["", *encoder_section(json.loads(path.read_text()), source, title)]
            if source == "new_modality_encoder.json":
                parts += sides_line(folder)
    return parts + levers_section(folder)


# (file, the lever benchmark of the networks this project trained, on the same splits)
SUMMARY = {
    "new_modality_encoder.json": ("A new modality", "new_modality.json"),
    "new_condition_encoder.json": ("A new condition", "new_condition.json"),
}
FLOOR = ("head@224", "centre-task")  # the frozen encoder with nearest centroid, as installed
DEFAULT = ("multi-scale@224", "ridge-domain")  # fedfew train + adapt-domain + evaluate
PIXELS = ("pixel", "prototype")


def _best_trained(payload: dict[str, Any], ways: int, shots: int) -> dict[str, Any] | None:
    rows = [
        r
        for r in payload["results"]["summary"]
        if r["ways"] == ways and r["shots"] == shots and r["encoder"] != "pixel"
    ]
    return max(rows, key=lambda r: r["accuracy"]) if rows else None


def render_summary(folder: Path) -> list[str]:
    """The README's results table: pixels, the best network trained here before, the frozen
    encoder as installed and the default path, 3-way, with 95% CIs."""
    out = [
        "| task, 3-way | path | 5-shot | vs pixels | 1-shot | confident | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, (task, trained_source) in SUMMARY.items():
        path = folder / source
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        summary = payload["results"]["summary"]
        by_key = {(r["encoder"], r["lever"], r["shots"]): r for r in summary}
        episodes = payload["config"]["episodes"]
        named = (
            (PIXELS, "nearest centroid on pixels"),
            (FLOOR, "public encoder as installed, nearest centroid"),
            (DEFAULT, "**default**: multi-scale features, ridge, domain centring"),
        )
        for (encoder, lever), label in named:
            five, one = by_key.get((encoder, lever, 5)), by_key.get((encoder, lever, 1))
            if five is None:
                continue
            out.append(
                f"| {task} | {label} ({episodes} episodes per fold) | "
                f"{_pct(five['accuracy'], five['ci95'])} | {_signed(five['gain_vs_pixel'])} | "
                f"{_pct(one['accuracy'], one['ci95']) if one else 'n/a'} | "
                f"{_pct(five['confident_share'])} | {five['ece']:.3f} |"
            )
        trained_path = folder / trained_source
        if trained_path.is_file():
            trained = json.loads(trained_path.read_text())
            best = _best_trained(trained, 3, 5)
            if best is not None:  # its gain on its own episodes (the same pools and halves)
                n = trained["config"].get(
                    "finetune_episodes" if best["lever"] == "finetune" else "episodes"
                )
                out.append(
                    f"| {task} | best network trained here before: {best['encoder']} + "
                    f"{best['lever']} ({n} episodes per fold, `{trained_source}`) | "
                    f"{_pct(best['accuracy'], best['ci95'])} | "
                    f"{_signed(best['gain_vs_pixel'])} | | | |"
                )
    return out if len(out) > 2 else []
