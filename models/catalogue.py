"""One small generic registry: a read-only name -> entry mapping with a typed unknown-name error.

Backbones, meta-learners, adaptation modes, parameter subsets, pre-training objectives, domain
methods, OOD distances and adapters are each a :class:`Catalogue`: a new one is one entry where
the catalogue is made (or one :meth:`Catalogue.register` call), and asking for a name that is not
there raises :class:`UnknownNameError`, which names the catalogue and lists what it has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A name no entry of a catalogue has (a KeyError for mapping code, a ValueError for
    callers that validate input)."""

    def __init__(self, what: str, name: object, known: list[str]) -> None:
        super().__init__(name)
        self.what, self.name, self.known = what, name, known

    def __str__(self) -> str:
        return f"unknown {self.what} {self.name!r}; known: {', '.join(self.known)}"


class Catalogue(Mapping[str, T]):
    """Entries by name, read-only once made except through :meth:`register`."""

    def __init__(self, what: str, entries: Mapping[str, T] | None = None) -> None:
        """``what`` names the kind of entry in errors ("backbone", "adaptation mode")."""
        self.what = what
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, entry: T) -> T:
        """Add an entry.

        Raises:
            ValueError: the name is taken.
        """
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.what, name, sorted(self._entries)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Catalogue({self.what!r}, {sorted(self._entries)})"
