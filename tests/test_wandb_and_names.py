"""Run names come from what varies in a sweep, and each W&B run's config is the effective one (read back from
the offline run files, as `wandb sync` would upload them)."""

import dataclasses

import pytest

from tests.wandb_offline import read_run

FAST = ["backbone=toy_random", "run=fast", "task.n=4", "task.batch_size=4"]


def _compose(*overrides):
    from experiments import runner

    return runner.compose([*FAST, *overrides])


def test_recycling_sweep_names_every_run_apart():
    from experiments import sweep

    specs = sweep.expand(_compose("sweep=recycling"), 144)
    names = [s.name for s in specs]
    assert len(specs) == 41 and len(set(names)) == 41
    paper = [s for s in specs if s.fields.get("budget") == "rank_paper"]
    assert len(paper) == 8 and all(s.budget is None and "budget=rank_paper" in s.name for s in paper)
    assert all(not s.name.startswith("sparsevlm-48") for s in paper)  # no budget in the name it does not use
    assert "sparsevlm-16-variant=plus-recycling=off-budget=rank_v1-positions=keep" in names


def test_overridden_fields_name_a_single_run():
    from experiments import sweep

    names = [
        s.name
        for s in sweep.expand(
            _compose("sweep=single", "strategy=sparsevlm", "budget=16", "strategy.budget=rank_v1"), 144
        )
    ]
    assert names == ["none", "sparsevlm-16-budget=rank_v1"]
    names = [s.name for s in sweep.expand(_compose("sweep=single", "strategy=fastv", "strategy.keep=10"), 144)]
    assert names == ["none", "fastv-keep=10"]  # no budget given: its own field decides and names it


@pytest.mark.slow
def test_wandb_offline_config_is_the_effective_one(tmp_path):
    from experiments import sweep
    from strategies.sparsevlm import SparseVLM

    cfg = _compose(
        f"out_dir={tmp_path}",
        "sweep.name=wb",
        "sweep.strategies=[none,sparsevlm]",
        "sweep.budgets=[16]",
        "+sweep.ablations.sparsevlm.recycling=[true,false]",
    )
    rows = sweep.run_sweep(cfg, quiet=True)
    runs = {r["name"]: r for r in map(read_run, sorted((tmp_path / "wandb").glob("offline-run-*")))}
    assert (
        sorted(runs)
        == sorted(r["name"] for r in rows)
        == ["none", "sparsevlm-16-recycling=off", "sparsevlm-16-recycling=on"]
    )
    fields = {f.name for f in dataclasses.fields(SparseVLM) if f.init}
    for name, run in runs.items():
        c = run["config"]
        assert run["group"] == "wb" and c["sweep"] == "wb"
        assert c["backbone"]["loader"] == "toy_random" and c["task"]["n"] == 4 and c["run"]["latency"]["repeats"] == 1
        if name == "none":
            assert c["strategy"]["name"] == "none" and c["budget"] is None and run["tags"] == ["none"]
            continue
        on = name.endswith("on")
        assert set(c["strategy"]) == fields | {"name"}
        # after budget mapping (16 of 144 -> preset 64) and __post_init__ (v1.5 re-packs positions)
        assert c["strategy"]["preset"] == "64" and c["strategy"]["recycling"] is on
        assert c["strategy"]["positions"] == "repack" and c["budget"] == 16
        assert run["tags"] == ["sparsevlm", f"recycling={'on' if on else 'off'}"]
