"""SparseVLM+ (official main branch, USE_VERSION=2_0): the RoPE gravity term, per-sample priority heads,
its keep tables on a LLaVA-1.5-7B-shaped model, and batching."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from framework import ConfigError, attach, build
from strategies.sparsevlm import PLUS_PRESETS, SparseVLM, SparseVLMPlus, priority_heads, rope_gravity
from tests.tiny import alone, assert_cached_decode_equals_recompute, llava_inputs, make_llava, positions


def run(model, cfg, x):
    with torch.no_grad(), attach(model, build(cfg)) as eng:
        out = model(**x, position_ids=positions(x["attention_mask"]))
    return out, eng.last_record


def _direct_gravity(dq: torch.Tensor, hd: int, base: float = 10000.0) -> torch.Tensor:
    """2 sum_i cos(delta theta_i) / sqrt(hd), theta_i = base^(-2i/hd): the all-ones RoPE product by hand."""
    theta = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    return 2 * torch.cos(dq.double()[..., None] * theta).sum(-1) / math.sqrt(hd)


def test_gravity_term_matches_a_direct_computation():
    hd = 128
    cfg = LlamaConfig(hidden_size=hd * 2, num_attention_heads=2, max_position_embeddings=4096)
    rot = LlamaRotaryEmbedding(cfg)
    q_pos = torch.tensor([[700, 651, 35]])
    k_pos = torch.arange(0, 700, 7)[None]
    x = torch.zeros(1, 1, hd)
    cq, sq = rot(x, q_pos)
    ck, sk = rot(x, k_pos)
    G = rope_gravity(cq[0], sq[0], ck[0], sk[0])
    want = _direct_gravity(q_pos[0, :, None] - k_pos[0, None, :], hd)
    assert G.shape == (3, 100)
    assert torch.allclose(G.double(), want, atol=2e-4)
    # sqrt(hd) at distance 0, and RoPE's decay with distance (code.md: 11.3 at 0, ~5.4 at 100, ~3.1 at 400)
    g = _direct_gravity(torch.tensor([0, 100, 400]), hd)
    assert g[0] == pytest.approx(math.sqrt(hd)) and 5.0 < g[1] < 6.0 and 2.5 < g[2] < 3.5


def test_priority_heads_by_mass():
    A = torch.zeros(5, 2, 3)
    A[3] += 0.5  # mass 3
    A[1] += 0.2  # mass 1.2
    A[4, 0, 0] = 1.2  # ties head 1 -> the lower index wins
    assert priority_heads(A, 2).tolist() == [1, 3]
    assert priority_heads(A, 9).tolist() == [0, 1, 2, 3, 4]


def test_config():
    plus = build("sparsevlm_plus")
    assert isinstance(plus, SparseVLMPlus) and plus.variant == "plus"
    assert (plus.positions, plus.recycling) == ("keep", False)
    v15 = build("sparsevlm")
    assert (v15.variant, v15.positions, v15.recycling) == ("v1.5", "repack", True)
    explicit = build({"name": "sparsevlm", "variant": "plus", "recycling": True, "positions": "repack"})
    assert (explicit.positions, explicit.recycling) == ("repack", True)
    assert SparseVLM.preset_table({"budget": "fixed"})["192"] == [300, 200, 110]
    assert SparseVLM.preset_table({"variant": "plus"}) is PLUS_PRESETS
    assert SparseVLMPlus.preset_table({}) is PLUS_PRESETS
    bad = [
        ({"name": "sparsevlm", "variant": "v2"}, "variant='v2'"),
        ({"name": "sparsevlm", "priority_heads": 4}, "only with variant='plus'"),
        ({"name": "sparsevlm_plus", "priority_heads": 0}, "a head count >= 1"),
        ({"name": "sparsevlm_plus", "gravity_floor": 0.0}, "gravity_floor"),
        ({"name": "sparsevlm_plus", "variant": "v1.5"}, "use strategy 'sparsevlm'"),
        ({"name": "sparsevlm_plus", "preset": "100"}, "allowed: \\['128', '192', '64', '96'\\]"),
    ]
    for cfg, message in bad:
        with pytest.raises(ConfigError, match=message):
            build(cfg)


# ---------------------------------------------------------------- scores against eager attentions
def test_scores_match_eager_attentions_with_gravity_and_priority_heads():
    """Stage 0 of one unpadded prompt (slot == position): probabilities from eager `output_attentions`,
    divided by the hand-computed gravity term (floored), averaged over the 2 heads (of 4) with the most
    rater x visual mass, then over raters."""
    ea = make_llava(layers=8, grid=8, attn="eager")
    sd = make_llava(layers=8, grid=8, attn="sdpa")
    x = llava_inputs(ea, [(3, 7)])
    cfg = {"name": "sparsevlm_plus", "record_scores": True}
    with torch.no_grad(), attach(ea, build(cfg)) as eng:
        out = ea(**x, output_attentions=True)
    rec_e = eng.last_record[0]["stages"][0]
    _, rec_s = run(sd, cfg, x)
    rec_s = rec_s[0]["stages"][0]
    hd = ea.config.text_config.hidden_size // ea.config.text_config.num_attention_heads
    rows, cols = torch.tensor(rec_e["rater_slots"]), torch.tensor(rec_e["visual_slots"])
    A = out.attentions[rec_e["layer"] - 1][0].double()[:, rows][:, :, cols]  # (H, R, Nv)
    G = _direct_gravity(rows[:, None] - cols[None, :], hd).clamp(min=0.01 * math.sqrt(hd))
    C = A / G
    heads = torch.sort(C.sum((1, 2)), descending=True, stable=True).indices[:2].sort().values
    ref = C[heads].mean(0).mean(0)
    for rec in (rec_e, rec_s):
        assert rec["heads"] == heads.tolist()
        assert torch.allclose(torch.tensor(rec["scores"], dtype=torch.float64), ref, rtol=1e-4, atol=1e-6)


def test_constant_correction_over_all_heads_decides_as_v15():
    """With every head a priority head and the floor at sqrt(hd) (G <= sqrt(hd), so the correction is a
    constant), SparseVLM+ keeps exactly the tokens v1.5 keeps (same positions, no recycling)."""
    model = make_llava(layers=8, grid=8)
    x = llava_inputs(model, [(3, 7), (1, 4)])
    common = {"layers": [1, 3], "keep": [20, 9], "recycling": False, "positions": "keep", "record_scores": True}
    out_p, rec_p = run(model, {"name": "sparsevlm_plus", "priority_heads": 4, "gravity_floor": 1.0, **common}, x)
    out_v, rec_v = run(model, {"name": "sparsevlm", **common}, x)
    assert torch.equal(out_p.logits, out_v.logits)
    for rp, rv in zip(rec_p, rec_v):
        for sp, sv in zip(rp["stages"], rv["stages"]):
            assert sp["groups"] == sv["groups"]
            hd = 16
            assert torch.allclose(torch.tensor(sp["scores"]) * math.sqrt(hd), torch.tensor(sv["scores"]), atol=1e-6)


# ---------------------------------------------------------------- LLaVA-1.5-7B-shaped schedules
@pytest.fixture(scope="module")
def llava32():
    return make_llava(layers=32, grid=24)


@pytest.mark.parametrize(
    "preset,traj", [("192", [576, 300, 200, 118]), ("128", [576, 238, 108, 60]), ("64", [576, 66, 34, 20])]
)
def test_plus_presets_on_llava7b_shape(llava32, preset, traj):
    x = llava_inputs(llava32, [(3, 12), (1, 9)])
    _, rec = run(llava32, {"name": "sparsevlm_plus", "preset": preset}, x)
    _, rec2 = run(llava32, {"name": "sparsevlm", "variant": "plus", "preset": preset}, x)
    spans = [(0, 3), (3, 7), (7, 16), (16, 32)]
    n_heads = round(14 * llava32.config.text_config.num_attention_heads / 32)
    for r, r2 in zip(rec, rec2):
        v = r["visual_per_layer"]
        assert [v[a] for a, _ in spans] == traj
        assert all(len(set(v[a:b])) == 1 for a, b in spans)
        assert [s["layer"] for s in r["stages"]] == [3, 7, 16]
        assert all(s["n_merged"] == 0 and len(s["heads"]) == n_heads for s in r["stages"])
        assert r2["visual_per_layer"] == v and [s["heads"] for s in r2["stages"]] == [s["heads"] for s in r["stages"]]


# ---------------------------------------------------------------- batching and decoding
PROMPTS = [(3, 7), (1, 4), (6, 10)]


@pytest.fixture(scope="module")
def llava8():
    return make_llava(layers=8, grid=8)


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "sparsevlm_plus"},
        {"name": "sparsevlm_plus", "budget": "rank_v1", "priority_heads": 1},
        {"name": "sparsevlm", "variant": "plus", "recycling": True, "positions": "repack"},
    ],
)
def test_head_selection_per_sample_equals_batch_of_one(llava8, cfg):
    x = llava_inputs(llava8, PROMPTS)
    out, rec = run(llava8, cfg, x)
    for b in range(len(PROMPTS)):
        o, ra = run(llava8, cfg, alone(x, b))
        assert (o.logits[0, -1] - out.logits[b, -1]).abs().max() < 1e-5
        assert rec[b]["visual_per_layer"] == ra[0]["visual_per_layer"]
        assert [s["heads"] for s in rec[b]["stages"]] == [s["heads"] for s in ra[0]["stages"]]


def test_samples_pick_their_own_heads(llava8):
    """Per-sample choice is visible: in this batch not every sample uses sample 0's heads."""
    x = llava_inputs(llava8, PROMPTS)
    _, rec = run(llava8, {"name": "sparsevlm_plus", "priority_heads": 1}, x)
    heads = [[s["heads"] for s in r["stages"]] for r in rec]
    assert any(h != heads[0] for h in heads[1:]), heads


def test_cached_decode_equals_recompute(llava8):
    assert_cached_decode_equals_recompute(llava8, build("sparsevlm_plus"), llava_inputs(llava8, PROMPTS))


def test_equal_length_batch_without_position_ids_equals_alone(llava8):
    """No padding and no position_ids: the model shares one RoPE table over the batch (batch dim 1)."""
    x = llava_inputs(llava8, [(3, 7), (3, 7)])
    with torch.no_grad(), attach(llava8, build("sparsevlm_plus")):
        out = llava8(**x).logits[:, -1]
        for b in range(2):
            single = llava8(**alone(x, b)).logits[0, -1]
            assert (single - out[b]).abs().max() < 1e-5
