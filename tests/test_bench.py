"""`sparsevlm bench` on a small random-weight LLaVA-shaped model (the real shapes are too slow for tests)."""
import json

import pytest

SMALL = ["backbone.text.hidden=64", "backbone.text.ffn=128", "backbone.text.layers=4", "backbone.text.heads=4",
         "backbone.text.kv_heads=4", "backbone.text.vocab=128", "backbone.vision.grid=8", "backbone.text_tokens=16"]


def test_bench_table_ratios_and_throughput(tmp_path, capsys):
    from experiments.cli import main

    rc = main(["bench", "--strategies", "sparsevlm,fastv", "--budgets", "16", "--batches", "1,2", "--repeats", "1",
               "--decode-tokens", "2", "--out", str(tmp_path), "--quiet", *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| sparsevlm | 16 | 1 |" in text and "| fastv | 16 | 2 |" in text
    assert "batch 2 vs batch 1 prefill throughput" in text
    assert "prefill latency ratio" in text and "FLOPs ratio" in text
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 4
    for r in rows:
        assert r["visual"] == 64 and r["prefill_ms"] > 0 and r["base_prefill_ms"] > 0
        assert r["tflops_ratio"] == pytest.approx(r["tflops"] / r["base_tflops"])
        assert 0 < r["tflops_ratio"] < 1 and r["kv_mb"] < r["base_kv_mb"]
        assert r["prefill_tput"] == pytest.approx(r["batch"] / (r["prefill_ms"] / 1e3))
    b1 = next(r for r in rows if r["strategy"] == "fastv" and r["batch"] == 1)
    b2 = next(r for r in rows if r["strategy"] == "fastv" and r["batch"] == 2)
    assert b2["base_kv_mb"] == pytest.approx(2 * b1["base_kv_mb"])


def test_bench_scaling(tmp_path, capsys):
    from experiments.cli import main

    rc = main(["bench", "--scaling-only", "--strategies", "fastv", "--budgets", "16", "--visual", "64,128",
               "--repeats", "2", "--out", str(tmp_path), "--quiet", *SMALL])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 64 |" in text and "| 128 |" in text
    rows = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["visual"] for r in rows] == [64, 128]
    assert rows[1]["base_tflops"] > 2 * rows[0]["base_tflops"]  # more than linear (attention n^2)
    assert all(r["overhead_ms"] > 0 for r in rows)
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_bench_rejects_non_random_backbone():
    from experiments.bench import bench
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="random_llava"):
        bench("toy_random", progress=False)
