"""`sparsevlm bench` on a small random-weight LLaVA-shaped model (the real shapes are too slow for tests)."""

import json

import pytest

SMALL = [
    "backbone.text.hidden=64",
    "backbone.text.ffn=128",
    "backbone.text.layers=4",
    "backbone.text.heads=4",
    "backbone.text.kv_heads=4",
    "backbone.text.vocab=128",
    "backbone.vision.grid=8",
    "backbone.text_tokens=16",
]


def test_bench_table_ratios_and_throughput(tmp_path, capsys):
    from experiments.cli import main

    rc = main(
        [
            "bench",
            "--strategies",
            "sparsevlm,fastv",
            "--budgets",
            "16",
            "--batches",
            "1,2",
            "--repeats",
            "1",
            "--decode-tokens",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
            *SMALL,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| sparsevlm | 16 | 1 |" in text and "| fastv | 16 | 2 |" in text
    assert "batch 2 vs batch 1 prefill throughput" in text
    assert "latency ratio of the decoder stack" in text and "of the whole prefill" in text and "FLOPs ratio" in text
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 4
    for r in rows:
        assert r["visual"] == 64 and r["prefill_ms"] > 0 and r["base_prefill_ms"] > 0
        assert r["tflops_ratio"] == pytest.approx(r["tflops"] / r["base_tflops"])
        assert 0 < r["tflops_ratio"] < 1 and r["kv_mb"] < r["base_kv_mb"]
        assert r["prefill_tput"] == pytest.approx(r["batch"] / (r["prefill_ms"] / 1e3))
        assert 0 < r["decoder_ms"] < r["prefill_ms"] and 0 < r["base_decoder_ms"] < r["base_prefill_ms"]
    b1 = next(r for r in rows if r["strategy"] == "fastv" and r["batch"] == 1)
    b2 = next(r for r in rows if r["strategy"] == "fastv" and r["batch"] == 2)
    assert b2["base_kv_mb"] == pytest.approx(2 * b1["base_kv_mb"])


def test_bench_scaling(tmp_path, capsys):
    from experiments.cli import main

    rc = main(
        [
            "bench",
            "--scaling-only",
            "--strategies",
            "fastv",
            "--budgets",
            "16",
            "--visual",
            "64,128",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
            "--quiet",
            *SMALL,
        ]
    )
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


def test_decoder_timer_covers_the_strategys_work_and_only_the_decoder():
    """The decoder-stack window starts before the engine's language-model hook (a strategy's `begin` runs
    there) and excludes the vision tower (made slow here by a hook)."""
    import time

    import torch

    from experiments import bench, metrics, runner
    from framework import attach

    cfg = runner.to_dict(runner.compose(["backbone=bench_cpu", *SMALL]).backbone)
    model = runner.random_llava(cfg)
    inputs = bench.make_inputs(model, 1, text_tokens=16)
    reducer = runner.build_reducer({"name": "none"})
    reducer.begin = lambda ctx: time.sleep(0.05)
    slow_vision = model.model.vision_tower.register_forward_hook(lambda *a: time.sleep(0.2))
    try:
        with (
            torch.no_grad(),
            attach(model, reducer) as engine,
            metrics.DecoderTimer(engine.adapter.language_model) as dec,
        ):
            whole = metrics.time_prefill(model, {**inputs, "logits_to_keep": 1})
    finally:
        slow_vision.remove()
    assert 0.05 <= dec.seconds < whole - 0.2
