"""Shared test fixtures: the reference fixtures folder, a tiny tokenizer, tiny data trees."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("DIFFUERASER_REFERENCE", REPO.parent / "shared" / "reference"))

torch.set_num_threads(1)  # the fixtures were produced with one thread


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a test's Accelerator(cpu=True) after another test's
    CUDA one would raise. Each test starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def reference():
    """Path to ../shared/reference (the original implementation's fixtures)."""
    if not REFERENCE.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE} (set DIFFUERASER_REFERENCE)")
    return REFERENCE


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from diffueraser.tiny import tiny_tokenizer

    return tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))
