"""Which adaptation modes the adapt page offers for a base model, and why not the others.

A mode is offered only when the base model supports it (registry ``MODE_REQUIREMENTS``, read from
the model's own records): MAML's inner loop only for a model meta-trained with MAML (from any
other start it is a few blind gradient steps), fine-tuning only for a model with trainable weights.
A mode may also need more labelled cases than the page holds (:data:`MIN_CASES_PER_CLASS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from models.adaptation import ADAPT_MODES
from models.freezing import trainable_parameters
from models.model_dir import LoadedModel

MAML_LEARNERS = frozenset({"maml", "fomaml"})  # models.meta.META_LEARNERS that learn an init
# Fine-tuning the network on one case per class memorises that case, and leave-one-out (the
# reliability check) needs a second case of each class to say whether it did.
MIN_CASES_PER_CLASS: dict[str, int] = {"finetune": 2}

# Plain words for each mode; how long it takes is measured (app.dashboard.timings), not said here.
MODE_HELP: dict[str, str] = {
    "prototype": "prototype: the average of each class's cases; the most robust choice",
    "linear": "linear: a linear classifier on the features; can separate classes that "
    "prototypes mix up",
    "ridge": "ridge: a least-squares classifier on the features; instant, and steady with "
    "few cases",
    "finetune": "finetune: also adjusts the network itself; can help when the cases look unlike "
    "the training data",
    "maml": "maml: the few learning steps a MAML-trained model was trained to take",
}


def mode_help(mode: str) -> str:
    """Plain words for a mode (the registry's description for a mode without its own)."""
    return MODE_HELP.get(mode, f"{mode}: {ADAPT_MODES[mode].description}")


def _always(model: LoadedModel) -> str:
    return ""


def _trainable(model: LoadedModel) -> str:
    if trainable_parameters(model.model):
        return ""
    return "this base model's weights are all frozen, so there is nothing to fine-tune"


def _maml_trained(model: LoadedModel) -> str:
    if model.meta.learner in MAML_LEARNERS:
        return ""
    return (
        f"this base model was trained with {model.meta.learner}, not MAML; MAML's few steps "
        "only work from a model meta-trained for them"
    )


ModeRequirement = Callable[[LoadedModel], str]  # "" when the model supports the mode, else why

# mode -> what it needs of the base model; a mode without an entry needs nothing.
MODE_REQUIREMENTS: dict[str, ModeRequirement] = {
    "prototype": _always,
    "linear": _always,
    "finetune": _trainable,
    "maml": _maml_trained,
}


def unsupported_modes(model: LoadedModel) -> dict[str, str]:
    """The modes ``model`` does not support, each with the reason in words."""
    reasons = {mode: MODE_REQUIREMENTS.get(mode, _always)(model) for mode in ADAPT_MODES}
    return {mode: why for mode, why in reasons.items() if why}


def offered_modes(model: LoadedModel) -> list[str]:
    """The modes to offer for ``model``, in registry order."""
    skipped = unsupported_modes(model)
    return [mode for mode in ADAPT_MODES if mode not in skipped]


def cases_problem(mode: str, counts: Sequence[int], classes: Sequence[str]) -> str:
    """Why ``mode`` cannot run with these cases per class ("" when it can)."""
    need = MIN_CASES_PER_CLASS.get(mode, 1)
    short = [c for c, n in zip(classes, counts, strict=True) if n < need]
    if not short:
        return ""
    return (
        f"{mode} needs at least {need} cases in every class; {', '.join(short)} "
        f"{'has' if len(short) == 1 else 'have'} fewer. Add cases or choose prototype."
    )
