"""Typed errors of the learning core. Every message names the value and says what to do."""

from __future__ import annotations


class FedfewError(Exception):
    """Base class of every error fedfew raises on purpose (the CLI prints these in one line)."""


class DataError(FedfewError, ValueError):
    """A dataset, manifest or array set is malformed."""


class UnreadableImageError(DataError):
    """One image file cannot be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class EpisodeError(DataError):
    """An episode cannot be drawn (too few classes, images or patients)."""


class ModelDirError(FedfewError):
    """A model directory is missing, incomplete or from an incompatible version."""


class ChecksumError(FedfewError):
    """A downloaded file does not match its published checksum."""


class RegistryError(FedfewError):
    """A model registry or one of its versions is missing or unreadable."""


class WeightsError(FedfewError):
    """A weights file cannot be read, or none of its tensors fits the backbone."""


class BatchNormError(FedfewError):
    """A backbone has BatchNorm layers whose statistics could mix examples (DP and federation
    need per-example independence: models/freezing.py states the rule)."""


class NothingToTrainError(FedfewError, ValueError):
    """A method that trains met a model with no trainable parameter (a frozen encoder)."""
