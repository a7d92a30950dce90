"""`sparsevlm report`: rows, columns, files, and numbers equal to the results they come from."""
import csv
import json

import pytest

from framework.errors import ConfigError

QT = ["colour_of", "shape_of", "relation", "count"]


def _row(name, strategy, budget, acc, by_type, eq, tflops, prefill, ratio=None, overlays=None, ablation=None):
    return {"run_key": name, "sweep": "s", "name": name, "strategy": strategy, "budget": budget,
            "ablation": ablation or {}, "backbone": "toy", "task": "toy_vqa", "n": 40, "n_visual": 144,
            "accuracy": acc, "acc_by_type": dict(zip(QT, by_type)), "equivalent_tokens": eq, "tflops": tflops,
            "flops_ratio": tflops / 2e-5, "prefill_ms": prefill, "prefill_ms_ratio": prefill / 10.0,
            "decode_ms": 1.5, "kv_cache_mb": eq / 100, "peak_mb": 3.0, "accuracy_ratio": ratio,
            "overlays": overlays or [], "config": {"task": {"name": "toy_vqa", "seed": 3, "n": 40, "qtypes": QT}}}


@pytest.fixture
def results(tmp_path):
    ov = [{"index": 0, "qtype": "relation", "correct": True, "groups": [[0], [5], [9, 10, 11]]},
          {"index": 1, "qtype": "relation", "correct": False, "groups": [[3], [4]]}]
    rows = [
        _row("fastv-21", "fastv", 21, 0.5, [0.6, 0.5, 0.4, 0.5], 31.8, 1.4e-5, 7.0, 0.625, ov),
        _row("none", "none", None, 0.8, [0.9, 0.8, 0.7, 0.8], 64.0, 2e-5, 10.0, 1.0),
        _row("sparsevlm-7-recycling=off", "sparsevlm", 7, 0.55, [0.6, 0.6, 0.5, 0.5], 5.0, 0.9e-5, 6.0, 0.6875, ov,
             {"recycling": False}),
        _row("fastv-7", "fastv", 7, 0.3, [0.3, 0.3, 0.3, 0.3], 21.2, 1.2e-5, 6.5, 0.375, ov),
    ]
    path = tmp_path / "results.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"run_key": "trunc')  # an interrupted write is ignored
    return tmp_path, rows


def test_report_table_and_files(results, capsys):
    from experiments.cli import main

    out, rows = results
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["method", "budget"]
    assert header[2:6] == [f"{q} %" for q in QT]
    for col in ("avg %", "% of none", "eq. tokens", "TFLOPs", "FLOPs %", "prefill ms", "prefill %", "decode ms/tok"):
        assert col in header
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    # baseline first, then strategies in first-seen order, budgets descending
    assert [b[0] for b in body] == ["none", "fastv-21", "fastv-7", "sparsevlm-7-recycling=off"]
    by_name = {r["name"]: r for r in rows}
    for b in body:
        r = by_name[b[0]]
        cell = dict(zip(header, b))
        assert float(cell["avg %"]) == pytest.approx(100 * r["accuracy"], abs=0.05)
        assert float(cell["relation %"]) == pytest.approx(100 * r["acc_by_type"]["relation"], abs=0.05)
        assert float(cell["% of none"]) == pytest.approx(100 * r["accuracy_ratio"], abs=0.05)
        assert float(cell["eq. tokens"]) == pytest.approx(r["equivalent_tokens"], abs=0.05)
        assert float(cell["prefill ms"]) == pytest.approx(r["prefill_ms"], abs=0.05)
        assert float(cell["prefill %"]) == pytest.approx(100 * r["prefill_ms_ratio"], abs=0.05)
        assert float(cell["TFLOPs"]) == pytest.approx(r["tflops"], rel=0.01)
    for f in ("table.md", "table.csv", "acc_vs_tokens.png", "acc_vs_latency.png", "overlays.png"):
        assert (out / f).stat().st_size > 0
    with open(out / "table.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == [b[0] for b in body]
    assert float(csv_rows[1]["avg %"]) == pytest.approx(50.0)  # exact values in the CSV
    assert float(csv_rows[1]["TFLOPs"]) == pytest.approx(1.4e-5)


def test_report_api_and_sweep_filter(results):
    from experiments.report import make_report

    out, rows = results
    rep = make_report(out, out_dir=out / "r", plots=False, echo=False)
    assert [r["method"] for r in rep["rows"]][0] == "none" and len(rep["rows"]) == 4
    assert rep["rows"][1]["FLOPs %"] == pytest.approx(70.0)
    with pytest.raises(ConfigError, match="no result rows"):
        make_report(out, sweep="other", plots=False, echo=False)
    with pytest.raises(ConfigError, match="no results file"):
        make_report(out / "missing", plots=False, echo=False)
