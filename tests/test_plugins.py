"""Strategies from outside the repo, budgets mapped by the strategy, config checks, and the import layering."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from framework import ScoringReducer, attach, build, register
from framework.errors import ConfigError
from framework.registry import available, unregister
from tests.tiny import llava_inputs, make_llava

ROOT = Path(__file__).resolve().parents[1]
FAST = ["backbone=toy_random", "run=fast", "task.batch_size=20", "run.wandb=false", "run.report=false"]


def _readme_strategy() -> str:
    """The README's one-file strategy (`my_strategy.py`), verbatim."""
    m = re.search(r"```python\n(# my_strategy\.py\n.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert m, "README.md lost its my_strategy.py example"
    return m.group(1)


def test_readme_strategy_runs_from_outside_the_repo(tmp_path):
    """A directory holding only my_strategy.py: `sparsevlm run --import my_strategy ...` prints its row."""
    (tmp_path / "my_strategy.py").write_text(_readme_strategy())
    exe = Path(sys.executable).parent / "sparsevlm"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [str(exe), "run", "--import", "my_strategy", "sweep=single", "strategy=l2norm", "budget=21", "task.n=50"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| l2norm-21 "))
    assert row.split("|")[2].strip() == "21"  # the budget column
    assert not (ROOT / "experiments" / "conf" / "strategy" / "l2norm.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_strategy.py", "outputs"]


def test_import_of_a_missing_module_is_one_clear_error(tmp_path, capsys):
    from experiments.cli import main

    assert main(["run", "--import", str(tmp_path / "nope.py")]) == 2
    assert "--import" in capsys.readouterr().err


@dataclass
class HalfBudget(ScoringReducer):
    """Test strategy: keeps half the sweep budget (its own budget mapping), scored by position."""

    layer: int = 1
    keep: int | float = 0.5

    @classmethod
    def for_budget(cls, fields, budget, n_visual):
        return {**fields, "keep": max(1, budget // 2)}

    def score(self, ctx, b):
        return -torch.arange(ctx.n_visual(b), dtype=torch.float)


@pytest.fixture
def half_budget():
    register("half_budget_test")(HalfBudget)
    yield "half_budget_test"
    unregister("half_budget_test")


def test_strategy_maps_its_own_budget_through_the_runner(tmp_path, half_budget):
    from experiments import runner, sweep

    cfg = runner.compose(
        [*FAST, "sweep=single", f"strategy={half_budget}", "budget=21", "task.n=4", f"out_dir={tmp_path}"]
    )
    assert cfg.strategy.keep == 0.5  # a strategy without a YAML: its dataclass defaults
    rows = sweep.run_sweep(cfg, quiet=True)
    row = rows[-1]
    assert row["fields"]["keep"] == 10 and row["budget"] == 21
    vis = row["visual_per_layer"]  # the decision is before layer 1: all visual tokens enter layer 0, then 10
    assert vis[0] == row["n_visual"] > 21 and vis[1:] == [10] * (len(vis) - 1)
    # the runner names no strategy; the sweep and the report only the baseline every ratio refers to
    for src, allowed in (("runner.py", ()), ("sweep.py", (sweep.BASELINE,)), ("report.py", (sweep.BASELINE,))):
        text = (ROOT / "experiments" / src).read_text()
        named = [n for n in available() if re.search(rf"[\"']{re.escape(n)}[\"']", text) and n not in allowed]
        assert not named, f"experiments/{src} names strategies {named}"


@pytest.mark.parametrize(
    "override, match",
    [
        ("strategy.recycling=maybe", r"field 'recycling' got 'maybe' \(str\); expected bool"),
        ("+strategy.layers=3", r"field 'layers' got 3 \(int\); expected list\[int\] \| None"),
        ("+strategy.tau=high", r"field 'tau' got 'high' \(str\); expected float"),
    ],
)
def test_strategy_overrides_are_checked_against_field_types(override, match):
    from experiments import runner

    with pytest.raises(ConfigError, match=match):
        runner.compose(["sweep=single", "strategy=sparsevlm", override])


def test_strategy_on_a_sweep_with_its_own_list_is_an_error():
    """`sparsevlm run strategy=x` on the main sweep used to be ignored silently."""
    from experiments import runner

    with pytest.raises(
        ConfigError,
        match=r"strategy=fastv was given, but sweep 'main' runs its own list .*"
        r"`sweep=single strategy=fastv budget=N`",
    ):
        runner.compose(["strategy=fastv"])
    with pytest.raises(ConfigError, match=r"budget=7 was given, but sweep 'main' runs its own budgets"):
        runner.compose(["budget=7"])
    assert runner.compose(["sweep=single", "strategy=fastv", "budget=7"]).strategy.name == "fastv"


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "tome", "keep": 6},
        {"name": "visionzip", "dominant": 5, "contextual": 2},
        {"name": "sparsevlm", "layers": [0, 1], "keep": [8, 4]},
    ],
)
def test_one_reducer_attached_twice_in_sequence(cfg):
    """Per-forward state lives in the engine's context state: the reducer is unchanged by a run and gives
    the same result when attached again."""
    model = make_llava(layers=4, grid=4)
    x = llava_inputs(model, [(3, 5), (1, 2)])
    reducer = build(cfg)
    before = dict(vars(reducer))
    outs = []
    for _ in range(2):
        with attach(model, reducer) as engine, torch.no_grad():
            outs.append((model(**x).logits, [s["visual_per_layer"] for s in engine.last_record]))
        assert dict(vars(reducer)).keys() == before.keys()
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    assert outs[0][1][0][-1] < 16


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of every module a file imports (top level or inside functions)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = [package, *path.relative_to(ROOT / package).parent.parts]
                base = ".".join(parts[: len(parts) - node.level + 1])
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("framework", ("models", "experiments", "strategies")),
        ("models", ("experiments", "strategies")),
        ("strategies", ("models", "experiments")),
    ],
)
def test_imports_point_one_way(package, forbidden):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == "models/toy.py":  # the old toy testbed, being moved out
            continue
        bad += [f"{path.relative_to(ROOT)} -> {n}" for n in _imports(path, package) if n.split(".")[0] in forbidden]
    assert not bad, bad
