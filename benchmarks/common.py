"""Shared bits of the CPU benchmarks: a ~100M-parameter LLaMA-shaped LLaVA with random weights, timing."""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

torch.set_num_threads(1)
IMAGE_TOKEN = 32000


def llava_100m(layers: int = 8, grid: int = 24, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """hidden 1024, FFN 2816, 16 heads, `layers` decoder layers (103M decoder parameters at 8 layers)."""
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=8192,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    clip = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=14 * grid, patch_size=14, projection_dim=64)
    cfg = LlavaConfig(vision_config=clip, text_config=text, image_token_index=IMAGE_TOKEN,
                      image_seq_length=grid * grid, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()


def prompt(model, n_text: int = 64, batch: int = 1, seed: int = 0) -> dict:
    """8 text tokens, the image, then n_text - 8 text tokens (the question)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    ids = torch.cat([torch.randint(3, 30000, (batch, 8), generator=g),
                     torch.full((batch, n_img), IMAGE_TOKEN),
                     torch.randint(3, 30000, (batch, n_text - 8), generator=g)], 1)
    size = model.config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
