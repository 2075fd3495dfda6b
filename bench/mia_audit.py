"""Membership-inference audit table: loss-threshold and LiRA-style attacks on a non-private model
and on DP models at several epsilons (privacy/audit.py).

The setting (``privacy.audit.attackable_setting``) is chosen to make the non-private model
attackable (small synthetic pool, long training, no augmentation), as an audit must first show;
then the same trainer runs with DP at each epsilon. Runs on the CPU in minutes:
``python bench/mia_audit.py [--shadows 4]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Progress, choose_device, set_threads, write_result
from privacy.audit import AUDIT_BACKBONE, attackable_setting, audit, episodic_trainer


def main(argv: list[str] | None = None) -> None:
    """Run the audit and write bench/results/mia_audit.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shadows", type=int, default=4)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sample-rate", type=float, default=0.5)
    p.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 4.0, 1.0])
    args = p.parse_args(argv)
    set_threads(1)
    log = Progress()
    pool, reference = attackable_setting()
    config = {
        **vars(args),
        "epsilons": [str(e) for e in args.epsilons],
        "pool": len(pool),
        "reference": len(reference),
        "backbone": AUDIT_BACKBONE.to_dict(),
        "delta": 1e-5,
    }
    rows: list[dict[str, Any]] = []
    for epsilon in args.epsilons:
        train = episodic_trainer(epsilon, steps=args.steps, sample_rate=args.sample_rate)
        for result in audit(train, pool, reference, shadows=args.shadows):
            label = "inf (non-private)" if math.isinf(epsilon) else epsilon
            rows.append({"epsilon": label, **result.to_dict()})
            log(
                f"epsilon {label}: {result.attack} AUC {result.auc:.3f}, "
                f"TPR {result.tpr_at_low_fpr:.3f} at FPR {result.low_fpr:.3f}"
            )
        write_result("mia_audit", config=config, results={"rows": rows}, device=choose_device())


if __name__ == "__main__":
    main()
