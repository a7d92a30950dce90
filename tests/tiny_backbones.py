"""Tiny random LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL models and inputs (no hub access, no processors).

Inputs are built per sample (`*_sample`, unpadded) and left-padded into a batch by `collate`, so a
test can run the same sample alone (`collate([s])`) and inside a batch. Factories share one signature:
`make_*(layers=4, attn="sdpa", seed=0)`; `BACKBONES` maps a family to (factory, example builder).
"""

from __future__ import annotations

import torch

from models.random import random_backbone
from tests.tiny import CLIP, IMAGE_TOKEN, TEXT, TOKENS, make_llava

VIDEO_TOKEN, VISION_START, VISION_END = TOKENS["video"], TOKENS["vision_start"], TOKENS["vision_end"]
QWEN_VISION = {"layers": 2, "heads": 4, "patch": 14, "merge": 2, "temporal_patch": 2}


# ------------------------------------------------------------------------------- factories
def make_llava_next(layers: int = 4, attn: str = "sdpa", seed: int = 0):
    shape = {"text": {**TEXT, "layers": layers}, "vision": {**CLIP, "grid": 4}, "tokens": TOKENS}
    return random_backbone("llava_next", shape, attn=attn, seed=seed)


def make_qwen2_vl(layers: int = 4, attn: str = "sdpa", seed: int = 0):
    shape = {"text": {**TEXT, "layers": layers}, "vision": {**QWEN_VISION, "hidden": 32, "ffn": 64}, "tokens": TOKENS}
    return random_backbone("qwen2_vl", shape, attn=attn, seed=seed)


def make_qwen25_vl(layers: int = 4, attn: str = "sdpa", seed: int = 0):
    vision = {**QWEN_VISION, "hidden": 32, "ffn": 64, "window": 56, "fullatt": [1]}
    return random_backbone(
        "qwen2_5_vl", {"text": {**TEXT, "layers": layers}, "vision": vision, "tokens": TOKENS}, attn=attn, seed=seed
    )


# ------------------------------------------------------------------------------- samples
def _text(n: int, g) -> torch.Tensor:
    return torch.randint(4, 90, (n,), generator=g)


def llava_next_sample(model, pre: int, post: int, sizes=((70, 90),), seed: int = 0, between: int = 2) -> dict:
    """[bos, text*pre, (image, text*between)..., text*post]; one image per entry of `sizes` (H, W)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    from models.llava_next import LlavaNextAdapter

    g = torch.Generator().manual_seed(seed)
    ad = LlavaNextAdapter(model)
    parts = [torch.tensor([1]), _text(pre, g)]
    for i, s in enumerate(sizes):
        if i:
            parts.append(_text(between, g))
        parts.append(torch.full((int(ad.image_layout(s).numel()),), IMAGE_TOKEN))
    parts.append(_text(post, g))
    side = model.config.vision_config.image_size
    n_patch = [image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, side) for s in sizes]
    pixels = torch.randn(len(sizes), max(n_patch), 3, side, side, generator=g)
    return {"input_ids": torch.cat(parts), "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}


def qwen_sample(model, segments, seed: int = 0) -> dict:
    """segments: ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w)), grids in patches
    (h, w even); each visual segment is wrapped in vision-start/end tokens."""
    g = torch.Generator().manual_seed(seed)
    v = model.config.vision_config
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    m2 = v.spatial_merge_size**2
    parts, images, videos, igrid, vgrid = [torch.tensor([1])], [], [], [], []
    for kind, arg in segments:
        if kind == "text":
            parts.append(_text(arg, g))
            continue
        t, h, w = arg
        tok = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
        parts += [torch.tensor([VISION_START]), torch.full((t * h * w // m2,), tok), torch.tensor([VISION_END])]
        (images if kind == "image" else videos).append(torch.randn(t * h * w, dim, generator=g))
        (igrid if kind == "image" else vgrid).append([t, h, w])
    ids = torch.cat(parts)
    out = {"input_ids": ids}
    if images:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(images), torch.tensor(igrid)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(videos), torch.tensor(vgrid)
    return out


def llava_frames_sample(model, pre: int, n_frames: int, post: int, seed: int = 0, between: int = 1) -> dict:
    """LLaVA-1.5 multi-frame input: several images in one prompt, text tokens between frames."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    parts = [torch.tensor([1]), _text(pre, g)]
    for i in range(n_frames):
        if i:
            parts.append(_text(between, g))
        parts.append(torch.full((n_img,), IMAGE_TOKEN))
    parts.append(_text(post, g))
    size = model.config.vision_config.image_size
    return {"input_ids": torch.cat(parts), "pixel_values": torch.randn(n_frames, 3, size, size, generator=g)}


# ------------------------------------------------------------------------------- batching
def collate(samples: list[dict]) -> dict:
    """Left-pad `input_ids` (pad 0) and build attention_mask; concatenate the visual inputs in
    sample order; add mm_token_type_ids for Qwen-style samples (those with grids)."""
    L = max(int(s["input_ids"].numel()) for s in samples)
    B = len(samples)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s["input_ids"].numel()
        ids[i, L - n :] = s["input_ids"]
        mask[i, L - n :] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    keys = set().union(*(s.keys() for s in samples)) - {"input_ids"}
    for k in sorted(keys):
        parts = [s[k] for s in samples if k in s]
        if k == "pixel_values" and parts[0].dim() == 5:  # LLaVA-NeXT: pad the crop dimension
            P = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], P - p.shape[1], *p.shape[2:])], 1) for p in parts]
        out[k] = torch.cat(parts)
    if "image_grid_thw" in out or "video_grid_thw" in out:
        out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    return out


def unpad(batch: dict, b: int, samples: list[dict]) -> dict:
    """Sample b of a batch built by `collate(samples)`, alone."""
    return collate([samples[b]])


# ------------------------------------------------------------------------------- examples
def llava_next_examples(model, seed: int = 0) -> list[dict]:
    """Three samples with different AnyRes layouts (and visual counts)."""
    return [
        llava_next_sample(model, 3, 5, ((70, 90),), seed),
        llava_next_sample(model, 1, 2, ((100, 50),), seed + 1),
        llava_next_sample(model, 6, 8, ((56, 56),), seed + 2),
    ]


def qwen_examples(model, seed: int = 0) -> list[dict]:
    """Three samples with different visual counts (16 / 24 / 20 merged tokens)."""
    return [
        qwen_sample(model, [("text", 3), ("image", (1, 8, 8)), ("text", 5)], seed),
        qwen_sample(model, [("text", 1), ("image", (1, 8, 12)), ("text", 2)], seed + 1),
        qwen_sample(model, [("text", 6), ("image", (1, 4, 20)), ("text", 8)], seed + 2),
    ]


def qwen_video_sample(model, frames: int = 3, seed: int = 0) -> dict:
    """A video of `frames` temporal patches (grid (frames, 4, 4): 4 tokens per frame)."""
    return qwen_sample(model, [("text", 2), ("video", (frames, 4, 4)), ("text", 4)], seed)


def qwen_two_image_sample(model, seed: int = 0) -> dict:
    return qwen_sample(model, [("text", 2), ("image", (1, 4, 8)), ("text", 2), ("image", (1, 4, 4)), ("text", 4)], seed)


BACKBONES = {
    "llava_next": (make_llava_next, llava_next_examples),
    "qwen2_vl": (make_qwen2_vl, qwen_examples),
    "qwen2_5_vl": (make_qwen25_vl, qwen_examples),
}


def llava_examples(model, seed: int = 0) -> list[dict]:
    from tests.tiny import llava_inputs

    x = llava_inputs(model, [(3, 5), (1, 2), (6, 8)], seed)
    out = []
    for b in range(3):
        keep = x["attention_mask"][b].bool()
        out.append({"input_ids": x["input_ids"][b, keep], "pixel_values": x["pixel_values"][b : b + 1]})
    return out


ALL_BACKBONES = {"llava": (make_llava, llava_examples), **BACKBONES}


def split_batch(model, x: dict, b: int) -> dict:
    """Sample b of a left-padded batch, alone and unpadded (pad columns and other samples' visual
    inputs removed), for any of the tiny backbones (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)."""
    from models import adapter_for

    cols = x["attention_mask"][b].bool()
    out = {"input_ids": x["input_ids"][b : b + 1, cols], "attention_mask": x["attention_mask"][b : b + 1, cols]}
    ids = x["input_ids"]
    name = type(model).__name__
    if name.startswith("Qwen"):
        m2 = model.config.vision_config.spatial_merge_size**2
        out["mm_token_type_ids"] = x["mm_token_type_ids"][b : b + 1, cols]
        for tok, pix, grid in (
            (IMAGE_TOKEN, "pixel_values", "image_grid_thw"),
            (VIDEO_TOKEN, "pixel_values_videos", "video_grid_thw"),
        ):
            if grid not in x:
                continue
            need = [int((ids[i] == tok).sum()) for i in range(ids.shape[0])]
            rows, j, start = [], 0, 0
            for i, n in enumerate(need):
                got = 0
                while got < n:
                    t, h, w = x[grid][j].tolist()
                    if i == b:
                        rows.append((j, start, start + t * h * w))
                    got += t * h * w // m2
                    start += t * h * w
                    j += 1
            if rows:
                out[pix] = torch.cat([x[pix][s:e] for _, s, e in rows])
                out[grid] = x[grid][[r[0] for r in rows]]
        return out
    if name.startswith("LlavaNext"):
        per_sample, _ = adapter_for(model)._assign(ids, x)
        first = sum(len(p) for p in per_sample[:b])
        sel = slice(first, first + len(per_sample[b]))
        out["pixel_values"], out["image_sizes"] = x["pixel_values"][sel], x["image_sizes"][sel]
        return out
    per = model.config.image_seq_length  # LLaVA-1.5: images in batch order
    counts = [int((ids[i] == model.config.image_token_id).sum()) // per for i in range(ids.shape[0])]
    first = sum(counts[:b])
    out["pixel_values"] = x["pixel_values"][first : first + counts[b]]
    return out


def forward_kwargs(model, x: dict) -> dict:
    """Extra kwargs for a plain forward that match generate(): Llama-style backbones need
    position_ids = cumsum(mask) - 1 under left padding; Qwen computes its M-RoPE ids from the mask."""
    from tests.tiny import positions

    return {} if type(model).__name__.startswith("Qwen") else {"position_ids": positions(x["attention_mask"])}
