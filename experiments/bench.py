"""`sparsevlm bench`: efficiency only, on random-weight models of real shapes.

Backbones (`conf/backbone`): `bench_cpu` (~100M parameters: Llama 1024 x 8 layers, ffn 2816, 16 heads,
tiny CLIP with a 24x24 patch grid -> 576 visual tokens) and `llava7b_shape` (LLaVA-1.5-7B shapes, for a
GPU). Prompts: BOS + the image tokens + text tokens (64 in all besides the image), random ids.

For each strategy x budget x batch size, interleaved with no reduction on the same inputs (medians of
`repeats`): prefill latency (one forward, `logits_to_keep=1`), and within it the decoder stack's latency
(the language model's forward with the engine's and the strategy's work inside it: the scope of the paper's
FLOPs formula, so this is the ratio to hold against the FLOPs ratio; the vision tower, projector and lm_head
are the same fixed cost with and without reduction), per-token decode latency (greedy
`generate`), prefill and decode throughput, KV-cache MB and prefill FLOPs (paper formula, from the
engine's per-layer token counts), peak memory; every one also as a ratio to no reduction.
`--scaling`: visual tokens 576, 1152, 2304, 4608 (1, 2, 4, 8 images per prompt): prefill latency with
and without reduction and the strategy's own overhead (time inside the reducer's `begin`/`decide`,
the rows-only attention it asks for included), as a table and `scaling.png`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from framework import attach
from framework.accounting import account
from framework.errors import ConfigError

from . import metrics, runner
from .sweep import BASELINE


def make_inputs(model, batch: int, images: int = 1, text_tokens: int = 64, seed: int = 0) -> dict:
    cfg = model.config
    n_img = cfg.image_seq_length
    vocab = cfg.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        text = torch.randint(3, vocab - 2, (max(0, text_tokens - 1),), generator=g)
        cut = min(len(text), 8)  # a short system prefix before the image, the question after
        rows.append(
            torch.cat([torch.tensor([1]), text[:cut], torch.full((n_img * images,), cfg.image_token_id), text[cut:]])
        )
    ids = torch.stack(rows)
    size = cfg.vision_config.image_size
    dev = next(model.parameters()).device
    pixels = torch.randn(batch * images, 3, size, size, generator=g).to(dev, model.dtype)
    return {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev), "pixel_values": pixels}


class _Timed:
    """Within `with`, the reducer's begin/decide accumulate their wall-clock time (the strategy's own
    overhead) in `seconds`; the original methods come back on exit, so repeated use never nests."""

    def __init__(self, reducer):
        self.reducer = reducer
        self.seconds = 0.0

    def __enter__(self) -> "_Timed":
        for name in ("begin", "decide"):
            orig = getattr(self.reducer, name)

            def wrapped(ctx, _orig=orig):
                dev = ctx.hidden.device
                metrics._sync(dev)
                t0 = time.perf_counter()
                out = _orig(ctx)
                metrics._sync(dev)
                self.seconds += time.perf_counter() - t0
                return out

            setattr(self.reducer, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("begin", "decide"):
            self.reducer.__dict__.pop(name, None)  # the instance attribute shadowed the class method


@torch.no_grad()
def prefill_stats(model, reducer, inputs, repeats: int) -> dict:
    """Whole-forward prefill seconds, the decoder stack's share of them (`metrics.DecoderTimer`), the
    strategy's own seconds, and the accounting of the last prefill."""
    times, decoder, overhead = [], [], []
    with _Timed(reducer) as timed, attach(model, reducer) as engine:
        model(**inputs, logits_to_keep=1)  # warm-up
        with metrics.DecoderTimer(engine.adapter.language_model) as dec:
            for _ in range(repeats):
                timed.seconds = dec.seconds = 0.0
                times.append(metrics.time_prefill(model, {**inputs, "logits_to_keep": 1}))
                decoder.append(dec.seconds)
                overhead.append(timed.seconds)
        acc = account(engine)
    return {"prefill_s": times, "decoder_s": decoder, "overhead_s": overhead, "acc": acc}


def _interleaved(model, none, reducer, inputs, repeats: int) -> dict:
    """Prefill timings of no reduction and of `reducer`, interleaved (base, run, base, run, ...) so that
    machine load hits both alike: per-repeat lists `base_s`, `run_s` (whole forward), `base_decoder_s`,
    `run_decoder_s` (decoder stack), `overhead_s` (the strategy's own work), and the last stats of each."""
    out = {k: [] for k in ("base_s", "run_s", "base_decoder_s", "run_decoder_s", "overhead_s")}
    for _ in range(repeats):
        sb = prefill_stats(model, none, inputs, 1)
        sr = prefill_stats(model, reducer, inputs, 1)
        out["base_s"] += sb["prefill_s"]
        out["run_s"] += sr["prefill_s"]
        out["base_decoder_s"] += sb["decoder_s"]
        out["run_decoder_s"] += sr["decoder_s"]
        out["overhead_s"] += sr["overhead_s"]
    out["base"], out["run"] = sb, sr
    return out


def _median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _budget_fields(strategy: str, budget: int | None, n_visual: int, images: int = 1) -> dict:
    """The strategy's fields for `budget` of the `n_visual` tokens of each of `images` images."""
    from framework.budget import apply_budget

    fields, used = apply_budget(runner.strategy_node(strategy), budget, n_visual)
    if images > 1 and used is not None and isinstance(fields.get("keep"), int):
        fields["keep"] = min(1.0, budget / n_visual)  # the same share of every image's tokens
    return fields


def _random_backbone(backbone: str, device: str, overrides) -> tuple:
    """The random-weight model of a `random_llava` backbone config (timings do not depend on weights), and
    the config as a dict."""
    cfg = runner.compose([f"backbone={backbone}", *overrides])
    b = runner.to_dict(cfg.backbone)
    if b.get("loader") != "random_llava":
        raise ConfigError(f"bench needs a random_llava backbone (bench_cpu, llava7b_shape), got {backbone!r}")
    return runner.random_llava(b).to(device), b


def bench(
    backbone: str = "bench_cpu",
    strategies: list[str] = ("sparsevlm",),
    budgets: list[int] = (64,),
    batches: list[int] = (1, 8),
    repeats: int = 3,
    decode_tokens: int = 8,
    device: str = "cpu",
    overrides: list[str] = (),
    progress: bool = True,
) -> list[dict]:
    from tqdm.auto import tqdm

    model, b = _random_backbone(backbone, device, overrides)
    n_visual = int(b["vision"]["grid"]) ** 2
    runs = [(s, bu) for s in strategies if s != BASELINE for bu in budgets]
    for s, bu in runs:  # validate everything first
        runner.build_reducer(_budget_fields(s, bu, n_visual))
    rows = []
    bar = tqdm(total=len(runs) * len(batches), desc="bench", disable=not progress)
    none = runner.build_reducer({"name": BASELINE})
    for batch in batches:
        inputs = make_inputs(model, batch, text_tokens=int(b.get("text_tokens", 64)))
        for s, bu in runs:
            reducer = runner.build_reducer(_budget_fields(s, bu, n_visual))
            # interleave: base, run, base, run ... (median of repeats each)
            reps = repeats if batch == 1 else max(1, (repeats + 1) // 2)  # big batches: fewer, longer repeats
            tm = _interleaved(model, none, reducer, inputs, reps)
            t = metrics.measure_pair(
                model,
                [inputs],
                {"base": none, "run": reducer},
                repeats=max(1, repeats // 2 + 1),
                new_tokens=decode_tokens,
                memory=True,
                warmup=0,
            )
            acc_b, acc_r = tm["base"]["acc"], tm["run"]["acc"]
            row = {
                "strategy": s,
                "budget": bu,
                "batch": batch,
                "visual": n_visual,
                "prefill_ms": _median_ms(tm["run_s"]),
                "base_prefill_ms": _median_ms(tm["base_s"]),
                "decoder_ms": _median_ms(tm["run_decoder_s"]),
                "base_decoder_ms": _median_ms(tm["base_decoder_s"]),
                "overhead_ms": _median_ms(tm["overhead_s"]),
                "decode_ms": t["run"]["decode_ms"],
                "base_decode_ms": t["base"]["decode_ms"],
                "peak_mb": t["run"]["peak_mb"],
                "base_peak_mb": t["base"]["peak_mb"],
                "tflops": sum(a.flops for a in acc_r) * 1e-12,
                "base_tflops": sum(a.flops for a in acc_b) * 1e-12,
                "kv_mb": sum(a.kv_bytes for a in acc_r) / 2**20,
                "base_kv_mb": sum(a.kv_bytes for a in acc_b) / 2**20,
                "equivalent_tokens": statistics.fmean(a.equivalent_tokens for a in acc_r),
            }
            row["prefill_tput"] = batch / (row["prefill_ms"] / 1e3)
            row["base_prefill_tput"] = batch / (row["base_prefill_ms"] / 1e3)
            row["decode_tput"] = batch / (row["decode_ms"] / 1e3) if row["decode_ms"] else None
            row["base_decode_tput"] = batch / (row["base_decode_ms"] / 1e3) if row["base_decode_ms"] else None
            for k in (
                "prefill_ms",
                "decoder_ms",
                "decode_ms",
                "peak_mb",
                "tflops",
                "kv_mb",
                "prefill_tput",
                "decode_tput",
            ):
                row[f"{k}_ratio"] = metrics.ratio(row[k], row[f"base_{k}"])
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def scaling(
    backbone: str = "bench_cpu",
    strategy: str = "sparsevlm",
    budget: int = 64,
    visual: list[int] = (576, 1152, 2304, 4608),
    repeats: int = 2,
    device: str = "cpu",
    overrides: list[str] = (),
    progress: bool = True,
) -> list[dict]:
    from tqdm.auto import tqdm

    model, b = _random_backbone(backbone, device, overrides)
    per_image = int(b["vision"]["grid"]) ** 2
    none = runner.build_reducer({"name": BASELINE})
    rows = []
    for v in tqdm(visual, desc="scaling", disable=not progress):
        if v % per_image:
            raise ConfigError(f"scaling visual tokens must be multiples of {per_image}, got {v}")
        images = v // per_image
        inputs = make_inputs(model, 1, images=images, text_tokens=int(b.get("text_tokens", 64)))
        reducer = runner.build_reducer(_budget_fields(strategy, budget, per_image, images))
        tm = _interleaved(model, none, reducer, inputs, repeats)
        sb, sr = tm["base"], tm["run"]
        row = {
            "visual": v,
            "strategy": strategy,
            "budget": budget,
            "base_prefill_ms": _median_ms(tm["base_s"]),
            "prefill_ms": _median_ms(tm["run_s"]),
            "overhead_ms": _median_ms(tm["overhead_s"]),
            "base_tflops": sb["acc"][0].flops * 1e-12,
            "tflops": sr["acc"][0].flops * 1e-12,
            "equivalent_tokens": sr["acc"][0].equivalent_tokens,
        }
        row["prefill_ms_ratio"] = row["prefill_ms"] / row["base_prefill_ms"]
        row["tflops_ratio"] = row["tflops"] / row["base_tflops"]
        row["overhead_share"] = row["overhead_ms"] / row["prefill_ms"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- output
def _f(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def format_bench(rows: list[dict]) -> str:
    head = (
        "| strategy | budget | batch | eq. tok | prefill ms (none) | prefill % | decoder ms (none) | decoder % "
        "| TFLOPs (none) | FLOPs % | overhead ms | decode ms/tok (none) | decode % | prefill samples/s "
        "| decode tok/s | KV MB (none) | peak MB (none) |"
    )
    lines = [head, "|" + "|".join("---" for _ in range(17)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['budget']} | {r['batch']} | {_f(r['equivalent_tokens'])} "
            f"| {_f(r['prefill_ms'])} ({_f(r['base_prefill_ms'])}) | {_f(100 * r['prefill_ms_ratio'])} "
            f"| {_f(r['decoder_ms'])} ({_f(r['base_decoder_ms'])}) | {_f(100 * r['decoder_ms_ratio'])} "
            f"| {_f(r['tflops'], '.3f')} ({_f(r['base_tflops'], '.3f')}) | {_f(100 * r['tflops_ratio'])} "
            f"| {_f(r['overhead_ms'])} | {_f(r['decode_ms'])} ({_f(r['base_decode_ms'])}) "
            f"| {_f(None if r['decode_ms_ratio'] is None else 100 * r['decode_ms_ratio'])} "
            f"| {_f(r['prefill_tput'], '.2f')} ({_f(r['base_prefill_tput'], '.2f')}) "
            f"| {_f(r['decode_tput'])} ({_f(r['base_decode_tput'])}) "
            f"| {_f(r['kv_mb'])} ({_f(r['base_kv_mb'])}) | {_f(r['peak_mb'])} ({_f(r['base_peak_mb'])}) |"
        )
    by = {}
    for r in rows:
        by.setdefault((r["strategy"], r["budget"]), {})[r["batch"]] = r
    notes = []
    for (s, bu), d in by.items():
        if 1 in d and len(d) > 1:
            for bsz, r in sorted(d.items()):
                if bsz == 1:
                    continue
                notes.append(
                    f"{s} {bu}: batch {bsz} vs batch 1 prefill throughput "
                    f"x{r['prefill_tput'] / d[1]['prefill_tput']:.2f} "
                    f"(none x{r['base_prefill_tput'] / d[1]['base_prefill_tput']:.2f}); decode throughput "
                    f"x{_ratio_str(r['decode_tput'], d[1]['decode_tput'])} "
                    f"(none x{_ratio_str(r['base_decode_tput'], d[1]['base_decode_tput'])})"
                )
    for r in rows:
        if r["batch"] == 1:
            gap = lambda ratio: f"{100 * (ratio / r['tflops_ratio'] - 1):+.1f} %"  # noqa: E731
            notes.append(
                f"{r['strategy']} {r['budget']} batch 1: FLOPs ratio {r['tflops_ratio']:.3f}; latency ratio "
                f"of the decoder stack (the FLOPs formula's scope) {r['decoder_ms_ratio']:.3f} "
                f"({gap(r['decoder_ms_ratio'])}), of the whole prefill {r['prefill_ms_ratio']:.3f} "
                f"({gap(r['prefill_ms_ratio'])})"
            )
    if rows:
        notes.append(
            "decoder = the language model's forward (engine hooks and the strategy's own work included; "
            "vision tower, projector and lm_head excluded, as in the paper's FLOPs formula, which also "
            "counts the full n^2 attention the causal kernels halve)"
        )
    return "\n".join(lines + [""] + notes)


def _ratio_str(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def format_scaling(rows: list[dict]) -> str:
    lines = [
        "| visual tokens | prefill ms none | prefill ms reduced | latency % | FLOPs % | strategy overhead ms "
        "| overhead % of prefill |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['visual']} | {r['base_prefill_ms']:.1f} | {r['prefill_ms']:.1f} | {100 * r['prefill_ms_ratio']:.1f} "
            f"| {100 * r['tflops_ratio']:.1f} | {r['overhead_ms']:.1f} | {100 * r['overhead_share']:.1f} |"
        )
    return "\n".join(lines)


def plot_scaling(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = [r["visual"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(v, [r["base_prefill_ms"] for r in rows], "ko-", label="no reduction")
    ax.plot(v, [r["prefill_ms"] for r in rows], "o-", label=f"{rows[0]['strategy']} {rows[0]['budget']}")
    ax.plot(v, [r["overhead_ms"] for r in rows], "s--", label=f"{rows[0]['strategy']} own overhead")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("prefill ms (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> int:
    torch.set_num_threads(int(args.threads))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # on the CPU, forwards must not page-fault their activations afresh (`metrics.keep_freed_host_memory`)
    print(f"host allocator: {metrics.host_allocator(args.host_allocator, device)}")
    backbone = args.backbone or ("llava7b_shape" if device.startswith("cuda") else "bench_cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strategies = [s for s in args.strategies.split(",") if s]
    budgets = [int(x) for x in args.budgets.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    if not args.scaling_only:
        rows = bench(
            backbone,
            strategies,
            budgets,
            batches,
            args.repeats,
            args.decode_tokens,
            device,
            args.overrides,
            progress=not args.quiet,
        )
        text = format_bench(rows)
        print(
            f"backbone {backbone} on {device}, {torch.get_num_threads()} thread(s); medians of {args.repeats} "
            f"(batch 1) / {max(1, (args.repeats + 1) // 2)} (larger) interleaved repeats; "
            f"(none) = no reduction measured in the same run"
        )
        print(text)
        (out / "bench.md").write_text(text + "\n")
        (out / "bench.json").write_text(json.dumps(rows, indent=1))
    if args.scaling or args.scaling_only:
        visual = [int(x) for x in args.visual.split(",") if x]
        srows = scaling(
            backbone,
            strategies[0],
            budgets[0],
            visual,
            max(1, args.repeats - 1),
            device,
            args.overrides,
            progress=not args.quiet,
        )
        text = format_scaling(srows)
        print(f"\nscaling: {strategies[0]} {budgets[0]} (same ratio of the visual tokens), batch 1")
        print(text)
        (out / "scaling.md").write_text(text + "\n")
        (out / "scaling.json").write_text(json.dumps(srows, indent=1))
        print(f"wrote {plot_scaling(srows, out / 'scaling.png')}")
    return 0
