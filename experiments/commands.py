"""`sparsevlm run`, `sparsevlm sweep`, `sparsevlm report`, `sparsevlm bench` (picked up by experiments.cli)."""

from __future__ import annotations

import os


def _env() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def import_user_strategies(args) -> None:
    from framework.registry import import_strategies

    for spec in args.imports:
        import_strategies(spec)


def add_import_option(p) -> None:
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE_OR_PATH",
        help="import a module or .py file that registers strategies (repeatable); the working "
        "directory is searched first",
    )


def cmd_run(args) -> int:
    _env()
    from . import report, runner, sweep

    import_user_strategies(args)
    cfg = runner.compose(args.overrides)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    rows = sweep.run_sweep(cfg)
    if cfg.run.get("report", True):
        print()
        report.make_report(
            cfg.out_dir, sweep=cfg.sweep.name, plots=not args.no_plots, keys=[r["run_key"] for r in rows]
        )
    return 0


def add_run(sub) -> None:
    doc = (
        "evaluate strategies x budgets on a task (default: the toy model, none/random/fastv/tome/sparsevlm "
        "at 48 and 16 of 144 visual tokens), print the table, write plots"
    )
    for name in ("run", "sweep"):
        p = sub.add_parser(name, help=doc if name == "run" else "alias of run (sweep=<name> picks the grid)")
        p.add_argument(
            "overrides",
            nargs="*",
            help="Hydra/OmegaConf overrides: sweep=recycling strategy=fastv "
            "budget=48 task.n=200 run.devices=2 out_dir=...",
        )
        p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
        add_import_option(p)
        p.add_argument("--no-plots", action="store_true")
        p.set_defaults(func=cmd_run)


def cmd_report(args) -> int:
    from . import report

    made = report.make_report(args.results, out_dir=args.out, sweep=args.sweep, plots=not args.no_plots)
    return 2 if made["bad_lines"] else 0  # the report holds the good rows; the warning named the bad lines


def add_report(sub) -> None:
    p = sub.add_parser("report", help="table + plots + token overlays from a results.jsonl")
    p.add_argument("results", nargs="?", default="outputs/main", help="results.jsonl or the folder holding it")
    p.add_argument("--out", default=None, help="where tables and PNGs go (default: next to the results)")
    p.add_argument("--sweep", default=None, help="only rows of this sweep name")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_report)


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def add_bench(sub) -> None:
    """`sparsevlm bench` (the benchmark module, torch included, is imported only when it runs)."""
    p = sub.add_parser("bench", help="efficiency benchmark on random-weight models of real shapes")
    p.add_argument("--backbone", default=None, help="bench_cpu (CPU default) | llava7b_shape (GPU default)")
    p.add_argument("--strategies", default="sparsevlm", help="comma list, e.g. sparsevlm,fastv,tome")
    p.add_argument("--budgets", default="64", help="visual tokens kept (of 576), comma list")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats at batch 1 (half as many for larger batches)")
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--host-allocator",
        choices=("keep", "default"),
        default="keep",
        help="on the CPU: keep freed memory in the process, so forwards do not page-fault their activations "
        "afresh (experiments.metrics.keep_freed_host_memory; for the rest of the process), or leave it as it is",
    )
    p.add_argument("--scaling", action="store_true", help="also the visual-token scaling sweep")
    p.add_argument("--scaling-only", action="store_true")
    p.add_argument("--visual", default="576,1152,2304,4608")
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. backbone.text.layers=4")
    p.set_defaults(func=cmd_bench)


COMMANDS = [add_run, add_report, add_bench]
