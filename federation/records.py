"""Record keys and conversions between model states and Flower records, defined once."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from privacy.mechanisms import OUTPUT_DELTA, OUTPUT_RELEASE

MODEL = "model"  # ArrayRecord: global model (server -> node)
# ArrayRecord of a reply (node -> server), under the name of the mechanism's kind of output
# (privacy.mechanisms Mechanism.output): the node's model delta, or a one-shot release instead of
# a delta for a mechanism whose output is its own arrays (dp-prototypes' class sums).
DELTA = OUTPUT_DELTA
RELEASE = OUTPUT_RELEASE
PLAN = "plan"  # ConfigRecord: the round's DP plan
REPORT = "report"  # ConfigRecord: the node's accounted privacy report
# The query action that hands the final model to the nodes (`query.final_model` messages): every
# round's model reaches them as the next round's input, the last one only this way.
FINAL_MODEL = "final_model"
# ConfigRecord of that message: the final version's public record as the server published it
# (each site's privacy report, the evaluation metrics), JSON under these keys.
PUBLISHED = "published"
PUBLISHED_PRIVACY = "privacy-json"
PUBLISHED_METRICS = "metrics-json"
# ... and, when the final round made a prototype release, its public metadata (JSON); the
# release's sums travel beside the model under RELEASE.
PUBLISHED_PROTOTYPES = "prototypes-json"

State = dict[str, np.ndarray]


def contiguous(array: np.ndarray) -> np.ndarray:
    """``array`` C-contiguous with its shape kept (``np.ascontiguousarray`` alone turns a 0-d
    array, such as BatchNorm's counter, into shape ``(1,)``)."""
    return np.ascontiguousarray(array).reshape(np.shape(array))


def to_arrays(state: State) -> ArrayRecord:
    """A model state as an ArrayRecord (names and shapes kept)."""
    return ArrayRecord(array_dict={k: Array(contiguous(v)) for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> State:
    """Inverse of :func:`to_arrays`."""
    return {k: v.numpy() for k, v in record.items()}


def to_config(values: dict[str, Any]) -> ConfigRecord:
    """A flat mapping of str/int/float/bool as a ConfigRecord."""
    return ConfigRecord(dict(values))


def from_config(record: ConfigRecord) -> dict[str, Any]:
    """Inverse of :func:`to_config`."""
    return dict(record.items())
