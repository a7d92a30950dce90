"""GrowingCache: decode appends in place, and generate's outputs equal those with transformers' DynamicCache."""

from __future__ import annotations

import pytest
import torch

from framework import attach, build
from framework.cache import GrowingCache, GrowingLayer
from tests.tiny import llava_inputs, make_llava


def _generate(model, inputs, cache, **kw):
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        cache=cache,
        **kw,
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize(
    "strategy",
    [
        "none",
        {"name": "fastv", "layer": 2, "keep": 6},
        {"name": "sparsevlm", "layers": [1], "keep": [5]},
        {"name": "visionzip", "dominant": 6, "contextual": 2},
    ],
    ids=["none", "fastv", "sparsevlm", "visionzip"],
)
def test_generate_equals_dynamic_cache_with_a_reducer(strategy):
    model = make_llava(layers=4)
    inputs = llava_inputs(model, [(2, 5), (0, 3), (4, 1)])  # left-padded: samples keep different counts
    with torch.no_grad(), attach(model, build(strategy)):
        seq_d, scores_d = _generate(model, inputs, None)
        seq_g, scores_g = _generate(model, inputs, GrowingCache())
    assert torch.equal(seq_g, seq_d)
    assert torch.equal(scores_g, scores_d)


def test_beam_search_reorders_the_cache():
    model = make_llava(layers=2)
    inputs = llava_inputs(model, [(2, 5), (1, 3)])
    with torch.no_grad():
        seq_d, _ = _generate(model, inputs, None, num_beams=3)
        seq_g, _ = _generate(model, inputs, GrowingCache(), num_beams=3)
    assert torch.equal(seq_g, seq_d)


def test_appends_in_place_until_the_reserve_is_used():
    layer = GrowingLayer(reserve=4)
    k = torch.randn(2, 3, 10, 8)
    keys, values = layer.update(k, -k)
    assert torch.equal(keys, k) and torch.equal(values, -k)
    buffer = keys.data_ptr()
    steps = [torch.randn(2, 3, 1, 8) for _ in range(5)]
    for i, s in enumerate(steps[:4]):  # 4 fit in the reserve: same storage, no copy of the cache
        keys, _ = layer.update(s, -s)
        assert keys.data_ptr() == buffer and layer.get_seq_length() == 11 + i
    keys, values = layer.update(steps[4], -steps[4])  # the fifth grows the buffer
    assert keys.data_ptr() != buffer
    want = torch.cat([k, *steps], dim=-2)
    assert torch.equal(keys, want) and torch.equal(values, -want)
    layer.crop(-3)  # crop keeps a view of the buffer; the next append overwrites the cropped slots
    s = torch.randn(2, 3, 2, 8)
    keys, _ = layer.update(s, -s)
    want = torch.cat([want[..., :-3, :], s], dim=-2)
    assert torch.equal(keys, want)
    layer.batch_select_indices(torch.tensor([1]))  # a new tensor: the next append re-adopts it
    s = torch.randn(1, 3, 1, 8)
    keys, values = layer.update(s, -s)
    want = torch.cat([want[1:], s], dim=-2)
    assert torch.equal(keys, want) and torch.equal(values, -want)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_generate_equals_dynamic_cache_on_other_backbones(family):
    """M-RoPE (Qwen2-VL) and AnyRes (LLaVA-NeXT) decode through the in-place cache, SparseVLM pruning."""
    from tests.tiny_backbones import collate, llava_next_examples, make_llava_next, make_qwen2_vl, qwen_sample

    if family == "qwen2_vl":
        model = make_qwen2_vl()
        samples = [
            qwen_sample(model, [("text", 3), ("image", (1, 8, 8)), ("text", 5)], seed=0),
            qwen_sample(model, [("text", 1), ("image", (1, 8, 6)), ("text", 2)], seed=1),
        ]
    else:
        model = make_llava_next()
        samples = llava_next_examples(model)[:2]
    inputs = collate(samples)
    strategy = {"name": "sparsevlm", "layers": [1], "keep": [3], "positions": "keep"}  # M-RoPE: keep
    with torch.no_grad(), attach(model, build(strategy)) as engine:
        seq_d, scores_d = _generate(model, inputs, None)
        assert engine.last_record[0]["stages"][0]["visual_after"] < engine.last_record[0]["n_visual_input"]
        seq_g, scores_g = _generate(model, inputs, GrowingCache())
    assert torch.equal(seq_g, seq_d)
    assert torch.equal(scores_g, scores_d)
