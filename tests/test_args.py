"""Flag checks: one line naming the flag and the value, before any model is loaded."""
import subprocess
import sys
from pathlib import Path

import pytest

from diffueraser.args import build_parser, check_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def base(tmp_path):
    (tmp_path / "sd" / "scheduler").mkdir(parents=True)
    (tmp_path / "DAVIS").mkdir()
    return ["--base_model_name_or_path", str(tmp_path / "sd"), "--davis_root", str(tmp_path / "DAVIS"),
            "--output_dir", str(tmp_path / "out")]


def refusal(argv):
    with pytest.raises(SystemExit) as e:
        check_args(build_parser("t", "out", 10).parse_args(argv))
    message = str(e.value.code)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("flag, value", [("learning_rate", "-1"), ("adam_beta2", "1.0"), ("adam_epsilon", "-0.5"),
                                         ("adam_weight_decay", "-0.1"), ("learning_rate", "nan"),
                                         ("stall_dump_minutes", "-1"), ("stall_dump_minutes", "inf")])
def test_invalid_values(base, flag, value):
    assert refusal(base + [f"--{flag}", value]).startswith(f"--{flag}: {value}")


def test_fp16_needs_a_gpu(base, monkeypatch):
    """From the flag or from accelerate launch (ACCELERATE_MIXED_PRECISION); bf16 and no pass; the flag wins."""
    import torch

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    message = refusal(base + ["--mixed_precision", "fp16"])
    assert message.startswith("--mixed_precision fp16: fp16 needs a CUDA GPU") and "bf16" in message
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert refusal(base).startswith("ACCELERATE_MIXED_PRECISION=fp16")
    for ok in ("bf16", "no"):
        check_args(build_parser("t", "out", 10).parse_args(base + ["--mixed_precision", ok]))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    check_args(build_parser("t", "out", 10).parse_args(base + ["--mixed_precision", "fp16"]))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")                     # accelerate launch --cpu
    assert "fp16 needs a CUDA GPU" in refusal(base)


def test_partial_checkpoint_cannot_be_resumed(base, tmp_path):
    (tmp_path / "out" / "checkpoint-4.partial").mkdir(parents=True)
    for spec in (str(tmp_path / "out" / "checkpoint-4.partial"), "checkpoint-4.partial"):
        message = refusal(base + ["--resume_from_checkpoint", spec])
        assert message.startswith(f"--resume_from_checkpoint: {spec} ") and "never finished" in message


def test_original_hub_and_cache_flags_are_accepted_with_a_note(base, capsys):
    args = check_args(build_parser("t", "out", 10).parse_args(
        base + ["--hub_token", "x", "--hub_model_id", "me/model", "--cache_dir", "/tmp/cache", "--set_grads_to_none"]))
    out = capsys.readouterr().out.splitlines()
    assert "--hub_token: ignored: this toolkit never uploads" in out
    assert "--hub_model_id: ignored: this toolkit never uploads" in out
    assert any(line.startswith("--cache_dir /tmp/cache: no effect") for line in out)
    assert args.set_grads_to_none
    help_text = " ".join(build_parser("t", "out", 10).format_help().split())
    assert "--set_grads_to_none No effect" in help_text


def test_script_refuses_before_loading_models(tmp_path):
    """Through the real script: one line, no traceback, nothing loaded (the base model folder is empty)."""
    (tmp_path / "sd" / "scheduler").mkdir(parents=True)
    (tmp_path / "DAVIS").mkdir()
    proc = subprocess.run([sys.executable, "train_DiffuEraser_stage1.py", "--base_model_name_or_path", tmp_path / "sd",
                           "--davis_root", tmp_path / "DAVIS", "--output_dir", tmp_path / "out",
                           "--learning_rate", "-1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == "--learning_rate: -1.0 must be >= 0", proc.stderr


def test_memory_cap_on_a_single_process_device(base, monkeypatch):
    """One process on a GPU: accelerate's device is plain "cuda" (no index), which torch's cap
    refuses; the cap goes to the current device with the fraction of that card's memory."""
    import torch
    from types import SimpleNamespace
    from torch.cuda._utils import _get_device_index

    from diffueraser.speed import configure_cuda

    calls = []
    for flags, name in ((torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
                        (torch.backends.cuda.matmul, "allow_tf32")):  # configure_cuda sets them: restored after
        monkeypatch.setattr(flags, name, getattr(flags, name))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=92 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",  # torch's own device check, as the real one
                        lambda fraction, device=None: calls.append((fraction, _get_device_index(device))))
    args = check_args(build_parser("t", "out", 10).parse_args(base + ["--memory_cap_gib", "46", "--compile", "0"]))
    for device, index in ((torch.device("cuda"), 0), (torch.device("cuda", 1), 1)):
        configure_cuda(args, SimpleNamespace(device=device))
        assert calls.pop() == (0.5, index)
