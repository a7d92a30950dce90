from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.reducer import CountBudget, Decision, ScoringReducer
from framework.registry import register


def dart_select(
    hidden: torch.Tensor,
    key_norm: torch.Tensor,
    text_hidden: torch.Tensor,
    text_key_norm: torch.Tensor,
    k: int,
    pivot_image: int,
    pivot_text: int,
) -> torch.Tensor:
    """DART's duplication-aware selection for one sample; returns k sorted visual indices.

    hidden (n, D) / key_norm (n,) of the visual tokens, text_* of the prompt text after the image.
    Pivots: the `pivot_image` visual and `pivot_text` text tokens with the largest key L1 norm. The
    remaining budget is split across the pivots (first pivots take the remainder); each pivot in turn
    takes its least cosine-similar tokens from the shrinking candidate pool."""
    n = hidden.shape[0]
    pi = min(pivot_image, k)
    img_piv = torch.sort(key_norm.float(), descending=True, stable=True).indices[:pi]
    pt = min(pivot_text, text_hidden.shape[0])
    txt_piv = torch.sort(text_key_norm.float(), descending=True, stable=True).indices[:pt]
    pivots = torch.cat([hidden[img_piv], text_hidden[txt_piv]]).float()
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    sim = unit(pivots) @ unit(hidden.float()).T  # (P, n)
    pool = torch.ones(n, dtype=torch.bool, device=hidden.device)
    pool[img_piv] = False
    chosen = [img_piv]
    rest = k - pi
    P = pivots.shape[0]
    for j in range(P):
        take = rest // P + (1 if j < rest % P else 0)
        if take == 0:
            continue
        s = sim[j].masked_fill(~pool, float("inf"))
        pick = torch.sort(s, stable=True).indices[:take]
        pool[pick] = False
        chosen.append(pick)
    return torch.cat(chosen).sort().values


@register("dart")
@dataclass
class DART(CountBudget, ScoringReducer):
    """DART (Wen et al., 2025): keep pivot tokens and the tokens least similar to them (duplication-aware).

    Before decoder layer `layer` (2): pivots are the `pivot_image` visual and `pivot_text` prompt
    tokens with the largest L1 norm of layer-(layer-1) post-RoPE keys (all heads); each pivot then
    takes its share of the budget as the candidate visual tokens least cosine-similar to it (hidden
    states entering the layer after the final norm), removed from the pool as they are picked. Keeps
    exactly `keep` (count or ratio; preset 192 / 128 / 64 scaled by n/576); the official code's
    4 + 8 * (budget // 8) count is not reproduced. Batched per sample. arXiv 2502.11494.
    """

    layer: int = 2
    keep: int | float = 128
    preset: int | None = None
    pivot_image: int = 4
    pivot_text: int = 4

    stage: ClassVar[str] = "llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ConfigError(f"dart pivot_image={self.pivot_image} (>= 1), pivot_text={self.pivot_text} (>= 0)")

    def decide(self, ctx) -> list[Decision]:
        keys = ctx.keys("previous")  # (B, H_kv, L, d), post-RoPE, from the KV cache when present
        knorm = keys.float().abs().sum(dim=(1, 3))  # (B, L)
        norm = getattr(ctx.adapter.language_model, "norm", None)
        h = norm(ctx.hidden) if norm is not None else ctx.hidden
        out = []
        for b in range(ctx.batch_size):
            v, t = ctx.visual[b], ctx.text[b]
            keep = dart_select(
                h[b, v],
                knorm[b, v],
                h[b, t],
                knorm[b, t],
                self.target(ctx.n_visual(b)),
                self.pivot_image,
                self.pivot_text,
            )
            out.append(Decision(keep=keep))
        return out
