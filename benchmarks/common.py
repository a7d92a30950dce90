"""Shared bits of the CPU benchmarks: a ~100M-parameter LLaMA-shaped LLaVA with random weights, timing."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from models.random import random_backbone  # noqa: E402

torch.set_num_threads(1)
IMAGE_TOKEN = 32000


def llava_100m(layers: int = 8, grid: int = 24, attn: str = "sdpa"):
    """hidden 1024, FFN 2816, 16 heads, `layers` decoder layers (103M decoder parameters at 8 layers)."""
    text = {"vocab": 32064, "hidden": 1024, "ffn": 2816, "layers": layers, "heads": 16, "max_positions": 8192}
    vision = {"hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "patch": 14, "grid": grid}
    return random_backbone("llava", {"text": text, "vision": vision, "tokens": {"image": IMAGE_TOKEN}}, attn=attn)


def prompt(model, n_text: int = 64, batch: int = 1, seed: int = 0) -> dict:
    """8 text tokens, the image, then n_text - 8 text tokens (the question)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    ids = torch.cat(
        [
            torch.randint(3, 30000, (batch, 8), generator=g),
            torch.full((batch, n_img), IMAGE_TOKEN),
            torch.randint(3, 30000, (batch, n_text - 8), generator=g),
        ],
        1,
    )
    size = model.config.vision_config.image_size
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, size, size, generator=g),
    }


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
