"""Listing reads strategies and adapters from their source: what it reads is what the classes say, and
`sparsevlm list` imports neither torch nor any strategy."""

from __future__ import annotations

import subprocess
import sys

from framework import backbones, registry
from framework.manifest import scan


def test_strategy_manifest_matches_the_classes():
    entries = {e.name: e for e in scan(registry.ENTRY_POINT_GROUP, "register")}
    modules = {e.module for e in entries.values()}
    built_in = [n for n in registry.available() if registry.get(n).__module__ in modules]  # not tests' own
    assert sorted(entries) == built_in  # every built-in strategy, none invented
    for name, e in entries.items():
        cls = registry.get(name)
        assert (e.module, e.qualname) == (cls.__module__, cls.__qualname__)
        assert e.doc == registry.describe(name)
        found = e.attr("stage", "stages")
        stages = (found[1],) if found[0] == "stage" else tuple(found[1])
        assert stages == cls.stages, name


def test_adapter_manifest_matches_the_classes():
    entries = {e.name: e for e in scan(backbones.ENTRY_POINT_GROUP, "register_adapter")}
    classes = backbones.available_backbones()
    assert list(entries) == list(classes)
    for family, e in entries.items():
        cls = classes[family]
        assert e.args[1] == backbones.describe_backbone(family)
        assert tuple(e.attr("stages")[1]) == cls.stages
        assert [p for p in e.init_params() if p not in ("self", "model")] == backbones.adapter_options(cls)
    assert backbones.backbone_catalogue()["qwen2_5_vl"] == (("projector", "llm"), "Qwen2.5-VL (M-RoPE)", ["video_span"])


def test_list_imports_no_strategy_and_no_torch():
    code = (
        "import sys; from experiments.cli import main; assert main(['list']) == 0; "
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('strategies.')]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sparsevlm   [llm] SparseVLM: text raters" in proc.stdout
    assert "tome        [vision|projector]" in proc.stdout
    assert "llava_next  stages: vision, projector, llm" in proc.stdout and "adapter options: newline" in proc.stdout
