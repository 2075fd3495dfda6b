"""Few-shot accuracy on new conditions in a known modality, lever by lever (issue 11).

Within three modalities, hold out three classes (conditions) and train on the rest of that
modality plus the other modalities: skin lesion types within HAM10000 (one acquisition source),
blood cell types, brain tumour types. One supervised encoder is trained on everything that is not
held out; each held-out group is split by patient into an unlabelled pool (for domain
preparation and centring) and an evaluation half, as in ``bench/new_modality.py``, whose levers
and encoders this reuses.

    python bench/new_condition.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Progress, choose_device, require_shared_data, write_result
from bench.cross_domain import load_sets
from bench.lever_report import plot_levers, summarise
from bench.new_modality import parse_args, prepared, pretrained, score_encoders, split_by_patient
from models.imageset import ImageSet

# modality -> the conditions held out (never trained on), three per modality for 3-way episodes.
HELD_OUT: dict[str, tuple[str, ...]] = {
    "skin_dermoscopy_isic": ("basal_cell_carcinoma", "dermatofibroma", "vascular_lesion"),
    "blood_cells_bccd": ("Platelets", "WBC_neutrophil", "WBC_eosinophil"),
    "brain_mri": ("glioma", "meningioma", "pituitary"),
}


def split_classes(data: ImageSet, held: tuple[str, ...]) -> tuple[ImageSet, ImageSet]:
    """The set's known conditions (for training) and its held-out conditions."""
    held_idx = [data.classes.index(c) for c in held]
    known_idx = [i for i in range(len(data.classes)) if i not in held_idx]
    return data.subset_classes(known_idx), data.subset_classes(held_idx, name=f"{data.name}:new")


def main(argv: list[str] | None = None) -> None:
    """Train once, score each held-out group, write ``bench/results/<out>.json`` and ``.png``."""
    config, out = parse_args(argv or ["--out", "new_condition", *sys.argv[1:]])
    folder = require_shared_data()
    log = Progress()
    sets = load_sets(folder, log)
    train: list[ImageSet] = []
    targets: dict[str, ImageSet] = {}
    for name, data in sets.items():
        if name in HELD_OUT:
            known, new = split_classes(data, HELD_OUT[name])
            train.append(known)
            targets[name] = new
        else:
            train.append(data)
    log(f"training on {sum(len(s) for s in train)} images; held out: {sorted(targets)}")
    base = pretrained(train, config, log)
    rows: list[dict[str, Any]] = []
    for name, new in targets.items():
        if name not in config.folds:
            continue
        pool, evaluation = split_by_patient(new, config.pool_fraction, config.seed)
        log(f"{name}: pool {len(pool)} unlabelled images, evaluation {len(evaluation)} images")
        models = {**base, **prepared(base["supervised"], pool, config, log)}
        rows += score_encoders(name, evaluation, pool, models, config, log)
        summary = summarise(rows)
        path = write_result(
            out,
            config={**dataclasses.asdict(config), "held_out": HELD_OUT},
            results={"rows": rows, "summary": summary},
            device=choose_device(),
        )
    plot_levers(summary, path.with_suffix(".png"), title="New condition, 3-way 5-shot")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
