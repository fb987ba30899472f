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
