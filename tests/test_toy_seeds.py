"""experiments.toy_seeds: runs one train_toy per seed in parallel and tabulates their eval.json."""
import json
import sys

import pytest

from experiments import toy_seeds


def _fake_run(seed, out, extra, recipe=False):
    """Stands in for train_toy: writes an eval.json whose accuracy is 0.9 + seed / 100; seed 3 fails."""
    script = (
        "import json, pathlib, sys\n"
        f"seed, out = {seed}, pathlib.Path({str(out)!r}) / 'seed{seed}'\n"
        "if seed == 3: sys.exit(3)\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "acc = 0.9 + seed / 100\n"
        "clean = {'overall': acc, 'colour_at': 1.0, 'shape_at': 1.0, 'left_of': acc, 'above': acc}\n"
        "(out / 'eval.json').write_text(json.dumps({'clean': clean}))\n"
    )
    return [sys.executable, "-c", script]


def test_runs_every_seed_and_reports_the_spread(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy_seeds, "seed_command", _fake_run)
    toy_seeds.main(["--seeds", "0,2", "--out", str(tmp_path), "--parallel", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"]["2"]["overall"] == pytest.approx(0.92)
    assert summary["spread"] == pytest.approx(0.02) and summary["failed"] == []
    assert "spread 2.0 points" in capsys.readouterr().out


def test_a_failed_seed_is_reported_and_the_others_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy_seeds, "seed_command", _fake_run)
    with pytest.raises(SystemExit) as e:
        toy_seeds.main(["--seeds", "1,3", "--out", str(tmp_path)])
    assert e.value.code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [3] and summary["seeds"]["3"] is None
    assert summary["seeds"]["1"]["overall"] == pytest.approx(0.91)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 3 ")]
    assert rows == [["3", "failed", "failed", "failed", "failed", "failed"]]


def test_seed_command_passes_train_toy_arguments_through(tmp_path):
    cmd = toy_seeds.seed_command(4, tmp_path, ["--regrow-regions", "--steps", "10"])
    assert cmd[1:3] == ["-m", "experiments.train_toy"]
    assert cmd[cmd.index("--seed") + 1] == "4" and cmd[cmd.index("--out") + 1] == str(tmp_path / "seed4")
    assert cmd[-3:] == ["--regrow-regions", "--steps", "10"] and "--resume" in cmd


def test_recipe_runs_toy_recipe_per_seed(tmp_path):
    cmd = toy_seeds.seed_command(4, tmp_path, [], recipe=True)
    assert cmd[1:3] == ["-m", "experiments.toy_recipe"]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "seed4")
    assert cmd[cmd.index("--ckpt-dir") + 1] == str(tmp_path / "ckpt" / "seed4")
    with pytest.raises(SystemExit, match="not allowed"):
        toy_seeds.main(["--seeds", "1", "--out", str(tmp_path), "--recipe", "--", "--steps", "5"])


@pytest.mark.parametrize("bad", ["", "1,x", "1,1"])
def test_bad_seed_list_fails_clearly(bad, tmp_path):
    with pytest.raises(SystemExit, match="--seeds"):
        toy_seeds.main(["--seeds", bad, "--out", str(tmp_path)])
