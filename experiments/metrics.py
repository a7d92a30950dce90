"""Measured efficiency: prefill latency, per-token decode latency, peak memory; and ratios.

Everything here times a model with a reducer attached through `framework.attach`, so the identity
reducer ("none") is the stock model. `measure_pair` times a strategy and its baseline interleaved
(baseline, strategy, baseline, ...) on the same inputs in the same process, so machine noise hits both
and the ratios are what we report. Medians of `repeats`.

* prefill latency: wall time from the call to `generate` to the first new token (the prefill forward,
  vision tower and projector included, plus one greedy pick);
* decode latency per token: median gap between later new tokens (the `streamer` callback of `generate`
  stamps each step);
* peak memory: CUDA allocator peak over the prefill on GPU; on CPU the peak of live tensor bytes over
  the prefill, replayed from the PyTorch profiler's allocation events (`profile_memory=True`);
* `keep_freed_host_memory`: what the CPU benchmarks call first (`--host-allocator keep`), so that a
  forward's time does not include page-faulting its activations afresh.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import platform
import statistics
import time
from typing import Callable, Mapping

import torch

from framework import attach
from framework.cache import GrowingCache

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HOST_ALLOCATOR_CHOICES = ("keep", "default")


def keep_freed_host_memory() -> str:
    """Keep freed host memory in the process (glibc: no mmap for large blocks; the heap's free top is given
    back only past 2 GiB), so a forward's large tensors reuse pages the previous forward touched. By default
    glibc maps each block over 128 KiB (adapting up to 32 MiB) afresh and unmaps it on free: every forward
    then pays a page fault per 4 KiB page of its activations (on hosts whose transparent huge pages are not
    "always"), ~15 % of the small efficiency shape's prefill here, varying from run to run with the
    allocator's adaptive threshold, not with the model. The heap settles within a few forwards (the first
    ones grow it; an aligned block freed a few bytes short of the next may take one more), which a benchmark's
    warm-up and median absorb. For the rest of the process; memory it freed stays
    with it (the peak, and any fragmentation). GPU memory is not affected (the CUDA caching allocator keeps
    its blocks). Returns what was set, for the record; elsewhere (not glibc) nothing is changed."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "default (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mmap_off = libc.mallopt(_M_MMAP_MAX, 0) == 1
    trim_off = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not (mmap_off and trim_off):
        return f"glibc malloc, partly set (mmap off: {mmap_off}, trim threshold 2 GiB: {trim_off})"
    return "glibc malloc keeping freed memory (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)"


def host_allocator(choice: str, device: str) -> str:
    """`keep` (`keep_freed_host_memory`) or `default` (glibc as this process has it: an earlier `keep` in the
    same process stays in effect) for a benchmark on `device` (nothing to set on a GPU, whose tensors the CUDA
    caching allocator holds): the description the benchmarks record."""
    if choice not in HOST_ALLOCATOR_CHOICES:
        raise ValueError(f"host allocator {choice!r}; allowed: {list(HOST_ALLOCATOR_CHOICES)}")
    if str(device).startswith("cuda"):
        return "default (the tensors are on the GPU: CUDA caching allocator)"
    return keep_freed_host_memory() if choice == "keep" else "default (as the process found it)"


class _Clock:
    """A `generate` streamer that only stamps the time of every `put` (prompt, then each new token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps.append(time.perf_counter())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _generation_config(model, new_tokens: int):
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens = new_tokens
    gc.min_new_tokens = None
    gc.do_sample = False
    gc.eos_token_id = None  # always generate exactly new_tokens
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    for k in ("temperature", "top_p", "top_k"):
        setattr(gc, k, None)
    return gc


@torch.no_grad()
def time_generate(model, inputs: Mapping[str, torch.Tensor], new_tokens: int = 8) -> dict:
    """One greedy `generate` (KV cache appended in place: `GrowingCache`): prefill seconds and median seconds
    per decoded token."""
    dev = next(model.parameters()).device
    clock = _Clock()
    _sync(dev)
    t0 = time.perf_counter()
    model.generate(
        **inputs,
        generation_config=_generation_config(model, max(1, new_tokens)),
        streamer=_SyncClock(clock, dev),
        cache=GrowingCache(),
    )
    s = clock.stamps
    # s[0] = prompt put (before prefill), s[1] = first token, s[2..] = later tokens, last = end()
    prefill = s[1] - t0 if len(s) > 1 else float("nan")
    gaps = [b - a for a, b in zip(s[1:-1], s[2:-1])]
    return {"prefill_s": prefill, "decode_s": statistics.median(gaps) if gaps else float("nan")}


class _SyncClock(_Clock):
    def __init__(self, inner: _Clock, device):
        self.inner, self.device = inner, device

    def put(self, value) -> None:
        _sync(self.device)
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()


@torch.no_grad()
def time_prefill(model, inputs: Mapping[str, torch.Tensor]) -> float:
    """Seconds for one prefill forward (no generate machinery), e.g. for batched throughput."""
    dev = next(model.parameters()).device
    _sync(dev)
    t0 = time.perf_counter()
    model(**inputs, use_cache=True)
    _sync(dev)
    return time.perf_counter() - t0


class DecoderTimer:
    """Within `with`, the wall time of every forward of the decoder stack (`module`, the language model:
    from its first pre-hook to its return, so the engine's hooks and the strategy's own work inside it
    count) accumulates in `seconds`. This is the scope of the paper's FLOPs formula (decoder layers only:
    no vision tower, projector or lm_head), so its ratio is the one to hold against the FLOPs ratio."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seconds = 0.0
        self._handles: list = []
        self._t0 = 0.0

    def _start(self, module, args) -> None:
        _sync(self._device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        _sync(self._device)
        self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> "DecoderTimer":
        self._device = next(self.module.parameters()).device
        # prepend: start before the engine's own language-model hook, so its work is inside the window
        self._handles = [
            self.module.register_forward_pre_hook(self._start, prepend=True),
            self.module.register_forward_hook(self._stop),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def peak_memory_mb(model, inputs: Mapping[str, torch.Tensor]) -> float | None:
    """Peak bytes allocated during one prefill, above what was live before it (MB)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        model(**inputs, use_cache=True)
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - before) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile

        with _silent_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(**inputs, use_cache=True)  # (the profiler's C++ side prints "USDT ... profiler_start/stop")
        events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    except RuntimeError:  # profiler unavailable: no number rather than a wrong one
        return None
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return peak / 2**20


@contextlib.contextmanager
def _silent_fd(fd: int):
    """Point a file descriptor at /dev/null for the block: the kineto profiler's C++ log lines go to fd 2
    directly, where no Python logging or environment setting reaches them."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(fd)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


def measure_pair(
    model,
    inputs_list: list[Mapping[str, torch.Tensor]],
    reducers: Mapping[str, object],
    repeats: int = 3,
    new_tokens: int = 8,
    memory: bool = True,
    warmup: int = 1,
    progress: Callable | None = None,
) -> dict[str, dict]:
    """Time each reducer (name -> reducer) on each input, interleaved; medians over repeats of the
    mean over inputs. Returns name -> {prefill_ms, decode_ms, peak_mb}."""
    names = list(reducers)
    raw: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    for _ in range(warmup):
        for n in names:
            with attach(model, reducers[n]):
                time_generate(model, inputs_list[0], new_tokens)
    for _ in range(repeats):
        acc = {n: {"prefill": [], "decode": []} for n in names}
        for inputs in inputs_list:
            for n in names:
                with attach(model, reducers[n]):
                    t = time_generate(model, inputs, new_tokens)
                acc[n]["prefill"].append(t["prefill_s"])
                acc[n]["decode"].append(t["decode_s"])
        for n in names:
            raw[n]["prefill"].append(statistics.fmean(acc[n]["prefill"]))
            raw[n]["decode"].append(statistics.fmean(acc[n]["decode"]))
        if progress:
            progress()
    out = {}
    for n in names:
        peak = None
        if memory:
            with attach(model, reducers[n]):
                peak = peak_memory_mb(model, inputs_list[0])
        out[n] = {
            "prefill_ms": 1e3 * statistics.median(raw[n]["prefill"]),
            "decode_ms": 1e3 * statistics.median(raw[n]["decode"]) if new_tokens > 1 else None,
            "peak_mb": peak,
        }
    return out


def ratio(a, b) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    try:
        import math

        if math.isnan(a) or math.isnan(b):
            return None
    except TypeError:
        return None
    return a / b
