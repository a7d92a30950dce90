"""The shared strategy matrix: every registered strategy x every backbone factory in BACKBONES.

For each (backbone, strategy, case): generation works at batch 1 and on a left-padded batch of 3;
batched last-token logits equal each sample run alone (pad columns removed); cached decode equals a
no-cache recompute under replayed decisions; and the visual-token counts per decoder layer equal the
configured budget (tests/strategy_defaults.py). A strategy a backbone cannot host faithfully must refuse
with a ConfigError that says why (REFUSED in tests/strategy_defaults.py); nothing is skipped. To add a
backbone, append a `Backbone` to BACKBONES.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from framework import ConfigError, attach, build
from framework.registry import available
from models import adapter_for
from tests.strategy_defaults import backbone_check, backbone_expect, cases, refused
from tests.tiny import alone, llava_inputs, make_llava, positions

TOL = 1e-5
NEW_TOKENS = 3


@dataclass
class Backbone:
    name: str
    make: Callable[[], torch.nn.Module]
    batch: Callable[[torch.nn.Module], dict]  # a left-padded batch of 3: input_ids, attention_mask, pixels...
    single: Callable[[torch.nn.Module], dict]  # one unpadded sample
    alone: Callable[[dict, int], dict]  # sample b of `batch`, unpadded
    # extra kwargs for a plain forward on `batch` (Llama-style: generate's left-padding positions)
    forward_kw: Callable[[torch.nn.Module, dict], dict] = lambda m, x: {"position_ids": positions(x["attention_mask"])}


BACKBONES = [
    Backbone(
        "llava",
        lambda: make_llava(),
        lambda m: llava_inputs(m, [(3, 5), (1, 2), (6, 8)]),
        lambda m: llava_inputs(m, [(2, 4)], seed=1),
        alone,
    ),
]


def _tiny_backbone(name: str) -> Backbone:
    """LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL factories from tests/tiny_backbones.py."""
    from tests import tiny_backbones as tb

    make, examples = tb.BACKBONES[name]
    cache: dict = {}

    def batch(m):
        cache[id(m)] = examples(m)
        return tb.collate(cache[id(m)])

    return Backbone(
        name,
        make,
        batch,
        lambda m: tb.collate([examples(m, seed=1)[0]]),
        lambda x, b: tb.split_batch(_MODELS[name], x, b),
        tb.forward_kwargs,
    )


BACKBONES += [_tiny_backbone(n) for n in ("llava_next", "qwen2_vl", "qwen2_5_vl")]

_MODELS: dict[str, torch.nn.Module] = {}


def _model(bb: Backbone):
    if bb.name not in _MODELS:
        _MODELS[bb.name] = bb.make()
    return _MODELS[bb.name]


PARAMS = [
    pytest.param(bb, name, i, id=f"{bb.name}-{name}-{i}")
    for bb in BACKBONES
    for name in available()
    for i in range(len(cases(name)))
]


def _n_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _n_visual(x: dict, b: int, model) -> int:
    return int((x["input_ids"][b] == model.config.image_token_id).sum())


def _check_counts(eng, x, model, expect, n_layers, check=None):
    for b, rec in enumerate(eng.last_record):
        if check is not None:  # data-dependent counts (e.g. LLaVA-NeXT crops losing patches to unpadding)
            check(rec, n_layers)
            continue
        want = expect(_n_visual(x, b, model), n_layers)
        assert rec["visual_per_layer"] == want, (b, rec["visual_per_layer"], want)


@pytest.mark.parametrize("bb,name,case", PARAMS)
@torch.no_grad()
def test_matrix(bb: Backbone, name: str, case: int):
    kwargs, expect = cases(name)[case]
    model = _model(bb)
    reducer = build({"name": name, **kwargs})
    adapter = adapter_for(model)
    if reducer.positions == "repack" and not getattr(adapter, "supports_repack", True):
        reducer = build({"name": name, **kwargs, "positions": "keep"})  # M-RoPE: repack is refused
    refusal = refused(bb.name, name, case)
    if refusal is not None:  # a documented refusal: a clear ConfigError at attach, the stock model left behind
        n_hooks = _n_hooks(model)
        with pytest.raises(ConfigError, match=refusal):
            with attach(model, reducer):
                pass
        assert _n_hooks(model) == n_hooks
        return
    expect = backbone_expect(bb.name, name, case) or expect
    check = backbone_check(bb.name, name, case)
    n_layers = model.config.text_config.num_hidden_layers
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)

    # batch 1: generation works and counts match
    x1 = bb.single(model)
    with attach(model, reducer) as eng:
        g = model.generate(**x1, **gen)
        assert g.sequences.shape[1] == x1["input_ids"].shape[1] + NEW_TOKENS
        if expect is not None or check is not None:
            _check_counts(eng, x1, model, expect, n_layers, check)

    # left-padded batch of 3 == each sample alone
    x = bb.batch(model)
    with attach(model, reducer) as eng:
        out = model(**x, **bb.forward_kw(model, x)).logits[:, -1]
        if expect is not None or check is not None:
            _check_counts(eng, x, model, expect, n_layers, check)
        for b in range(out.shape[0]):
            o = model(**bb.alone(x, b)).logits[:, -1]
            torch.testing.assert_close(o[0], out[b], atol=TOL, rtol=0, msg=f"sample {b}: batch != alone")
        g = model.generate(**x, **gen)
        assert g.sequences.shape == (3, x["input_ids"].shape[1] + NEW_TOKENS)

    # cached decode == no-cache recompute under the same (replayed) decisions
    with attach(model, reducer, replay=True):
        g2 = model.generate(**x, **gen, use_cache=False)
    assert torch.equal(g.sequences, g2.sequences)
    for a, c in zip(g.logits, g2.logits):
        torch.testing.assert_close(a, c, atol=TOL, rtol=0)
