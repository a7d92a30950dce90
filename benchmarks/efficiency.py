"""Efficiency of every strategy at the paper's budgets, as ratios to no reduction measured in the same run.

Random-weight stock backbones (`models.random`), sdpa:
  * `llava15`   LLaVA-1.5-7B shapes: Llama 32 x 4096, FFN 11008, 32 heads; CLIP-L/336 (24 x 1024, 24x24
                patches) -> 576 visual tokens; 64 non-visual tokens (BOS, 8 before the image, 55 after); bf16.
  * `llavanext` LLaVA-NeXT-7B shapes: the same decoder and tower, AnyRes on a 672x672 image (base view +
                2x2 crops: 2,880 patch tokens + 48 row newlines = 2,928 visual tokens); bf16.
  * `small`     CPU: Llama 32 x 256, FFN 688, 4 heads (LLaVA-1.5's depth, so the papers' layer schedules apply
                unscaled); a 1-layer CLIP with 24x24 patches (576 visual); fp32.
  * `tiny`, `tinynext`  tests: Llama 4 x 64; LLaVA with 6x6 patches (36 visual), LLaVA-NeXT with 4x4 patches
                on a 112x112 image (base view + 2x2 crops + newlines); fp32.

On the CPU the host allocator keeps freed memory (`--host-allocator keep`, the default;
`experiments.metrics.keep_freed_host_memory`): with glibc's defaults every forward page-faults its
activations afresh, ~15 % of the small shape's prefill on this machine, varying from run to run.

`--dtype` overrides the shape's dtype (float16 for a GPU without bfloat16); the table says which it used.

Budgets are the paper's 192 / 128 / 64 of LLaVA-1.5's 576 tokens, scaled to the shape's visual tokens
(2,928 -> 976 / 651 / 325); each strategy maps a budget to its own fields (v1.5 presets for SparseVLM).

Per shape and batch size, for none and every strategy x budget:
  * prefill latency: one forward (`logits_to_keep=1`, vision tower included) timed with CUDA events on a
    GPU (thread CPU time on a 1-thread CPU), after a warm-up, median of `--repeats` (`--batch-repeats` at
    batch sizes > 1), interleaved with no reduction (none, run, none, run, ...), whose median is that row's
    baseline (decode likewise);
  * in the same runs, the decoder-stack latency (the language model's forward: the scope of the paper's
    FLOPs formula) and the strategy's own work (time inside its `begin` / `decide`, rows-only attention
    and recycling included); on a GPU these are CUDA events read after the forward, so no extra sync;
  * in the same alternation, the stock floor: the stock model (no engine) dropping tokens as the row does,
    each decoder layer's input cut to the row's token count at that layer (`ideal_pruning`): what a reducer
    that costs nothing would take. The gap between latency and FLOPs splits into what the shape costs
    beyond FLOPs (the stock model's own fixed per-layer work) and what the reduction adds on top of it;
  * what attaching the engine costs: no reduction's first runs are interleaved with the stock model (no
    engine, `attached(model, None)`): its prefill, decoder and decode latency as ratios to the stock
    model's, and both prefills' syncs and ops (the none row's `engine_*`, `engine_*_ratio`, `stock_*`; the
    none row's own `prefill_ms` etc. are then the median over every row's pairing, as every ratio's base);
  * decode: median ms per new token of greedy `generate` with the KV cache appended in place
    (`framework.cache.GrowingCache`; `--cache dynamic`: transformers' DynamicCache), and decode
    throughput (new tokens / s);
  * KV cache: MiB of every token every layer holds (accounting), and the paper's convention (MB = 1e6
    bytes of the visual tokens alone); peak memory over one prefill; prefill TFLOPs (paper formula, and
    with its attention term halved as causal kernels compute it);
  * every one also as a ratio to none; batch throughput at the same per-sample budget (batch sizes > 1
    at `--batch-budgets`); SparseVLM's figures against the issue's targets (`efficiency_table.targets`).

Writes `benchmarks/results/efficiency_<device>.{md,json}` (device name, versions, the exact command) after
every row (a run killed half-way keeps what it measured, marked incomplete); all shapes run at batch 1
before any larger batch, and `--stop-after SECONDS` starts no new row after that time, so a run cut short
keeps what it measured (and says so). The time is shared between the groups (batch size, shape): the batch-1
groups may use `--batch1-share` of it (0.6), the larger batches the rest, each group handing what it leaves
to the next, so that a slower device than expected thins every group instead of losing the last ones;
SparseVLM's rows, whose figures the targets are about, run first in every group and heed only the whole
run's limit (no whole GPU run has been timed yet).

  python -m benchmarks.efficiency --device cpu --shapes small         # CPU table, 8-9 min on 1 core
  python -m benchmarks.efficiency --device cpu --shapes llava15 --batches 1 --repeats 3 --new-tokens 3
      --decode-repeats 1   # the 7B shape on a CPU with bf16 matrix units (AMX): ~13 s per unreduced
                           # prefill, ~1 h for every row (one command line)
  bash benchmarks/device_run.sh --device cuda --stop-after 420 --profile none,fastv:192,sparsevlm:192 \
      --out $OUT/efficiency_cuda 2>&1 | tee $OUT/efficiency_cuda.log
                                       # GPU table: llava15 + llavanext, batches 1/8/32, <= 7 min; then
                                       # profiles of three prefills (kernels, device busy share)
On the lent H200 neither this package (whose entry points register the built-in strategies: a bare
`PYTHONPATH=.` finds none) nor transformers 5.24 is installed (it has 5.17), and nothing can be downloaded.
`benchmarks/device_run.sh` installs the carried wheels offline into a private folder, writes the package's
entry points there (from pyproject.toml: nothing is built) and runs this module. Here, first:
`echo /.whl/ >> .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12
transformers==5.24.0 -d .whl`, and carry `.whl` (its requirements are met there: huggingface-hub 1.33,
tokenizers 0.23, safetensors 0.8, and the others as 5.17 needs them). Copy the files written under $OUT to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from experiments import metrics  # noqa: E402
from framework import attach, build  # noqa: E402
from framework.accounting import account  # noqa: E402
from framework.backbones import adapter_for  # noqa: E402
from framework.budget import REFERENCE_VISUAL_TOKENS, apply_budget  # noqa: E402
from framework.cache import GrowingCache  # noqa: E402
from framework.syncs import SyncCounter  # noqa: E402
from models.random import random_backbone  # noqa: E402

from .efficiency_table import batch_scaling, targets, to_markdown  # noqa: E402

STRATEGIES = ("fastv", "pdrop", "visionzip", "dart", "divprune", "sparsevlm", "sparsevlm_plus", "cdpruner")
PRIORITY = "sparsevlm"  # the targets' strategy: measured first in every group, whatever the time left
BUDGETS = (192, 128, 64)
RESULTS = Path(__file__).resolve().parent / "results"
_CLIP_L = {"hidden": 1024, "ffn": 4096, "layers": 24, "heads": 16, "patch": 14, "grid": 24}
_VICUNA_7B = {"hidden": 4096, "ffn": 11008, "layers": 32, "heads": 32, "vocab": 32064}
SHAPES = {
    "llava15": {"family": "llava", "text": _VICUNA_7B, "vision": _CLIP_L, "dtype": "bfloat16"},
    "llavanext": {
        "family": "llava_next",
        "text": _VICUNA_7B,
        "vision": _CLIP_L,
        "dtype": "bfloat16",
        "image_size": (672, 672),
    },
    "small": {
        "family": "llava",
        "text": {"hidden": 256, "ffn": 688, "layers": 32, "heads": 4, "vocab": 1024},
        "vision": {"hidden": 32, "ffn": 64, "layers": 1, "heads": 2, "patch": 14, "grid": 24},
        "dtype": "float32",
    },
    "tiny": {
        "family": "llava",
        "text": {"hidden": 64, "ffn": 128, "layers": 4, "heads": 4, "vocab": 256},
        "vision": {"hidden": 16, "ffn": 32, "layers": 1, "heads": 2, "patch": 14, "grid": 6},
        "dtype": "float32",
    },
    "tinynext": {
        "family": "llava_next",
        "text": {"hidden": 64, "ffn": 128, "layers": 4, "heads": 4, "vocab": 256},
        "vision": {"hidden": 16, "ffn": 32, "layers": 1, "heads": 2, "patch": 14, "grid": 4},
        "dtype": "float32",
        "image_size": (112, 112),
    },
}
TEXT_TOKENS = 64  # BOS + 8 before the image + 55 after: the paper's ~64 text tokens


# ---------------------------------------------------------------------------------------- model and inputs
DTYPES = ("bfloat16", "float16", "float32")


def build_model(name: str, device: str, dtype: str | None = None):
    """The shape's random-weight model on the device, in `dtype` (default: the shape's)."""
    s = SHAPES[name]
    shape = {"text": s["text"], "vision": s["vision"]}
    dtype = getattr(torch, dtype or s["dtype"])
    with torch.device(device):  # initialise on the device: a 7B model's random init on the CPU takes minutes
        model = random_backbone(s["family"], shape, attn="sdpa", dtype=dtype, seed=0)
    return model


def image_tokens(model, name: str) -> int:
    """Visual tokens of one image of the shape (LLaVA-NeXT: base view + unpadded crops + newlines)."""
    if SHAPES[name]["family"] == "llava_next":
        from models.llava_next import LlavaNextAdapter

        return int(LlavaNextAdapter(model).image_layout(SHAPES[name]["image_size"]).numel())
    return int(model.config.image_seq_length)


def make_inputs(model, name: str, batch: int, seed: int = 0) -> dict:
    """[BOS, 8 text, image, 55 text] per sample, random ids and pixels, on the model's device."""
    cfg = model.config
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    n_img = image_tokens(model, name)
    text = torch.randint(3, cfg.text_config.vocab_size - 8, (batch, TEXT_TOKENS - 1), generator=g)
    ids = torch.cat(
        [
            torch.ones(batch, 1, dtype=torch.long),
            text[:, :8],
            torch.full((batch, n_img), cfg.image_token_id),
            text[:, 8:],
        ],
        1,
    )
    side = cfg.vision_config.image_size
    out = {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}
    if SHAPES[name]["family"] == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = list(SHAPES[name]["image_size"])
        crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, side)
        out["pixel_values"] = torch.randn(batch, crops, 3, side, side, generator=g).to(dev, model.dtype)
        out["image_sizes"] = torch.tensor([size] * batch, device=dev)
    else:
        out["pixel_values"] = torch.randn(batch, 3, side, side, generator=g).to(dev, model.dtype)
    return out


def scaled_budget(budget: int, n_visual: int) -> int:
    return max(1, round(budget * n_visual / REFERENCE_VISUAL_TOKENS))


STRATEGY_CONF = Path(__file__).resolve().parents[1] / "experiments" / "conf" / "strategy"


def strategy_fields(strategy: str, budget: int, n_visual: int) -> dict:
    """The strategy's configured fields (its `experiments/conf/strategy` YAML, as `sparsevlm bench` uses) with
    `budget` of `n_visual` tokens applied. Plain YAML: no Hydra / OmegaConf needed where this runs."""
    import yaml

    path = STRATEGY_CONF / f"{strategy}.yaml"
    node = yaml.safe_load(path.read_text()) if path.exists() else strategy
    return apply_budget(node, budget, n_visual)[0]


def reducer_for(strategy: str, budget: int | None, n_visual: int):
    if strategy == "none":
        return build("none")
    return build(strategy_fields(strategy, scaled_budget(budget, n_visual), n_visual))


# ---------------------------------------------------------------------------------------- clocks
class Clock:
    """CUDA events on a GPU; on the CPU thread CPU time when torch runs one intra-op thread (all the work is
    on this thread, and time spent waiting for a core on a shared machine does not count), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        self.name = (
            "CUDA events"
            if self.cuda
            else ("thread CPU time (1 thread)" if self.cpu_clock is time.thread_time else "wall time")
        )

    def stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return self.cpu_clock()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


class _Stamps:
    """A `generate` streamer stamping the prompt and every new token with the clock."""

    def __init__(self, clock: Clock):
        self.clock, self.stamps = clock, []

    def put(self, value) -> None:
        self.stamps.append(self.clock.stamp())

    def end(self) -> None:
        pass


class _Span:
    """Clock intervals `open()` ... `close()`, any number of times; `seconds` sums them once the run is over
    (reading a CUDA event's time waits for it, so nothing is read while the forward runs)."""

    def __init__(self, clock: Clock):
        self.clock, self.stamps = clock, []

    def open(self, *_) -> None:
        self.stamps.append(self.clock.stamp())

    def close(self, *_) -> None:
        self.stamps.append(self.clock.stamp())

    @property
    def seconds(self) -> float:
        return sum(self.clock.seconds(a, b) for a, b in zip(self.stamps[::2], self.stamps[1::2]))


def attached(model, reducer):
    """`attach(model, reducer)`; reducer None: the stock model, no engine (what attaching costs is measured
    against it)."""
    return contextlib.nullcontext() if reducer is None else attach(model, reducer)


@torch.no_grad()
def prefill_seconds(model, reducer, inputs, clock: Clock) -> tuple[float, float, float]:
    """One prefill forward: (whole, decoder stack, the strategy's own work) seconds, all from the same run.
    The decoder stack is the language model's forward from its first pre-hook to its return (the engine's
    hooks and the strategy's work inside it): the scope of the paper's FLOPs formula. The own work is the
    time inside the reducer's `begin` / `decide` (rows-only attention and recycling included). On a GPU
    these are CUDA events in stream order, so measuring them adds no synchronisation. reducer None: the
    stock model (no engine, no own work)."""
    whole, dec, own = _Span(clock), _Span(clock), _Span(clock)
    timed_methods = ("begin", "decide") if reducer is not None else ()
    with attached(model, reducer):
        lm = adapter_for(model).language_model
        handles = [lm.register_forward_pre_hook(dec.open, prepend=True), lm.register_forward_hook(dec.close)]
        for name in timed_methods:
            orig = getattr(reducer, name)

            def timed(ctx, _orig=orig):
                own.open()
                try:
                    return _orig(ctx)
                finally:
                    own.close()

            setattr(reducer, name, timed)
        try:
            whole.open()
            model(**inputs, logits_to_keep=1)
            whole.close()
        finally:
            for h in handles:
                h.remove()
            for name in timed_methods:
                reducer.__dict__.pop(name, None)  # the instance attribute shadowed the class method
    return whole.seconds, dec.seconds, own.seconds


@torch.no_grad()
def decode_seconds(model, reducer, inputs, new_tokens: int, clock: Clock, cache: str = "growing") -> float:
    """Median seconds between consecutive new tokens of one greedy `generate` (the prefill excluded), with the
    in-place KV cache (`framework.cache.GrowingCache`, cache="growing") or transformers' `DynamicCache`;
    reducer None: the stock model."""
    st = _Stamps(clock)
    with attached(model, reducer):
        model.generate(
            **inputs,
            generation_config=metrics._generation_config(model, new_tokens),
            streamer=st,
            cache=GrowingCache() if cache == "growing" else None,
        )
    s = st.stamps[1:]  # [0] = the prompt, [1] = the first new token (after the prefill)
    return statistics.median(clock.seconds(a, b) for a, b in zip(s, s[1:]))


@torch.no_grad()
def prefill_syncs(model, reducer, inputs) -> tuple[int, int]:
    """Host-device synchronisation points in one prefill (`framework.syncs.SyncCounter`): on a GPU each one
    drains the queue, so the host's launch time of the ops after it is no longer hidden; and the prefill's
    non-view ops (kernel launches on a GPU, at most: what a launch-bound prefill pays for). reducer None:
    the stock model."""
    with attached(model, reducer):
        with SyncCounter() as syncs:
            model(**inputs, logits_to_keep=1)
    return syncs.count, syncs.ops


@torch.no_grad()
def peak_mb(model, reducer, inputs) -> float | None:
    with attach(model, reducer):
        return metrics.peak_memory_mb(model, {**inputs, "logits_to_keep": 1})


@torch.no_grad()
def accounting(model, reducer, inputs) -> dict:
    """Prefill TFLOPs, KV cache (MiB of all tokens; MB = 1e6 bytes of visual tokens, the paper's convention)
    and equivalent tokens, summed / averaged over the samples of the batch."""
    with attach(model, reducer) as engine:
        model(**inputs, logits_to_keep=1)
        acc = account(engine)
        shape = engine.adapter.shape()
    per_token = 2 * shape["kv_heads"] * shape["head_dim"] * next(model.parameters()).element_size()
    d, m = shape["hidden"], shape["ffn"]
    causal = sum(4 * n * d * d + n * n * d + 3 * n * d * m for a in acc for n in a.tokens_per_layer)
    return {
        "tflops": sum(a.flops for a in acc) * 1e-12,
        # the paper's formula with the attention term halved, as causal kernels compute it
        "tflops_causal": causal * 1e-12,
        "kv_mib": sum(a.kv_bytes for a in acc) / 2**20,
        "kv_visual_mb": sum(per_token * sum(a.visual_per_layer) for a in acc) / 1e6,
        "equivalent_tokens": statistics.fmean(a.equivalent_tokens for a in acc),
        # tokens entering each decoder layer, the mean over the samples (what the stock floor cuts to)
        "tokens_per_layer": [statistics.fmean(n) for n in zip(*(a.tokens_per_layer for a in acc))],
    }


def _median(xs) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------- stock floor
def _prefix(t, n: int, dims: tuple[int, ...]):
    """t cut to its first n entries along `dims` (t unchanged when it is not a tensor)."""
    if not torch.is_tensor(t):
        return t
    for d in dims:
        t = t.narrow(d, 0, min(n, t.shape[d]))
    return t


@contextlib.contextmanager
def ideal_pruning(model, tokens_per_layer: list[float]):
    """The stock model (no engine) made to drop tokens as a row does: the language model's input and each
    decoder layer's input are cut to that layer's token count (the mean over the samples, rounded), with the
    position embeddings, positions and mask cut alike; nothing else runs. Its decoder time is what a reducer
    that costs nothing would take at the row's tokens per layer: the stock floor."""
    adapter = adapter_for(model)
    counts = [max(1, round(n)) for n in tokens_per_layer]

    def lm_hook(module, args, kwargs):
        n = counts[0]
        kw = dict(kwargs)
        kw["inputs_embeds"] = _prefix(kw.get("inputs_embeds"), n, (1,))
        kw["attention_mask"] = _prefix(kw.get("attention_mask"), n, (-1,))
        kw["position_ids"] = _prefix(kw.get("position_ids"), n, (-1,))
        return args, kw

    def layer_hook(i: int):
        def hook(module, args, kwargs):
            n = counts[i]
            kw = dict(kwargs)
            if "position_embeddings" in kw:
                kw["position_embeddings"] = tuple(_prefix(t, n, (1,)) for t in kw["position_embeddings"])
            kw["position_ids"] = _prefix(kw.get("position_ids"), n, (-1,))
            kw["attention_mask"] = _prefix(kw.get("attention_mask"), n, (-2, -1))
            if args:
                return (_prefix(args[0], n, (1,)), *args[1:]), kw
            kw["hidden_states"] = _prefix(kw["hidden_states"], n, (1,))
            return args, kw

        return hook

    handles = [adapter.language_model.register_forward_pre_hook(lm_hook, with_kwargs=True)]
    handles += [
        layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------- one row
def measure(
    model,
    reducer,
    inputs,
    clock: Clock,
    repeats: int,
    new_tokens: int,
    decode_repeats: int,
    base=None,
    cache: str = "growing",
    stock: bool = False,
) -> dict:
    """One row's raw figures. With `base` (the no-reduction reducer), prefill is interleaved with it and with
    the row's stock floor (`ideal_pruning` at the row's tokens per layer: none, row, floor, none, ...), and the
    row carries its own baseline prefill and its floor; otherwise the baseline is measured separately by the
    caller. stock: the stock model (no engine) is interleaved instead of `base` (which must then be None), and
    the row carries its figures (`stock_*`): what attaching the engine costs when it reduces nothing; the
    unreduced stock decoder is its own floor."""
    if stock and base is not None:
        raise ValueError("measure: stock=True interleaves the stock model; base must be None")
    interleave = stock or base is not None
    partner = None if stock else base  # None: the stock model
    acc = accounting(model, reducer, inputs)  # also the row's warm-up
    floor = None if base is None else (lambda: ideal_pruning(model, acc["tokens_per_layer"]))
    if stock:  # the stock model's warm-up
        prefill_seconds(model, None, inputs, clock)
    if floor:  # the floor's warm-up
        with floor():
            prefill_seconds(model, None, inputs, clock)
    runs, bases, floors = [], [], []
    for _ in range(repeats):
        if interleave:
            bases.append(prefill_seconds(model, partner, inputs, clock))
        runs.append(prefill_seconds(model, reducer, inputs, clock))
        if floor:
            with floor():
                floors.append(prefill_seconds(model, None, inputs, clock))
    decodes, base_decodes = [], []
    for _ in range(decode_repeats):
        if interleave:
            base_decodes.append(decode_seconds(model, partner, inputs, new_tokens, clock, cache))
        decodes.append(decode_seconds(model, reducer, inputs, new_tokens, clock, cache))
    row = {
        "prefill_ms": 1e3 * _median([r[0] for r in runs]),
        "decoder_ms": 1e3 * _median([r[1] for r in runs]),
        "own_ms": 1e3 * _median([r[2] for r in runs]),
        "own_share": _median([r[2] / r[0] for r in runs]),
        "decode_ms": 1e3 * _median(decodes),
        "peak_mb": peak_mb(model, reducer, inputs),
        **dict(zip(("syncs", "ops"), prefill_syncs(model, reducer, inputs))),
        **acc,
    }
    if stock:
        row["stock_prefill_ms"] = 1e3 * _median([b[0] for b in bases])
        row["stock_decoder_ms"] = 1e3 * _median([b[1] for b in bases])
        row["stock_decode_ms"] = 1e3 * _median(base_decodes)
        row["stock_syncs"], row["stock_ops"] = prefill_syncs(model, None, inputs)
        row["floor_ms"], row["floor_ratio"] = row["stock_decoder_ms"], 1.0
    elif bases:
        row["interleaved_base_prefill_ms"] = 1e3 * _median([b[0] for b in bases])
        row["interleaved_base_decoder_ms"] = 1e3 * _median([b[1] for b in bases])
        row["interleaved_base_decode_ms"] = 1e3 * _median(base_decodes)
        row["floor_ms"] = 1e3 * _median([f[1] for f in floors])
        row["floor_ratio"] = row["floor_ms"] / row["interleaved_base_decoder_ms"]
    return row


RATIO_KEYS = (
    "prefill_ms",
    "decoder_ms",
    "decode_ms",
    "kv_mib",
    "kv_visual_mb",
    "peak_mb",
    "tflops",
    "tflops_causal",
    "prefill_tok_s",
    "decode_tok_s",
)


def finish(row: dict, base: dict, batch: int, prompt_tokens: int) -> dict:
    """Throughputs and every ratio to the baseline row `base` (same shape and batch, same run)."""
    for r in (row, base):
        r["prefill_tok_s"] = batch * prompt_tokens / (r["prefill_ms"] / 1e3)
        r["decode_tok_s"] = batch / (r["decode_ms"] / 1e3)
    if "interleaved_base_prefill_ms" in row:  # the paired baseline
        b_prefill = row["interleaved_base_prefill_ms"]
        row["prefill_ms_ratio"] = row["prefill_ms"] / b_prefill
        row["prefill_tok_s_ratio"] = b_prefill / row["prefill_ms"]
        row["decoder_ms_ratio"] = row["decoder_ms"] / row["interleaved_base_decoder_ms"]
        row["decode_ms_ratio"] = row["decode_ms"] / row["interleaved_base_decode_ms"]
        row["decode_tok_s_ratio"] = row["interleaved_base_decode_ms"] / row["decode_ms"]
    for k in RATIO_KEYS:
        row.setdefault(f"{k}_ratio", metrics.ratio(row[k], base[k]))
        row[f"base_{k}"] = base[k]
    row["latency_vs_flops"] = row["prefill_ms_ratio"] / row["tflops_ratio"] - 1
    row["decoder_vs_flops"] = row["decoder_ms_ratio"] / row["tflops_ratio"] - 1
    # the stock floor (measured with the row: its ratio to no reduction's decoder) over the FLOPs ratio, and
    # how far the row's decoder ratio is above it: the reduction's own overhead
    if "floor_ratio" in row:
        row["floor_vs_flops"] = row["floor_ratio"] / row["tflops_ratio"] - 1
        row["decoder_vs_floor"] = row["decoder_ms_ratio"] / row["floor_ratio"] - 1
    return row


def profile_prefill(model, reducer, inputs, device: torch.device, n: int = 3, rows: int = 30) -> str:
    """`n` prefills of one row under torch.profiler (CPU ops, and CUDA kernels on a GPU), the reducer's
    `begin` / `decide` and the engine's decisions marked: a table of the ops by self device time (self CPU
    time on a CPU), and the device's busy time against the wall time (a launch-bound prefill leaves the
    device idle)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import framework.stages as stages

    cuda = device.type == "cuda"
    marks = {"begin": reducer.begin, "decide": reducer.decide}
    apply = stages.apply_decisions
    for name, orig in marks.items():

        def marked(ctx, _orig=orig, _name=name):
            with record_function(f"reducer.{_name}"):
                return _orig(ctx)

        setattr(reducer, name, marked)

    def applied(*args, **kwargs):
        with record_function("engine.apply_decisions"):
            return apply(*args, **kwargs)

    stages.apply_decisions = applied
    try:
        with torch.no_grad(), attach(model, reducer):
            model(**inputs, logits_to_keep=1)  # warm-up
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                for _ in range(n):
                    model(**inputs, logits_to_keep=1)
                if cuda:
                    torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / n
    finally:
        stages.apply_decisions = apply
        for name in marks:
            reducer.__dict__.pop(name, None)
    avg = prof.key_averages()
    head = f"wall {1e3 * wall:.2f} ms per prefill (profiler on)"
    if cuda:
        from torch.autograd import DeviceType

        kernels = [e for e in avg if e.device_type == DeviceType.CUDA]  # kernels and copies, not the ops launching them
        busy = sum(e.self_device_time_total for e in kernels) / n / 1e3
        head += f"; device busy {busy:.2f} ms per prefill ({100 * busy / (1e3 * wall):.0f} % of the wall)"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return head + "\n" + avg.table(sort_by=sort, row_limit=rows)


# ---------------------------------------------------------------------------------------- a shape
class Backbone:
    """One shape's random-weight model on the device, its clock, visual-token count and baseline reducer."""

    def __init__(self, name: str, device: str, strategies, budgets, log, dtype: str | None = None):
        t0 = time.perf_counter()
        self.name, self.model = name, build_model(name, device, dtype)
        self.clock = Clock(next(self.model.parameters()).device)
        self.n_visual = image_tokens(self.model, name)
        for s in strategies:  # fail on a bad strategy / budget before timing anything
            for bu in budgets:
                reducer_for(s, bu, self.n_visual)
        self.none = reducer_for("none", None, self.n_visual)
        text = SHAPES[name]["text"]
        log(
            f"[{name}] built in {time.perf_counter() - t0:.0f} s: {self.n_visual} visual tokens, "
            f"{text['layers']} x {text['hidden']}, {self.model.dtype}, {self.clock.name}"
        )


def run_group(
    bb: Backbone,
    batch: int,
    runs: list[tuple[str, int]],
    repeats: int,
    new_tokens: int,
    decode_repeats: int,
    log,
    deadline: float | None = None,
    cache: str = "growing",
    failed: list[str] | None = None,
    run_deadline: float | None = None,
    progress=None,
) -> list[dict] | None:
    """No reduction and every (strategy, budget) of `runs` at one shape and batch size -> finished rows, in
    the order of `runs` (None when no reduction does not fit in memory or fails). A row that raises is
    skipped, its error appended to `failed`. No row starts after `deadline` (this group's share of the run's
    time), except those of `PRIORITY` (the targets' strategy), measured first, which heed only `run_deadline`
    (the run's own). `progress`, if given, receives the group's rows so far after every row."""
    failed = [] if failed is None else failed
    t0 = time.perf_counter()
    model, clock, name = bb.model, bb.clock, bb.name
    inputs = make_inputs(model, name, batch)
    prompt = inputs["input_ids"].shape[1]
    try:
        base = measure(model, bb.none, inputs, clock, repeats, new_tokens, decode_repeats, cache=cache, stock=True)
        for key in ("prefill_ms", "decoder_ms", "decode_ms"):  # before the pairings below replace none's figures
            base[f"engine_{key}"] = base[key]  # none's own, in alternation with the stock model
            base[f"engine_{key}_ratio"] = base[key] / base[f"stock_{key}"]
    except torch.OutOfMemoryError:
        log(f"[{name} b{batch}] out of memory without reduction: batch skipped")
        torch.cuda.empty_cache()
        return None
    except Exception as e:  # one failure must not cost the rest of a (lent, timed) run
        failed.append(f"{name} batch {batch} none: {type(e).__name__}: {e}")
        log(f"[{name} b{batch}] none failed ({type(e).__name__}: {e}): batch skipped")
        return None
    base.update(strategy="none", budget=None)
    group = [("none", None, base)]
    if progress is not None:
        progress(group_rows(bb, batch, prompt, runs, group))
    order = sorted(runs, key=lambda run: run[0] != PRIORITY)  # stable: the priority strategy first
    for i, (s, bu) in enumerate(order):
        limit = run_deadline if s == PRIORITY else deadline
        if limit is not None and time.perf_counter() > limit:
            spent = "--stop-after" if s == PRIORITY else "this group's share of --stop-after"
            log(f"[{name} b{batch}] {spent} reached: {len(order) - i} row(s) not measured")
            break
        t1 = time.perf_counter()
        paired = bb.none  # interleaved with no reduction: a CPU's speed drifts by more than the gaps measured
        try:
            row = measure(
                model,
                reducer_for(s, bu, bb.n_visual),
                inputs,
                clock,
                repeats,
                new_tokens,
                decode_repeats,
                paired,
                cache=cache,
            )
        except torch.OutOfMemoryError:
            log(f"[{name} b{batch}] {s} {bu}: out of memory; row skipped")
            torch.cuda.empty_cache()
            continue
        except Exception as e:  # recorded with the table; the other rows go on
            failed.append(f"{name} batch {batch} {s} {bu}: {type(e).__name__}: {e}")
            log(f"[{name} b{batch}] {s} {bu} failed ({type(e).__name__}: {e}); row skipped")
            continue
        row.update(strategy=s, budget=bu)
        group.append((s, bu, row))
        log(
            f"[{name} b{batch}] {i + 1}/{len(runs)} {s} {bu}: prefill {row['prefill_ms']:.1f} ms, "
            f"decode {row['decode_ms']:.2f} ms/tok ({time.perf_counter() - t1:.1f} s; "
            f"{time.perf_counter() - t0:.0f} s on this group)"
        )
        if progress is not None:
            progress(group_rows(bb, batch, prompt, runs, group))
    return group_rows(bb, batch, prompt, runs, group)


def group_rows(bb: Backbone, batch: int, prompt: int, runs: list[tuple[str, int]], group: list[tuple]) -> list[dict]:
    """A group's table rows from its raw figures [("none", None, base), (strategy, budget, row), ...] (left
    unchanged, so that a group in progress can be written after every row): none's prefill, decoder and
    decode are the medians over every row's pairing, and the rows come in the order of `runs`."""
    base = dict(group[0][2])
    for key in ("prefill_ms", "decoder_ms", "decode_ms"):
        pair = [r[f"interleaved_base_{key}"] for _, _, r in group[1:]] or [base[key]]
        base[key] = base[f"interleaved_base_{key}"] = _median(pair)
    rows = sorted(group[1:], key=lambda g: runs.index((g[0], g[1])))
    out = []
    for s, bu, row in [("none", None, base), *rows]:
        fields = {"shape": bb.name, "batch": batch, "visual": bb.n_visual, "prompt_tokens": prompt}
        fields["scaled_budget"] = None if bu is None else scaled_budget(bu, bb.n_visual)
        out.append({**fields, **finish(dict(row), dict(base), batch, prompt)})
    return out


def group_shares(batches: list[int], batch1_share: float) -> list[float]:
    """The fraction of --stop-after by whose end each group (batch size, shape), in run order, starts its last
    row: the batch-1 groups share `batch1_share` of the time, the larger batches the rest, equally. Cumulative,
    so the time a group leaves goes to the next; the last group's is the whole run's."""
    n1 = batches.count(1)
    n_more = len(batches) - n1
    if not n_more:
        batch1_share = 1.0
    out, at = [], 0.0
    for batch in batches:
        at += batch1_share / n1 if batch == 1 else (1 - batch1_share) / n_more
        out.append(at)
    out[-1] = 1.0  # no rounding short of the run's deadline
    return out


def metadata(args, device: torch.device, clock_name: str, argv: list[str]) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    if device.type == "cpu":
        name = f"CPU {name}, {torch.get_num_threads()} thread(s) of {os.cpu_count()} cores"
    return {
        "device": device.type,
        "device_name": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.efficiency " + " ".join(argv),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "clock": clock_name,
        "repeats": args.repeats,
        "batch_repeats": args.batch_repeats,
        "new_tokens": args.new_tokens,
        "decode_repeats": args.decode_repeats,
        "decode_cache": args.cache,
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def default_stem(device: str, shapes: list[str], default_shapes: list[str]) -> Path:
    """benchmarks/results/efficiency_<device>, and _<shape>... for other shapes than the device's default: a
    run at other shapes never overwrites the device's main table."""
    suffix = "" if shapes == default_shapes else "_" + "_".join(shapes)
    return RESULTS / f"efficiency_{device}{suffix}"


def parse_profiles(spec: str | None) -> list[tuple[str, str, int | None]]:
    """Parse --profile, e.g. "none,sparsevlm:192": [(label, strategy, budget)]; a bad entry fails at once."""
    out = []
    for label in (spec or "").split(","):
        if not label:
            continue
        strategy, _, budget = label.partition(":")
        if strategy == "none" and not budget:
            out.append((label, "none", None))
        elif strategy in STRATEGIES and budget.isascii() and budget.isdigit() and int(budget) > 0:
            out.append((label, strategy, int(budget)))
        else:
            raise SystemExit(
                f"--profile entry {label!r}: expected STRATEGY:BUDGET (STRATEGY of {list(STRATEGIES)}, BUDGET a "
                "positive integer) or 'none'"
            )
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shapes",
        "--shape",
        default=None,
        help=f"comma-separated of {list(SHAPES)} (default: llava15,llavanext on cuda, small on cpu)",
    )
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="of LLaVA-1.5's 576, scaled per shape")
    p.add_argument("--batches", default=None, help="batch sizes (default: 1,8,32 on cuda, 1,8 on cpu)")
    p.add_argument("--batch-budgets", default="64", help="budgets measured at batch sizes > 1")
    p.add_argument("--repeats", type=int, default=None, help="prefill repeats at batch 1 (cuda 20, cpu 5)")
    p.add_argument("--batch-repeats", type=int, default=3, help="prefill repeats at larger batches")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per generate (cuda 16, cpu 8)")
    p.add_argument("--decode-repeats", type=int, default=None, help="generate runs per row (cuda 1, cpu 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights and activations (default: each shape's: bfloat16 at the 7B shapes, float32 at the small "
        "ones); float16 for a GPU without bfloat16",
    )
    p.add_argument(
        "--cache",
        choices=("growing", "dynamic"),
        default="growing",
        help="decode KV cache: in-place appends (framework.cache.GrowingCache) or transformers' DynamicCache",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output stem (default benchmarks/results/efficiency_<device>, with _<shape>... appended when "
        "--shapes is not the device's default)",
    )
    p.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new row after this many seconds (what was measured is written). Each group (batch size, "
        "shape) has a share of it (--batch1-share) and leaves what it does not use to the next; SparseVLM's rows, "
        "measured first in each group, heed only the whole run's limit",
    )
    p.add_argument(
        "--batch1-share",
        type=float,
        default=0.6,
        metavar="FRACTION",
        help="of --stop-after, the share of the batch-1 groups (split equally between the shapes); the larger "
        "batches share the rest",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="STRATEGY:BUDGET,...",
        help="after the table, profile a few batch-1 prefills of these rows ('none' for no reduction) on the first "
        "shape (torch.profiler, kernels and host ops) into <out>_profile.txt: where each row's time goes on this "
        "device, and how busy the device is (a launch-bound prefill leaves it idle)",
    )
    p.add_argument(
        "--host-allocator",
        choices=metrics.HOST_ALLOCATOR_CHOICES,
        default="keep",
        help="on the CPU, keep freed memory in the process (experiments.metrics.keep_freed_host_memory; for the "
        "rest of the process) so that forwards do not page-fault their activations afresh, or leave it as it is",
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (20 if cuda else 5)
    args.new_tokens = args.new_tokens or (16 if cuda else 8)
    # on a GPU one generate's median gap (of new_tokens - 1) is steady; its time goes to the rows instead
    args.decode_repeats = args.decode_repeats or (1 if cuda else 3)
    if not 0 < args.batch1_share <= 1:
        raise SystemExit(f"--batch1-share {args.batch1_share}: expected a fraction in (0, 1]")
    profiles = parse_profiles(args.profile)
    default_shapes = ["llava15", "llavanext"] if cuda else ["small"]
    shapes = [s for s in args.shapes.split(",") if s] if args.shapes else default_shapes
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; allowed: {list(SHAPES)}")
    strategies = [s for s in args.strategies.split(",") if s and s != "none"]
    budgets = [int(b) for b in args.budgets.split(",") if b]
    batches = sorted({int(b) for b in (args.batches or ("1,8,32" if cuda else "1,8")).split(",") if b} | {1})
    batch_budgets = [int(b) for b in args.batch_budgets.split(",") if b]
    stem = Path(args.out) if args.out else default_stem(device.type, shapes, default_shapes)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = metadata(args, device, Clock(device).name, argv)
    meta["host_allocator"] = metrics.host_allocator(args.host_allocator, device.type)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, flush=True))
    done: list[dict] = []
    failed: list[str] = meta.setdefault("failed", [])  # rows that raised, with their errors
    meta["complete"] = False  # until every row is in: a run killed half-way says so in what it wrote

    def write(in_progress: list[dict] = ()):
        """The table of the finished groups and of the group in progress (so a killed run keeps every row)."""
        meta["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        all_rows = done + list(in_progress)
        stem.with_suffix(".json").write_text(
            json.dumps(
                {
                    "meta": meta,
                    "rows": all_rows,
                    "batch_scaling": batch_scaling(all_rows),
                    "targets": targets(all_rows),
                },
                indent=1,
            )
        )
        stem.with_suffix(".md").write_text(to_markdown(meta, all_rows))

    start = time.perf_counter()
    deadline = None if args.stop_after is None else start + args.stop_after
    backbones = [Backbone(name, args.device, strategies, budgets, log, args.dtype) for name in shapes]
    meta["dtypes"] = {bb.name: str(bb.model.dtype).removeprefix("torch.") for bb in backbones}
    skipped: set[str] = set()  # shapes whose baseline ran out of memory at a smaller batch
    # every shape at batch 1 first, so a cut-short run still has both tables
    groups = [(batch, bb) for batch in batches for bb in backbones]
    shares = group_shares([batch for batch, _ in groups], args.batch1_share)
    for (batch, bb), share in zip(groups, shares):
        if bb.name in skipped or (deadline is not None and time.perf_counter() > deadline):
            continue
        runs = [(s, bu) for s in strategies for bu in (budgets if batch == 1 else batch_budgets)]
        reps = args.repeats if batch == 1 else args.batch_repeats
        dreps = args.decode_repeats if batch == 1 else max(1, args.decode_repeats - 1)
        group_deadline = None if deadline is None else start + share * args.stop_after
        rows = run_group(
            bb, batch, runs, reps, args.new_tokens, dreps, log, group_deadline, args.cache, failed, deadline, write
        )
        if rows is None:
            skipped.add(bb.name)
            continue
        done.extend(rows)  # already written, as the group in progress, after its last row
    expected = len(shapes) * sum(1 + len(strategies) * len(budgets if b == 1 else batch_budgets) for b in batches)
    meta["complete"] = len(done) == expected  # False when --stop-after, memory or a failure cut the run short
    write()
    if profiles:
        bb = backbones[0]
        inputs = make_inputs(bb.model, bb.name, 1)
        path = stem.parent / f"{stem.name}_profile.txt"
        parts = []
        for label, strategy, budget in profiles:  # each part written as soon as it is measured
            text = profile_prefill(bb.model, reducer_for(strategy, budget, bb.n_visual), inputs, device)
            parts.append(f"{meta['device_name']}, {bb.name}, batch 1, {label}\n{text}\n")
            path.write_text("\n".join(parts))
        log(f"wrote {path}")
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
