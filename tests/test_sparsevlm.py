"""SparseVLM: raters, DPC-kNN recycling, budgets, schedules on a LLaVA-1.5-7B-shaped random model,
rows-only scores vs eager attentions, batching and cached decoding."""

import math

import pytest
import torch

from framework import ConfigError, attach, build
from framework.clustering import cluster_and_merge, dpc_knn, merge_clusters, scaled_distances
from strategies.sparsevlm import matrix_ranks, rank_keep, scale_layers, select_raters
from tests.tiny import alone, assert_cached_decode_equals_recompute, llava_inputs, make_llava, positions

BUDGETS = [{"budget": "fixed"}, {"budget": "rank_v1"}, {"budget": "rank_paper", "lam": 0.5}]


def equivalent_tokens(rec):
    v = rec["visual_per_layer"]
    return (sum(v[1:]) + v[-1]) / len(v)


def run(model, reducer, x, replay=False):
    with torch.no_grad(), attach(model, reducer, replay=replay) as eng:
        out = model(**x, position_ids=positions(x["attention_mask"]))
    return out, eng.last_record


# ---------------------------------------------------------------- unit tests on hand-built tensors
def test_raters_worked_example():
    # 2 visual tokens, 4 text tokens: logits rows [2,0,0,0] and [0,2,0,0]
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    T = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    e2 = math.exp(2)
    r = [(e2 + 1) / (2 * (e2 + 3))] * 2 + [1 / (e2 + 3)] * 2  # by hand; mean = 1/4
    assert r[0] > 0.25 > r[2]
    assert select_raters(V, T).tolist() == [0, 1]
    # softmax([ln 3, 0, 0]) = [3/5, 1/5, 1/5] -> only token 0 is above the mean 1/3
    V = torch.tensor([[1.0, 0.0]])
    T = torch.tensor([[math.log(3), 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert select_raters(V, T).tolist() == [0]
    # strict: r = [0.5, 0.5] equals its mean exactly -> no rater (">=" would take both)
    assert select_raters(torch.ones(3, 2), torch.ones(2, 2)).tolist() == []


def test_dpc_knn_worked_example():
    # 1-D points (D=1, so distances are plain |x_i - x_j|), C = k = 2.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [8.0]])
    # kNN (self + nearest): mean squared distances 0.5, 0.5, 2, 0.5, 0.5 -> rho = e^-0.5 (x4), e^-2
    # denser = larger rho or equal rho at lower index: delta = [max=8, 1, 2, 6, 1]
    # rho*delta = [8, 1, 2e^1.5... ] -> scores 4.85, 0.61, 0.27, 3.64, 0.61 -> centres {0, 3}
    labels, centres = dpc_knn(x, 2)
    assert centres.tolist() == [0, 3]
    assert labels.tolist() == [0, 0, 0, 1, 1]
    merged, sources, centres = cluster_and_merge(x, 2, merge="mean")
    assert torch.allclose(merged, torch.tensor([[4 / 3], [7.5]]))
    assert [s.tolist() for s in sources] == [[0, 1, 2], [3, 4]]
    merged, _, _ = cluster_and_merge(x, 2, merge="sum")
    assert torch.allclose(merged, torch.tensor([[4.0], [15.0]]))
    # distances are Euclidean / sqrt(D)
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert torch.allclose(scaled_distances(y), torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


def test_dpc_knn_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 20
    truth = torch.arange(3).repeat_interleave(torch.tensor([7, 11, 5]))
    x = centres[truth] + 0.1 * torch.randn(len(truth), 16, generator=g)
    perm = torch.randperm(len(truth), generator=g)
    x, truth = x[perm], truth[perm]
    for assign in ("euclidean", "cosine"):
        labels, c = dpc_knn(x, 3, assign=assign)
        assert len(set(truth[c].tolist())) == 3  # one centre per blob
        for t in range(3):  # the partition matches the blobs (up to renaming)
            assert len(set(labels[truth == t].tolist())) == 1
    labels2, c2 = dpc_knn(x, 3)
    assert torch.equal(labels, labels2) and torch.equal(c, c2)  # deterministic


def test_merge_mean_vs_sum():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    assert torch.equal(merge_clusters(x, labels, 2, "mean"), torch.tensor([[2.0, 3.0], [10.0, 0.0]]))
    assert torch.equal(merge_clusters(x, labels, 2, "sum"), torch.tensor([[4.0, 6.0], [10.0, 0.0]]))
    with pytest.raises(ValueError):
        merge_clusters(x, labels, 2, "max")


def test_rank_v1_keep_from_known_rank():
    g = torch.Generator().manual_seed(0)
    P = torch.rand(6, 3, generator=g) @ torch.rand(3, 40, generator=g)  # rank 3, Nv = 40
    assert rank_keep(P, 13.5, 0) == (39, 3)  # int(40.5) clamped to Nv-1
    assert rank_keep(P, 9, 6) == (33, 3)
    assert rank_keep(P, 0.8, 0) == (2, 3)
    assert rank_keep(P, 0.1, 0) == (1, 3)  # at least one survives
    Q = torch.eye(5) + 0.1  # full rank with Nv = rank = 5: the layer is skipped
    assert rank_keep(Q, 13.5, 0) == (None, 5)


def test_batched_ranks_equal_each_matrix_rank_alone():
    """Zero padding to one shape keeps each matrix's singular values, and each keeps its own tolerance."""
    g = torch.Generator().manual_seed(1)
    mats = []
    for r, n, k in [(6, 40, 3), (2, 9, 2), (12, 30, 12), (1, 5, 1), (7, 7, 4), (9, 64, 9), (3, 40, 1)]:
        a = torch.rand(r, k, generator=g) @ torch.rand(k, n, generator=g)
        mats.append(torch.softmax(a * 4, -1) if r % 2 else a)  # probability rows, as SparseVLM's P
    mats.append(mats[0] * 1e-6)  # a tiny matrix: the tolerance is relative to its own largest value
    want = [int(torch.linalg.matrix_rank(m)) for m in mats]
    assert matrix_ranks(mats) == want
    assert matrix_ranks(mats[:1] * 3) == want[:1] * 3  # equal shapes: stacked


def test_config_and_schedule():
    assert scale_layers([2, 6, 15], 32) == [2, 6, 15]
    assert scale_layers([2, 6, 15], 8) == [1, 2, 4]
    assert scale_layers([2, 6, 15, 19], 8) == [1, 2, 4, 5]
    with pytest.raises(ConfigError):
        build({"name": "sparsevlm", "preset": "100"})
    with pytest.raises(ConfigError):
        build({"name": "sparsevlm", "budget": "rank"})
    with pytest.raises(ConfigError):
        build({"name": "sparsevlm", "budget": "rank_v1", "preset": "96"})
    assert build("sparsevlm").positions == "repack"
    bad = [
        ({"keep": [100, 50]}, "2 counts for 3 pruning layers"),
        ({"layers": [2, 2, 5], "keep": [9, 8, 7]}, "strictly increasing"),
        ({"layers": [-1, 3], "keep": [9, 8]}, "strictly increasing"),
        ({"budget": "rank_v1", "scale": 2.0}, "give both"),
    ]
    for fields, message in bad:
        with pytest.raises(ConfigError, match=message):
            build({"name": "sparsevlm", **fields})


def test_layers_beyond_the_decoder_are_refused_at_attach():
    model = make_llava(layers=4, grid=4)
    with pytest.raises(ConfigError, match="must be <= 2 in this 4-layer decoder"):
        with attach(model, build({"name": "sparsevlm", "layers": [1, 3], "keep": [8, 4]})):
            pass


# ---------------------------------------------------------------- LLaVA-1.5-7B-shaped schedules
@pytest.fixture(scope="module")
def llava32():
    return make_llava(layers=32, grid=24)


@pytest.mark.parametrize(
    "preset,traj,equal",
    [("192", [576, 309, 204, 113], 192.03), ("128", [576, 312, 117, 39], 128.62), ("64", [576, 82, 32, 18], 64.81)],
)
def test_presets_on_llava7b_shape(llava32, preset, traj, equal):
    x = llava_inputs(llava32, [(3, 12), (1, 9)])
    _, rec = run(llava32, build({"name": "sparsevlm", "preset": preset}), x)
    spans = [(0, 3), (3, 7), (7, 16), (16, 32)]
    for b, r in enumerate(rec):
        v = r["visual_per_layer"]
        assert [v[a] for a, _ in spans] == traj
        assert all(len(set(v[a:b])) == 1 for a, b in spans)
        assert equivalent_tokens(r) == pytest.approx(equal, abs=0.01)
        assert [s["layer"] for s in r["stages"]] == [3, 7, 16]
        # merged groups come from deleted tokens and are anchored in them; raters are text after the image
        st = r["stages"][0]
        assert sum(len(g) > 1 for g in st["groups"]) <= st["n_merged"]
        assert len(st["groups"]) == st["visual_after"]
        last_image = int(torch.nonzero(x["input_ids"][b] == llava32.config.image_token_id).max())
        assert st["raters"] and min(st["raters"]) > last_image
    no_rec = {"192": [576, 300, 200, 110], "128": [576, 303, 110, 36], "64": [576, 66, 30, 17]}[preset]
    _, rec = run(llava32, build({"name": "sparsevlm", "preset": preset, "recycling": False}), x)
    assert [rec[0]["visual_per_layer"][a] for a, _ in spans] == no_rec


def test_rows_only_scores_match_eager_attentions():
    x = llava_inputs(make_llava(layers=8, grid=8), [(3, 7), (1, 4)])
    cfg = {"name": "sparsevlm", "record_scores": True}
    sd = make_llava(layers=8, grid=8, attn="sdpa")
    ea = make_llava(layers=8, grid=8, attn="eager")
    _, rec_s = run(sd, build(cfg), x)
    with torch.no_grad(), attach(ea, build(cfg)) as eng:
        out = ea(**x, position_ids=positions(x["attention_mask"]), output_attentions=True)
    rec_e = eng.last_record
    for b in range(2):
        for st_s, st_e in zip(rec_s[b]["stages"], rec_e[b]["stages"]):
            A = out.attentions[st_e["layer"] - 1][b].float().mean(0)  # the pruning layer's own map
            ref = A[st_e["rater_slots"]][:, st_e["visual_slots"]].mean(0)
            assert torch.allclose(torch.tensor(st_e["scores"]), ref, atol=1e-6, rtol=0)
            assert torch.allclose(torch.tensor(st_s["scores"]), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- batching and decoding
@pytest.fixture(scope="module")
def llava8():
    return make_llava(layers=8, grid=8)


PROMPTS = [(3, 7), (1, 4), (6, 10)]


@pytest.mark.parametrize(
    "cfg",
    BUDGETS
    + [
        {"budget": "fixed", "raters": "all_text", "merge": "sum", "assign": "cosine"},
        {"budget": "fixed", "raters": "last_token", "positions": "keep"},
        {"budget": "fixed", "raters": "all_tokens", "recycling": False},
    ],
)
def test_batch_equals_alone(llava8, cfg):
    x = llava_inputs(llava8, PROMPTS)
    out, rec = run(llava8, build({"name": "sparsevlm", **cfg}), x)
    for b in range(len(PROMPTS)):
        xa = alone(x, b)
        o, ra = run(llava8, build({"name": "sparsevlm", **cfg}), xa)
        assert (o.logits[0, -1] - out.logits[b, -1]).abs().max() < 1e-5
        assert rec[b]["visual_per_layer"] == ra[0]["visual_per_layer"]
        # raters are LM-input indices: shift by this sample's left padding
        pad = int((x["attention_mask"][b] == 0).sum())
        assert [[i - pad for i in s["raters"]] for s in rec[b]["stages"]] == [s["raters"] for s in ra[0]["stages"]]
    if cfg["budget"] != "fixed":
        assert all("rank" in s for s in rec[0]["stages"])


@pytest.mark.parametrize("cfg", BUDGETS + [{"budget": "fixed", "positions": "keep"}])
def test_cached_decode_equals_recompute(llava8, cfg):
    assert_cached_decode_equals_recompute(llava8, build({"name": "sparsevlm", **cfg}), llava_inputs(llava8, PROMPTS))


def test_scaled_presets_and_explicit_fields(llava8):
    x = llava_inputs(llava8, PROMPTS[:1])
    # 8 layers, 64 visual tokens: layers [2,6,15] -> [1,2,4]; keeps 300/200/110 * 64/576 -> 33/22/12
    _, rec = run(llava8, build({"name": "sparsevlm", "recycling": False}), x)
    assert rec[0]["visual_per_layer"] == [64, 64, 33, 22, 22, 12, 12, 12]
    _, rec = run(llava8, build({"name": "sparsevlm", "layers": [1, 3], "keep": [10, 5], "recycling": False}), x)
    assert rec[0]["visual_per_layer"] == [64, 64, 10, 10, 5, 5, 5, 5]
    # rank_v1 with explicit scale/bias: keep = int(0 * rank + 7) = 7 at the first layer, then Nv-1
    _, rec = run(
        llava8, build({"name": "sparsevlm", "budget": "rank_v1", "scale": 0.0, "bias": 7.0, "recycling": False}), x
    )
    assert rec[0]["visual_per_layer"][:4] == [64, 64, 7, 6]


def test_rater_fallback_is_recorded():
    """A prompt that ends with the image has no text raters: the last prompt token rates, and the record says so."""
    model = make_llava(layers=4)
    x = llava_inputs(model, [(3, 0), (2, 4)])
    with torch.no_grad(), attach(model, build({"name": "sparsevlm", "layers": [1], "keep": [4]})) as engine:
        model(**x)
    flags = [s["stages"][0]["rater_fallback"] for s in engine.last_record]
    assert flags == [True, False]
    # raters=last_token: the same fallback when the last prompt token is visual (once refused as "a rater
    # token is no longer in the sequence"); otherwise the last text token rates alone
    strategy = {"name": "sparsevlm", "layers": [1], "keep": [4], "raters": "last_token"}
    with torch.no_grad(), attach(model, build(strategy)) as engine:
        model(**x)
    stages = [s["stages"][0] for s in engine.last_record]
    assert [st["rater_fallback"] for st in stages] == [True, False]
    assert stages[1]["raters"] == [int(x["input_ids"].shape[1]) - 1] and stages[1]["n_raters"] == 1


def test_scores_average_the_heads_of_the_gathered_columns_as_the_official_code():
    """P = the rater rows' probabilities at the visual columns, averaged over heads in that order (the
    official code's): with 32 heads a float32 mean over all columns then a gather can differ by an ulp,
    which can reorder near-tied scores."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    B, H, R, L = 2, 32, 5, 640
    probs = torch.rand(B, H, R, L, generator=g).softmax(-1)
    vis = [torch.arange(9, 586), torch.arange(20, 597)]  # 577 columns each, at different offsets
    ctx = SimpleNamespace(batch_size=B, visual=vis)
    rows = [torch.arange(R), torch.arange(R)]
    P, scores = build("sparsevlm")._scores(ctx, rows, probs, [{}, {}])
    for b in range(B):
        want = probs[b][:, :, vis[b]].mean(0)
        assert torch.equal(P[b], want) and torch.equal(scores[b], want.mean(0))
