"""Backbone adapters on tiny random LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL (and multi-image LLaVA-1.5).

identity == stock exactly; none/random/fastv at batch 1 and on a left-padded batch (batch == alone,
cached == no-cache recompute, exact counts); Qwen keep-mode positions equal the original 3-D ones;
repack refused on M-RoPE; video and multi-image prompts with per-span budgets; loading resolution.
"""

from __future__ import annotations

import pytest
import torch

from framework import ConfigError, attach, build
from models import adapter_for, available_backbones
from models.loading import FAMILIES, load, resolve_family, resolve_family_from_name
from tests import tiny_backbones as tb

TOL = 1e-5
GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
_MODELS: dict = {}


def model_for(name: str, attn: str = "sdpa"):
    if (name, attn) not in _MODELS:
        make = tb.ALL_BACKBONES[name][0]
        m = make(attn=attn)
        if name == "llava":
            m.generation_config.suppress_tokens = [tb.IMAGE_TOKEN]
        _MODELS[name, attn] = m
    return _MODELS[name, attn]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def spans_of(model, x, b):
    """Input span id of each input visual token of sample b (plain-forward kwargs)."""
    ad = adapter_for(model)
    vis = ad.visual_mask(x["input_ids"], x) & x["attention_mask"].bool()
    return ad.visual_spans(x["input_ids"], x, vis)[b][vis[b]]


def kept_per_span(model, x, rec, b) -> list[int]:
    span = spans_of(model, x, b)
    kept = torch.tensor(rec[b]["stages"][-1]["kept"], dtype=torch.long)
    return torch.bincount(span[kept], minlength=int(span.max()) + 1).tolist()


# ------------------------------------------------------------------------------- registry
def test_available_backbones_and_stages():
    av = available_backbones()
    assert {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"} <= set(av)
    assert av["llava_next"].stages == ("vision", "projector", "llm")  # CLIP per AnyRes crop
    assert av["qwen2_vl"].stages == av["qwen2_5_vl"].stages == ("projector", "llm")
    assert av["qwen2_vl"].supports_repack is False
    for name in ("llava_next", "qwen2_vl", "qwen2_5_vl"):
        assert isinstance(adapter_for(model_for(name)), av[name])


# ------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_identity_is_stock(name, attn):
    m = model_for(name, attn)
    x = tb.collate(tb.ALL_BACKBONES[name][1](m))
    fw = tb.forward_kwargs(m, x)
    ref, gref = m(**x, **fw).logits, m.generate(**x, **GEN)
    with attach(m, build("none")):
        out, g = m(**x, **fw).logits, m.generate(**x, **GEN)
    assert torch.equal(ref, out)
    assert torch.equal(gref.sequences, g.sequences) and max_diff(gref.logits, g.logits) == 0.0


# ------------------------------------------------------------------------------- strategies
SPECS = [
    ({"name": "none"}, lambda n: n),
    ({"name": "random", "layer": 0, "keep": 0.5}, lambda n: round(n * 0.5)),
    ({"name": "random", "layer": 2, "keep": 3}, lambda n: 3),
    ({"name": "fastv", "layer": 2, "keep": 0.5}, lambda n: round(n * 0.5)),
    ({"name": "fastv", "layer": 1, "keep": 0.25, "budget_scope": "per_span"}, lambda n: round(n * 0.25)),
]


@pytest.mark.parametrize(
    "spec,count", SPECS, ids=[f"{s['name']}-{s.get('layer', '')}-{s.get('keep', '')}" for s, _ in SPECS]
)
@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_strategy_on_backbone(name, spec, count):
    m = model_for(name)
    samples = tb.ALL_BACKBONES[name][1](m)
    x = tb.collate(samples)
    r = build(spec)
    layer = spec.get("layer", 0)
    with attach(m, r) as eng:
        # batch 1
        g1 = m.generate(**tb.collate([samples[0]]), **GEN)
        assert g1.sequences.shape[0] == 1
        # padded batch == alone
        out = m(**x, **tb.forward_kwargs(m, x)).logits[:, -1]
        rec = eng.last_record
        for b in range(3):
            n = rec[b]["n_visual_input"]
            want = [n] * layer + [count(n)] * (m.config.text_config.num_hidden_layers - layer)
            assert rec[b]["visual_per_layer"] == (want if spec["name"] != "none" else [n] * len(want))
            alone = m(**tb.split_batch(m, x, b)).logits[:, -1]
            torch.testing.assert_close(alone[0], out[b], atol=TOL, rtol=0)
        g = m.generate(**x, **GEN)
    with attach(m, r, replay=True):
        g2 = m.generate(**x, **GEN, use_cache=False)
    assert torch.equal(g.sequences, g2.sequences)
    assert max_diff(g.logits, g2.logits) < TOL


# ------------------------------------------------------------------------------- Qwen positions
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("layer", [0, 2])
@torch.no_grad()
def test_qwen_keep_mode_keeps_3d_positions(name, layer):
    m = model_for(name)
    x = tb.collate(tb.qwen_examples(m))
    pos3, _ = m.model.get_rope_index(
        x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"], attention_mask=x["attention_mask"]
    )
    lm = m.model.language_model
    cos_ref, sin_ref = lm.rotary_emb(torch.zeros(1, 1, 64), pos3)  # the stock (B, L, hd) M-RoPE cos/sin
    seen = {}
    K = max(layer, 1) if layer else 1

    def grab(mod, args, kwargs):
        seen["cos"], seen["sin"] = kwargs["position_embeddings"]
        seen["len"] = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]

    with attach(m, build({"name": "random", "layer": layer, "keep": 0.5})) as eng:
        h = lm.layers[K if layer else 0].register_forward_pre_hook(grab, with_kwargs=True)  # after the engine's
        try:
            m(**x)
        finally:
            h.remove()
        rec = eng.last_record
    L = x["input_ids"].shape[1]
    assert seen["len"] < L
    for b in range(3):
        valid = x["attention_mask"][b].bool()
        vis = torch.nonzero((x["input_ids"][b] == tb.IMAGE_TOKEN) & valid).flatten()
        kept_vis = vis[torch.tensor(rec[b]["stages"][0]["kept"])]
        keep = valid.clone()
        keep[vis] = False
        keep[kept_vis] = True
        idx = torch.nonzero(keep).flatten()
        n = idx.numel()
        got_cos, got_sin = seen["cos"][b, -n:], seen["sin"][b, -n:]  # left-padded with empty slots
        assert torch.equal(got_cos, cos_ref[b, idx]) and torch.equal(got_sin, sin_ref[b, idx])
        # the kept visual tokens really carry distinct H/W positions (not a 1-D ramp)
        assert pos3[1:, b, kept_vis].unique(dim=1).shape[1] == kept_vis.numel()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_repack_is_refused(name):
    m = model_for(name)
    for spec in ({"name": "fastv", "positions": "repack"}, {"name": "random", "layer": 0, "positions": "repack"}):
        with pytest.raises(ConfigError, match="repack"):
            with attach(m, build(spec)):
                pass
    assert not m.model.language_model.layers[0]._forward_pre_hooks  # nothing left attached


# ------------------------------------------------------------------------------- video / multi-image
def _video_batch(m):
    return [
        tb.qwen_video_sample(m, frames=3, seed=0),
        tb.qwen_sample(m, [("text", 1), ("video", (2, 4, 8)), ("text", 3)], seed=1),
    ]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_qwen_video_frames_are_spans(name):
    m = model_for(name)
    samples = _video_batch(m)
    x = tb.collate(samples)
    assert spans_of(m, x, 0).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert spans_of(m, x, 1).tolist() == [0] * 8 + [1] * 8
    whole = type(adapter_for(m))(m, video_span="video")
    vis = whole.visual_mask(x["input_ids"], x)
    assert whole.visual_spans(x["input_ids"], x, vis)[0][vis[0]].tolist() == [0] * 12

    r = build({"name": "fastv", "layer": 2, "keep": 2, "budget_scope": "per_span"})
    with attach(m, r) as eng:
        out = m(**x).logits[:, -1]
        rec = eng.last_record
        assert kept_per_span(m, x, rec, 0) == [2, 2, 2]
        assert kept_per_span(m, x, rec, 1) == [2, 2]
        for b in range(2):
            torch.testing.assert_close(m(**tb.split_batch(m, x, b)).logits[0, -1], out[b], atol=TOL, rtol=0)
        g = m.generate(**x, **GEN)  # generate passes no grids: frames come from the temporal positions
        assert [s["visual_per_layer"][-1] for s in eng.last_record] == [6, 4]
        assert kept_per_span(m, x, eng.last_record, 0) == [2, 2, 2]
    with attach(m, r, replay=True):
        g2 = m.generate(**x, **GEN, use_cache=False)
    assert torch.equal(g.sequences, g2.sequences) and max_diff(g.logits, g2.logits) < TOL

    with attach(m, build({"name": "fastv", "layer": 2, "keep": 5})) as eng:  # global budget over all frames
        m(**x)
        assert [s["visual_per_layer"][-1] for s in eng.last_record] == [5, 5]


def _two_image(name, m):
    if name == "llava_next":
        return [
            tb.llava_next_sample(m, 2, 3, ((70, 90), (56, 56)), seed=0),
            tb.llava_next_sample(m, 1, 2, ((100, 50), (60, 60)), seed=1),
        ]
    if name == "llava":
        return [tb.llava_frames_sample(m, 2, 3, 3, seed=0), tb.llava_frames_sample(m, 1, 2, 2, seed=1, between=0)]
    return [
        tb.qwen_two_image_sample(m, seed=0),
        tb.qwen_sample(m, [("image", (1, 8, 8)), ("text", 1), ("image", (1, 4, 4)), ("text", 2)], seed=1),
    ]


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_multi_image_per_span_budgets(name):
    m = model_for(name)
    samples = _two_image(name, m)
    x = tb.collate(samples)
    fw = tb.forward_kwargs(m, x)
    sizes = [torch.bincount(spans_of(m, x, b)).tolist() for b in range(2)]
    assert all(len(s) >= 2 for s in sizes)
    if name == "llava":  # frames are cut by the fixed count even when adjacent (sample 1: no text between)
        assert sizes == [[16, 16, 16], [16, 16]]
    for keep, per in ((0.5, lambda n: round(n * 0.5)), (2, lambda n: 2)):
        r = build({"name": "fastv", "layer": 2, "keep": keep, "budget_scope": "per_span"})
        with attach(m, r) as eng:
            out = m(**x, **fw).logits[:, -1]
            rec = eng.last_record
            for b in range(2):
                assert kept_per_span(m, x, rec, b) == [per(n) for n in sizes[b]]
                alone = m(**tb.split_batch(m, x, b)).logits[0, -1]
                torch.testing.assert_close(alone, out[b], atol=TOL, rtol=0)
            g = m.generate(**x, **GEN)
            for b in range(2):  # generate (pre-encoded images) finds the same spans
                assert kept_per_span(m, x, eng.last_record, b) == [per(n) for n in sizes[b]]
        with attach(m, r, replay=True):
            g2 = m.generate(**x, **GEN, use_cache=False)
        assert torch.equal(g.sequences, g2.sequences) and max_diff(g.logits, g2.logits) < TOL


def _has_sparsevlm() -> bool:
    from framework.registry import available

    return "sparsevlm" in available()


@pytest.mark.skipif(not _has_sparsevlm(), reason="strategies/sparsevlm.py not available")
@pytest.mark.parametrize("prompt", ["video", "two_image"])
@pytest.mark.parametrize("name", ["qwen2_vl", "llava_next", "llava"])
@torch.no_grad()
def test_sparsevlm_on_video_and_multi_image(name, prompt):
    if prompt == "video" and name != "qwen2_vl":
        samples = (
            _two_image(name, model_for(name))
            if name == "llava_next"
            else [tb.llava_frames_sample(model_for(name), 2, 4, 3, seed=2)]
        )
    else:
        samples = _video_batch(model_for(name)) if prompt == "video" else _two_image(name, model_for(name))
    m = model_for(name)
    x = tb.collate(samples)
    positions = "keep" if name.startswith("qwen") else "repack"
    for recycling in (False, True):
        r = build({"name": "sparsevlm", "layers": [1], "keep": [6], "recycling": recycling, "positions": positions})
        with attach(m, r) as eng:
            g = m.generate(**x, **GEN)
            for s in eng.last_record:
                assert s["visual_per_layer"][:2] == [s["n_visual_input"]] * 2
                if not recycling:
                    assert s["visual_per_layer"][2:] == [6, 6]
        with attach(m, r, replay=True):
            g2 = m.generate(**x, **GEN, use_cache=False)
        assert torch.equal(g.sequences, g2.sequences) and max_diff(g.logits, g2.logits) < TOL


# ------------------------------------------------------------------------------- LLaVA-NeXT specifics
@torch.no_grad()
def test_llava_next_layout_and_newline_modes():
    m = model_for("llava_next")
    ad = adapter_for(m)
    lay = ad.image_layout((70, 90))  # 2x1 crops of 56 -> 8x4 grid per crop; unpadded; + newline per row
    assert lay.numel() == 70 and int(lay.sum()) == 6 and bool(lay[-1])
    assert ad.image_layout((56, 56)).numel() == 16 + 16 + 4  # base + 4x4 crop + 4 newlines
    x = tb.collate(tb.llava_next_examples(m))
    # counts agree with the model's own packing
    feats = m.model.get_image_features(x["pixel_values"], x["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == [int(ad.image_layout(s).numel()) for s in x["image_sizes"]]
    nl = ad.newline_mask(x["input_ids"], x)
    keep_nl = type(ad)(m, newline="keep")
    with attach(m, build({"name": "fastv", "layer": 2, "keep": 4}), adapter=keep_nl) as eng:
        m(**x, **tb.forward_kwargs(m, x))
        for b, s in enumerate(eng.last_record):
            n_img = int((x["input_ids"][b] == tb.IMAGE_TOKEN).sum())
            assert s["n_visual_input"] == n_img - int(nl[b].sum())
            assert s["tokens_per_layer"][-1] == s["tokens_per_layer"][0] - (s["n_visual_input"] - 4)
    with pytest.raises(ConfigError, match="newline"):
        type(ad)(m, newline="drop")


def test_input_mismatch_is_a_config_error():
    m = model_for("qwen2_vl")
    x = tb.collate(tb.qwen_examples(m))
    bad = dict(x, image_grid_thw=x["image_grid_thw"][:2])
    with attach(m, build("fastv")), pytest.raises(ConfigError, match="qwen2_vl"):
        m(**bad)
    m2 = model_for("llava_next")
    x2 = tb.collate(tb.llava_next_examples(m2))
    with attach(m2, build("fastv")), pytest.raises(ConfigError, match="llava_next"):
        m2(**dict(x2, image_sizes=x2["image_sizes"].flip(0)))


# ------------------------------------------------------------------------------- loading
def test_family_resolution_without_downloads(tmp_path):
    assert resolve_family_from_name("llava-hf/llava-1.5-7b-hf") == "llava"
    assert resolve_family_from_name("llava-hf/llava-v1.6-mistral-7b-hf") == "llava_next"
    assert resolve_family_from_name("Qwen/Qwen2-VL-2B-Instruct") == "qwen2_vl"
    assert resolve_family_from_name("Qwen/Qwen2.5-VL-3B-Instruct") == "qwen2_5_vl"
    assert resolve_family_from_name("some/unknown-model") is None
    assert resolve_family(family="qwen2_vl") == "qwen2_vl"
    with pytest.raises(ConfigError, match="unknown backbone family"):
        resolve_family(family="gpt2")
    for name in FAMILIES:
        m = model_for(name)
        assert resolve_family(config=m.config) == name
        assert FAMILIES[name].model_class == type(m).__name__
    with pytest.raises(ConfigError, match="cannot tell"):
        resolve_family(str(tmp_path / "nothing-here"))


@torch.no_grad()
def test_load_local_checkpoint(tmp_path):
    m = model_for("qwen2_vl")
    m.save_pretrained(tmp_path / "a-misleading-llava-name")
    model, adapter, proc = load(str(tmp_path / "a-misleading-llava-name"), dtype=torch.float32, processor=False)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and adapter.family == "qwen2_vl"
    assert proc is None
    x = tb.collate(tb.qwen_examples(m))
    torch.testing.assert_close(model(**x).logits, m(**x).logits, atol=1e-6, rtol=0)


def test_adapter_options_pass_through_and_unknown_ones_are_refused():
    nxt = adapter_for(model_for("llava_next"), newline="keep")
    assert nxt.newline == "keep"
    assert adapter_for(model_for("qwen2_vl"), video_span="video").video_span == "video"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['newline'\]; allowed: \['video_span'\]"):
        adapter_for(model_for("qwen2_vl"), newline="text")
    with pytest.raises(ConfigError, match="newline='nope'; allowed"):
        adapter_for(model_for("llava_next"), newline="nope")
