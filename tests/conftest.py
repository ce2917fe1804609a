"""Fixtures for every test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def restore_tf32_flags():
    """A stage run in-process turns TF32 on for the whole process (runtime.resolve_device on CUDA); without this the
    fp32 tests that a worker runs after it would compute in TF32 (the GPU causality checks failed so under xdist)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
