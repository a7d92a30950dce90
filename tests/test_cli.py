"""`sparsevlm flops` reproduces the paper's TFLOPs and equivalent tokens; `sparsevlm list` lists things."""

import json

import pytest

from experiments.cli import main

SHAPE = ["--layers", "32", "--hidden", "4096", "--ffn", "11008", "--visual", "576", "--text", "118"]


def run_json(capsys, *extra):
    assert main(["flops", *SHAPE, *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flops_no_reduction(capsys):
    out = run_json(capsys)
    assert out["tflops"] == pytest.approx(4.62, abs=0.005)
    assert out["equivalent_tokens"] == 576
    assert out["tokens_per_layer"] == [694] * 32


@pytest.mark.parametrize(
    "keep,tflops,equiv",
    [("2:309,6:204,15:113", 2.14, 192.03), ("2:312,6:117,15:39", 1.72, 128.6), ("2:82,6:32,15:18", 1.30, 64.8)],
)
def test_flops_paper_schedules(capsys, keep, tflops, equiv):
    out = run_json(capsys, "--keep", keep)
    assert out["tflops"] == pytest.approx(tflops, rel=0.015)
    assert out["equivalent_tokens"] == pytest.approx(equiv, abs=0.05)  # the paper rounds to 0.1 (192.03 to 0.01)
    first = int(keep.split(":")[0])
    assert out["tokens_per_layer"][: first + 1] == [694] * (first + 1)


def test_flops_table_and_errors(capsys):
    assert main(["flops", *SHAPE, "--keep", "2:309"]) == 0
    text = capsys.readouterr().out
    assert "0-2" in text and "3-31" in text and "equivalent tokens" in text
    assert main(["flops", "--keep", "2:999"]) == 2
    assert "allowed 1..576" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("none", "random", "fastv", "llava"):
        assert name in text
