"""The generic registry (models/catalogue.py) behind the backbones, meta-learners, modes, ..."""

from __future__ import annotations

import pytest

from models.adaptation import ADAPT_MODES
from models.catalogue import Catalogue, UnknownNameError
from models.networks import BACKBONES


def test_an_unknown_name_is_a_typed_error_naming_the_catalogue_and_its_entries():
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet50'; known: conv4") as info:
        BACKBONES["resnet50"]
    assert isinstance(info.value, ValueError) and info.value.known == sorted(BACKBONES)
    assert BACKBONES.get("resnet50") is None and "conv4" in BACKBONES


def test_entries_keep_their_order_and_are_read_only_but_can_be_registered():
    assert next(iter(ADAPT_MODES)) == "ridge"  # the default mode comes first
    shapes = Catalogue[int]("shape", {"square": 4})
    with pytest.raises(TypeError):
        shapes["triangle"] = 3  # type: ignore[index]
    assert shapes.register("triangle", 3) == 3 and list(shapes) == ["square", "triangle"]
    with pytest.raises(ValueError, match="already registered"):
        shapes.register("square", 5)
