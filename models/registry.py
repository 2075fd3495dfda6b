"""Model registry: versioned global models and clinician adapters, as files plus a SQLite index.

The server keeps the authoritative registry; each node keeps the versions it received; the
dashboard reads its node's. A version's files are written to a temporary folder first and moved
into place before the index row is committed, so a crash leaves no row pointing at missing files.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.errors import RegistryError
from models.version import code_version

if TYPE_CHECKING:  # models.model_dir imports torch and MONAI: loaded by load_model only
    from models.model_dir import LoadedModel

KIND_GLOBAL = "global"  # a federation round's model, as the server published it
KIND_ADAPTER = "adapter"  # a clinician's support set for one condition (stays at the hospital)
# A hospital's own preparation of a version for a modality (unlabelled local images, no DP):
# it stays in the node's registry and is never offered to the federation.
KIND_LOCAL = "local"
# The public encoder as installed (models/public_start.py): the base model of a hospital whose
# federation has published nothing yet; no patient's data went into it.
KIND_PUBLIC = "public"
KINDS = (KIND_GLOBAL, KIND_ADAPTER, KIND_LOCAL, KIND_PUBLIC)
INDEX = "registry.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    parent INTEGER,
    code_version TEXT NOT NULL,
    metrics TEXT NOT NULL,
    privacy TEXT NOT NULL,
    info TEXT NOT NULL,
    folder TEXT NOT NULL UNIQUE
)
"""


@dataclass(frozen=True)
class RegistryEntry:
    """One registered version; ``path`` is its folder (a model directory for global models)."""

    id: int
    kind: str
    name: str
    created: str
    parent: int | None
    code_version: str
    metrics: dict[str, Any]
    privacy: dict[str, Any]  # site id -> that site's privacy report for this version
    info: dict[str, Any]
    path: Path

    @property
    def label(self) -> str:
        """Short human label, e.g. ``v3 global-round-2``."""
        return f"v{self.id} {self.name}"


class Registry:
    """A registry folder: ``registry.sqlite`` plus one folder per version."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | Path, *, create: bool = False) -> Registry:
        """Open the registry at ``root``; ``create=True`` makes it when missing.

        Raises:
            RegistryError: no registry there (and ``create`` is false) or an unreadable index.
        """
        root = Path(root)
        if not (root / INDEX).is_file():
            if not create:
                raise RegistryError(
                    f"no model registry at {root}; run `fedfew demo` or a federation to publish one"
                )
            root.mkdir(parents=True, exist_ok=True)
        registry = cls(root)
        with registry._connect() as conn:
            conn.execute(_SCHEMA)
        return registry

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.root / INDEX, timeout=30)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry index {self.root / INDEX}: {exc}") from exc
        try:
            with conn:
                yield conn
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry index {self.root / INDEX} is unreadable: {exc}") from exc
        finally:
            conn.close()

    def publish(
        self,
        write: Callable[[Path], None],
        *,
        kind: str,
        name: str,
        metrics: dict[str, Any] | None = None,
        privacy: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        parent: int | None = None,
    ) -> RegistryEntry:
        """Register a new version whose files ``write(folder)`` creates; returns its entry."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not name.strip():
            raise ValueError("name must not be empty")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            write(staging / "files")
            folder = f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{staging.name[-8:]}"
            os.replace(staging / "files", self.root / folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        row = {
            "kind": kind,
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parent": parent,
            "code_version": code_version(),
            "metrics": json.dumps(metrics or {}, sort_keys=True),
            "privacy": json.dumps(privacy or {}, sort_keys=True),
            "info": json.dumps(info or {}, sort_keys=True),
            "folder": folder,
        }
        with self._connect() as conn:
            cursor = conn.execute(
                f"INSERT INTO versions ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                list(row.values()),
            )
            version = int(cursor.lastrowid or 0)  # sqlite sets it after every INSERT
        return self.get(version)

    def entries(self, *, kind: str | None = None) -> list[RegistryEntry]:
        """All versions (of one kind if given), oldest first."""
        query = "SELECT * FROM versions" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(query, (kind,) if kind else ()).fetchall()
        return [self._entry(row) for row in rows]

    def get(self, version: int) -> RegistryEntry:
        """One version by id.

        Raises:
            RegistryError: no such version.
        """
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM versions WHERE id = ?", (version,)).fetchone()
        if row is None:
            raise RegistryError(f"registry {self.root} has no version {version}")
        return self._entry(row)

    def latest(self, *, kind: str = "global") -> RegistryEntry:
        """The newest version of ``kind``.

        Raises:
            RegistryError: the registry holds none.
        """
        found = self.entries(kind=kind)
        if not found:
            raise RegistryError(f"registry {self.root} holds no {kind} model yet")
        return found[-1]

    def load_model(self, version: int) -> LoadedModel:
        """Load a global or local model version as a ready backbone (with its domain mean when
        the version was prepared for a modality)."""
        from models.model_dir import load_model_dir

        return load_model_dir(self.get(version).path)

    def _entry(self, row: sqlite3.Row) -> RegistryEntry:
        return RegistryEntry(
            id=row["id"],
            kind=row["kind"],
            name=row["name"],
            created=row["created"],
            parent=row["parent"],
            code_version=row["code_version"],
            metrics=json.loads(row["metrics"]),
            privacy=json.loads(row["privacy"]),
            info=json.loads(row["info"]),
            path=self.root / row["folder"],
        )
