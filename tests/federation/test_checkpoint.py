import numpy as np
import pytest

from federation.checkpoint import CHECKPOINT, Checkpoint, load_checkpoint, save_checkpoint
from federation.errors import CheckpointError


def test_round_trip_and_overwrite(tmp_path):
    assert load_checkpoint(tmp_path, federation="f") is None
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, Checkpoint("f", 1, state, [{"round": 1}]))
    save_checkpoint(
        tmp_path, Checkpoint("f", 2, {"w": state["w"] + 1}, [{"round": 1}, {"round": 2}])
    )
    loaded = load_checkpoint(tmp_path, federation="f")
    assert loaded is not None and loaded.round == 2 and len(loaded.history) == 2
    np.testing.assert_array_equal(loaded.state["w"], state["w"] + 1)
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary files left


def test_other_federation_and_corrupt_file_are_typed_errors(tmp_path):
    save_checkpoint(tmp_path, Checkpoint("f", 1, {"w": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match="belongs to federation 'f'"):
        load_checkpoint(tmp_path, federation="g")
    (tmp_path / CHECKPOINT).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, federation="f")


def test_a_crash_before_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, Checkpoint("f", 1, {"w": np.zeros(2, np.float32)}))

    def crash(*_args):
        raise OSError("power cut")

    monkeypatch.setattr("federation.checkpoint.os.replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, Checkpoint("f", 2, {"w": np.ones(2, np.float32)}))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path, federation="f")
    assert loaded is not None and loaded.round == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]
