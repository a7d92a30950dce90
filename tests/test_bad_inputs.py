"""The issue's list of bad inputs: each is one line naming what is wrong and what is allowed, exit code 2
from the command line, no traceback, and an existing results file left exactly as it was. Ctrl-C says how
far a sweep got; a text-only prompt runs the stock model with one warning."""

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from framework import ConfigError, attach, build
from tests.tiny import llava_inputs, make_llava

BASE = ["backbone=toy_random", "run=fast", "task.n=4", "task.batch_size=4", "run.wandb=false", "run.report=false"]
SINGLE = ["sweep=single", "strategy=fastv"]

# (overrides, what the one line must say)
BAD = [
    (["strategy=fastvv"], r"unknown strategy option 'fastvv'; available: .*fastv"),
    (["backbone=llava13b"], r"unknown backbone option 'llava13b'; available: .*toy_llava, toy_random"),
    (SINGLE + ["budget=145"], r"budget 145 is not allowed: the backbone has 144 visual tokens; allowed 1\.\.144"),
    (SINGLE + ["budget=-5"], r"budget -5 is not allowed: .*allowed 1\.\.the backbone's visual tokens"),
    (SINGLE + ["budget=0"], r"budget 0 is not allowed: .*allowed 1\.\.the backbone's visual tokens"),
    (SINGLE + ["budget=abc"], r"budget must be a count of visual tokens \(an int, 1\.\..*\), got 'abc'"),
    (SINGLE + ["budget=0.5"], r"budget must be a count of visual tokens \(an int, 1\.\..*\), got 0\.5"),
    (["task.nn=50"], r"unknown config key 'task.nn': task 'toy_vqa' has name, seed, n, batch_size, qtypes"),
    (SINGLE + ["budget=4", "strategy.kep=3"], r"unknown config key 'strategy.kep': strategy 'fastv' has .*keep"),
    (["task.n=abc"], r"task.n='abc' \(str\); allowed: an integer >= 1"),
    (["sweep.strategies=fastv"], r"sweep.strategies='fastv'; allowed: a list, e.g. sweep.strategies=\[none,fastv\]"),
    (["sweep.budgets=48"], r"sweep.budgets=48; allowed: a list"),
    (["run.devices=abc"], r"run.devices='abc' \(str\); allowed: an int, like the default 1"),
    (["run.latency.repeats=2.5"], r"run.latency.repeats=2.5 \(float\); allowed: an int, like the default 3"),
    (
        ["sweep=single", "strategy=sparsevlm", "budget=16", "strategy.budget=rank"],
        r"sparsevlm budget='rank'; allowed: \['fixed', 'rank_v1', 'rank_paper'\]",
    ),
    (
        ["sweep=single", "strategy=sparsevlm", "budget=16", "strategy.recycling=maybe"],
        r"field 'recycling' got 'maybe' \(str\); expected bool \| None",
    ),
    (["backbone=toy_llava", "backbone.path=/nonexistent"], r"no toy checkpoint at /nonexistent.*backbone=toy_random"),
    (["sweep=recyling"], r"unknown sweep option 'recyling'; available: .*recycling"),
    (SINGLE, r"strategy 'fastv' needs a budget: add budget=N"),
]


@pytest.fixture
def results(tmp_path):
    """An out_dir holding two finished rows: a refused command must leave them byte for byte."""
    path = tmp_path / "results.jsonl"
    path.write_text(
        "".join(
            json.dumps({"run_key": k, "name": k, "strategy": "none", "sweep": "single", "accuracy": 0.5}) + "\n"
            for k in ("a1", "b2")
        )
    )
    return path


@pytest.mark.parametrize("overrides, match", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_one_line_exit_2(overrides, match, results, capsys):
    from experiments.cli import main

    before = results.read_bytes()
    assert main(["run", *BASE, f"out_dir={results.parent}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert __import__("re").search(match, err[0]), err[0]
    assert results.read_bytes() == before


@pytest.mark.parametrize(
    "bad, match",
    [
        ("budget=abc", "budget must be a count"),
        ("budget=0", "budget 0 is not"),
        ("strategy.recycling=maybe", "field 'recycling'"),
        ("task.n=abc", "task.n='abc'"),
    ],
)
def test_bad_values_fail_before_any_weights_load(bad, match, capsys):
    """A checkpoint that does not exist would fail the load: these errors come first."""
    from experiments.cli import main

    args = [
        "run",
        *BASE,
        "backbone=toy_llava",
        "backbone.path=/nonexistent",
        "sweep=single",
        "strategy=sparsevlm",
        "budget=16",
        bad,
    ]
    assert main(args) == 2
    assert match in capsys.readouterr().err


def test_list_shows_the_names_the_backbone_error_offers(capsys):
    from experiments.cli import main
    from experiments.runner import options

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"backbone configs (backbone=...): {', '.join(options('backbone'))}" in out


def test_report_on_a_missing_folder(tmp_path, capsys):
    from experiments.cli import main

    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no results file at" in err[0] and "run `sparsevlm run`" in err[0]


def test_sweep_whose_run_names_collide_is_refused(tmp_path):
    from experiments import runner, sweep

    cfg = runner.compose([*BASE, f"out_dir={tmp_path}", "sweep.strategies=[none,fastv]", "sweep.budgets=[16]"])
    specs = sweep.expand(cfg, 144)
    specs.append(sweep.RunSpec("fastv", 16, {**specs[1].fields, "layer": 3}, name=specs[1].name))
    with pytest.raises(ConfigError, match=r"two runs would both be named 'fastv-16' \(they differ in \['layer'\]\)"):
        sweep.check_unique_names(specs, "main")


@pytest.fixture(scope="module")
def model():
    return make_llava(layers=4)


def test_image_tokens_without_pixel_values(model):
    x = llava_inputs(model, [(2, 3)])
    with (
        attach(model, build("fastv")),
        pytest.raises(
            ConfigError,
            match=r"holds 16 image/video tokens .* but no "
            r"pixel values were given",
        ),
    ):
        model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])


def test_second_attach_on_the_same_model(model):
    x = llava_inputs(model, [(2, 3)])
    with attach(model, build("fastv")):
        with pytest.raises(ConfigError, match=r"already has a reducer attached \(FastV\).*leave the first"):
            with attach(model, build("random")):
                pass
        model(**x)  # the first one still works
    with attach(model, build("random")):  # and once it is gone, another attaches
        model(**x)
    assert [m for m in model.modules() if m._forward_pre_hooks] == []


def test_text_only_prompt_runs_the_stock_model_with_one_warning(model):
    x = llava_inputs(model, [(2, 3)])
    ids = x["input_ids"].masked_fill(x["input_ids"] == model.config.image_token_id, 5)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=x["attention_mask"]).logits
        with attach(model, build("fastv")), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(input_ids=ids, attention_mask=x["attention_mask"]).logits
    assert torch.equal(out, ref)
    msgs = [str(w.message) for w in caught if "no visual input" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]


@pytest.mark.slow
def test_ctrl_c_says_how_far_the_sweep_got(tmp_path):
    """SIGINT after the first finished run: one line, exit 130, the finished rows kept; rerunning resumes."""
    out = tmp_path / "out"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "sparsevlm"),
        "run",
        "backbone=toy_random",
        "task.n=120",
        "task.batch_size=4",
        "run.wandb=false",
        "run.report=false",
        f"out_dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    rows = out / "results.jsonl"
    try:
        while proc.poll() is None and not (rows.exists() and rows.stat().st_size):
            __import__("time").sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    done = len(rows.read_text().splitlines())
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert last == (f"interrupted after {done} of 9 runs (results in {rows}); rerun the same command to resume")
    keys = [json.loads(line)["run_key"] for line in rows.read_text().splitlines()]
    assert len(keys) == len(set(keys)) >= 1
