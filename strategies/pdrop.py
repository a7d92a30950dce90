from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from framework.budget import REFERENCE_LAYERS, nearest_preset, scale_to_depth
from framework.errors import ConfigError
from framework.reducer import Decision, TokenReducer, topk_indices
from framework.registry import register

# 192/128/64 (576 tokens, 32 layers): the maintainers' advice (issue #29), layers [2, 8, 16] and the
# geometric ratio solving 2 + 6λ + 8λ² + 16λ³ = 32·T/576 (see docs; a derivation, not the repo's).
PRESETS = {192: ([2, 8, 16], 0.56), 128: ([2, 8, 16], 0.42), 64: ([2, 8, 16], 0.19)}


@register("pdrop")
@dataclass
class PyramidDrop(TokenReducer):
    """PyramidDrop (Xing et al., CVPR 2025): drop visual tokens in stages with a geometric ratio.

    Before decoder layer layers[s] the sample keeps int(n * lam^(s+1)) of its n input visual tokens,
    ranked by the attention of the last instruction token computed with that layer's own
    input-norm / Q / K projections on the incoming hidden states (rows only, head mean).
    Defaults are the repo's ([8, 16, 24], λ = 0.5); presets 192 / 128 / 64 use [2, 8, 16] with
    λ = 0.56 / 0.42 / 0.19; on a decoder of other depth a preset's layers are scaled like SparseVLM's
    (x depth / 32, rounded half up, strictly increasing). Positions default to `repack` (the official code
    re-numbers positions).
    arXiv 2410.17247.
    """

    positions: str = "repack"
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    lam: float = 0.5
    preset: int | None = None

    stage: ClassVar[str] = "llm"

    @classmethod
    def for_budget(cls, fields, budget, n_visual):
        """The preset nearest the budget (scaled to 576 visual tokens)."""
        return {**fields, "preset": nearest_preset(PRESETS, budget, n_visual, "pdrop")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"pdrop preset={self.preset}; allowed: {sorted(PRESETS)}")
            self.layers, self.lam = list(PRESETS[self.preset][0]), PRESETS[self.preset][1]
        if not 0.0 < self.lam < 1.0:
            raise ConfigError(f"pdrop lam={self.lam}; allowed: (0, 1)")
        if sorted(set(self.layers)) != list(self.layers) or not self.layers:
            raise ConfigError(f"pdrop layers={self.layers}; allowed: strictly increasing layer indices")

    def setup(self, adapter) -> None:
        n = adapter.num_layers
        if self.preset is not None:  # the preset's schedule is quoted for 32 layers
            layers = PRESETS[self.preset][0]
            self.layers = layers if n == REFERENCE_LAYERS else scale_to_depth(layers, n, n - 1, "PDrop stages", first=1)
        super().setup(adapter)

    def decision_layers(self) -> list[int]:
        return list(self.layers)

    def decide(self, ctx) -> list[Decision]:
        s = self.layers.index(ctx.layer)
        probs = ctx.attention_batch(ctx.slots.last_slots()[:, None], which="current")  # (B, H, 1, L')
        out = []
        for b, p in enumerate(probs):
            n0 = int(ctx.slots.members[b].shape[1])
            k = min(ctx.n_visual(b), max(1, int(n0 * self.lam ** (s + 1))))
            out.append(Decision(keep=topk_indices(p.float().mean(0)[0, ctx.visual[b]], k)))
        return out
