from dataclasses import dataclass

import torch

from framework.reducer import ScoringReducer
from framework.registry import register


@register("fastv")
@dataclass
class FastV(ScoringReducer):
    """FastV (Chen et al., ECCV 2024): keep the visual tokens the last prompt token attends to most in layer K-1.

    layer: K (>= 1), the first layer that sees fewer tokens. keep: a count (int) or a ratio of the
    visual tokens (float); the official scripts use K=2 and R=50 % (keep=0.5). As in the official code
    the score is the head-mean attention row of the last prompt token (arXiv 2403.06764); it comes from
    rows-only attention, so sdpa stays on.
    """

    layer: int = 2
    keep: int | float = 0.5

    def scores(self, ctx) -> list[torch.Tensor]:
        probs = ctx.attention_batch(ctx.slots.last_slots()[:, None])  # (B, H, 1, L')
        return [p.mean(0)[0, ctx.visual[b]] for b, p in enumerate(probs)]
