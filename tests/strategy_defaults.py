"""Every registered strategy with the kwargs the shared matrix (tests/test_matrix.py) runs it with.

`DEFAULTS[name]` is a list of cases, easy to hard; each case is (kwargs, expect) where
`expect(n_visual, n_layers) -> list[int]` gives the visual tokens entering each decoder layer
(engine.last_record[b]["visual_per_layer"]) for a sample with n_visual image tokens, or None when the
count is data-dependent. A registered name without an entry runs with {} and no count check.
Budgets are written for the tiny backbones (16 visual tokens per image, 4 decoder layers); the
expectations scale with n_visual so other backbones can reuse them.
"""

from __future__ import annotations


def _flat(k):
    return lambda n, L: [k(n)] * L


def _at(layer, k):
    return lambda n, L: [n] * layer + [k(n)] * (L - layer)


def _pdrop(layers, lam):
    def f(n, L):
        out, cur = [], n
        for i in range(L):
            if i in layers:
                cur = max(1, int(n * lam ** (layers.index(i) + 1)))
            out.append(cur)
        return out

    return f


def _sparsevlm(keeps, recycling):
    """Keep counts after pruning layers 0, 1, ...; recycling adds int(0.1 * (int(0.3 * deleted) + 1)) + 1
    clusters of the deleted tokens (the official code's tau = 0.3, theta = 0.1)."""

    def f(n, L):
        out, cur = [n], n
        for k in keeps:
            deleted = cur - k
            cur = k + (int(0.1 * (int(0.3 * deleted) + 1)) + 1 if recycling and deleted else 0)
            out.append(cur)
        return out + [cur] * (L - len(out))

    return f


DEFAULTS: dict[str, list[tuple[dict, object]]] = {
    "none": [({}, _flat(lambda n: n))],
    "random": [({"keep": 0.5}, _flat(lambda n: round(n * 0.5))), ({"keep": 5, "layer": 2}, _at(2, lambda n: 5))],
    "fastv": [({"layer": 2, "keep": 5}, _at(2, lambda n: 5))],
    "pooling": [({"keep": 4}, _flat(lambda n: 4))],
    "divprune": [({"keep": 5}, _flat(lambda n: 5)), ({"preset": 192}, _flat(lambda n: max(1, round(192 * n / 576))))],
    "tome": [
        ({"keep": 6}, _flat(lambda n: 6)),
        ({"keep": 7, "placement": "projector"}, _flat(lambda n: 7)),
        ({"r": [3, 2]}, _flat(lambda n: n - 3)),
    ],  # tiny CLIP: only layer 0 feeds the features
    "visionzip": [
        ({"dominant": 4, "contextual": 2}, _flat(lambda n: 6)),
        ({"preset": 64}, _flat(lambda n: max(1, round(54 * n / 576)) + max(1, round(10 * n / 576)))),
    ],
    "dart": [({"layer": 2, "keep": 6, "pivot_image": 2, "pivot_text": 2}, _at(2, lambda n: 6))],
    "pdrop": [({"layers": [1, 2, 3], "lam": 0.5}, _pdrop([1, 2, 3], 0.5))],
    # pruning layers 0 and 1 (their outputs are pruned: decisions before layers 1 and 2)
    "sparsevlm": [
        ({"layers": [0, 1], "keep": [8, 4], "recycling": False}, _sparsevlm([8, 4], False)),
        ({"layers": [0, 1], "keep": [8, 4]}, _sparsevlm([8, 4], True)),
        (
            {"layers": [0, 1], "keep": [8, 4], "positions": "keep", "merge": "sum", "assign": "cosine"},
            _sparsevlm([8, 4], True),
        ),
        ({"layers": [0, 1], "keep": [8, 4], "variant": "plus", "recycling": True}, _sparsevlm([8, 4], True)),
    ],
    # SparseVLM+: original positions, no recycling, gravity-corrected priority-head scores
    "sparsevlm_plus": [({"layers": [0, 1], "keep": [8, 4]}, _sparsevlm([8, 4], False))],
    "cdpruner": [
        ({"keep": 5}, _flat(lambda n: 5)),
        ({"preset": 128, "relevance": "none"}, _flat(lambda n: max(1, round(128 * n / 576)))),
    ],
    "chain": [
        (
            {"reducers": [{"name": "tome", "keep": 8}, {"name": "fastv", "layer": 2, "keep": 3}]},
            lambda n, L: [8, 8] + [3] * (L - 2),
        ),
        (
            {
                "reducers": [
                    {"name": "divprune", "keep": 8},
                    {"name": "sparsevlm", "layers": [1], "keep": [4], "positions": "keep"},
                ]
            },
            lambda n, L: [8, 8] + [5] * (L - 2),
        ),
    ],  # 8 -> 4 kept + 1 recycled cluster after layer 1
}


_QWEN_VISION = r"acts at stage 'vision' but backbone 'qwen2(_5)?_vl'.*no CLS token.*patch merger"

# (backbone, strategy, case index) -> regex of the ConfigError the strategy must refuse with at attach.
REFUSED: dict[tuple[str, str, int], str] = {}
for _bb in ("qwen2_vl", "qwen2_5_vl"):
    REFUSED.update(
        {
            (_bb, "tome", 0): _QWEN_VISION + r".*placement='projector'",
            (_bb, "tome", 2): _QWEN_VISION + r".*placement='projector'",
            (_bb, "chain", 0): _QWEN_VISION + r".*placement='projector'",
        }
    )

# Exact counts that depend on a backbone's layout, not only on n_visual: (backbone, strategy, case) ->
# {n_visual of a tiny example: visual tokens entering every decoder layer}.
# LLaVA-NeXT pooling keep=4: the image's 4 pooled tokens split over the base grid and the crop grid,
# plus one newline per pooled crop row: (70, 90) -> base 1 + crop 1 x 3 + 1 newline; (100, 50) -> 1 +
# 3 x 1 + 3 newlines; (56, 56) -> 1 x 2 + 1 x 2 + 1 newline.
BACKBONE_COUNTS: dict[tuple[str, str, int], dict[int, int]] = {
    ("llava_next", "pooling", 0): {70: 5, 56: 7, 36: 5},
}

# LLaVA-NeXT vision stage (per CLIP crop, base view first): the tiny examples' images by n_visual ->
# (crops incl. base, newlines, whether AnyRes unpadding drops crop patches). Without unpadding each
# crop keeps exactly its budget; with it, groups whose patches were all unpadded away vanish (as in
# VisionZip's LLaVA-NeXT code): the base view still keeps exactly its budget, the crops at most theirs.
_NEXT_IMAGES = {70: (5, 6, True), 56: (3, 8, False), 36: (2, 4, False)}


def _next_vision(per_crop: int, llm=None):
    def check(rec: dict, L: int) -> None:
        crops, newlines, unpadded = _NEXT_IMAGES[rec["n_visual_input"]]
        st = rec["stages"][0]
        n = st["visual_after"]
        assert sum(1 for g in st["groups"] if len(g) == 1) >= newlines
        if unpadded:
            assert per_crop + newlines < n <= crops * per_crop + newlines, (n, crops, per_crop, newlines)
        else:
            assert n == crops * per_crop + newlines, (n, crops, per_crop, newlines)
        want = [n] * L if llm is None else llm(n, L)
        assert rec["visual_per_layer"] == want, (rec["visual_per_layer"], want)

    return check


BACKBONE_CHECKS = {
    ("llava_next", "tome", 0): _next_vision(6),
    ("llava_next", "tome", 2): _next_vision(16 - 3),
    ("llava_next", "visionzip", 0): _next_vision(4 + 2),
    ("llava_next", "visionzip", 1): _next_vision(round(54 * 16 / 576) + max(1, round(10 * 16 / 576))),
    ("llava_next", "chain", 0): _next_vision(8, lambda n, L: [n, n] + [3] * (L - 2)),
}


def cases(name: str) -> list[tuple[dict, object]]:
    return DEFAULTS.get(name, [({}, None)])


def refused(backbone: str, name: str, case: int) -> str | None:
    return REFUSED.get((backbone, name, case))


def backbone_check(backbone: str, name: str, case: int):
    """A callable(record, n_layers) asserting the counts where they depend on the data (or None)."""
    return BACKBONE_CHECKS.get((backbone, name, case))


def backbone_expect(backbone: str, name: str, case: int):
    counts = BACKBONE_COUNTS.get((backbone, name, case))
    return None if counts is None else (lambda n, L: [counts[n]] * L)
