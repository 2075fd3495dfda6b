"""Which adaptation modes the adapt page offers for a base model, and why not the others.

Each mode says in its registry entry (``models.adaptation.ADAPT_MODES``) what it needs of the base
model (MAML's inner loop only for a model meta-trained with MAML, fine-tuning only for a model
with trainable weights), how many labelled cases of each class, and its plain words.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.adaptation import ADAPT_MODES
from models.model_dir import LoadedModel


def mode_help(mode: str) -> str:
    """Plain words for a mode (its description where it has none of its own)."""
    entry = ADAPT_MODES[mode]
    return entry.help or f"{mode}: {entry.description}"


def unsupported_modes(model: LoadedModel) -> dict[str, str]:
    """The modes ``model`` does not support, each with the reason in words."""
    reasons = {name: m.requirement(model.model, model.meta) for name, m in ADAPT_MODES.items()}
    return {mode: why for mode, why in reasons.items() if why}


def offered_modes(model: LoadedModel) -> list[str]:
    """The modes to offer for ``model``, in registry order."""
    skipped = unsupported_modes(model)
    return [mode for mode in ADAPT_MODES if mode not in skipped]


def cases_problem(mode: str, counts: Sequence[int], classes: Sequence[str]) -> str:
    """Why ``mode`` cannot run with these cases per class ("" when it can)."""
    need = ADAPT_MODES[mode].min_cases_per_class
    short = [c for c, n in zip(classes, counts, strict=True) if n < need]
    if not short:
        return ""
    return (
        f"{mode} needs at least {need} cases in every class; {', '.join(short)} "
        f"{'has' if len(short) == 1 else 'have'} fewer. Add cases or choose prototype."
    )
