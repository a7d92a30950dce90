"""Peer strategies: ToMe, VisionZip, DART, DivPrune, pooling, PyramidDrop, chain.

Pure-function checks on hand-built tokens, then each strategy's rule and budget on tiny LLaVA.
"""

from __future__ import annotations

import pytest
import torch

from framework import attach, build
from framework.merging import (
    bipartite_soft_matching,
    contextual_merge,
    farthest_point_selection,
    grid_shape,
    merge_source,
    merge_to,
    merge_wavg,
    pool_bins,
    scaled,
)
from models import adapter_for
from strategies.dart import dart_select
from strategies.tome import layer_schedule, prop_attn_mask
from strategies.visionzip import VisionZip
from tests.tiny import llava_inputs, make_llava, positions


@pytest.fixture(scope="module")
def model():
    return make_llava()


def _run(model, cfg, x=None):
    x = x or llava_inputs(model, [(3, 5), (1, 2)])
    with torch.no_grad(), attach(model, build(cfg)) as eng:
        out = model(**x, position_ids=positions(x["attention_mask"])).logits[:, -1]
    return out, eng.last_record, x


# ----------------------------------------------------------------------------------- ToMe
def test_tome_merges_duplicates_and_sizes_add():
    g = torch.Generator().manual_seed(0)
    base = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q  # 8 orthonormal directions
    x = base[:6].clone()
    x[1] = x[0]  # duplicates across the A/B split: (0, 1) and (4, 5)
    x[5] = x[4]
    x = x[None]
    merge, r = bipartite_soft_matching(x, 2)
    assert r == 2
    y, size = merge_wavg(merge, x)
    src = merge_source(merge, torch.eye(6)[None])
    groups = sorted(tuple(torch.nonzero(s).flatten().tolist()) for s in src[0])
    assert groups == [(0, 1), (2,), (3,), (4, 5)]
    assert size.sum() == 6 and sorted(size[0].tolist()) == [1, 1, 2, 2]
    # merged value = size-weighted average (here the duplicate itself)
    for row, s in zip(y[0], src[0]):
        torch.testing.assert_close(row, x[0, s.bool()].mean(0))
    # repeated rounds to a target, spatial order, sizes still add up
    y, size, source = merge_to(x, 3)
    assert y.shape[1] == 3 and size.sum() == 6
    firsts = [int(torch.nonzero(s).min()) for s in source[0]]
    assert firsts == sorted(firsts)


def test_tome_protected_cls_and_r0_identity():
    x = torch.randn(2, 7, 5)
    x[:, 1] = x[:, 0]  # CLS duplicate: still protected
    merge, r = bipartite_soft_matching(x, 0)
    assert r == 0 and merge(x) is x
    merge, r = bipartite_soft_matching(x, 3, protected=1)
    src = merge_source(merge, torch.eye(7)[None].expand(2, 7, 7))
    assert all(int(s[:, 0].sum()) == 1 and int(s[s[:, 0] > 0].sum()) == 1 for s in src)  # CLS alone
    assert layer_schedule(None, 10, 3) == [4, 3, 3]
    assert layer_schedule([2, 1], 0, 3) == [2, 1, 0]


def test_tome_r0_and_unit_sizes_are_the_stock_model(model):
    x = llava_inputs(model, [(3, 5), (1, 2)])
    with torch.no_grad():
        ref = model(**x, position_ids=positions(x["attention_mask"])).logits[:, -1]
    out, rec, _ = _run(model, {"name": "tome", "r": 0, "prop_attn": True}, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert rec[0]["visual_per_layer"] == [16] * 4
    # proportional attention with all sizes 1 is an all-zero additive mask: no change
    layer = adapter_for(model).vision_tower().layers[0]
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        a = layer(h, None)
        b = layer(h, prop_attn_mask(torch.ones(2, 17), h.dtype))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # and with unequal sizes it does change attention
    size = torch.ones(2, 17)
    size[:, 3] = 5.0
    with torch.no_grad():
        c = layer(h, prop_attn_mask(size, h.dtype))
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize(
    "cfg,n",
    [
        ({"name": "tome", "keep": 6}, 6),
        ({"name": "tome", "keep": 0.5}, 8),
        ({"name": "tome", "keep": 5, "placement": "projector"}, 5),
        ({"name": "tome", "preset": 192}, scaled(192, 16)),
    ],
)
def test_tome_budget_and_groups_partition_patches(model, cfg, n):
    _, rec, _ = _run(model, cfg)
    for r in rec:
        st = r["stages"][0]
        assert st["visual_after"] == n and r["visual_per_layer"] == [n] * 4
        flat = sorted(i for g in st["groups"] for i in g)
        assert flat == list(range(16))  # every patch in exactly one group; sizes add up to 16
        assert sum(st["sizes"]) == 16
        assert [g[0] for g in st["groups"]] == sorted(g[0] for g in st["groups"])  # spatial order


def test_tome_projector_merge_values_are_size_weighted_means(model):
    adapter = adapter_for(model)
    x = llava_inputs(model, [(2, 3)])
    with torch.no_grad():
        proj = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output[0]
    rec, seen = _run_seen(model, adapter, {"name": "tome", "keep": 5, "placement": "projector"}, x)
    start = x["input_ids"][0].tolist().index(100)  # reduced LM input: the merged tokens in spatial order
    for i, g in enumerate(rec[0]["stages"][0]["groups"]):
        torch.testing.assert_close(seen["e"][0, start + i], proj[g].mean(0), atol=1e-5, rtol=0)


def _run_seen(model, adapter, cfg, x):
    """Run cfg; capture the language model's (reduced) input embeddings: a hook registered after the
    engine's runs after it."""
    seen = {}
    with torch.no_grad(), attach(model, build(cfg)) as eng:
        hook = adapter.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True
        )
        try:
            model(**x, position_ids=positions(x["attention_mask"]))
        finally:
            hook.remove()
    return eng.last_record, seen


# ----------------------------------------------------------------------------------- VisionZip
def test_visionzip_contextual_rule():
    hidden = torch.arange(6.0)[:, None].repeat(1, 2)
    metric = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1], [1, 0.2], [0, 1]])
    tok, targets, assign = contextual_merge(hidden, metric, 2)
    assert targets.tolist() == [0, 3]  # uniform stride 6 // 2
    assert assign.tolist() == [0, 1, 0, 1, 0, 1]
    torch.testing.assert_close(tok[0], hidden[0] + hidden[[2, 4]].mean(0))  # target + mean of members
    torch.testing.assert_close(tok[1], hidden[3] + hidden[[1, 5]].mean(0))


def test_visionzip_dominant_by_cls_attention_and_presets():
    assert [VisionZip(preset=p).counts(576) for p in (192, 128, 64)] == [(162, 30), (108, 20), (54, 10)]
    m = make_llava(attn="eager")
    ad = adapter_for(m)
    x = llava_inputs(m, [(3, 5), (1, 2)])
    with torch.no_grad():
        att = m.model.vision_tower(x["pixel_values"], output_attentions=True).attentions[ad.vision_tower().depth - 1]
    cls = att[:, :, 0, 1:].sum(1)
    _, rec, _ = _run(m, {"name": "visionzip", "dominant": 4, "contextual": 3}, x)
    for b, r in enumerate(rec):
        st = r["stages"][0]
        assert st["visual_after"] == 7
        top = set(cls[b].topk(4).indices.tolist())
        singles = {g[0] for g in st["groups"] if len(g) == 1}
        assert top <= singles
        assert sorted(i for g in st["groups"] for i in g) == list(range(16))


# ----------------------------------------------------------------------------------- DART
def test_dart_picks_least_similar_to_pivots():
    hidden = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [-1, 0], [1, 0.2], [0.5, 0.5]])
    knorm = torch.tensor([9.0, 1, 1, 1, 1, 1])  # token 0 is the pivot
    empty = torch.zeros(0, 2)
    keep = dart_select(hidden, knorm, empty, torch.zeros(0), 3, pivot_image=1, pivot_text=0)
    assert keep.tolist() == [0, 2, 3]
    # a text pivot takes its share from what is left
    text = torch.tensor([[-1.0, 0.0]])
    keep = dart_select(hidden, knorm, text, torch.ones(1), 3, pivot_image=1, pivot_text=1)
    assert keep.tolist() == [0, 1, 3]  # image pivot takes 3 (least like [1,0]); text pivot takes 1 ([1,0.1])


def test_dart_budget(model):
    _, rec, _ = _run(model, {"name": "dart", "layer": 2, "keep": 5})
    assert all(r["visual_per_layer"] == [16, 16, 5, 5] for r in rec)


# ----------------------------------------------------------------------------------- DivPrune
def _divprune_reference(x, k):
    xn = x / x.norm(dim=-1, keepdim=True)
    d = 1 - xn @ xn.T
    sel = []
    for i in range(k):
        if i == 0:
            scores = d.topk(2, dim=0, largest=False).values[1]
        else:
            scores = d[sel].min(0).values
            scores[sel] = -1
        sel.append(int(scores.argmax()))
    return sorted(sel)


def test_divprune_farthest_points():
    pts = torch.tensor([[1.0, 0], [0.99, 0.05], [0, 1], [-1, -0.2], [0.7, 0.7]])
    assert farthest_point_selection(pts, 2).tolist() == [1, 3]  # 3: farthest from its neighbour; then 1
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(3))
    for k in (1, 4, 11):
        assert farthest_point_selection(x, k).tolist() == _divprune_reference(x, k)


def test_divprune_budget_and_rule(model):
    x = llava_inputs(model, [(3, 5)])
    with torch.no_grad():
        proj = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output[0]
    _, rec, _ = _run(model, {"name": "divprune", "keep": 6}, x)
    assert rec[0]["visual_per_layer"] == [6] * 4
    assert rec[0]["stages"][0]["kept"] == farthest_point_selection(proj, 6).tolist()


# ----------------------------------------------------------------------------------- pooling
def test_pooling_cells():
    assert pool_bins(4, 2) == [(0, 2), (2, 4)] and pool_bins(4, 3) == [(0, 1), (1, 2), (2, 4)]
    assert (
        grid_shape(192, 24, 24) == (12, 16) and grid_shape(128, 24, 24) == (8, 16) and grid_shape(64, 24, 24) == (8, 8)
    )


@pytest.mark.parametrize("keep, cells", [(4, (2, 2)), (6, (2, 3))])  # 4 x 4 into 2 x 2; and 2 x 3 (uneven bins)
def test_pooling_averages_projected_cells(model, keep, cells):
    adapter = adapter_for(model)
    x = llava_inputs(model, [(2, 3)])
    with torch.no_grad():
        proj = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output[0]
    rec, seen = _run_seen(model, adapter, {"name": "pooling", "keep": keep}, x)
    grid = torch.arange(16).view(4, 4)  # the cells: pool_bins over rows x pool_bins over columns, row-major
    want = [
        grid[r0:r1, c0:c1].flatten().tolist() for r0, r1 in pool_bins(4, cells[0]) for c0, c1 in pool_bins(4, cells[1])
    ]
    groups = rec[0]["stages"][0]["groups"]
    assert groups == want and rec[0]["stages"][0]["sizes"] == [len(g) for g in want]
    start = x["input_ids"][0].tolist().index(100)
    for i, g in enumerate(groups):  # reduced LM input: each cell's mean, at its top-left slot's place
        torch.testing.assert_close(seen["e"][0, start + i], proj[g].mean(0), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- PDrop / chain
def test_pdrop_pyramid_and_presets(model):
    _, rec, _ = _run(model, {"name": "pdrop", "layers": [1, 3], "lam": 0.5})
    assert all(r["visual_per_layer"] == [16, 8, 8, 4] for r in rec)
    assert build({"name": "pdrop", "preset": 64}).lam == 0.19
    # a preset's stages [2, 8, 16] of 32 scale to this 4-layer decoder as [1, 2, 3] (at least 1: a decision
    # needs the layer before it)
    _, rec, _ = _run(model, {"name": "pdrop", "preset": 192})
    n = 16
    assert all(r["visual_per_layer"] == [n, int(n * 0.56), int(n * 0.56**2), int(n * 0.56**3)] for r in rec)


def test_chain_tome_then_fastv(model):
    cfg = {"name": "chain", "reducers": [{"name": "tome", "keep": 8}, {"name": "fastv", "layer": 2, "keep": 3}]}
    r = build(cfg)
    assert r.stage == "projector" and r.decision_layers() == [2]
    _, rec, _ = _run(model, cfg)
    for s in rec:
        assert s["visual_per_layer"] == [8, 8, 3, 3]
        proj, llm = s["stages"]
        assert (proj["stage"], proj["visual_after"], llm["stage"], llm["visual_after"]) == ("projector", 8, "llm", 3)
        assert all(g in proj["groups"] for g in llm["groups"])  # the LLM keeps whole merged groups
    assert build({"name": "chain", "reducers": [{"name": "fastv", "layer": 2, "keep": 3}]}).stage == "llm"


# ----------------------------------------------------------------------------------- other backbones
def test_next_vision_stage_per_crop():
    """LLaVA-NeXT: ToMe r=0 through the crop map is the stock model; VisionZip keeps each crop's top-CLS
    patches (base view: feature slot == token index); the get_image_features wrapper is removed."""
    from tests import tiny_backbones as tb

    m = tb.make_llava_next(attn="eager")
    x = tb.collate(tb.llava_next_examples(m))
    kw = tb.forward_kwargs(m, x)
    with torch.no_grad():
        ref = m(**x, **kw).logits[:, -1]
        with attach(m, build({"name": "tome", "r": 0})) as eng:
            out = m(**x, **kw).logits[:, -1]
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        assert [r["visual_per_layer"][0] for r in eng.last_record] == [70, 56, 36]
        ad = adapter_for(m)
        pix = torch.cat([x["pixel_values"][i, :n] for i, n in enumerate((5, 3, 2))])  # crops in encoder order
        att = m.model.vision_tower(pix, output_attentions=True).attentions[ad.vision_tower().depth - 1]
        with attach(m, build({"name": "visionzip", "dominant": 4, "contextual": 2})) as eng:
            m(**x, **kw)
    assert "get_image_features" not in m.model.__dict__
    base = [0, 5, 8]  # each image's base view is its first crop
    for b, r in enumerate(eng.last_record):
        singles = {g[0] for g in r["stages"][0]["groups"] if len(g) == 1}
        top = set(att[base[b], :, 0, 1:].sum(0).topk(4).indices.tolist())
        assert top <= singles


def test_projector_stage_grids_on_qwen_video():
    """Qwen2-VL: pooling uses each frame's (h, w) / merge grid, under a plain forward (grid_thw) and
    under generate (M-RoPE positions)."""
    from tests import tiny_backbones as tb

    m = tb.make_qwen2_vl()
    x = tb.collate([tb.qwen_video_sample(m, frames=3)])  # 3 frames of 2 x 2 merged tokens
    with torch.no_grad(), attach(m, build({"name": "pooling", "keep": 2})) as eng:
        m(**x)
        groups = eng.last_record[0]["stages"][0]["groups"]
        m.generate(**x, max_new_tokens=1, do_sample=False)
    assert groups == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11]]  # 2 x 2 -> 1 x 2 per frame
    assert eng.last_record[0]["stages"][0]["groups"] == groups
