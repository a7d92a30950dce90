"""The engine on tiny random LLaVA: identity == stock, rows-only attention, cache/decode, batching."""

from dataclasses import dataclass

import pytest
import torch

from framework import ConfigError, Decision, TokenReducer, attach, build, register
from framework.accounting import account
from framework.context import Slots, StageContext
from tests.tiny import alone, llava_inputs, make_llava, positions

PROMPTS = [(3, 5), (1, 2), (6, 8)]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return make_llava(layers=4, attn=request.param)


@register("test_per_sample")
@dataclass
class KeepFirstK(TokenReducer):
    """Test reducer: a sample keeps its first 2 + n_text // 3 visual tokens (counts differ per prompt)."""

    layer: int = 2

    def decision_layers(self):
        return [self.layer]

    def decide(self, ctx: StageContext):
        return [Decision(keep=torch.arange(2 + len(ctx.text[b]) // 3)) for b in range(ctx.batch_size)]


@pytest.mark.parametrize("batch", [PROMPTS[:1], PROMPTS])
def test_identity_equals_stock(model, batch):
    x = llava_inputs(model, batch)
    with torch.no_grad():
        ref = model(**x, position_ids=positions(x["attention_mask"])).logits
        ref_gen = model.generate(**x, max_new_tokens=4, do_sample=False)
        with attach(model, build("none")):
            out = model(**x, position_ids=positions(x["attention_mask"])).logits
            gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert torch.equal(ref, out)
    assert torch.equal(ref_gen, gen)


def test_rows_only_attention_equals_eager_rows():
    model = make_llava(layers=3, attn="eager")
    x = llava_inputs(model, PROMPTS)
    captured = {}

    @register("test_capture_rows")
    @dataclass
    class Capture(TokenReducer):
        """Test reducer: records the attention rows of every text slot, keeps everything."""

        def decision_layers(self):
            return [2]

        def decide(self, ctx):
            rows = [torch.cat([ctx.visual[b][:3], ctx.text[b]]) for b in range(ctx.batch_size)]
            captured["rows"] = rows
            captured["probs"] = ctx.attention(rows)
            captured["index"] = ctx.slots.index.clone()
            return [Decision(keep=torch.arange(ctx.n_visual(b))) for b in range(ctx.batch_size)]

    with torch.no_grad():
        ref = model(**x, position_ids=positions(x["attention_mask"]), output_attentions=True).attentions[1]
        with attach(model, Capture()):
            model(**x, position_ids=positions(x["attention_mask"]))
    for b, (rows, probs) in enumerate(zip(captured["rows"], captured["probs"])):
        full = ref[b][:, captured["index"][b][rows]][..., captured["index"][b]]
        valid = x["attention_mask"][b].bool()
        assert torch.allclose(probs[..., valid], full[..., valid].float(), atol=1e-6)
        assert probs[..., ~valid].abs().max() == 0 if (~valid).any() else True


@pytest.mark.parametrize("positions_mode", ["keep", "repack"])
@pytest.mark.parametrize(
    "reducer",
    [
        {"name": "fastv", "layer": 2, "keep": 5},
        {"name": "test_per_sample"},
        {"name": "random", "layer": 1, "keep": 0.5, "seed": 3},
    ],
)
def test_cached_decode_equals_no_cache_recompute(model, reducer, positions_mode):
    x = llava_inputs(model, PROMPTS)
    r = build({**reducer, "positions": positions_mode})
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        with attach(model, r) as engine:
            cached = model.generate(**x, **kw)
            assert len(engine.records) == 1 and all(s["stages"] for s in engine.last_record)
        with attach(model, r, replay=True) as engine:
            recomputed = model.generate(**x, use_cache=False, **kw)
            assert len(engine.records) == 4  # one full recompute per generated token
        unreduced = model.generate(**x, **kw)
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(cached.logits, unreduced.logits))
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        assert torch.allclose(a, b, atol=1e-5)


def test_per_layer_cache_lengths_and_keep_positions():
    model = make_llava(layers=4)
    x = llava_inputs(model, PROMPTS[:1])
    L = x["input_ids"].shape[1]
    seen = {}
    with torch.no_grad(), attach(model, build({"name": "fastv", "layer": 2, "keep": 6})) as engine:

        def spy(i):
            def hook(module, args, kwargs):
                seen.setdefault(i, kwargs["position_embeddings"])

            return hook

        hooks = [
            model.model.language_model.layers[i].register_forward_pre_hook(spy(i), with_kwargs=True) for i in (0, 3)
        ]
        out = model.generate(**x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        for h in hooks:
            h.remove()
        stage = engine.last_record[0]["stages"][0]
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    lens = [cache.layers[i].get_seq_length() for i in range(4)]
    new = 2  # the last generated token is not fed back
    assert lens == [L + new, L + new, L - 10 + new, L - 10 + new]
    n_vis, first_visual = 16, 4  # tests.tiny prompt (3, 5): [bos, 3 words, 16 image, 5 words]
    kept = torch.tensor(stage["kept"]) + first_visual
    slots = torch.cat([torch.arange(first_visual), kept, torch.arange(first_visual + n_vis, L)])
    for t in (0, 1):
        assert torch.equal(seen[3][t][0], seen[0][t][0, slots])


def test_batch_equals_alone_with_different_counts(model):
    x = llava_inputs(model, PROMPTS)
    pos = positions(x["attention_mask"])
    with torch.no_grad(), attach(model, build("test_per_sample")) as engine:
        batch = model(**x, position_ids=pos).logits[:, -1]
        counts = [s["visual_per_layer"] for s in engine.last_record]
        for b in range(3):
            single = model(**alone(x, b)).logits[:, -1]
            assert torch.allclose(single[0], batch[b], atol=1e-5)
    assert [c[-1] for c in counts] == [3, 2, 4]
    assert counts[0] == [16, 16, 3, 3]


def test_projector_drop_equals_stock_on_shortened_input():
    model = make_llava(layers=3)
    x = llava_inputs(model, PROMPTS[:1])
    r = build({"name": "random", "layer": 0, "keep": 6, "seed": 1})
    with torch.no_grad():
        with attach(model, r) as engine:
            pruned = model(**x).logits[:, -1]
        kept = engine.last_record[0]["stages"][0]["kept"]
        embeds = model.model.get_input_embeddings()(x["input_ids"])
        feats = model.model.get_image_features(pixel_values=x["pixel_values"])
        feats = torch.cat(list(feats.pooler_output if hasattr(feats, "pooler_output") else feats))
        is_img = x["input_ids"][0] == model.config.image_token_id
        embeds[0, is_img] = feats.to(embeds.dtype)
        vis_pos = torch.nonzero(is_img).flatten()
        keep_pos = torch.cat([torch.nonzero(~is_img).flatten(), vis_pos[kept]]).sort().values
        ref = model(
            inputs_embeds=embeds[:, keep_pos],
            position_ids=keep_pos[None],
            attention_mask=torch.ones(1, len(keep_pos), dtype=torch.long),
        ).logits[:, -1]
    assert len(kept) == 6
    assert torch.allclose(pruned, ref, atol=1e-6)


def test_accounting_counts_tokens_per_layer():
    model = make_llava(layers=4)
    x = llava_inputs(model, PROMPTS)
    with torch.no_grad(), attach(model, build({"name": "fastv", "layer": 2, "keep": 4})) as engine:
        model(**x, position_ids=positions(x["attention_mask"]))
        acc = account(engine)
    n_text = [1 + pre + post for pre, post in PROMPTS]
    for a, t in zip(acc, n_text):
        assert a.visual_per_layer == [16, 16, 4, 4]
        assert a.tokens_per_layer == [16 + t, 16 + t, 4 + t, 4 + t]
        assert a.equivalent_tokens == (16 + 4 + 4 + 4) / 4
        assert a.flops == sum(4 * n * 64**2 + 2 * n * n * 64 + 3 * n * 64 * 128 for n in a.tokens_per_layer)


@pytest.mark.parametrize("positions_mode", ["keep", "repack"])
def test_manual_decode_loop_after_projector_reduction(positions_mode):
    """A plain forward loop (no position_ids) decodes at the right positions after a projector drop."""
    model = make_llava(layers=3)
    x = llava_inputs(model, PROMPTS[:1])
    r = build({"name": "random", "layer": 0, "keep": 6, "seed": 2, "positions": positions_mode})
    with torch.no_grad(), attach(model, r, replay=True):
        out = model(**x, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        cached = model(
            input_ids=nxt,
            cache=out.past_key_values,
            attention_mask=torch.ones(1, x["input_ids"].shape[1] + 1, dtype=torch.long),
        ).logits[:, -1]
        full = {
            **x,
            "input_ids": torch.cat([x["input_ids"], nxt], 1),
            "attention_mask": torch.ones(1, x["input_ids"].shape[1] + 1, dtype=torch.long),
        }
        recomputed = model(**full).logits[:, -1]
    # keep: the recompute numbers the prompt 0..L-1 and the new token L; repack: both renumber 0..L'
    assert torch.allclose(cached, recomputed, atol=1e-5)


def test_slots_last_slots_text_mask_and_counts():
    """Batched slot queries: the last valid slot (left or right padding), the text after each sample's last
    visual token (all valid text without visual tokens), and the host counts."""
    valid = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    visual = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    slots = Slots(index=torch.arange(6).expand(3, 6), valid=valid, visual=visual, members=[])
    assert slots.last_slots().tolist() == [5, 3, 2]
    assert [torch.nonzero(m).flatten().tolist() for m in slots.text_mask()] == [[4, 5], [2, 3], [0, 1, 2]]
    assert slots.counts() == ([5, 4, 3], [2, 1, 0]) and not slots.all_valid()


@dataclass
class BadAtSecond(TokenReducer):
    """Test reducer: fine at its first decision; at its second, sample 1 keeps token 0 twice (`repeat`) or
    a tensor check that fails (`check`)."""

    fault: str = "repeat"

    def decision_layers(self):
        return [1, 2]

    def decide(self, ctx: StageContext):
        n = [ctx.n_visual(b) for b in range(ctx.batch_size)]
        out = [
            Decision(keep=torch.arange(n[b] - 1), record={"tensor": torch.arange(3) * ctx.layer}) for b in range(len(n))
        ]
        if ctx.layer == 2 and self.fault == "repeat":
            out[1] = Decision(keep=torch.tensor([0, 0, 1]))
        if ctx.layer == 2 and self.fault == "check":
            ctx.check(ctx.hidden.isnan().any(), "bad_at_second: the hidden states hold no NaN")
        return out


@pytest.mark.parametrize("fault", ["repeat", "range"])
@pytest.mark.parametrize(
    "second", [{"name": "sparsevlm", "layers": [2], "keep": [5]}, {"name": "dart", "layer": 3, "keep": 4}]
)
def test_a_faulty_decision_raises_its_own_error_after_later_decisions(fault, second):
    """A faulty keep is repaired until the checks are read, so the decisions after it (SparseVLM's rows-only
    attention, DART's pivots) run on consistent slots and the error raised is the faulty decision's."""

    @dataclass
    class Faulty(TokenReducer):
        def decision_layers(self):
            return [1]

        def decide(self, ctx):
            out = []
            for b in range(ctx.batch_size):
                keep = torch.arange(ctx.n_visual(b) - 2)
                if b == 0:
                    keep[1] = keep[2] if fault == "repeat" else ctx.n_visual(b) + 3
                out.append(Decision(keep=keep))
            return out

    model = make_llava(layers=6)
    x = llava_inputs(model, PROMPTS)
    words = "keeps a visual token twice" if fault == "repeat" else "keeps indices outside 0..15"
    chain = build({"name": "chain", "reducers": [Faulty(), {**second, "positions": "keep"}]})
    with torch.no_grad(), attach(model, chain) as engine:
        with pytest.raises(ConfigError, match=f"sample 0 {words}"):
            model(**x, position_ids=positions(x["attention_mask"]))
    assert all(isinstance(s["kept"], list) and "_members" not in s for s in engine.last_record[0]["stages"])


def test_checks_wait_for_the_end_of_the_prefill_and_name_what_is_wrong():
    """Checks of device values do not stop the host at the decision: the prefill runs on (on clamped
    indices) and the error, with its own message, comes when the checks are read with the records at the
    last layer; no error, and the records' tensors are lists then."""
    model = make_llava(layers=4)
    x = llava_inputs(model, PROMPTS)
    kw = {**x, "position_ids": positions(x["attention_mask"])}
    with torch.no_grad():
        with attach(model, BadAtSecond(fault="repeat")):
            with pytest.raises(ConfigError, match="sample 1 keeps a visual token twice"):
                model(**kw)
        with attach(model, BadAtSecond(fault="check")):
            with pytest.raises(RuntimeError, match="bad_at_second: the hidden states hold no NaN"):
                model(**kw)
        with attach(model, BadAtSecond(fault="none")) as engine:
            model(**kw)
    stages = engine.last_record[0]["stages"]
    assert [s["tensor"] for s in stages] == [[0, 1, 2], [0, 2, 4]]
    assert [s["visual_after"] for s in stages] == [15, 14] and stages[1]["kept"] == list(range(14))
