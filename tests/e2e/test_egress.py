"""Egress on a real deployment: a node whose patient files turn unreadable replies a public reason
code, and nothing on the server's side (ServerApp output, SuperLink log and database, registry
files and SQLite, status.json, checkpoints) holds the patient files' names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from federation.deploy.local_deployment import SiteSpec
from models.synthetic import synthetic_arrays
from privacy.ledger_head import check_against_record
from privacy.site_report import recorded_heads
from tests.e2e.test_federation import (
    RUN_TIMEOUT,
    app,
    deployment,
    ledger,
    sites,
    tiny_config,
)

pytestmark = pytest.mark.slow
MARKER = "MARKER-patient-0042"


def marker_manifest(root: Path) -> tuple[Path, list[Path]]:
    """A CSV manifest of readable PNGs whose folder and file names carry the marker."""
    folder = root / f"{MARKER}-images"
    folder.mkdir(parents=True)
    arrays = synthetic_arrays(n_classes=4, per_class=10, size=32, seed=5)
    lines, files = ["path,label"], []
    for i, (image, label) in enumerate(zip(arrays["images"], arrays["labels"], strict=True)):
        path = folder / f"{MARKER}-{i:03d}.png"
        Image.fromarray(np.asarray(image)).save(path)
        files.append(path)
        lines.append(f"{path.name},{arrays['classes'][label]}")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, files


def server_side_files(tmp_path: Path) -> list[Path]:
    """Everything the server's side wrote: the ServerApp's workdir and the SuperLink's folder."""
    roots = [tmp_path / "server", tmp_path / "deployment" / "server"]
    found = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "status.json" for p in found)
    assert any(p.suffix == ".sqlite" for p in found)
    assert any("checkpoint" in p.parts for p in found)
    return found


def test_a_node_with_unreadable_patient_files_leaks_no_file_name_to_the_server(tmp_path):
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-b": 8.0})
    manifest, files = marker_manifest(tmp_path / "hospital-c")
    nodes["hospital-c"] = SiteSpec(
        data=manifest, budget_epsilon=8.0, state_dir=tmp_path / "hospital-c" / "state"
    )
    config = tiny_config(tmp_path, num_rounds=1, min_replies=2)
    with deployment(tmp_path, nodes) as federation:
        for path in files:  # readable when the node was set up, corrupt by the round
            path.write_bytes(b"\x89PNG\r\n\x1a\n truncated by a failing disk")
        result = federation.run(app(tmp_path, config), timeout=RUN_TIMEOUT)
    result.check()

    node_log = (tmp_path / "hospital-c" / "state").rglob("node-errors.log")
    (failures,) = list(node_log)
    assert MARKER in failures.read_text()  # the detail was there to leak, and stayed here
    assert MARKER not in result.output
    leaked = [p for p in server_side_files(tmp_path) if MARKER.encode() in p.read_bytes()]
    assert not leaked, f"patient file names reached the server side: {leaked}"
    assert "data-unreadable" in (config.root / "status.json").read_text()
    # The sites that trained sent signed ledger heads; the server's record matches their ledgers.
    heads = recorded_heads(config.root / "registry", site="hospital-a")
    assert [h.round for h in heads] == [1] and heads[0].head.signed
    assert check_against_record(ledger(tmp_path, "hospital-a"), heads) == 1
