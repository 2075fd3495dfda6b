"""The one strict converter between frozen config dataclasses and their flat kebab-case form.

Flower carries configuration as flat mappings of scalars and lists (a run config, a node config,
a ConfigRecord). A dataclass field ``noise_multiplier`` is the key ``noise-multiplier``; a field of
a component behind a prefix is ``dp.noise-multiplier``. Reading is strict, so that a mistake is an
error naming the key rather than a silent default: an unknown key is refused, and a value must
already have its field's type (an ``int`` field refuses ``2.7`` and ``"5"``; a ``bool`` field
refuses ``"false"``, which ``bool()`` would call true). The only widenings are an integer for a
``float`` field (TOML writes ``2`` for ``2.0``), a list for a tuple, and a string for a path.

A field whose type is itself a dataclass is a component: its fields are written and read behind
the field's name (``dp.noise-multiplier``), recursively, so one nested config tree has one flat
form. A TOML table ``[dp]`` is that prefix too: Flower flattens nested tables with ``.``.

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

    A component (a dataclass value) is flattened behind its field's key and ``SEPARATOR``. A
    ``float`` field is written as a float (``2`` and ``2.0`` must give one digest), a tuple as a
    list (a ConfigRecord holds lists), a path as a string.
    """
    hints = typing.get_type_hints(type(obj))
    flat: dict[str, Any] = {}
    for name in field_names(type(obj)) if names is None else tuple(names):
        value = getattr(obj, name)
        if is_component(value):
            flat.update(flatten(value, prefix=key_of(name, prefix=prefix, keys=keys) + SEPARATOR))
            continue
        if hints[name] is float and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Path):
            value = str(value)
        flat[key_of(name, prefix=prefix, keys=keys)] = value
    return flat


def flatten_tables(tables: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """A TOML document's nested tables as flat keys (``[dp]`` ``noise-multiplier`` is
    ``dp.noise-multiplier``), as Flower flattens a run config."""
    flat: dict[str, Any] = {}
    for key, value in tables.items():
        if isinstance(value, Mapping):
            flat.update(flatten_tables(value, prefix=prefix + key + SEPARATOR))
        else:
            flat[prefix + key] = value
    return flat


def nest_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_tables`: flat keys as the nested tables TOML writes."""
    tables: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(SEPARATOR)
        table = tables
        for part in parents:
            table = table.setdefault(part, {})
        table[leaf] = value
    return tables


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
    components: Mapping[str, type] | None = None,
) -> dict[str, Any]:
    """The fields ``names`` (default all) of the dataclass ``kind`` from the flat ``values``,
    type-checked, as keyword arguments for ``kind``; a field whose key is absent is left out
    (its default applies) unless it has no default. A component field (its type a dataclass,
    or named in ``components``) is built from the keys behind its prefix, recursively.

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
        components: Field name -> the dataclass to build it as, for a component whose type
            hint is not that dataclass (a protocol the plan's mechanism resolves).

    Raises:
        error: an unknown key, a missing key without a default, or a value of the wrong type,
            naming the key.
            A component's own check that refuses its values is re-raised as ``error``
            naming the component's key.
    """
    chosen = field_names(kind) if names is None else tuple(names)
    hints = {**typing.get_type_hints(kind), **(components or {})}
    required = set(chosen if complete else required_names(kind))
    left = set(values) if unused is None else unused
    taken: dict[str, Any] = {}
    missing: list[str] = []
    for name in chosen:
        key = key_of(name, prefix=prefix, keys=keys)
        if is_component(hints[name]):
            part = hints[name]
            found = read_fields(
                part, values, owner=owner, prefix=key + SEPARATOR, unused=left,
                complete=complete, error=error,
            )  # fmt: skip
            try:
                taken[name] = part(**found)
            except ValueError as exc:  # the component's own range check
                raise error(f"{owner}: {key}: {exc}") from exc
        elif key in values:
            taken[name] = typed(key, values[key], hints[name], owner=owner, error=error)
            left.discard(key)
        elif name in required:
            missing.append(key)
    if missing:
        raise error(f"{owner}: missing {', '.join(missing)}")
    if unused is None:
        known = flat_keys(kind, prefix=prefix, keys=keys, hints=hints)
        reject_unknown(left, owner=owner, known=known, error=error)
    return taken


def is_component(value: object) -> bool:
    """Whether ``value`` (an instance or a type) is a dataclass: a component of a config."""
    return dataclasses.is_dataclass(value)


def flat_keys(
    kind: type,
    *,
    prefix: str = "",
    keys: Mapping[str, str] | None = None,
    hints: Mapping[str, Any] | None = None,
) -> tuple[str, ...]:
    """Every flat key of the dataclass ``kind``, its components' keys included."""
    hints = hints or typing.get_type_hints(kind)
    found: list[str] = []
    for name in field_names(kind):
        key = key_of(name, prefix=prefix, keys=keys)
        if is_component(hints[name]):
            found += flat_keys(hints[name], prefix=key + SEPARATOR)
        else:
            found.append(key)
    return tuple(found)


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
