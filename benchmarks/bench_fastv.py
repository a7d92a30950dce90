"""Prefill latency of FastV (keep 192 visual tokens from layer 2 on) vs no reduction, next to the FLOPs ratio.

~100M-parameter random LLaMA-shaped decoder, 576 visual + 64 text tokens, 1 thread, sdpa.
Goal: the latency ratio within 10 % of the FLOPs ratio.  Run: python -m benchmarks.bench_fastv
"""

from __future__ import annotations

import torch

from benchmarks.common import llava_100m, median_time, prompt
from experiments.metrics import keep_freed_host_memory
from framework import attach, build
from framework.accounting import account


def main() -> None:
    print(f"host allocator: {keep_freed_host_memory()}")
    model = llava_100m()
    x = prompt(model)
    run = lambda: model(**x, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        with attach(model, build("none")) as engine:
            base_t = median_time(run)
            base = account(engine)[0]
        with attach(model, build({"name": "fastv", "layer": 2, "keep": 192})) as engine:
            fast_t = median_time(run)
            fast = account(engine)[0]
    flops_ratio = fast.flops / base.flops
    lat_ratio = fast_t / base_t
    print(f"{'setting':<26}{'prefill ms':>11}{'TFLOPs':>9}{'equiv tok':>10}")
    print(f"{'no reduction':<26}{base_t * 1e3:>11.0f}{base.flops * 1e-12:>9.3f}{base.equivalent_tokens:>10.1f}")
    print(f"{'fastv K=2 keep 192':<26}{fast_t * 1e3:>11.0f}{fast.flops * 1e-12:>9.3f}{fast.equivalent_tokens:>10.1f}")
    print(
        f"latency ratio {lat_ratio:.3f}  FLOPs ratio {flops_ratio:.3f}  "
        f"relative gap {abs(lat_ratio / flops_ratio - 1):.1%} (goal < 10 %)"
    )


if __name__ == "__main__":
    main()
