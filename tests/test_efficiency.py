"""benchmarks/efficiency.py at the tiny shape on the CPU: the written JSON and Markdown, ratios taken from the
same run, FLOPs ratios equal to the accounting's."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import efficiency as eff
from framework import attach
from framework.accounting import account

ARGS = [
    "--device",
    "cpu",
    "--shapes",
    "tiny",
    "--strategies",
    "fastv,sparsevlm",
    "--budgets",
    "192,64",
    "--batches",
    "1,2",
    "--batch-budgets",
    "64",
    "--repeats",
    "2",
    "--batch-repeats",
    "1",
    "--new-tokens",
    "3",
    "--decode-repeats",
    "1",
    "--quiet",
]


def quick_run(stem, strategies: str, batches: str = "1", *extra: str) -> list[str]:
    """The arguments of the smallest run: the tiny shape, budget 64, one repeat, two new tokens."""
    return ["--device", "cpu", "--shapes", "tiny", "--strategies", strategies, "--budgets", "64", "--batches", batches,
            "--batch-budgets", "64", "--repeats", "1", "--batch-repeats", "1", "--new-tokens", "2",
            "--decode-repeats", "1", "--quiet", "--out", str(stem), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    stem = tmp_path_factory.mktemp("eff") / "eff"
    assert eff.main([*ARGS, "--out", str(stem)]) == 0
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def test_rows_and_metadata(written):
    data, md = written
    meta, rows = data["meta"], data["rows"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["transformers"]
    assert meta["command"].startswith("python -m benchmarks.efficiency --device cpu --shapes tiny")
    got = [(r["batch"], r["strategy"], r["budget"]) for r in rows]
    assert got == [
        (1, "none", None),
        (1, "fastv", 192),
        (1, "fastv", 64),
        (1, "sparsevlm", 192),
        (1, "sparsevlm", 64),
        (2, "none", None),
        (2, "fastv", 64),
        (2, "sparsevlm", 64),
    ]
    for r in rows:
        assert r["visual"] == 36 and r["prompt_tokens"] == 36 + eff.TEXT_TOKENS
        assert r["scaled_budget"] == (None if r["budget"] is None else round(r["budget"] * 36 / 576))
        for k in eff.RATIO_KEYS:
            assert f"{k}_ratio" in r and f"base_{k}" in r
        assert r["prefill_ms"] > 0 and r["decode_ms"] > 0 and 0 <= r["own_share"] < 1
    # host-device syncs per prefill: the same at batch 2 as at batch 1, and more with decisions than without
    syncs = {(r["batch"], r["strategy"], r["budget"]): r["syncs"] for r in rows}
    for key in (("none", None), ("fastv", 64), ("sparsevlm", 64)):
        assert syncs[(2, *key)] == syncs[(1, *key)]
    assert syncs[(1, "none", None)] < syncs[(1, "fastv", 64)] < syncs[(1, "sparsevlm", 64)]
    # non-view ops per prefill: fewer layers' worth of tokens does not change their number, decisions add some
    ops = {(r["batch"], r["strategy"], r["budget"]): r["ops"] for r in rows}
    assert 0 < ops[(1, "none", None)] < ops[(1, "fastv", 64)] < ops[(1, "sparsevlm", 64)]
    assert [s["batch"] for s in data["batch_scaling"]] == [2, 2, 2]
    # one Markdown line per row, with the table's columns, and the batch table
    for col in (
        "ops",
        "prefill ×",
        "decoder ×",
        "FLOPs ×",
        "lat/FLOPs",
        "own %",
        "syncs",
        "decode ms/tok",
        "decode tok/s",
        "KV MiB",
        "KV MB (paper)",
        "peak MB",
        "decode × batch 1",
    ):
        assert col in md
    n_engine = sum(r["strategy"] == "none" for r in rows)  # what attaching costs, per batch size
    n_lines = len(rows) + len(data["batch_scaling"]) + len(data["targets"]) + n_engine
    assert sum(line.startswith("| tiny | ") for line in md.splitlines()) == n_lines
    # SparseVLM's figures against the targets, read from its rows
    figures = {t["figure"]: t for t in data["targets"]}
    r192 = next(r for r in rows if r["strategy"] == "sparsevlm" and r["budget"] == 192 and r["batch"] == 1)
    assert figures["prefill latency ratio at 192"]["value"] == f"{r192['prefill_ms_ratio']:.3f}"
    assert {"own work at 64 (% of prefill)", "latency / FLOPs ratio - 1 at 64"} <= set(figures)
    assert meta["command"] in md
    # the CPU table keeps freed host memory (the call itself is stubbed in the tests: see conftest.py)
    assert meta["host_allocator"] == "kept (tests: not applied)" and f"- host allocator: {meta['host_allocator']}" in md


def test_engine_cost_is_measured_against_the_stock_model(written):
    """The none rows carry the stock model's (no engine) figures from interleaved runs: syncs and ops of a
    plain forward, and the engine's latency ratios over it."""
    from framework.syncs import SyncCounter

    data, md = written
    model = eff.build_model("tiny", "cpu")
    for r in (r for r in data["rows"] if r["strategy"] == "none"):
        x = eff.make_inputs(model, "tiny", r["batch"])
        with torch.no_grad(), SyncCounter() as plain:
            model(**x, logits_to_keep=1)
        assert (r["stock_syncs"], r["stock_ops"]) == (plain.count, plain.ops)
        assert r["stock_syncs"] < r["syncs"] and r["stock_ops"] < r["ops"]  # reading the prompt, the hooks
        for key in ("prefill_ms", "decoder_ms", "decode_ms"):  # none's own runs, before the pairings' median
            assert r[f"engine_{key}_ratio"] == r[f"engine_{key}"] / r[f"stock_{key}"]
            assert r[f"{key}_ratio"] == 1.0
        assert f"| {r['stock_syncs']} / {r['syncs']} | {r['stock_ops']} / {r['ops']} |" in md
    assert "Attaching the engine with no reduction" in md


def test_kept_host_memory_stops_page_faults_at_every_forward():
    """With glibc's defaults a freed 64 MiB block is unmapped and the next one page-faults afresh (16k faults
    with 4 KiB pages; fewer where transparent huge pages are "always"); kept, the pages are reused once the heap
    has grown to hold the block: the first kept block is fresh heap, and torch's aligned allocation can leave a
    freed block a few bytes short of the next (more than half the runs here), so the second or third may be fresh too;
    the two freed blocks then merge and hold every later one."""
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("freed memory is kept on glibc only")
    script = """
import resource, torch
from experiments.metrics import keep_freed_host_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(*[faults() for _ in range(3)])
print(keep_freed_host_memory())
print(*[faults() for _ in range(6)])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    default, kept = [list(map(int, out[i].split())) for i in (0, 2)]
    assert out[1].startswith("glibc malloc keeping freed memory")
    assert min(default) >= 16  # at least one fault per 4 MiB huge page, at every unkept block
    assert all(k * 10 < min(default) for k in kept[3:]), (default, kept)  # settled: ~no faults


def test_ratios_are_measured_over_the_same_runs_baseline(written):
    rows = written[0]["rows"]
    base = {r["batch"]: r for r in rows if r["strategy"] == "none"}
    for r in rows:
        b = base[r["batch"]]
        # interleaved with none: the row's own paired baseline; none's is the median over every pairing
        assert r["prefill_ms_ratio"] == pytest.approx(r["prefill_ms"] / r["interleaved_base_prefill_ms"])
        assert r["decoder_ms_ratio"] == pytest.approx(r["decoder_ms"] / r["interleaved_base_decoder_ms"])
        assert r["decode_ms_ratio"] == pytest.approx(r["decode_ms"] / r["interleaved_base_decode_ms"])
        assert r["decode_tok_s_ratio"] == pytest.approx(r["interleaved_base_decode_ms"] / r["decode_ms"])
        for k in ("kv_mib", "kv_visual_mb", "tflops", "tflops_causal"):
            assert r[f"base_{k}"] == pytest.approx(b[k])
            assert r[f"{k}_ratio"] == pytest.approx(r[k] / b[k])
        assert r["decode_tok_s"] == pytest.approx(r["batch"] / (r["decode_ms"] / 1e3))
        assert r["latency_vs_flops"] == pytest.approx(r["prefill_ms_ratio"] / r["tflops_ratio"] - 1)
    for s in written[0]["batch_scaling"]:
        one = next(r for r in rows if r["batch"] == 1 and r["strategy"] == s["strategy"] and r["budget"] == s["budget"])
        assert s["decode_vs_batch1"] == pytest.approx(s["decode_tok_s"] / one["decode_tok_s"])


@torch.no_grad()
def test_flops_and_kv_ratios_equal_the_accounting(written):
    model = eff.build_model("tiny", "cpu")
    x = eff.make_inputs(model, "tiny", 1)

    def acc(strategy, budget):
        with attach(model, eff.reducer_for(strategy, budget, 36)) as engine:
            model(**x, logits_to_keep=1)
            return account(engine)[0]

    none = acc("none", None)
    for r in written[0]["rows"]:
        if r["batch"] == 1 and r["strategy"] != "none":
            a = acc(r["strategy"], r["budget"])
            assert r["tflops_ratio"] == pytest.approx(a.flops / none.flops, rel=1e-12)
            assert r["kv_mib_ratio"] == pytest.approx(a.kv_bytes / none.kv_bytes, rel=1e-12)
            assert r["equivalent_tokens"] == pytest.approx(a.equivalent_tokens)
            assert r["tflops_ratio"] < 1


def test_vectorised_bookkeeping_equals_the_per_row_forms():
    """The engine's one-copy forms of per-row loops (records, merged members, recycled clusters)."""
    from framework.accounting import member_groups
    from framework.clustering import cluster_and_merge
    from framework.decisions import _unions

    g = torch.Generator().manual_seed(0)
    m = torch.rand(40, 30, generator=g) < 0.1
    m[3] = False  # a row with no member
    assert member_groups(m) == [torch.nonzero(r).flatten().tolist() for r in m]
    sources = [torch.randint(0, 40, (n,), generator=g) for n in (1, 5, 0, 12)]
    want = torch.stack([m[s].any(0) for s in sources])
    group = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sources)])
    assert torch.equal(_unions(m, torch.cat(sources), group, len(sources)), want)
    x = torch.randn(50, 16, generator=g)
    _, sources, _ = cluster_and_merge(x, 7)
    from framework.clustering import dpc_knn

    labels, _ = dpc_knn(x, 7)
    assert [s.tolist() for s in sources] == [torch.nonzero(labels == c).flatten().tolist() for c in range(7)]


def test_llava_next_shape_scales_the_budgets(tmp_path):
    """AnyRes: base view + crops + newlines are the visual tokens; 192 of 576 -> the same share of them."""
    stem = tmp_path / "next"
    eff.main(
        [
            "--device",
            "cpu",
            "--shapes",
            "tinynext",
            "--strategies",
            "sparsevlm",
            "--budgets",
            "192",
            "--batches",
            "1",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--decode-repeats",
            "1",
            "--quiet",
            "--out",
            str(stem),
        ]
    )
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    model = eff.build_model("tinynext", "cpu")
    n = eff.image_tokens(model, "tinynext")
    assert n > 4 * 16  # base view + 2x2 crops (+ newlines)
    assert [(r["strategy"], r["visual"], r["scaled_budget"]) for r in rows] == [
        ("none", n, None),
        ("sparsevlm", n, round(192 * n / 576)),
    ]
    assert rows[1]["tflops_ratio"] < 1 and rows[1]["kv_visual_mb_ratio"] < 1


@pytest.mark.parametrize("strategy", eff.STRATEGIES)
def test_strategy_fields_are_the_benchs(strategy):
    """The script reads the strategy YAMLs without Hydra: the same fields as `sparsevlm bench`."""
    from experiments import bench

    for budget, n in ((192, 576), (64, 576), (976, 2928), (325, 2928)):
        assert eff.strategy_fields(strategy, budget, n) == bench._budget_fields(strategy, budget, n)


def test_stop_after_writes_the_table_and_says_it_is_incomplete(tmp_path):
    stem = tmp_path / "cut"
    eff.main(quick_run(stem, "fastv", "1,2", "--stop-after", "0"))
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["meta"]["complete"] is False
    assert data["rows"] == []  # the time was up before the first group
    assert "incomplete" in stem.with_suffix(".md").read_text()


def test_each_group_has_its_share_of_the_time_and_sparsevlm_is_measured_first(tmp_path):
    """A batch-1 group whose share of --stop-after is spent still measures SparseVLM (the targets' rows) and
    leaves its other rows; the next group gets the time left. The table keeps the order asked for."""
    stem = tmp_path / "shares"
    eff.main(quick_run(stem, "fastv,sparsevlm", "1,2", "--stop-after", "3600", "--batch1-share", "1e-9"))
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["batch"], r["strategy"]) for r in data["rows"]] == [
        (1, "none"), (1, "sparsevlm"), (2, "none"), (2, "fastv"), (2, "sparsevlm")
    ]  # fmt: skip
    assert data["meta"]["complete"] is False


def test_a_run_killed_half_way_through_a_group_keeps_its_rows(tmp_path, monkeypatch):
    """The table is written after every row: a lent GPU's time limit kills the process mid-group, and what
    it measured must come back, marked incomplete."""
    from strategies.fastv import FastV

    measure = eff.measure

    def killed_at_fastv(model, reducer, *args, **kwargs):
        if isinstance(reducer, FastV):
            raise KeyboardInterrupt  # as a kill: not an error that the run records and goes on from
        return measure(model, reducer, *args, **kwargs)

    monkeypatch.setattr(eff, "measure", killed_at_fastv)
    stem = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        eff.main(quick_run(stem, "sparsevlm,fastv"))
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [r["strategy"] for r in data["rows"]] == ["none", "sparsevlm"]
    assert data["meta"]["complete"] is False
    assert data["rows"][1]["prefill_ms_ratio"] > 0
    assert "incomplete" in stem.with_suffix(".md").read_text()


def test_group_shares_split_the_time_between_batch_sizes():
    assert eff.group_shares([1, 1, 8, 8, 32, 32], 0.6) == pytest.approx([0.3, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert eff.group_shares([1, 1], 0.6) == [0.5, 1.0]  # batch 1 alone has the whole run
    assert eff.group_shares([1, 8], 1.0) == [1.0, 1.0]


def test_a_failing_row_is_recorded_and_the_others_are_measured(tmp_path, monkeypatch):
    """A strategy that raises (on a lent GPU: a device-only bug) costs its row, not the run."""
    from strategies.sparsevlm import SparseVLM

    def decide(self, ctx):
        raise RuntimeError("boom on this device")

    monkeypatch.setattr(SparseVLM, "decide", decide)
    stem = tmp_path / "failing"
    eff.main(quick_run(stem, "fastv,sparsevlm"))
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [r["strategy"] for r in data["rows"]] == ["none", "fastv"]
    assert data["meta"]["complete"] is False
    assert data["meta"]["failed"] == ["tiny batch 1 sparsevlm 64: RuntimeError: boom on this device"]
    assert "**failed**: tiny batch 1 sparsevlm 64: RuntimeError: boom" in stem.with_suffix(".md").read_text()


def test_profile_writes_where_a_rows_time_goes(tmp_path):
    stem = tmp_path / "prof"
    eff.main(quick_run(stem, "sparsevlm", "1", "--profile", "none,sparsevlm:64"))
    text = (tmp_path / "prof_profile.txt").read_text()
    none, sparse = text.split("tiny, batch 1, ")[1:]
    assert text.startswith("CPU") and none.startswith("none\n") and sparse.startswith("sparsevlm:64\n")
    assert "wall " in none and "reducer.decide" not in none
    assert "reducer.decide" in sparse and "engine.apply_decisions" in sparse and "reducer.begin" in sparse


@pytest.mark.parametrize("spec", ["sparsevlm", "sparsevlm:x", "nosuch:64", "none:64,", "fastv:0", "fastv:\u00b2"])
def test_a_bad_profile_entry_fails_before_anything_runs(spec, capsys):
    with pytest.raises(SystemExit, match="--profile entry"):
        eff.main(["--device", "cpu", "--shapes", "tiny", "--profile", spec])
    assert capsys.readouterr().out == ""


def test_a_run_at_other_shapes_writes_its_own_files():
    """The device's default shapes write efficiency_<device>; other shapes add theirs, so a 7B-shape CPU run
    never overwrites the small CPU table."""
    assert eff.default_stem("cpu", ["small"], ["small"]) == eff.RESULTS / "efficiency_cpu"
    assert eff.default_stem("cpu", ["llava15"], ["small"]) == eff.RESULTS / "efficiency_cpu_llava15"
    cuda = ["llava15", "llavanext"]
    assert eff.default_stem("cuda", cuda, cuda) == eff.RESULTS / "efficiency_cuda"
    assert eff.default_stem("cuda", ["llavanext"], cuda) == eff.RESULTS / "efficiency_cuda_llavanext"


def test_stock_floor_runs_each_layer_at_the_rows_token_count(written):
    """The floor is the stock model cutting each decoder layer's input to the row's token count at that
    layer: every layer sees exactly that many tokens, and with nothing cut it is the stock model itself."""
    model = eff.build_model("tiny", "cpu")
    inputs = eff.make_inputs(model, "tiny", 2)
    layers = eff.adapter_for(model).layers
    n = inputs["input_ids"].shape[1]
    seen = []

    def record(module, args, kwargs):  # registered after the floor's own hooks: what the layer runs on
        seen.append(int((args[0] if args else kwargs["hidden_states"]).shape[1]))

    with torch.no_grad():
        stock = model(**inputs).logits
        with eff.ideal_pruning(model, [float(n)] * len(layers)):
            same = model(**inputs).logits
        for counts in ([float(n), 30.0, 12.4, 12.4], [40.0, 30.0, 12.4, 3.0]):  # the second cuts the LM's input
            with eff.ideal_pruning(model, counts):
                hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
                model(**inputs, logits_to_keep=1)
                for h in hooks:
                    h.remove()
    assert torch.equal(stock, same)
    assert seen == [n, 30, 12, 12, 40, 30, 12, 3]
    data, md = written
    for r in data["rows"]:  # every measured row carries its floor; no reduction is its own floor
        assert r["floor_ms"] > 0 and len(r["tokens_per_layer"]) == 4
        assert r["decoder_vs_floor"] == pytest.approx(r["decoder_ms_ratio"] / r["floor_ratio"] - 1)
        if r["strategy"] == "none":
            assert r["floor_ratio"] == 1.0 and r["decoder_vs_floor"] == 0.0
        else:  # measured in alternation with the row: its ratio to the same runs of no reduction
            assert r["floor_ratio"] == pytest.approx(r["floor_ms"] / r["interleaved_base_decoder_ms"])
    assert "dec/stock" in md and "stock/FLOPs" in md


def test_every_strategy_runs_in_the_gpu_tables_dtype(tmp_path):
    """The GPU table is bfloat16: every strategy at the end budgets, batch 1 and 2, on LLaVA and LLaVA-NeXT
    runs without a failed row in bfloat16 (a dtype bug would cost the lent GPU its rows), and the KV cache
    is counted at 2 bytes a value."""
    stem = tmp_path / "bf16"
    eff.main(["--device", "cpu", "--shapes", "tiny,tinynext", "--budgets", "192,64", "--batches", "1,2",
              "--repeats", "1", "--batch-repeats", "1", "--new-tokens", "2", "--decode-repeats", "1", "--quiet",
              "--dtype", "bfloat16", "--out", str(stem)])  # fmt: skip
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["meta"]["failed"] == [] and data["meta"]["complete"] is True
    assert data["meta"]["dtypes"] == {"tiny": "bfloat16", "tinynext": "bfloat16"}
    assert "- dtype: tiny bfloat16, tinynext bfloat16" in stem.with_suffix(".md").read_text()
    assert {(r["shape"], r["batch"], r["strategy"]) for r in data["rows"]} == {
        (shape, batch, s) for shape in ("tiny", "tinynext") for batch in (1, 2) for s in ("none", *eff.STRATEGIES)
    }
    text = eff.SHAPES["tiny"]["text"]  # tinynext has the same decoder
    per_token = text["layers"] * 2 * text["hidden"] * 2  # keys and values, every layer, bfloat16
    for r in data["rows"]:
        if r["strategy"] == "none":
            assert r["kv_mib"] * 2**20 == r["batch"] * r["prompt_tokens"] * per_token


def test_device_script_installs_the_package_and_runs_the_benchmark(tmp_path):
    """benchmarks/device_run.sh, as the lent GPU runs it (where the package is not installed): it writes the
    package's metadata, with the entry points that register the built-in strategies, into its own folder
    (nothing built, so no build backend needed), leaves the tree clean, and passes its arguments to the
    benchmark."""
    root = Path(__file__).resolve().parents[1]
    site, stem = tmp_path / "site", tmp_path / "out" / "eff"
    before = sorted(p.name for p in root.iterdir())
    env = {**os.environ, "PYTHON": sys.executable, "SITE": str(site)}
    args = quick_run(stem, "sparsevlm")
    done = subprocess.run(["bash", str(root / "benchmarks" / "device_run.sh"), *args], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(site)]) if d.metadata["Name"] == "sparsevlm"]
    assert [ep.value for ep in dist.entry_points.select(group="sparsevlm.strategies")] == ["strategies"]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["meta"]["complete"] is True and data["meta"]["failed"] == []
    assert [(r["strategy"], r["budget"]) for r in data["rows"]] == [("none", None), ("sparsevlm", 64)]
    assert sorted(p.name for p in root.iterdir()) == before  # no build/ or *.egg-info left in the tree
