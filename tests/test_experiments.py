"""Experiments layer: configs, the Lightning runner (incl. DDP), resumable sweeps with W&B offline,
the `sparsevlm run` main job (reduced, on an untrained toy-shaped model), the lmms-eval plugin."""

import json
import os
from pathlib import Path

import pytest

from framework.errors import ConfigError
from tests.tiny import TINY_TOY

FAST = ["backbone=toy_random", "run=fast", "task.batch_size=20"]


def _compose(*overrides):
    from experiments import runner

    return runner.compose([*FAST, *overrides])


# ---------------------------------------------------------------------------------------- configs
def test_compose_defaults_and_overrides():
    from experiments import runner

    cfg = runner.compose([])
    assert cfg.backbone.loader == "toy" and cfg.task.name == "toy_vqa"
    assert list(cfg.sweep.strategies) == ["none", "random", "fastv", "tome", "sparsevlm"]
    assert list(cfg.sweep.budgets) == [48, 16]
    cfg = runner.compose(["sweep=single", "strategy=fastv", "strategy.layer=3", "task.n=7"])
    assert cfg.strategy.layer == 3 and cfg.task.n == 7


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["strategy=bogus"], "unknown strategy option 'bogus'"),
        (["backbone=nope"], "unknown backbone option"),
        (["foo=1"], "unknown config key 'foo'"),
        (["strategy=fastv", "strategy.nope=1"], "unknown config key"),
    ],
)
def test_bad_config_is_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _compose(*overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["sweep=single", "strategy=fastv", "budget=145"],
            "budget 145 is not allowed: the backbone has 144 visual tokens",
        ),
        (["task.n=0"], "has no questions"),
        (["task.qtypes=[]"], "has no questions"),
        (["task.qtypes=[colour_at,weather]"], "unknown question type"),
        (["sweep.strategies=[none,nosuch]"], "unknown strategy 'nosuch'"),
        (["+sweep.ablations.sparsevlm.bogus=[1,2]", "sweep.strategies=[sparsevlm]"], "has no field 'bogus'"),
        (["sweep=single", "strategy=fastv", "+strategy.bogus=3", "budget=4"], r"unknown config key\(s\) \['bogus'\]"),
    ],
)
def test_bad_run_config_fails_before_any_run(tmp_path, overrides, match):
    from experiments import sweep

    with pytest.raises(ConfigError, match=match):  # at compose time or when the sweep is expanded
        sweep.run_sweep(_compose("task.n=4", f"out_dir={tmp_path}", *overrides), quiet=True)
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_reports_config_error(capsys):
    from experiments.cli import main

    assert main(["run", "strategy=bogus"]) == 2
    assert "unknown strategy option 'bogus'" in capsys.readouterr().err


def test_budget_mapping():
    """Each strategy maps a budget to its own fields (`for_budget`): keep by default, presets for
    sparsevlm (by mode), none and sparsevlm rank_paper take no budget."""
    from framework.budget import apply_budget

    assert apply_budget({"name": "fastv", "layer": 2}, 21, 64) == ({"name": "fastv", "layer": 2, "keep": 21}, 21)
    assert apply_budget({"name": "sparsevlm"}, 21, 64)[0]["preset"] == "192"
    assert apply_budget({"name": "sparsevlm"}, 7, 64)[0]["preset"] == "64"
    assert apply_budget({"name": "sparsevlm", "budget": "rank_v1"}, 14, 64)[0]["preset"] == "128"
    assert apply_budget({"name": "sparsevlm", "budget": "rank_paper"}, 7, 64) == (
        {"name": "sparsevlm", "budget": "rank_paper"},
        None,
    )
    assert apply_budget({"name": "none"}, 7, 64) == ({"name": "none"}, None)
    with pytest.raises(ConfigError, match="allowed 1..64"):
        apply_budget({"name": "random"}, 100, 64)
    # a budget far from every preset is refused, not snapped to the nearest one
    with pytest.raises(ConfigError, match=r"budget 40 of 64 .* allowed budgets: \[7, 11, 14, 21\]"):
        apply_budget({"name": "sparsevlm"}, 40, 64)
    with pytest.raises(ConfigError, match="takes no budget"):
        apply_budget({"name": "chain", "reducers": [{"name": "fastv"}]}, 7, 64)


def test_budget_free_modes_run_once_per_combination():
    """sparsevlm rank_paper sets its own count (Eq. 7): one run per ablation combination, not per budget."""
    from experiments import runner, sweep

    specs = sweep.expand(runner.compose(["backbone=toy_random", "sweep=recycling"]), 144)
    modes = [(s.budget, s.fields.get("budget")) for s in specs if s.strategy == "sparsevlm"]
    # baseline + variant x recycling x positions x (fixed, rank_v1 x 2 budgets; rank_paper)
    assert len(specs) == 1 + 2 * 2 * 2 * (2 * 2 + 1)
    assert modes.count((None, "rank_paper")) == 8 and modes.count((48, "fixed")) == 8


# ---------------------------------------------------------------------------------------- runner
def test_runner_ddp_matches_single_process():
    """Lightning DDP (2 CPU processes, gloo) evaluates disjoint shards; gathered results equal devices=1."""
    from experiments import runner
    from framework import build

    cfg = _compose("task.n=24", "task.batch_size=6")
    bb = runner.load_backbone(cfg.backbone)
    samples = runner.load_task(cfg.task)
    one = runner.run_test(bb, samples, build({"name": "fastv", "keep": 7}), cfg.run, 6)
    two = runner.run_test(bb, samples, build({"name": "fastv", "keep": 7}), _compose("run.devices=2").run, 6)
    assert {r["rank"] for r in two["records"]} == {0, 1}
    assert two["n"] == one["n"] == 24
    assert two["accuracy"] == one["accuracy"] and two["acc_by_type"] == one["acc_by_type"]
    assert [r["pred"] for r in two["records"]] == [r["pred"] for r in one["records"]]
    assert two["visual_per_layer"] == one["visual_per_layer"]
    assert one["visual_per_layer"][:2] == [144, 144] and one["visual_per_layer"][2] == 7


def _wandb_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_sweep_grid_wandb_and_resume(tmp_path):
    """2 strategies x 2 budgets x an on/off flag = 8 rows (+ the no-reduction baseline), 1 W&B run each;
    an interruption after 3 runs and a truncated last line resume without duplicates."""
    from experiments import sweep
    from experiments.logging_utils import ResultsFile

    overrides = [
        "task.n=8",
        f"out_dir={tmp_path}",
        "sweep.name=grid",
        "sweep.strategies=[none,sparsevlm,fastv]",
        "sweep.budgets=[48,16]",
        "+sweep.ablations.sparsevlm.recycling=[true,false]",
        "+sweep.ablations.fastv.positions=[keep,repack]",
        "run.per_sample=true",
    ]
    cfg = _compose(*overrides)

    class Boom(Exception):
        pass

    def interrupt(row, k):
        if k == 3:
            raise Boom

    with pytest.raises(Boom):
        sweep.run_sweep(cfg, on_row=interrupt, quiet=True)
    results = ResultsFile(tmp_path / "results.jsonl")
    assert len(results.rows()) == 3
    # a run killed inside the final write leaves a partial line
    with open(results.path, "a") as f:
        f.write('{"run_key": "partial", "accur')
    rows = sweep.run_sweep(_compose(*overrides), quiet=True)
    assert len(rows) == 9
    stored = results.rows()
    keys = [r["run_key"] for r in stored]
    assert len(keys) == len(set(keys)) == 9 and "partial" not in keys
    assert results.path.read_text().endswith("\n")
    assert all(json.loads(line) for line in results.path.read_text().splitlines())
    reduced = [r for r in stored if r["strategy"] != "none"]
    assert len(reduced) == 8
    assert {(r["strategy"], r["budget"], json.dumps(r["ablation"])) for r in reduced} == {
        (s, b, json.dumps({k: v}))
        for s, k, vs in (("sparsevlm", "recycling", (True, False)), ("fastv", "positions", ("keep", "repack")))
        for b in (48, 16)
        for v in vs
    }
    assert len(_wandb_runs(tmp_path)) == 9
    # a third invocation does nothing
    assert len(sweep.run_sweep(_compose(*overrides), quiet=True)) == 9
    assert len(results.rows()) == 9 and len(_wandb_runs(tmp_path)) == 9
    assert len({p.name.split("-")[3] for p in _wandb_runs(tmp_path)}) == 9  # one W&B run id per run
    # what each row carries
    base = next(r for r in stored if r["strategy"] == "none")
    for r in stored:
        assert set(r["acc_by_type"]) == set(_compose().task.qtypes)
        assert len(r["visual_per_layer"]) == 4 and r["tflops"] > 0 and r["kv_cache_mb"] > 0
        assert r["prefill_ms"] > 0 and r["base_prefill_ms"] > 0 and r["decode_ms"] > 0
        assert r["prefill_ms_ratio"] == pytest.approx(r["prefill_ms"] / r["base_prefill_ms"])
        assert r["kv_cache_mb_ratio"] == pytest.approx(r["kv_cache_mb"] / base["kv_cache_mb"])
        assert r["flops_ratio"] <= 1.0 and r["config"]["backbone"]["loader"] == "toy_random"
        assert (tmp_path / "samples" / f"{r['run_key']}.jsonl").exists()
    assert base["flops_ratio"] == 1.0 and base["equivalent_tokens"] == 144
    fv = next(r for r in stored if r["strategy"] == "fastv" and r["budget"] == 16)
    assert fv["visual_per_layer"] == [144, 144, 16, 16]


def test_main_job_reduced(tmp_path, capsys):
    """`sparsevlm run` = the default sweep (none/random/fastv/tome/sparsevlm x 48, 16) + table + plots;
    here on an untrained toy-shaped model with few questions."""
    from experiments.cli import main

    rc = main(["run", *FAST, "task.n=8", "run.wandb=false", f"out_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    for name in (
        "none",
        "random-48",
        "random-16",
        "fastv-48",
        "fastv-16",
        "tome-48",
        "tome-16",
        "sparsevlm-48",
        "sparsevlm-16",
    ):
        assert f"| {name} " in out
    for f in ("acc_vs_tokens.png", "acc_vs_latency.png", "overlays.png", "table.md", "table.csv"):
        assert (tmp_path / f).stat().st_size > 0


# ---------------------------------------------------------------------------------------- lmms-eval
def test_lmms_plugin_registration():
    from importlib.metadata import entry_points

    from experiments.lmms_plugin import SparseVLMLmms

    eps = [e for e in entry_points(group="lmms_eval") if e.name == "sparsevlm"]
    assert eps and eps[0].value == "experiments.lmms_plugin:SparseVLMLmms"
    assert eps[0].load() is SparseVLMLmms


def test_lmms_plugin_fake_task():
    from types import SimpleNamespace

    from experiments.lmms_plugin import SparseVLMLmms
    from experiments.toy import task as toy_task
    from experiments.toy.model import build_processor, build_toy_model

    model, tok = build_toy_model(TINY_TOY)
    model.generation_config.eos_token_id = None
    proc = build_processor(tok)
    with pytest.raises(ConfigError, match="unknown argument"):
        SparseVLMLmms(model=model, processor=proc, strategy="fastv", budget=8, nonsense=1)
    with pytest.raises(ConfigError, match="llava adapter: unknown option"):
        SparseVLMLmms(model=model, processor=proc, strategy="fastv", budget=8, adapter_args="newline=text")
    lm = SparseVLMLmms(
        model=model,
        processor=proc,
        strategy="sparsevlm",
        budget="48",
        strategy_args="recycling=false",
        max_new_tokens=3,
    )
    assert lm.reducer.recycling is False and lm.reducer.preset == "192"
    sample = toy_task.generate(0, 1)[0]
    lm.task_dict = {"fake": {"test": {0: {"image": sample.image}}}}
    req = SimpleNamespace(
        args=(sample.question, {"until": ["\n"], "max_new_tokens": 3}, lambda doc: [doc["image"]], 0, "fake", "test")
    )
    out = lm.generate_until([req])
    assert len(out) == 1 and isinstance(out[0], str)
    acc = lm.records[0]["accounting"]
    assert acc["visual_per_layer"][0] == 144 and acc["visual_per_layer"][-1] < 144
    # batch_size=2 over 3 prompts (a padded batch, then one alone) answers exactly as one at a time
    samples = toy_task.generate(1, 3, ["colour_of", "relation", "exists"])  # prompts of different lengths
    docs = {i: {"image": s.image} for i, s in enumerate(samples)}
    reqs = [
        SimpleNamespace(
            args=(s.question, {"until": ["\n"], "max_new_tokens": 3}, lambda doc: [doc["image"]], i, "fake", "test")
        )
        for i, s in enumerate(samples)
    ]
    answers = {}
    for bs in (1, 2):
        lm2 = SparseVLMLmms(
            model=model, processor=proc, strategy="sparsevlm", budget="48", batch_size=bs, max_new_tokens=3
        )
        lm2.task_dict = {"fake": {"test": docs}}
        answers[bs] = (lm2.generate_until(reqs), [r["accounting"]["visual_per_layer"] for r in lm2.records])
    assert answers[1] == answers[2] and len(answers[2][0]) == 3
    with pytest.raises(NotImplementedError, match="SparseVLMLmms"):
        lm.loglikelihood([req])


def test_killed_between_wandb_and_results_row_reuses_the_wandb_run(tmp_path, monkeypatch):
    from experiments import sweep
    from experiments.logging_utils import ResultsFile

    overrides = [
        "task.n=4",
        f"out_dir={tmp_path}",
        "sweep.name=kill",
        "sweep.strategies=[none,fastv]",
        "sweep.budgets=[7]",
    ]
    real = ResultsFile.append

    def killed(self, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultsFile, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(_compose(*overrides), quiet=True)
    monkeypatch.setattr(ResultsFile, "append", real)
    rows = sweep.run_sweep(_compose(*overrides), quiet=True)
    ids = [p.name.split("-")[3] for p in _wandb_runs(tmp_path)]
    assert len(rows) == 2 and len(ids) == 3 and len(set(ids)) == 2, [p.name for p in _wandb_runs(tmp_path)]


@pytest.mark.slow
def test_hydra_multirun_shares_results(tmp_path):
    """`python -m experiments.sweep -m ...`: one Hydra job per combination, one results file, baseline once."""
    import subprocess
    import sys

    from experiments.logging_utils import ResultsFile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            "-m",
            *FAST,
            "task.n=6",
            "sweep=single",
            "strategy=fastv,random",
            "budget=21,7",
            f"out_dir={tmp_path}",
            "run.report=false",
            "run.wandb=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = ResultsFile(tmp_path / "results.jsonl").rows()
    assert sorted(r["name"] for r in rows) == ["fastv-21", "fastv-7", "none", "random-21", "random-7"]


def test_lmms_plugin_prompts_real_processors_with_their_chat_template():
    from transformers import CLIPImageProcessor, LlavaProcessor

    from experiments.lmms_plugin import SparseVLMLmms
    from experiments.toy.model import build_toy_model

    model, tok = build_toy_model(TINY_TOY)
    template = (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ c['text'] + ' ' }}{% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(),
        tokenizer=tok,
        chat_template=template,
        patch_size=8,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    lm = SparseVLMLmms(model=model, processor=proc, strategy="none")
    assert lm._prompt("what colour ?", 2) == "USER: <image>\n<image>\nwhat colour ? ASSISTANT:"
    proc.chat_template = None
    assert lm._prompt("what colour ?", 1) == "<image> what colour ?"
