"""Shared fixtures: tiny random backbones built from configs (no downloads), one thread."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _host_allocator_untouched():
    """The benchmarks keep freed host memory for the rest of their process (`--host-allocator keep`); run
    in-process by a test, they would change the whole test session's allocator. The real call is tested in
    a subprocess (tests/test_efficiency.py). Session-scoped, so module-scoped fixtures see it too."""
    import experiments.metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiments.metrics, "keep_freed_host_memory", lambda: "kept (tests: not applied)")
        yield


from tests.tiny import llava_inputs, make_llava  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llava():
    return make_llava()
