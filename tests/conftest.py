"""Shared fixtures: tiny random backbones built from configs (no downloads), one thread."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tests.tiny import llava_inputs, make_llava  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llava():
    return make_llava()
