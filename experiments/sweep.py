"""Sweeps: strategies x budgets x ablation flags from one config, resumable.

`sweep.strategies` lists strategy names (each takes its fields from `conf/strategy/<name>.yaml`, or from
the composed `strategy` node when it is the selected one, so `strategy.layer=3` overrides apply);
`sweep.budgets` lists visual-token budgets; `sweep.ablations` maps `strategy.field` (or a bare `field`,
for every listed strategy that has it) to a list of values. `none` runs once, first: it is the baseline
every other row's ratios refer to. Every run is checked (strategy built, budget applied) before the
first one starts, so a typo fails in a second, not an hour in.

Resume: each run has a `run_key` (hash of backbone, task, strategy fields and budget). Rows already in
the results file are skipped; a run interrupted before its row is appended is simply run again.
Latency ratios are always measured against a baseline timed in the same process (interleaved).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from framework.errors import ConfigError

from . import runner
from .logging_utils import WANDB_PROJECT, ResultsFile, log_wandb, run_key, write_jsonl_atomic


@dataclass
class RunSpec:
    strategy: str
    budget: int | None
    fields: dict
    ablation: dict = field(default_factory=dict)
    key: str = ""
    name: str = ""


BASELINE = "none"  # the identity reducer: every row's ratios refer to it, so it runs first


def expand(cfg, n_visual: int | None, adapter=None) -> list[RunSpec]:
    """The grid of runs a config describes (baseline first), every one validated. With n_visual None
    (before the backbone loads) budgets are left out: strategies, fields and ablations are checked."""
    from framework import registry
    from framework.budget import apply_budget

    sw = cfg.sweep
    for key in ("strategies", "budgets"):
        value = runner.to_dict(sw.get(key))
        if value is not None and not isinstance(value, list):
            raise ConfigError(
                f"sweep.{key}={value!r}; allowed: a list, e.g. sweep.{key}="
                + ("[none,fastv]" if key == "strategies" else "[48,16]")
            )
    strategies = list(sw.strategies) if sw.get("strategies") else [cfg.strategy.name]
    budgets = list(sw.budgets) if sw.get("budgets") else [cfg.get("budget")]
    for b in budgets:  # the type before any weights load; the range once the backbone says its visual tokens
        if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
            raise ConfigError(
                f"budget must be a count of visual tokens (an int, 1..the backbone's visual tokens), got {b!r}"
            )
        if b is not None and b < 1:
            raise ConfigError(
                f"budget {b} is not allowed: a count of visual tokens kept; allowed 1..the backbone's visual tokens"
            )
    if n_visual is None:
        budgets = [None]
    ablations = _flatten_axes(runner.to_dict(sw.get("ablations") or {}))
    for s in strategies:
        registry.get(s)
    if BASELINE in strategies:
        strategies.remove(BASELINE)
    nodes = {s: runner.strategy_node(s, cfg.strategy) for s in strategies}
    fields_of = {s: {f.name for f in dataclasses.fields(registry.get(s))} for s in strategies}
    if not sw.get("budgets") and cfg.get("budget") is None:
        for s in strategies:
            _check_budget_given(s, nodes[s])
    axes: dict[str, list[tuple[str, list]]] = {s: [] for s in strategies}
    for key, values in ablations.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.ablations.{key} must be a non-empty list of values")
        strat, _, fname = key.rpartition(".")
        targets = [strat] if strat else [s for s in strategies if fname in fields_of[s]]
        for t in targets:
            if t not in fields_of:
                raise ConfigError(f"ablation {key!r} names strategy {t!r}, not in this sweep ({strategies})")
            if fname not in fields_of[t]:
                raise ConfigError(
                    f"unknown ablation key {key!r}: strategy {t!r} has no field {fname!r}; "
                    f"allowed: {sorted(fields_of[t] - {'name'})}"
                )
        if not targets:
            raise ConfigError(f"ablation {key!r}: no strategy in {strategies} has a field {fname!r}")
        for t in targets:
            axes[t].append((fname, values))
    specs = [RunSpec(BASELINE, None, {"name": BASELINE})]
    for s in strategies:
        names = [a[0] for a in axes[s]]
        for budget in budgets:
            for combo in itertools.product(*[a[1] for a in axes[s]]):
                raw = {**nodes[s], **dict(zip(names, combo))}
                # a budget the strategy does not use (it sets its own count) gives one run, not one per budget
                fields, used = apply_budget(raw, budget, n_visual or 0)
                reducer = runner.build_reducer(fields)  # validate now
                if adapter is not None:
                    reducer.setup(adapter)
                spec = RunSpec(s, used, fields, dict(zip(names, combo)))
                if not any(o.strategy == s and o.budget == used and o.fields == fields for o in specs):
                    specs.append(spec)
    backbone = runner.to_dict(cfg.backbone)
    task = runner.to_dict(cfg.task)
    for sp in specs:
        sp.key = run_key({"backbone": backbone, "task": task, "strategy": sp.fields, "budget": sp.budget})
        sp.name = run_name(sp, changed(sp.strategy, nodes.get(sp.strategy, {})))
    check_unique_names(specs, cfg.sweep.name)
    return specs


def _check_budget_given(strategy: str, node: dict) -> None:
    """`sweep=single` with no `budget=` for a strategy that takes one, and none of its fields set: refuse
    rather than run the YAML default under a budget nobody chose."""
    from framework import registry
    from framework.budget import REFERENCE_VISUAL_TOKENS as ref

    if changed(strategy, node):
        return  # its own fields were given (e.g. strategy.keep=10): they decide
    cls, fields = registry.strategy_fields(node)
    try:
        takes = cls.for_budget(dict(fields), ref // 3, ref) is not None
    except ConfigError:
        takes = False
    if takes:
        raise ConfigError(
            f"strategy {strategy!r} needs a budget: add budget=N (a count of visual tokens, 1..the "
            f"backbone's visual tokens), or set its own fields (strategy.<field>=...)"
        )


def changed(strategy: str, node: dict) -> dict:
    """The fields of a strategy's config node that differ from its shipped YAML / dataclass defaults
    (`strategy.<field>=...` overrides): they name the run as the ablation fields do."""
    if strategy == BASELINE:
        return {}
    default = runner.strategy_node(strategy)
    return {k: v for k, v in node.items() if k != "name" and default.get(k) != v}


def run_name(spec: RunSpec, overrides: dict | None = None) -> str:
    """`<strategy>[-<budget>][-<field>=<value>...]` from what varies: the budget (absent when the strategy sets
    its own count), the ablation fields and any overridden fields (e.g. `sparsevlm-budget=rank_paper-recycling=off`)."""
    tags = {**(overrides or {}), **spec.ablation}
    parts = [spec.strategy] + ([str(spec.budget)] if spec.budget is not None else [])
    return "-".join(parts + [f"{k}={_short(v)}" for k, v in tags.items()])


def check_unique_names(specs: list[RunSpec], sweep: str) -> None:
    """Refuse, before anything runs, a sweep in which two different runs would share a name (tables, plots and
    W&B would show one of them)."""
    seen: dict[str, RunSpec] = {}
    for sp in specs:
        other = seen.setdefault(sp.name, sp)
        if other is not sp:
            diff = sorted(k for k in {*sp.fields, *other.fields} if sp.fields.get(k) != other.fields.get(k))
            raise ConfigError(
                f"sweep {sweep!r}: two runs would both be named {sp.name!r} (they differ in "
                f"{diff or ['budget']}); make the differing field an ablation axis "
                "(sweep.ablations.<strategy>.<field>=[...]) so it names the runs"
            )


def _flatten_axes(d: dict, prefix: str = "") -> dict:
    """{"<strategy>": {"<field>": [..]}} (from +sweep.ablations.<strategy>.<field>=[..])
    -> {"<strategy>.<field>": [..]}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_axes(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    return {True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def _evaluate(cfg, bb: runner.Backbone, samples, spec: RunSpec, base_row: dict | None, progress) -> tuple[dict, list]:
    from framework import registry

    from . import metrics

    run = runner.to_dict(cfg.run)
    reducer = runner.build_reducer(spec.fields)
    t0 = time.time()
    res = runner.run_test(bb, samples, reducer, cfg.run, int(cfg.task.batch_size), desc=spec.name)
    eval_s = time.time() - t0
    lat = run.get("latency", {})
    inputs = runner.latency_inputs(bb, samples, int(lat.get("samples", 4)))
    reducers = {"run": reducer} if spec.strategy == BASELINE else {"base": registry.build(BASELINE), "run": reducer}
    timing = metrics.measure_pair(
        bb.model,
        inputs,
        reducers,
        repeats=int(lat.get("repeats", 3)),
        new_tokens=int(lat.get("decode_tokens", 8)),
        memory=bool(lat.get("memory", True)),
    )
    base_t = timing.get("base", timing["run"])
    records = res.pop("records")
    row = {
        "run_key": spec.key,
        "sweep": cfg.sweep.name,
        "name": spec.name,
        "strategy": spec.strategy,
        "budget": spec.budget,
        "ablation": spec.ablation,
        "fields": spec.fields,
        "reducer": repr(reducer),
        "backbone": bb.name,
        "task": cfg.task.name,
        "n_visual": bb.n_visual,
        **res,
        "prefill_ms": timing["run"]["prefill_ms"],
        "decode_ms": timing["run"]["decode_ms"],
        "peak_mb": timing["run"]["peak_mb"],
        "base_prefill_ms": base_t["prefill_ms"],
        "base_decode_ms": base_t["decode_ms"],
        "base_peak_mb": base_t["peak_mb"],
        "eval_seconds": eval_s,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": runner.to_dict(cfg),
    }
    row["kv_cache_mb_base"] = res["kv_cache_mb"] if base_row is None else base_row["kv_cache_mb"]
    base_acc = row["accuracy"] if base_row is None else base_row["accuracy"]
    base_by_type = row["acc_by_type"] if base_row is None else base_row["acc_by_type"]
    row["base_accuracy"] = base_acc
    row["accuracy_ratio"] = metrics.ratio(row["accuracy"], base_acc)
    row["acc_ratio_by_type"] = {k: metrics.ratio(v, base_by_type.get(k)) for k, v in row["acc_by_type"].items()}
    for k in ("prefill_ms", "decode_ms", "peak_mb"):
        row[f"{k}_ratio"] = metrics.ratio(row[k], row[f"base_{k}"])
    row["kv_cache_mb_ratio"] = metrics.ratio(row["kv_cache_mb"], row["kv_cache_mb_base"])
    return row, records


def wandb_config(cfg, spec: RunSpec) -> dict:
    """The effective config of one run, as W&B should filter and group it: the strategy with every field
    after budget mapping, the budget used, the backbone, task and run settings, the sweep and the run key."""
    return {
        "strategy": effective_fields(spec.fields),
        "budget": spec.budget,
        "ablation": dict(spec.ablation),
        "backbone": runner.to_dict(cfg.backbone),
        "task": runner.to_dict(cfg.task),
        "run": runner.to_dict(cfg.run),
        "sweep": cfg.sweep.name,
        "out_dir": str(cfg.out_dir),
        "run_key": spec.key,
        "name": spec.name,
    }


def effective_fields(fields: dict) -> dict:
    """Every init field of the reducer the fields build (defaults and the values `__post_init__` resolves,
    e.g. SparseVLM's variant-dependent `positions`), with its name first."""
    reducer = runner.build_reducer(fields)
    values = {f.name: getattr(reducer, f.name) for f in dataclasses.fields(reducer) if f.init}
    return {"name": fields["name"], **json.loads(json.dumps(values, default=repr))}


def wandb_tags(spec: RunSpec, specs: list[RunSpec]) -> list[str]:
    """The strategy's name and `<field>=<value>` for each ablation field that takes several values in the sweep."""
    values: dict[str, set] = {}
    for sp in specs:
        for k, v in sp.ablation.items():
            values.setdefault(k, set()).add(repr(v))
    return [spec.strategy] + [f"{k}={_short(v)}" for k, v in spec.ablation.items() if len(values[k]) > 1]


def run_sweep(cfg, on_row: Callable[[dict, int], None] | None = None, quiet: bool = False) -> list[dict]:
    """Run (or resume) every run of the config's sweep; returns the sweep's rows (in grid order)."""
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(int(cfg.run.get("threads", 1)))
    out = Path(cfg.out_dir)
    expand(cfg, None)  # strategies, fields, types and ablations: checked before any weights load
    samples = runner.load_task(cfg.task)
    bb = runner.load_backbone(cfg.backbone)
    specs = expand(cfg, bb.n_visual, bb.adapter)
    results = ResultsFile(out / "results.jsonl")
    if results.repair() and not quiet:
        print(f"note: removed a truncated last line from {results.path}")
    done = {r["run_key"]: r for r in results.rows()}
    if not quiet:
        results.warn_bad_lines()
    todo = [s for s in specs if s.key not in done]
    if not quiet:
        print(f"sweep {cfg.sweep.name!r}: {len(specs)} runs ({len(specs) - len(todo)} already done) -> {out}")
    base_row = done.get(specs[0].key)
    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        desc=f"sweep {cfg.sweep.name}",
        unit="run",
        disable=quiet or not cfg.run.get("progress", True),
        position=0,
    )
    finished = 0
    try:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            row, records = _evaluate(cfg, bb, samples, spec, base_row, bar)
            if cfg.run.get("per_sample", True):
                write_jsonl_atomic(out / "samples" / f"{spec.key}.jsonl", records)
            if cfg.run.get("wandb", True):
                row["wandb_dir"] = log_wandb(
                    row,
                    wandb_config(cfg, spec),
                    cfg.run.get("wandb_dir") or out,
                    group=cfg.sweep.name,
                    name=spec.name,
                    tags=wandb_tags(spec, specs),
                    project=cfg.run.get("wandb_project", WANDB_PROJECT),
                    samples=records,
                    key=spec.key,
                )
            results.append(row)  # the commit point
            done[spec.key] = row
            if spec.strategy == BASELINE:
                base_row = row
            finished += 1
            bar.update(1)
            if on_row is not None:
                on_row(row, finished)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"interrupted after {sum(s.key in done for s in specs)} of {len(specs)} runs "
            f"(results in {results.path}); rerun the same command to resume"
        ) from None
    bar.close()
    return [done[s.key] for s in specs]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the message says how far it got and how to resume."""


def hydra_main() -> None:
    """Hydra entry point: `python -m experiments.sweep -m sweep=single strategy=fastv,sparsevlm budget=48,16`
    runs one job per combination through Hydra's launcher (basic: sequential; plugins: clusters). Jobs
    sharing an `out_dir` share one results file, so the baseline runs once and reruns resume."""
    import hydra

    runner._register_strategy_defaults()

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        OmegaConf.resolve(cfg)
        try:
            runner.check_overrides(cfg, HydraConfig.get().overrides.task)
            runner.check_strategy_fields(cfg)
            runner.check_run(cfg.run)
            run_sweep(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as err:
            print(str(err) or "interrupted; rerun the same command to resume", file=sys.stderr)
            raise SystemExit(130) from None

    _main()


if __name__ == "__main__":
    hydra_main()
