"""Membership inference against federated models that learned: does DP stop the leak?

The setting is bench/federated_real.py's: one real modality split by patient into three hospitals
and a held-out part, a public start pre-trained on the other four modalities, then federated
training without privacy and with ``dp-supervised`` at each per-site epsilon. The attacker targets
hospital 1's patients (members) against held-out patients no site holds (non-members), and builds
its prototype classifier from a third, disjoint group of held-out patients (the reference).

Each patient gets a score, the mean over their images of the logit-scaled confidence of their
own class (``privacy.audit.record_scores``; DP protects patients, so patients are the unit). Two
attacks:

- ``loss-threshold`` (Yeom et al. 2018): members score higher;
- ``calibrated`` (difficulty calibration, Watson et al. 2022): the score minus the public
  start's score for the same patient, which removes how easy a patient is; the public start is
  public, so any attacker has it.

Each row reports ROC AUC and the TPR at 1% FPR, with the number of patients behind both.

Run: ``python bench/mia_federated.py --modality skin_dermoscopy_isic --epsilons 1 8``.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Progress, set_threads, write_result
from bench.federated_accuracy import at_epsilon, federated
from bench.federated_real import nonprivate_federated, parser, score, setup
from federation.inprocess_grid import set_task_identity
from federation.publishing import model_from_state
from federation.records import State
from federation.server_app import initial_state
from federation.server_config import ServerConfig
from models.imageset import ImageSet
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from privacy.audit import auc_and_tpr, record_scores, subset

MAX_FPR = 0.01


def attack_sets(
    base: ServerConfig, member_sites: list[str], seed: int, reference_share: float
) -> tuple[ImageSet, np.ndarray, np.ndarray, ImageSet]:
    """The attacked pool (the member sites' patients and held-out non-members), whether each
    pool record is a member, each record's patient, and the attacker's reference set.

    ``reference_share`` of the held-out patients build the attacker's prototypes; the rest are
    the non-members. Members are drawn from the member sites' patients, as many as there are
    non-members when one site is attacked, all of them otherwise (a larger pool).
    """
    pipeline = PipelineConfig(image_size=base.backbone.image_size)
    held_out = load_dataset(base.eval.data, pipeline)
    sites = [load_dataset(path, pipeline) for path in member_sites]
    if any(site.classes != held_out.classes for site in sites):
        raise ValueError("the member sites and the held-out part must share their classes")
    rng = np.random.default_rng(seed)
    outside = rng.permutation(np.unique(held_out.patients))
    cut = int(reference_share * len(outside))
    reference_ids, other_ids = outside[:cut], outside[cut:]
    member_parts = []
    for index, site in enumerate(sites):
        # patient ids are per site: prefix them so two sites' patients never merge
        prefixed = np.char.add(f"m{index}:", site.patients.astype(str))
        site = dataclasses.replace(site, patients=prefixed)
        ids = np.unique(site.patients)
        if len(sites) == 1:
            ids = rng.choice(ids, size=min(len(ids), len(other_ids)), replace=False)
        member_parts.append(subset(site, np.isin(site.patients, ids)))
    others = subset(held_out, np.isin(held_out.patients, other_ids))
    parts = [*member_parts, others]
    pool = ImageSet(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        classes=held_out.classes,
        patients=np.concatenate([p.patients.astype(str) for p in parts]),
        name="audit-pool",
    )
    is_member = np.arange(len(pool)) < len(pool) - len(others)
    reference = subset(held_out, np.isin(held_out.patients, reference_ids))
    return pool, is_member, pool.patients, reference


def per_patient(
    scores: np.ndarray, patients: np.ndarray, is_member: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score of each patient, and whether the patient is a member."""
    ids, index = np.unique(patients, return_inverse=True)
    means = np.bincount(index, weights=scores) / np.bincount(index)
    member = np.zeros(len(ids), dtype=bool)
    member[index[is_member]] = True
    return means, member


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    # The defaults of the skin run where dp-supervised learned (federated_real_skin_supervised).
    p.set_defaults(
        modality="skin_dermoscopy_isic", epsilons=[1.0, 8.0], subsets=["all"],
        mechanisms=["dp-supervised"], rounds=3, sample_rate=0.5, pretrain_steps=150,
        out="mia_federated",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="the attacker's split of patients")
    p.add_argument(
        "--members",
        choices=["site-1", "all-sites"],
        default="site-1",
        help="whose patients are the members: hospital 1's, or every site's",
    )
    p.add_argument(
        "--reference-share",
        type=float,
        default=0.5,
        help="share of the held-out patients that build the attacker's prototypes",
    )
    args = p.parse_args()
    set_threads(args.threads)
    set_task_identity()
    log = Progress()
    sites, base = setup(args, log)
    root = Path(base.workdir).parent
    attacked = sites[:1] if args.members == "site-1" else sites
    pool, is_member, patients, reference = attack_sets(
        base, [s["data"] for s in attacked], args.seed, args.reference_share
    )
    log(f"pool: {len(np.unique(patients[is_member]))} members ({args.members}), "
        f"{len(np.unique(patients[~is_member]))} non-members; "
        f"reference: {len(np.unique(reference.patients))} patients")  # fmt: skip
    plan = base.round_plan(1)

    def scores_of(state: State) -> np.ndarray:
        return record_scores(model_from_state(state, plan).eval(), pool, reference)

    start_scores = scores_of(initial_state(base))
    rows: list[dict[str, Any]] = []

    def attack(method: str, epsilon: float | None, state: State) -> None:
        target = scores_of(state)
        accuracy = score(state, base, args)
        attacks = [("loss-threshold", target)]
        if method != "public-start":  # calibrated against itself, its every score is 0
            attacks.append(("calibrated", target - start_scores))
        for name, values in attacks:
            means, member = per_patient(values, patients, is_member)
            auc, tpr, fpr = auc_and_tpr(means, member, max_fpr=MAX_FPR)
            rows.append({"method": method, "epsilon": epsilon, "attack": name, "auc": auc,
                         "tpr_at_low_fpr": tpr, "low_fpr": fpr, "members": int(member.sum()),
                         "non_members": int((~member).sum()), **accuracy})  # fmt: skip
            log(f"{method} eps={epsilon} {name}: AUC {auc:.3f}, TPR {100 * tpr:.1f}% at "
                f"FPR {100 * fpr:.1f}% (accuracy {100 * accuracy['accuracy']:.1f}%)")  # fmt: skip
        write_result(args.out, config=vars(args), results=rows, device=torch.device("cpu"))

    attack("public-start", None, initial_state(base))
    base = base.with_values({"backbone.trainable": args.subsets[0]})
    attack("federated-nonprivate", None, nonprivate_federated(base, sites))
    steps = args.rounds * args.local_steps
    for mechanism, epsilon in itertools.product(args.mechanisms, args.epsilons):
        name = f"{mechanism}-eps{epsilon:g}"
        config = dataclasses.replace(base, mechanism=mechanism)
        run = at_epsilon(config, epsilon, steps=steps, name=name, root=root)
        result = federated(run, sites, epsilon * 1.0001, root / name)
        attack(f"federated-{mechanism}", epsilon, result["state"])
    log(f"wrote bench/results/{args.out}.json")


if __name__ == "__main__":
    main()
