"""A model card for the adapt page (issue 24, item 11): what a base model is, what it was trained
on, how well it did where it was measured, and that on a modality it was not measured on, the
reliability interval shown after Adapt is the only measure.

Read from the model directory (``config.json``: network, learner, the federation's settings or
the public start's weight set), the registry entry (privacy reports, the federation's evaluation
metrics, a local version's preparation record) and the benchmark results the project ships
(``bench/results/*.json``). Nothing here runs the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.adaptation import AdaptConfig
from models.registry import KIND_GLOBAL, KIND_LOCAL, KIND_PUBLIC, RegistryEntry
from models.run_config import key_of

BENCH_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
# Benchmark files whose rows are (fold, encoder, lever, ways, shots, accuracy, ci95), as
# bench/new_modality_encoder.py writes them; the first one present is read.
ENCODER_BENCHMARKS = ("new_modality_encoder.json", "smoke_encoder.json")
PUBLIC_ENCODER_ROWS = "multi-scale@"  # the public encoder's rows (its multi-scale features)
CARD_SHOTS = 5  # the card quotes 5 labelled cases per class, the dashboard's usual support
# The benchmark's row for an adaptation mode (bench/new_modality_encoder.py LEVERS) and what it
# adds to the mode; the card quotes the adapt page's default mode (AdaptConfig().mode).
MODE_LEVERS: dict[str, tuple[str, str]] = {
    "ridge": ("ridge-domain", ", after a preparation for the modality (its statistics)"),
    "prototype": ("prototype", ""),
}
UNTESTED = (
    "On a modality that is not listed here, nothing has measured this model: the reliability "
    "interval shown after Adapt, computed from your own labelled cases, is the only measure of "
    "how well it works."
)
# Dataset folds of the benchmarks in words (the modality and what the images show).
FOLD_NAMES: dict[str, str] = {
    "blood_cells_bccd": "blood-cell microscopy",
    "bloodmnist": "blood-cell microscopy",
    "brain_tumor_mri": "brain MRI",
    "chest_xray": "chest radiographs",
    "skin_lesions": "skin photographs (dermatoscopy)",
    "skin_dermoscopy_isic": "skin photographs (dermatoscopy)",
    "breast_ultrasound": "breast ultrasound",
    "brain_mri": "brain MRI",
    "lung_histo_lc25000": "lung histology",
    "fundus_odir": "retinal fundus photographs",
}


@dataclass(frozen=True)
class ModelCard:
    """What the adapt page says about a base model, in plain words."""

    what: str
    trained_on: str
    privacy: str
    measured: tuple[str, ...]  # one sentence per measurement, with where it comes from

    def markdown(self) -> str:
        """The card as Markdown (one paragraph per part)."""
        measured = (
            "\n".join(f"- {line}" for line in self.measured)
            if self.measured
            else "- Not measured on any benchmark the project ships."
        )
        return (
            f"**What it is.** {self.what}\n\n**Trained on.** {self.trained_on}\n\n"
            f"**Privacy.** {self.privacy}\n\n**Measured.**\n{measured}\n\n{UNTESTED}"
        )


def read_config(entry: RegistryEntry) -> dict[str, Any]:
    """The model directory's ``config.json`` (empty when it is missing or unreadable: the card
    then says less, and the page still works)."""
    try:
        data = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _network(config: Mapping[str, Any]) -> str:
    backbone = config.get("backbone") or {}
    name = str(backbone.get("name", "a network"))
    side = backbone.get("image_size")
    return f"{name}" + (f", looking at images of {side}x{side} pixels" if side else "")


def encoder_rows(
    bench: Path, *, shots: int = CARD_SHOTS, mode: str | None = None
) -> list[dict[str, Any]]:
    """The public encoder's benchmark rows at ``shots`` with ``mode`` (default: the adapt page's
    default mode), from the first shipped file of :data:`ENCODER_BENCHMARKS`, with the file's
    name under ``source`` and what the row adds to the mode under ``note``."""
    mode = mode or AdaptConfig().mode
    lever, note = MODE_LEVERS.get(mode, (mode, ""))
    for name in ENCODER_BENCHMARKS:
        path = bench / name
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["results"]["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found = [
            {**r, "source": f"bench/results/{name}", "mode": mode, "note": note}
            for r in rows
            if isinstance(r, dict)
            and str(r.get("encoder", "")).startswith(PUBLIC_ENCODER_ROWS)
            and r.get("lever") == lever
            and r.get("shots") == shots
        ]
        if found:
            return found
    return []


def _measured_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    best: dict[str, Mapping[str, Any]] = {}
    for r in rows:  # one line per modality: the best side the benchmark tried
        fold = str(r.get("fold"))
        if fold not in best or float(r["accuracy"]) > float(best[fold]["accuracy"]):
            best[fold] = r
    return tuple(
        f"{FOLD_NAMES.get(fold, fold)}: {100 * float(r['accuracy']):.0f}% right "
        f"(± {100 * float(r.get('ci95') or 0):.0f}) telling {r.get('ways')} classes apart from "
        f"{r.get('shots')} labelled cases each with {r['mode']}{r['note']}, over "
        f"{r.get('episodes')} trials ({r['source']})"
        for fold, r in sorted(best.items())
    )


def _federation_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The federation's run config a version was published with (the server's versions); a
    version a node kept names only its federation (a string): nothing more is known of it."""
    federation = config.get("federation")
    return federation if isinstance(federation, Mapping) else {}


def _federation_metrics(entry: RegistryEntry, config: Mapping[str, Any]) -> tuple[str, ...]:
    federation = _federation_config(config)
    data = federation.get(key_of("data", prefix="eval."), "its evaluation set")
    ways = federation.get(key_of("ways", prefix="eval."))
    accuracy = entry.metrics.get("accuracy")
    if not isinstance(accuracy, int | float) or isinstance(accuracy, bool):
        return ()
    task = f"telling {ways} classes apart" if ways else "its few-shot task"
    return (
        f"{100 * float(accuracy):.0f}% right on the federation's public evaluation set "
        f"({data}), {task}, after round {entry.info.get('round', '?')} (this node's registry)",
    )


def model_card(
    entry: RegistryEntry,
    *,
    config: Mapping[str, Any] | None = None,
    privacy: str = "",
    base: RegistryEntry | None = None,
    bench: Path = BENCH_RESULTS,
) -> ModelCard:
    """The card of ``entry``.

    Args:
        entry: the base model's registry entry.
        config: its model directory's ``config.json`` (read from ``entry.path`` when None).
        privacy: its privacy status in words (``adapters.epsilon_label``).
        base: for a local version, the version it was prepared from.
        bench: the folder of the shipped benchmark results.
    """
    config = read_config(entry) if config is None else config
    network = _network(config)
    if entry.kind == KIND_PUBLIC:
        return ModelCard(
            what=f"The public encoder {entry.label} ({network}), unchanged: no training here.",
            trained_on="ImageNet-1k, about 1.3 million everyday photographs (animals, objects, "
            "scenes); no medical image and no patient's data.",
            privacy="No privacy budget spent: no patient's data went into it.",
            measured=_measured_rows(encoder_rows(bench)),
        )
    if entry.kind == KIND_LOCAL and base is not None:
        inner = model_card(base, privacy=privacy, bench=bench)
        record = entry.info.get("domain") or {}
        return ModelCard(
            what=f"{entry.label}: {base.label} prepared for {record.get('source', '?')} on "
            f"{record.get('images', '?')} of this hospital's unlabelled studies "
            f"({record.get('method', '?')}); it stays on this node.",
            trained_on=inner.trained_on,
            privacy=inner.privacy + " The preparation used this hospital's images, without "
            "differential privacy: the version is never shared.",
            measured=inner.measured,
        )
    federation = _federation_config(config)
    start = federation.get(key_of("initial_model")) or ""
    rounds = entry.info.get("round", "?")
    started = f"started from {Path(str(start)).name}" if start else "started from scratch"
    if entry.kind == KIND_GLOBAL:
        what = (
            f"{entry.label}: the federation's model after round {rounds} ({network}; "
            f"{federation.get(key_of('learner', prefix='meta.'), 'meta')}-trained, {started})."
        )
        trained_on = (
            "The participating hospitals' own labelled images, which never left them; which "
            "modalities they hold is known to the hospitals, not to this model."
        )
    else:
        what, trained_on = f"{entry.label} ({network}).", "Not recorded."
    return ModelCard(
        what=what,
        trained_on=trained_on,
        privacy=privacy or "Not recorded.",
        measured=_federation_metrics(entry, config),
    )
