"""SparseVLM on CPU: its own overhead (raters + scoring + recycling) as a share of the prefill, and the
prefill latency ratio vs no reduction next to the FLOPs ratio, for presets 192/128/64 (scaled to 8 layers:
pruning layers [1, 2, 4]; keep counts unchanged since there are 576 visual tokens).

~100M-parameter random LLaMA-shaped decoder (hidden 1024, FFN 2816, 8 layers, 16 heads), tiny CLIP with
grid 24 -> 576 visual tokens + 64 text tokens, 1 thread, sdpa, median of several runs.
Goal: SparseVLM's own work < 3 % of the prefill.  Run: python -m benchmarks.bench_sparsevlm
"""

from __future__ import annotations

import sys
import time

import torch

import strategies.sparsevlm as sv
from benchmarks.common import llava_100m, prompt
from experiments.metrics import keep_freed_host_memory
from framework import attach, build
from framework.accounting import account

REPEATS = 7
# Thread CPU time: with one intra-op thread all the work runs on this thread, and unlike wall time it does
# not count the time the process waits for a core on a shared machine. `--wall` switches to wall time.
CLOCK = time.perf_counter if "--wall" in sys.argv else time.thread_time


class Timer:
    """Accumulates wall time of wrapped callables per label, reset per run."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def wrap(self, label, fn):
        def inner(*a, **k):
            t0 = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                self.t[label] = self.t.get(label, 0.0) + CLOCK() - t0

        return inner


def measure(model, x, cfg) -> dict:
    """Interleave unreduced and reduced prefills (the machine may be shared), REPEATS of each after a
    warm-up; return medians, the median per-run own share, and the latency ratio of the medians."""
    reducer = build(cfg)
    timer = Timer()
    reducer.begin = timer.wrap("raters", reducer.begin)
    reducer.decide = timer.wrap("decide", reducer.decide)
    orig = sv.cluster  # what SparseVLM's recycling calls
    sv.cluster = timer.wrap("recycling", orig)
    runs, base = [], []
    try:
        with torch.no_grad():
            for i in range(REPEATS + 1):
                with attach(model, build("none")) as engine:
                    t0 = CLOCK()
                    model(**x, logits_to_keep=1)
                    base.append(CLOCK() - t0)
                    base_acc = account(engine)[0]
                with attach(model, reducer) as engine:
                    timer.t = {}
                    t0 = CLOCK()
                    model(**x, logits_to_keep=1)
                    runs.append({"prefill": CLOCK() - t0, **timer.t})
                    acc = account(engine)[0]
    finally:
        sv.cluster = orig
    runs, base = runs[1:], base[1:]  # drop the warm-up
    med = lambda vals: sorted(vals)[len(vals) // 2]  # noqa: E731
    own = med([(r.get("raters", 0.0) + r.get("decide", 0.0)) / r["prefill"] for r in runs])
    out = {k: med([r.get(k, 0.0) for r in runs]) for k in ("prefill", "raters", "decide", "recycling")}
    return {**out, "base": med(base), "own_share": own, "acc": acc, "base_acc": base_acc}


def main() -> None:
    print(f"host allocator: {keep_freed_host_memory()}")
    model = llava_100m()
    x = prompt(model)
    with torch.no_grad(), attach(model, build("none")) as engine:
        model(**x, logits_to_keep=1)
        base = account(engine)[0]
    print(f"clock: {'wall' if CLOCK is time.perf_counter else 'thread CPU time'}")
    print(f"no reduction: {base.flops * 1e-9:.1f} GFLOPs, tokens per layer {base.tokens_per_layer}")
    hdr = (
        f"{'setting':<22}{'base ms':>8}{'prefill ms':>11}{'raters ms':>10}{'score ms':>10}{'recycle ms':>11}"
        f"{'own %':>7}{'equiv':>8}{'lat ratio':>10}{'FLOPs ratio':>12}"
    )
    print(hdr)
    for preset in ("192", "128", "64"):
        for label, cfg in (
            (f"sparsevlm {preset}", {"name": "sparsevlm", "preset": preset}),
            (f"  rank_v1 {preset}", {"name": "sparsevlm", "preset": preset, "budget": "rank_v1"}),
        ):
            m = measure(model, x, cfg)
            acc = m["acc"]
            score = m["decide"] - m["recycling"]
            print(
                f"{label:<22}{m['base'] * 1e3:>8.0f}{m['prefill'] * 1e3:>11.0f}{m['raters'] * 1e3:>10.2f}"
                f"{score * 1e3:>10.2f}"
                f"{m['recycling'] * 1e3:>11.2f}{m['own_share'] * 100:>7.2f}{acc.equivalent_tokens:>8.1f}"
                f"{m['prefill'] / m['base']:>10.3f}{acc.flops / base.flops:>12.3f}"
            )
    print(
        "own % = (raters + scoring incl. rows-only attention and rank + recycling) / prefill, median of "
        f"{REPEATS};\n  goal < 3 %. score ms = rows-only attention + scores + keep selection (+ rank). "
        "lat ratio = median reduced / median unreduced prefill, interleaved runs."
    )


if __name__ == "__main__":
    main()
