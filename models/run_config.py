"""The one strict converter between frozen config dataclasses and their flat kebab-case form.

Flower carries configuration as flat mappings of scalars and lists (a run config, a node config,
a ConfigRecord). A dataclass field ``noise_multiplier`` is the key ``noise-multiplier``; a field of
a component behind a prefix is ``dp.noise-multiplier``. Reading is strict, so that a mistake is an
error naming the key rather than a silent default: an unknown key is refused, and a value must
already have its field's type (an ``int`` field refuses ``2.7`` and ``"5"``; a ``bool`` field
refuses ``"false"``, which ``bool()`` would call true). The only widenings are an integer for a
``float`` field (TOML writes ``2`` for ``2.0``), a list for a tuple, and a string for a path.

Used by the server's run config, the node's config, the round plan and the site privacy report.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SEPARATOR = "."  # between a component's prefix and its field in the flat form


class RunConfigError(ValueError):
    """A flat config has an unknown or missing key, or a value of the wrong type."""


def key_of(name: str, *, prefix: str = "", keys: Mapping[str, str] | None = None) -> str:
    """The flat key of field ``name``: kebab-case behind ``prefix``, unless ``keys`` renames it."""
    if keys and name in keys:
        return prefix + keys[name]
    return prefix + name.replace("_", "-")


def field_names(kind: type) -> tuple[str, ...]:
    """The field names of the dataclass ``kind``, in order."""
    return tuple(f.name for f in dataclasses.fields(kind))


def required_names(kind: type) -> tuple[str, ...]:
    """The fields of ``kind`` that have no default."""
    return tuple(
        f.name
        for f in dataclasses.fields(kind)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def flatten(
    obj: object,
    *,
    prefix: str = "",
    names: Iterable[str] | None = None,
    keys: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The flat form of the dataclass instance ``obj`` (its fields ``names``, default all).

    A ``float`` field is written as a float (``2`` and ``2.0`` must give one digest), a tuple
    as a list (a ConfigRecord holds lists), a path as a string.
    """
    hints = typing.get_type_hints(type(obj))
    flat: dict[str, Any] = {}
    for name in field_names(type(obj)) if names is None else tuple(names):
        value = getattr(obj, name)
        if hints[name] is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        flat[key_of(name, prefix=prefix, keys=keys)] = value
    return flat


def read_fields(
    kind: type,
    values: Mapping[str, Any],
    *,
    owner: str,
    prefix: str = "",
    names: Iterable[str] | None = None,
    keys: Mapping[str, str] | None = None,
    unused: set[str] | None = None,
    complete: bool = False,
    error: type[Exception] = RunConfigError,
) -> dict[str, Any]:
    """The fields ``names`` (default all) of the dataclass ``kind`` from the flat ``values``,
    type-checked, as keyword arguments for ``kind``; a field whose key is absent is left out
    (its default applies) unless it has no default.

    Args:
        kind: The dataclass.
        values: The flat mapping.
        owner: What the mapping is, at the start of every message ("run config", "plan", ...).
        prefix: The component's prefix (``"dp."``), "" for top-level fields.
        names: The fields to read (default: every field of ``kind``).
        keys: Field name -> key, for keys that are not the field's kebab-case name.
        unused: When given, the keys read are removed from it and the caller refuses what is
            left (several components read from one mapping); when ``None``, any key of
            ``values`` that is not one of these fields is refused here.
        complete: Every field's key must be present, defaults or not (a message that must
            say everything, like a round plan).
        error: The exception type to raise (the owner's typed error).

    Raises:
        error: an unknown key, a missing key without a default, or a value of the wrong type,
            naming the key.
    """
    chosen = field_names(kind) if names is None else tuple(names)
    hints = typing.get_type_hints(kind)
    required = set(chosen if complete else required_names(kind))
    wanted = {key_of(name, prefix=prefix, keys=keys): name for name in chosen}
    if unused is None:
        reject_unknown(set(values) - set(wanted), owner=owner, known=wanted, error=error)
    missing = [key for key, name in wanted.items() if key not in values and name in required]
    if missing:
        raise error(f"{owner}: missing {', '.join(missing)}")
    taken: dict[str, Any] = {}
    for key, name in wanted.items():
        if key in values:
            taken[name] = typed(key, values[key], hints[name], owner=owner, error=error)
            if unused is not None:
                unused.discard(key)
    return taken


def reject_unknown(
    unknown: Iterable[str],
    *,
    owner: str,
    known: Iterable[str],
    error: type[Exception] = RunConfigError,
) -> None:
    """Refuse the keys ``unknown`` (none: nothing to refuse), listing the ``known`` ones.

    Raises:
        error: naming every unknown key.
    """
    names = sorted(unknown)
    if names:
        raise error(
            f"{owner}: unknown key(s) {', '.join(names)}; known: {', '.join(sorted(known))}"
        )


def typed(
    key: str,
    value: Any,
    hint: Any,
    *,
    owner: str = "config",
    error: type[Exception] = RunConfigError,
) -> Any:
    """``value`` as the field type ``hint``, or ``error`` naming ``key``.

    Raises:
        error: ``value`` does not have the type (see the module docstring for the widenings).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return typed(key, value, inner[0], owner=owner, error=error)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is Path and isinstance(value, str | Path):
        return Path(value).expanduser()
    if origin is tuple and isinstance(value, list | tuple):
        item = typing.get_args(hint)[0]
        return tuple(typed(key, v, item, owner=owner, error=error) for v in value)
    raise error(f"{owner}: {key} must be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is Path:
        return "a path"
    return str(getattr(hint, "__name__", hint))
