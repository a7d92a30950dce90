"""Tiny random models and inputs for tests and examples (no hub access)."""

from __future__ import annotations

import torch

from models.random import random_backbone

VOCAB, IMAGE_TOKEN = 128, 100
# the tiny shapes every test backbone shares (models.random.random_backbone)
TEXT = {"hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "vocab": VOCAB, "max_positions": 4096}
CLIP = {"hidden": 32, "ffn": 64, "layers": 2, "heads": 4, "patch": 14}
TOKENS = {"image": IMAGE_TOKEN, "video": 101, "vision_start": 102, "vision_end": 103}
# a tiny untrained toy LLaVA (experiments.toy.model.build_toy_model): the toy's tokenizer, 144 visual tokens
TINY_TOY = {
    "vision_hidden": 32,
    "vision_layers": 1,
    "vision_heads": 2,
    "text_hidden": 32,
    "text_layers": 4,
    "text_heads": 2,
    "mlp_ratio": 2,
}


def make_llava(layers: int = 4, attn: str = "sdpa", grid: int = 4, seed: int = 0):
    shape = {"text": {**TEXT, "layers": layers}, "vision": {**CLIP, "grid": grid}, "tokens": TOKENS}
    return random_backbone("llava", shape, attn=attn, seed=seed)


def llava_inputs(model, prompts: list[tuple[int, int]], seed: int = 0):
    """A left-padded batch; each prompt = (tokens before the image, tokens after the image)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    seqs = []
    for pre, post in prompts:
        before = torch.randint(3, 90, (pre,), generator=g)
        after = torch.randint(3, 90, (post,), generator=g)
        seqs.append(torch.cat([torch.tensor([1]), before, torch.full((n_img,), IMAGE_TOKEN), after]))
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :] = s
        mask[i, L - len(s) :] = 1
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(seqs), 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s convention for left padding: cumsum(mask) - 1, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def alone(x: dict, b: int) -> dict:
    """Sample b of a left-padded `llava_inputs` batch, unpadded, with its own image."""
    cols = x["attention_mask"][b].bool()
    return {
        "input_ids": x["input_ids"][b : b + 1, cols],
        "attention_mask": x["attention_mask"][b : b + 1, cols],
        "pixel_values": x["pixel_values"][b : b + 1],
    }


def assert_cached_decode_equals_recompute(model, reducer, x: dict, new_tokens: int = 4) -> None:
    """Greedy decode with the KV cache == no-cache decoding that replays the same decisions (1e-5)."""
    from framework import attach

    kw = dict(max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with attach(model, reducer):
            g = model.generate(**x, **kw)
        with attach(model, reducer, replay=True):
            g2 = model.generate(**x, use_cache=False, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(g.logits, g2.logits)) < 1e-5
    assert torch.equal(g.sequences, g2.sequences)
