from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from framework.merging import farthest_points
from framework.reducer import CountBudget, Decision, TokenReducer
from framework.registry import register


@register("divprune")
@dataclass
class DivPrune(CountBudget, TokenReducer):
    """DivPrune (Alvar et al., CVPR 2025): max-min diversity selection of visual tokens before the LLM.

    Greedy farthest-point selection on cosine distance of the projected visual tokens (the official
    rule: first the token farthest from its nearest neighbour, then repeatedly the token whose
    minimum distance to the selected set is largest). keep: a count (int) or ratio (float) of the
    sample's visual tokens; preset: 192 / 128 / 64 (for 576 tokens, scaled by n/576). Kept tokens
    stay in their original order. arXiv 2503.02175.
    """

    keep: int | float = 0.25
    preset: int | None = None

    stage: ClassVar[str] = "projector"

    def decide(self, ctx):
        # samples with the same visual-token count share one greedy loop (row-wise: picks as alone)
        by_count: dict[int, list[int]] = {}
        for b in range(ctx.batch_size):
            by_count.setdefault(ctx.n_visual(b), []).append(b)
        keep: list = [None] * ctx.batch_size
        for n, group in by_count.items():
            picks_of = farthest_points([ctx.visual_hidden(b) for b in group], self.target(n))
            for b, picks in zip(group, picks_of):
                keep[b] = picks
        return [Decision(keep=k) for k in keep]
