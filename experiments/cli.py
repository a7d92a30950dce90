"""The `sparsevlm` console command. Sub-commands register themselves in COMMANDS."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from framework.errors import ConfigError


def cmd_list(args) -> int:
    from experiments.commands import import_user_strategies
    from framework.backbones import backbone_catalogue
    from framework.registry import catalogue

    import_user_strategies(args)
    print("strategies:")  # read from the strategies' source: listing imports none of them (nor torch)
    for name, (stages, doc) in catalogue().items():
        print(f"  {name:<11} [{'|'.join(stages)}] {doc}")
    print("backbones:")
    for family, (stages, doc, options) in backbone_catalogue().items():
        opts = ", ".join(options)
        print(f"  {family:<11} stages: {', '.join(stages):<24} {doc}" + (f"; adapter options: {opts}" if opts else ""))
    conf = Path(__file__).resolve().parent / "conf"  # the runner's config groups (importing it imports torch)
    for group in ("backbone", "sweep", "task"):
        print(f"{group} configs ({group}=...): {', '.join(sorted(p.stem for p in (conf / group).glob('*.yaml')))}")
    return 0


def add_list(sub) -> None:
    from experiments.commands import add_import_option

    p = sub.add_parser("list", help="strategies and backbones")
    add_import_option(p)
    p.set_defaults(func=cmd_list)


def cmd_flops(args) -> int:
    from framework.accounting import (
        equivalent_tokens,
        kv_cache_bytes,
        parse_schedule,
        prefill_flops,
    )

    visual = parse_schedule(args.keep or "", args.layers, args.visual)
    tokens = [v + args.text for v in visual]
    flops = prefill_flops(tokens, args.hidden, args.ffn)
    head_dim = args.hidden // args.heads
    kv = kv_cache_bytes(tokens, args.kv_heads or args.heads, head_dim, 2)
    base = prefill_flops([args.visual + args.text] * args.layers, args.hidden, args.ffn)
    out = {
        "tflops": flops * 1e-12,
        "flops_ratio": flops / base,
        "equivalent_tokens": equivalent_tokens(visual),
        "tokens_per_layer": tokens,
        "visual_per_layer": visual,
        "kv_cache_mb_fp16": kv / 2**20,
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"decoder: {args.layers} layers, d={args.hidden}, m={args.ffn}; {args.visual} visual + {args.text} other tokens"
    )
    print(f"{'layers':<10}{'visual in':>10}{'tokens in':>10}")
    start = 0
    for i in range(1, args.layers + 1):
        if i == args.layers or visual[i] != visual[start]:
            print(f"{f'{start}-{i - 1}':<10}{visual[start]:>10}{tokens[start]:>10}")
            start = i
    print(f"prefill TFLOPs      {out['tflops']:.3f}  ({out['flops_ratio']:.1%} of no reduction)")
    print(f"equivalent tokens   {out['equivalent_tokens']:.2f}")
    print(f"KV cache (fp16)     {out['kv_cache_mb_fp16']:.1f} MB")
    return 0


def add_flops(sub) -> None:
    p = sub.add_parser("flops", help="prefill FLOPs / equivalent tokens for a decoder shape and a schedule")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--visual", type=int, default=576)
    p.add_argument("--text", type=int, default=118, help="non-visual tokens in the prompt")
    p.add_argument("--keep", default="", help="LAYER:KEPT,... visual tokens remaining after each pruning layer")
    p.add_argument("--json", action="store_true", help="one JSON object (tflops, equivalent_tokens, tokens_per_layer)")
    p.set_defaults(func=cmd_flops)


COMMANDS = [add_list, add_flops]


def _all_commands() -> list:
    """list/flops live here; run, report and bench in experiments.commands (imported only when called)."""
    from experiments.commands import COMMANDS as more

    return COMMANDS + [c for c in more if c not in COMMANDS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsevlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _all_commands():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # a sweep says how far it got; elsewhere nothing was written yet
        print(
            str(err) or "interrupted before the first run finished; rerun the same command to resume", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
