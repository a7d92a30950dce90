"""`sparsevlm report`: rows, columns, files, and numbers equal to the results they come from."""

import csv
import json

import pytest

from framework.errors import ConfigError

QT = ["colour_of", "shape_of", "relation", "count"]


def _row(
    name, strategy, budget, acc, by_type, eq, tflops, prefill, ratio=None, overlays=None, ablation=None, base=10.0
):
    return {
        "run_key": name,
        "sweep": "s",
        "name": name,
        "strategy": strategy,
        "budget": budget,
        "base_prefill_ms": base,
        "base_decode_ms": base / 5,
        "ablation": ablation or {},
        "backbone": "toy",
        "task": "toy_vqa",
        "n": 40,
        "n_visual": 144,
        "accuracy": acc,
        "acc_by_type": dict(zip(QT, by_type)),
        "equivalent_tokens": eq,
        "tflops": tflops,
        "flops_ratio": tflops / 2e-5,
        "prefill_ms": prefill,
        "prefill_ms_ratio": prefill / 10.0,
        "decode_ms": 1.5,
        "kv_cache_mb": eq / 100,
        "peak_mb": 3.0,
        "accuracy_ratio": ratio,
        "overlays": overlays or [],
        "config": {"task": {"name": "toy_vqa", "seed": 3, "n": 40, "qtypes": QT}},
    }


@pytest.fixture
def results(tmp_path):
    ov = [
        {"index": 0, "qtype": "relation", "correct": True, "groups": [[0], [5], [9, 10, 11]]},
        {"index": 1, "qtype": "relation", "correct": False, "groups": [[3], [4]]},
    ]
    rows = [
        _row("fastv-21", "fastv", 21, 0.5, [0.6, 0.5, 0.4, 0.5], 31.8, 1.4e-5, 7.0, 0.625, ov, base=12.0),
        _row("none", "none", None, 0.8, [0.9, 0.8, 0.7, 0.8], 64.0, 2e-5, 9.0, 1.0, base=9.0),
        _row(
            "sparsevlm-7-recycling=off",
            "sparsevlm",
            7,
            0.55,
            [0.6, 0.6, 0.5, 0.5],
            5.0,
            0.9e-5,
            6.0,
            0.6875,
            ov,
            {"recycling": False},
            base=10.0,
        ),
        _row("fastv-7", "fastv", 7, 0.3, [0.3, 0.3, 0.3, 0.3], 21.2, 1.2e-5, 6.5, 0.375, ov, base=11.0),
    ]
    path = tmp_path / "results.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if i == 1:
                f.write("{not json\n")  # a corrupted line (line 3): reported, the other rows kept
        f.write('{"run_key": "trunc')  # an interrupted write (line 6) is ignored
    return tmp_path, rows


# the one no-reduction reference: the median of the four interleaved baseline timings (9, 10, 11, 12)
REF = 10.5


def test_report_table_and_files(results, capsys):
    from experiments.cli import main

    out, rows = results
    assert main(["report", str(out)]) == 2  # lines that are not rows: named, the report written from the rest
    captured = capsys.readouterr()
    text = captured.out
    assert "line(s) 3, 6 are not result rows" in captured.err
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:2] == ["method", "budget"]
    assert header[2:6] == [f"{q} %" for q in QT]
    for col in (
        "avg %",
        "% of none",
        "eq. tokens kept",
        "TFLOPs",
        "FLOPs %",
        "prefill ms",
        "prefill %",
        "decode ms/tok",
        "decode %",
    ):
        assert col in header
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    # baseline first, then strategies in first-seen order, budgets descending
    assert [b[0] for b in body] == ["none", "fastv-21", "fastv-7", "sparsevlm-7-recycling=off"]
    assert "median of its 4 timings" in text
    by_name = {r["name"]: r for r in rows}
    for b in body:
        r = by_name[b[0]]
        cell = dict(zip(header, b))
        assert float(cell["avg %"]) == pytest.approx(100 * r["accuracy"], abs=0.05)
        assert float(cell["relation %"]) == pytest.approx(100 * r["acc_by_type"]["relation"], abs=0.05)
        assert float(cell["% of none"]) == pytest.approx(100 * r["accuracy_ratio"], abs=0.05)
        assert float(cell["eq. tokens kept"]) == pytest.approx(r["equivalent_tokens"], abs=0.05)
        # every ratio follows from the printed time and the one reference the none row shows
        ms = REF if r["strategy"] == "none" else r["prefill_ms"]
        assert float(cell["prefill ms"]) == pytest.approx(ms, abs=0.05)
        assert float(cell["prefill %"]) == pytest.approx(100 * ms / REF, abs=0.05)
        assert cell["budget"] == ("144" if r["strategy"] == "none" else str(r["budget"]))
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


def test_report_holds_every_row_of_the_results(tmp_path):
    """Rows are runs (run keys), not names: two runs that share a name (e.g. older rows of another config)
    are both in the table; a run key logged twice counts once (its last row)."""
    from experiments.report import make_report

    rows = [
        _row("none", "none", None, 0.8, [0.9] * 4, 144.0, 2e-5, 9.0),
        _row("sparsevlm", "sparsevlm", None, 0.5, [0.5] * 4, 40.0, 1e-5, 6.0, ablation={"recycling": True}),
        _row("sparsevlm", "sparsevlm", None, 0.4, [0.4] * 4, 38.0, 1e-5, 6.0, ablation={"recycling": False}),
    ]
    rows[2]["run_key"] = "other"
    again = dict(rows[1], accuracy=0.55)
    with open(tmp_path / "results.jsonl", "w") as f:
        for r in rows + [again]:
            f.write(json.dumps(r) + "\n")
    rep = make_report(tmp_path, plots=False, echo=False)
    assert [r["run_key"] for r in rep["results"]] == ["none", "other", "sparsevlm"]  # in the order logged
    assert [r["avg %"] for r in rep["rows"]] == pytest.approx([80.0, 40.0, 55.0])
    assert [r["budget"] for r in rep["rows"]] == [144, "own", "own"]


@pytest.mark.slow
def test_plots_hold_every_run_at_sweep_size(tmp_path):
    """41 rows (the recycling sweep's size): every reduced run is a point of exactly one labelled line, the
    labels name the varying fields, the legend sits outside the axes, overlays come in pages of <= 8 runs."""
    import itertools

    from PIL import Image

    from experiments.report import make_report, series

    ov = [
        {"index": i, "qtype": "relation", "correct": i % 2 == 0, "groups": [[j] for j in range(0, 144, 3)]}
        for i in range(3)
    ]
    rows = [_row("none", "none", None, 0.8, [0.8] * 4, 144.0, 2e-5, 9.0, 1.0)]
    for variant, rec, mode, pos in itertools.product(
        ["v1.5", "plus"], [True, False], ["fixed", "rank_v1", "rank_paper"], ["repack", "keep"]
    ):
        ab = {"variant": variant, "recycling": rec, "budget": mode, "positions": pos}
        for budget in [None] if mode == "rank_paper" else [48, 16]:
            name = "-".join(["sparsevlm"] + ([str(budget)] if budget else []) + [f"{k}={v}" for k, v in ab.items()])
            rows.append(_row(name, "sparsevlm", budget, 0.5, [0.5] * 4, budget or 30.0, 1e-5, 6.0, 0.6, ov, ab))
    assert len(rows) == 41
    with open(tmp_path / "results.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    lines = series(rows)
    points = [r["name"] for rs in lines.values() for r in rs]
    assert sorted(points) == sorted(r["name"] for r in rows[1:])  # each reduced run once
    assert len(lines) == 24 and "sparsevlm variant=plus recycling=off budget=rank_paper positions=keep" in lines
    rep = make_report(tmp_path, echo=False)
    assert len(rep["rows"]) == 41 and len({r["method"] for r in rep["rows"]}) == 41
    pages = sorted(p.name for p in tmp_path.glob("overlays*.png"))
    assert pages == ["overlays-2.png", "overlays-3.png", "overlays-4.png", "overlays-5.png", "overlays.png"]
    width, _ = Image.open(tmp_path / "acc_vs_tokens.png").size
    assert width > 6.4 * 110 * 1.3  # the axes' width plus a legend beside them
