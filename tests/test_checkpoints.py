"""Checkpoint bookkeeping: what counts as complete, `latest`, pruning, resolving user paths."""
import pytest

from diffueraser.checkpoints import (checkpoint_step, find_latest_checkpoint, list_checkpoints, prune_checkpoints,
                                     resolve_checkpoint)


def make(root, name, complete=True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "model.safetensors").write_bytes(b"")
    return path


def test_latest_ignores_partial_and_incomplete(tmp_path):
    make(tmp_path, "checkpoint-2")
    make(tmp_path, "checkpoint-10")
    make(tmp_path, "checkpoint-30", complete=False)       # cut short before the model was written
    make(tmp_path, "checkpoint-40.partial")               # a save in progress or killed
    make(tmp_path, "checkpoint-x")
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 10]   # numeric, not string, order
    assert find_latest_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    assert find_latest_checkpoint(str(tmp_path / "nothing")) is None


def test_prune_keeps_newest_and_removes_partials(tmp_path):
    for step in (1, 2, 3, 4):
        make(tmp_path, f"checkpoint-{step}")
    make(tmp_path, "checkpoint-5.partial")
    prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_data_position_of_a_resume():
    """Where the data goes on: the checkpoint's record ([epoch, batches read]; a whole epoch read is the
    next one's start), else, for a checkpoint without one, derived from the step."""
    from types import SimpleNamespace

    from diffueraser.trainer import data_position

    args = SimpleNamespace(gradient_accumulation_steps=2)
    assert data_position([1, 3], 10, 4, args, 8) == (1, 3)
    assert data_position([1, 8], 10, 4, args, 8) == (2, 0)
    assert data_position(None, 10, 4, args, 8) == (2, 4)      # 4 updates of 2 batches per epoch
    assert data_position(None, 8, 4, args, 8) == (2, 0)


def test_resolve_user_paths(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = make(run, "checkpoint-7")
    assert resolve_checkpoint("latest", str(run)) == str(ckpt)
    assert resolve_checkpoint(str(ckpt), "elsewhere") == str(ckpt)
    assert resolve_checkpoint("checkpoint-7", str(run)) == str(run / "checkpoint-7")
    assert resolve_checkpoint(str(run), "elsewhere") == str(ckpt)          # a run folder: its latest
    assert checkpoint_step(str(ckpt) + "/") == 7
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "missing"), str(run))


def test_marker_makes_a_checkpoint_complete_without_model_files(tmp_path):
    """DeepSpeed writes no model.safetensors; our completion marker is what counts."""
    path = make(tmp_path, "checkpoint-5", complete=False)
    assert find_latest_checkpoint(str(tmp_path)) is None
    (path / "checkpoint_complete.json").write_text('{"step": 5}')
    assert find_latest_checkpoint(str(tmp_path)) == str(path)


def test_abandon_newer_checkpoints(tmp_path):
    from diffueraser.checkpoints import abandon_newer_checkpoints

    for step in (2, 4, 6):
        make(tmp_path, f"checkpoint-{step}")
    abandon_newer_checkpoints(str(tmp_path), 2)
    assert find_latest_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    assert (tmp_path / "checkpoint-6.abandoned-at-2").is_dir()


def test_fingerprint_sees_head_and_tail_changes(tmp_path):
    """Size plus a hash of each weight file's first and last `edge` bytes; other files ignored."""
    from diffueraser.checkpoints import fingerprint

    data = bytearray(range(256)) * 40  # 10240 bytes: head, middle and tail with edge=1000
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    (tmp_path / "config.json").write_text("{}")
    base = fingerprint(str(tmp_path), edge=1000)
    assert list(base) == ["diffusion_pytorch_model.safetensors"]
    for offset, seen in ((10, True), (10240 - 10, True), (5000, False)):  # the middle is not read
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(changed))
        assert (fingerprint(str(tmp_path), edge=1000) != base) == seen, offset
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data) + b"x")  # size
    assert fingerprint(str(tmp_path), edge=1000) != base


def test_empty_or_missing_marker_reads_as_none(tmp_path):
    from diffueraser.checkpoints import read_marker

    path = make(tmp_path, "checkpoint-3")
    assert read_marker(str(path)) == {}
    (path / "checkpoint_complete.json").write_text("")  # left empty by a crash
    assert read_marker(str(path)) == {}
    (path / "checkpoint_complete.json").write_text('{"step": 3, "frozen_sources": {}}')
    assert read_marker(str(path)) == {"step": 3, "frozen_sources": {}}
