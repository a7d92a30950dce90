"""VisionZip on Qwen2-VL / Qwen2.5-VL: the dominance score per LLM visual token equals a direct
recomputation from the attention probabilities the model itself computes in its last full-attention
vision block (eager attention, recorded as it runs), and the dominant tokens are exactly the top-scored
ones of each image / video frame."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from framework import attach, build
from tests import tiny_backbones as tb

DOMINANT, CONTEXTUAL = 2, 1


def _record_block_attention(monkeypatch, model, block: int) -> list[torch.Tensor]:
    """Attention probabilities (H, S, S) of every segment `block` attends over, in call order, taken
    from the model's own eager attention function while that block runs."""
    visual = model.model.visual
    mod = importlib.import_module(type(visual.blocks[block].attn).__module__)
    eager, seen, active = mod.eager_attention_forward, [], [False]

    def recording(*args, **kwargs):
        out, weights = eager(*args, **kwargs)
        if active[0]:
            seen.append(weights[0].detach().float())
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    blk = visual.blocks[block]
    blk.register_forward_pre_hook(lambda *a: active.__setitem__(0, True))
    blk.register_forward_hook(lambda *a: active.__setitem__(0, False))
    return seen


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_qwen_dominance_score_and_dominant_tokens(monkeypatch, name):
    make, _ = tb.BACKBONES[name]
    model = make(attn="eager")
    if name == "qwen2_5_vl":  # a windowed block after the full-attention one: the signal block is not the last
        cfg = model.config
        cfg.vision_config.depth, cfg.vision_config.fullatt_block_indexes = 3, [1]
        torch.manual_seed(0)
        model = type(model)._from_config(cfg, attn_implementation="eager").eval()
    visual = model.model.visual
    full = 1 if name == "qwen2_5_vl" else len(visual.blocks) - 1
    probs = _record_block_attention(monkeypatch, model, full)
    samples = [
        tb.qwen_two_image_sample(model, seed=0),  # images of 8 and 4 tokens
        tb.qwen_video_sample(model, frames=3, seed=1),
    ]  # 3 frames of 4 tokens
    x = tb.collate(samples)

    from models.qwen2_vl import QwenTower

    signals = []  # the vision tower's encoder-signal recorder the strategy reads (per attach)
    make_signals = QwenTower.token_signals
    monkeypatch.setattr(QwenTower, "token_signals", lambda self: signals.append(make_signals(self)) or signals[-1])
    reducer = build({"name": "visionzip", "dominant": DOMINANT, "contextual": CONTEXTUAL})
    with attach(model, reducer) as eng:
        model(**x)
    records = eng.last_record

    # direct recomputation: per segment (an image / a video frame), attention received by each patch,
    # heads summed, averaged over the segment's queries; summed over each merged token's patches
    m = visual.spatial_merge_size
    expected = []
    for grid in (x["image_grid_thw"], x["video_grid_thw"]):  # encoder calls: images, then videos
        n_seg = int(grid[:, 0].sum())
        segs, probs[:] = probs[:n_seg], probs[n_seg:]
        per_patch = torch.cat([p.sum(0).mean(0) for p in segs])
        per_token = per_patch.view(-1, m * m).sum(1)
        if name == "qwen2_5_vl":  # blocks see merged-token units in window order
            order, _ = get_vision_window_index(grid, m, visual.window_size, visual.patch_size)
            per_token = torch.empty_like(per_token).index_copy_(0, order, per_token)
        expected.append(per_token)
    assert not probs  # every recorded segment accounted for
    got = torch.cat([s for s, _ in signals[-1]._group])
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=1e-5)

    # dominant tokens = the top-DOMINANT expected scores of each image / frame
    spans = [[0] * 8 + [1] * 4, [0] * 4 + [1] * 4 + [2] * 4]
    for rec, score, span in zip(records, expected, spans):
        span = torch.tensor(span)
        want = []
        for s in span.unique():
            idx = torch.nonzero(span == s).flatten()
            top = torch.sort(score[idx], descending=True).values
            assert float(top[DOMINANT - 1] - top[DOMINANT]) > 1e-6  # no near-tie at the cut
            want += idx[torch.topk(score[idx], DOMINANT).indices].tolist()
        st = rec["stages"][0]
        assert st["dominant"] == sorted(want)
        assert len(st["contextual"]) == CONTEXTUAL * len(span.unique())
        assert rec["visual_per_layer"] == [(DOMINANT + CONTEXTUAL) * len(span.unique())] * len(rec["visual_per_layer"])
        assert not set(st["dominant"]) & set(st["contextual"])
