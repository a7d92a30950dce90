"""Host-device synchronisations: the counter itself, and a prefill's count not growing with the batch.

On a GPU each sync drains the queue, so a reduction that reads a value per sample (or per token) stalls
the prefill that many times. The counter sees the same calls on the CPU, so these checks run anywhere.
"""

import pytest
import torch

from framework import attach, build
from framework.backbones import adapter_for
from framework.syncs import SyncCounter
from tests.tiny import llava_inputs, make_llava, positions


def test_counter_counts_host_reads_and_data_dependent_shapes():
    t = torch.arange(6)
    with SyncCounter(sites=True) as syncs:
        int(t[0])
        bool((t > 2).any())
        t.tolist()
        t.cpu()
        torch.nonzero(t)
        t[t > 2]  # boolean-mask indexing runs a nonzero
        torch.repeat_interleave(t, t)  # the output size is read from the data
        torch.bincount(t)
        t.unique()
    assert syncs.count == 9
    assert sum(syncs.sites.values()) == 9 and all("test_syncs.py" in s for s in syncs.sites)


def test_counter_counts_copies_between_host_and_device_that_wait():
    """The meta device stands in for a GPU: a blocking host -> device copy waits for the queue, a
    non-blocking one does not; host -> host copies are free."""
    t = torch.arange(6)
    with SyncCounter() as syncs:
        t.to("meta")
        torch.empty(6, device="meta").copy_(t)
    assert syncs.count == 2
    with SyncCounter() as syncs:
        t.to("meta", non_blocking=True)
        t.clone().to(torch.float64)
        torch.empty(6, dtype=torch.long).copy_(t)
    assert syncs.count == 0


def test_counter_counts_the_copies_hidden_in_factories_and_host_indices():
    """`torch.tensor` / `as_tensor` / `new_tensor` of host data on a device, and a device tensor indexed by a
    Python list or a (non-scalar) host tensor, copy to the device and wait; on the host, or from device data,
    they do not. Each is one sync (a factory's own copy is not counted again)."""
    d, h = torch.zeros(5, device="meta"), torch.zeros(5)
    waits = [
        lambda: torch.tensor([1, 2], device="meta"),
        lambda: torch.as_tensor(h, device="meta"),
        lambda: torch.as_tensor([1, 2], device=torch.device("meta")),
        lambda: d.new_tensor([0]),
        lambda: h.new_tensor([0], device="meta"),
        lambda: d[[0, 1]],
        lambda: d[None][:, [0, 1]],
        lambda: d[torch.tensor([0, 1])],
        lambda: d.__setitem__([0, 1], 1.0),
    ]
    free = [
        lambda: torch.tensor([1, 2]),
        lambda: torch.tensor([], device="meta"),  # nothing to copy (a transformers cache layer's start)
        lambda: torch.tensor([[], []], device="meta"),
        lambda: torch.as_tensor(d, device="meta"),
        lambda: torch.as_tensor(d),
        lambda: h.new_tensor([0]),
        lambda: d[1:3],
        lambda: d[1],
        lambda: d[torch.zeros(2, dtype=torch.long, device="meta")],
        lambda: h[[0, 1]],
        lambda: d[None][0, 1],  # basic indexing
        lambda: d.index_put_([torch.zeros(2, dtype=torch.long, device="meta")], torch.ones(2, device="meta")),
    ]
    for i, f in enumerate(waits + free):
        with SyncCounter() as syncs:
            f()
        assert syncs.count == (i < len(waits)), i
    with torch.device("meta"), SyncCounter() as syncs:  # the default device receives host data too
        torch.tensor([1, 2])
    assert syncs.count == 1
    with SyncCounter() as syncs:  # a host bool mask: one sync (its nonzero), not a second for a copy
        d[torch.tensor([True, False, True, False, True])]
    assert syncs.count == 1


def test_counter_counts_ops_that_are_not_views():
    t = torch.arange(12)
    with SyncCounter() as c:
        t.view(3, 4)
        t[2:]
        t.reshape(2, 6).T
        t + 1
        t.index_select(0, torch.tensor([1, 2]))
        t.sum()
    assert c.ops == 3  # add, index_select, sum (a factory such as torch.tensor copies below the dispatcher)


def test_counter_ignores_static_shapes_and_host_arrays():
    t = torch.arange(6)
    with SyncCounter() as syncs:
        torch.nonzero_static(t, size=5)
        torch.repeat_interleave(t, t, output_size=15)
        t[torch.tensor([0, 2])]
        t.sort()
        (t + 1).sum()
        t.numpy().sum()  # a host tensor's array: only its `.cpu()` (none here) would copy
    assert syncs.count == 0


CONFIGS = [
    {"name": "none"},
    {"name": "fastv"},
    {"name": "pdrop", "layers": [2, 4, 6]},
    {"name": "sparsevlm", "layers": [1, 3, 5], "keep": [30, 12, 6]},  # recycling with several clusters
    {"name": "sparsevlm", "raters": "all_tokens", "layers": [1, 3], "keep": [30, 12]},
    {"name": "sparsevlm", "budget": "rank_v1", "layers": [1, 3], "scale": 2.0, "bias": 4.0},
    {"name": "sparsevlm", "budget": "rank_paper", "layers": [1, 3], "lam": 0.5},
    {"name": "sparsevlm_plus", "layers": [1, 3], "keep": [30, 12]},
    {"name": "random", "keep": 20},
    {"name": "visionzip", "dominant": 12, "contextual": 4},
    {"name": "tome", "keep": 20},
    {"name": "divprune", "keep": 20},
    {"name": "cdpruner", "keep": 20},
]


def _prefill_syncs(model, cfg: dict, prompts) -> int:
    x = llava_inputs(model, prompts)
    with torch.no_grad(), attach(model, build(dict(cfg))):
        model(**x, position_ids=positions(x["attention_mask"]))  # warm-up: lazy set-up is not per prefill
        with SyncCounter() as syncs:
            model(**x, position_ids=positions(x["attention_mask"]))
    return syncs.count


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_prefill_syncs_do_not_grow_with_the_batch(cfg):
    """The engine and these strategies read the host a fixed number of times per prefill: batch 4 (equal
    prompt lengths, different content) syncs exactly as often as batch 1."""
    model = make_llava(layers=8, grid=8)
    one = _prefill_syncs(model, cfg, [(3, 7)])
    four = _prefill_syncs(model, cfg, [(3, 7)] * 4)
    assert four == one, f"{cfg['name']}: {one} syncs at batch 1, {four} at batch 4"
    assert one <= 30


def _engine_ops(model, prompts) -> int:
    """The non-view ops (GPU launches) attaching the engine with no reduction adds to a stock prefill."""
    x = llava_inputs(model, prompts)
    kw = {**x, "position_ids": positions(x["attention_mask"])}
    with torch.no_grad():
        with SyncCounter() as stock:
            model(**kw)
        with attach(model, build("none")):
            model(**kw)
            with SyncCounter() as attached:
                model(**kw)
    return attached.ops - stock.ops


def test_the_engine_adds_as_many_ops_at_any_batch():
    """Reading the prompt (visual positions, spans, grids, the identity members) and the stage hooks run
    once for the batch: with no reduction the engine adds the same ops to batch 4 as to batch 1."""
    model = make_llava(layers=8, grid=8)
    assert _engine_ops(model, [(3, 7)] * 4) == _engine_ops(model, [(3, 7)])


@pytest.mark.parametrize(
    "one, three",
    [
        ({"name": "pdrop", "layers": [2]}, {"name": "pdrop", "layers": [2, 4, 6]}),
        (
            {"name": "sparsevlm", "layers": [1], "keep": [30]},
            {"name": "sparsevlm", "layers": [1, 3, 5], "keep": [30, 12, 6]},
        ),
        (
            {"name": "sparsevlm_plus", "layers": [1], "keep": [30]},
            {"name": "sparsevlm_plus", "layers": [1, 3, 5], "keep": [30, 12, 6]},
        ),
        (
            {"name": "sparsevlm", "raters": "all_tokens", "layers": [1], "keep": [30], "record_scores": True},
            {
                "name": "sparsevlm",
                "raters": "all_tokens",
                "layers": [1, 3, 5],
                "keep": [30, 12, 6],
                "record_scores": True,
            },
        ),
    ],
    ids=["pdrop", "sparsevlm", "sparsevlm_plus", "sparsevlm_all_tokens_scores"],
)
def test_decisions_do_not_wait_for_the_device(one, three):
    """A decision (scores, recycling, applying it, its record and checks) reads nothing on the host: three
    decision layers sync exactly as often as one, at batch 1 and 3 (the checks and records are read once,
    when the prefill's last layer starts)."""
    model = make_llava(layers=8, grid=8)
    for prompts in ([(3, 7)], [(3, 7)] * 3):
        assert _prefill_syncs(model, three, prompts) == _prefill_syncs(model, one, prompts)


def test_fetch_reads_tensors_of_any_dtype_and_layout_in_one_copy():
    from framework.checks import fetch

    a = torch.arange(12).reshape(3, 4)
    parts = [
        a,
        a.T,
        a[:, 1],
        torch.rand(2, 3) > 0.5,
        torch.tensor(2.5),
        torch.randn(3).bfloat16(),
        torch.tensor([7], dtype=torch.int8),
        torch.arange(10)[::2][:1],  # one element, stride 2
        torch.arange(10.0)[::5],
    ]
    with SyncCounter() as syncs:
        host = fetch(parts)
    assert syncs.count == 1
    for t, h in zip(parts, host):
        want = t.float() if t.dtype == torch.bfloat16 else t
        assert (
            h.shape == tuple(t.shape) and h.tolist() == want.tolist() and str(h.dtype) == str(want.dtype).split(".")[1]
        )


def _added_syncs(model, cfg: dict, samples: list[dict]) -> int:
    """Syncs a prefill with the engine attached makes beyond the stock model's on the same batch."""
    from tests.tiny_backbones import collate, forward_kwargs

    x = collate(samples)
    kw = {**x, **forward_kwargs(model, x)}

    def fresh() -> dict:  # a new prompt each time: nothing read for an earlier one is reused
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}

    with torch.no_grad():
        model(**fresh())
        with SyncCounter() as stock:
            model(**fresh())
        with attach(model, build(dict(cfg))):
            model(**fresh())
            with SyncCounter() as reduced:
                model(**fresh())
    return reduced.count - stock.count


ANY_BACKBONE = [
    {"name": "none"},
    {"name": "fastv", "keep": 0.5},
    {"name": "sparsevlm", "layers": [1, 2], "keep": [30, 12], "positions": "keep"},
    {"name": "pooling", "keep": 4},
    {"name": "tome", "placement": "projector", "keep": 0.5},
]
VISIONZIP = {"name": "visionzip", "dominant": 6, "contextual": 2}


@pytest.mark.parametrize(
    "name, cfg",
    [(n, c) for n in ("llava_next", "qwen2_vl", "qwen2_5_vl") for c in ANY_BACKBONE]
    + [("llava_next", VISIONZIP), ("qwen2_vl", VISIONZIP), ("qwen2_5_vl", VISIONZIP)],
    ids=lambda v: v if isinstance(v, str) else v["name"],
)
def test_adapters_read_a_prompt_in_a_fixed_number_of_syncs(name, cfg):
    """Reading the prompt (image sizes, layouts, spans, grids) and reducing it adds as many syncs to the stock
    model's at batch 3 (three different layouts) as at batch 1 (the stock model's own per-image reads aside)."""
    from tests.tiny_backbones import BACKBONES

    make, examples = BACKBONES[name]
    model = make(layers=4)
    samples = examples(model)
    assert _added_syncs(model, cfg, samples) == _added_syncs(model, cfg, samples[:1])


@pytest.mark.parametrize("name, reads", [("llava", 1), ("llava_next", 2), ("qwen2_vl", 2), ("qwen2_5_vl", 2)])
def test_adapters_read_a_prompt_once(name, reads):
    """An adapter's checks, spans and grids of one prompt share one host copy of each thing they read (LLaVA:
    the image-token counts; Qwen: the ids and the image grids; LLaVA-NeXT: the image sizes and the image-token
    counts); a new prompt, or the same tensor edited in place, is read again."""
    from tests.tiny_backbones import ALL_BACKBONES, collate, forward_kwargs

    make, examples = ALL_BACKBONES[name]
    model = make(layers=4)
    x = collate(examples(model))
    kw = {k: v for k, v in {**x, **forward_kwargs(model, x)}.items() if k != "input_ids"}
    adapter = adapter_for(model)
    ids = x["input_ids"]
    with SyncCounter() as syncs:
        adapter.check_inputs(ids, kw)
        adapter.visual_spans(ids, kw, adapter.visual_mask(ids, kw))
        adapter.visual_grids(ids, kw)
    assert syncs.count == reads
    before = adapter.visual_spans(ids, kw, adapter.visual_mask(ids, kw))
    b, first = (before >= 0).nonzero()[0].tolist()
    ids[b, first] = 0  # no longer an image token: this prompt has one image token too few
    with pytest.raises(Exception, match="consecutive|fewer|more|image tokens"):
        adapter.check_inputs(ids, kw)


def test_llava_next_reads_generates_encoded_prompt_once():
    """Under `generate` LLaVA-NeXT's forward gets the images pre-encoded (no image sizes): the newline
    layouts come from the features, and the checks, spans and grids share one host copy of them (and one
    of the image-token counts)."""
    from tests.tiny_backbones import BACKBONES, collate

    make, examples = BACKBONES["llava_next"]
    model = make(layers=4)
    x = collate(examples(model))
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    with torch.no_grad():
        model.generate(**x, max_new_tokens=1, do_sample=False)
    hook.remove()
    ids, kw = seen[0]["input_ids"], {k: v for k, v in seen[0].items() if k != "input_ids"}
    assert kw.get("image_sizes") is None and kw.get("mm_encoder_outputs") is not None  # the generate form
    adapter = adapter_for(model)
    with SyncCounter() as syncs:
        adapter.check_inputs(ids, kw)
        adapter.visual_spans(ids, kw, adapter.visual_mask(ids, kw))
        adapter.visual_grids(ids, kw)
    assert syncs.count == 2


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_adapters_read_once_in_inference_mode(name):
    """Inference tensors have no version counter: the prompt read once per forward works under
    torch.inference_mode (forward and generate, whose own slices are inference tensors) and gives what
    no_grad gives; the next forward reads its own prompt."""
    from tests.tiny_backbones import ALL_BACKBONES, collate, forward_kwargs

    make, examples = ALL_BACKBONES[name]
    model = make(layers=4)
    samples = examples(model)
    gen = dict(max_new_tokens=2, do_sample=False)
    outs = {}
    for mode in (torch.no_grad, torch.inference_mode):
        with mode(), attach(model, build({"name": "fastv", "keep": 0.5})):
            got = []
            for batch in (samples, samples[1:]):  # a second prompt after the first
                x = collate(batch)
                got += [model(**x, **forward_kwargs(model, x)).logits[:, -1], model.generate(**x, **gen)]
            outs[mode] = got
    assert all(torch.equal(a, b) for a, b in zip(outs[torch.no_grad], outs[torch.inference_mode]))
