"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): keep the visual tokens of maximum conditional
diversity, before the language model.

Per sample, on the projected visual tokens x_i (the language model's input embeddings of the image):
  1. S_ij = cos(x_i, x_j): similarity of the visual features (the official code: after the projector).
  2. r_i: relevance of token i to the instruction, min-max normalised per sample to (0, 1]:
     r = (a - min a + 1e-6) / (max a - min a), a_i = mean over instruction tokens m of cos(x_i, t_m).
     The official code (LLaVA only) embeds the instruction with CLIP's text tower and compares it with
     CLIP's projected patch embeddings (and negates that similarity, a CLIP-specific sign). Models without
     a paired text tower (Qwen2.5-VL, InternVL3 in the paper) have no such space; their code is unreleased
     (CDPruner issues #3, #18, #20), so the choice here is ours: no adapter loads a CLIP text tower, and on
     every backbone t_m are the language model's input embeddings of the prompt text after the image and
     x_i the projected visual tokens, the same space (`negate` flips the sign as the LLaVA code does;
     `relevance: none` sets r = 1, plain DPP diversity). No text after the image: r = 1 (recorded).
     Optional `theta` in [0, 1): r <- exp(theta / (2 (1 - theta)) r), the reweighting the official code
     leaves commented out (None = off, as published).
  3. L = diag(r) S diag(r); the kept set maximises det(L_S), chosen by the fast greedy MAP inference for
     DPPs (Chen et al., NeurIPS 2018): incremental Cholesky rows, O(N k^2), computed in float64. When the
     remaining gains vanish (L is numerically singular: duplicate tokens, k > rank) the rest of the budget
     goes to the largest diagonal L_ii = r_i^2 (ties -> lower index), so the budget is always exact.

Per-sample normalisation (the official code normalises over the whole batch) keeps a sample's choice
independent of its batch. Kept tokens stay in their original order. Budget: `keep` (count or ratio) or
`preset` 192 / 128 / 64 (for 576 tokens, scaled by n/576).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.reducer import CountBudget, Decision, TokenReducer
from framework.registry import register

RELEVANCE_MODES = ("embeds", "none")


def instruction_relevance(visual: torch.Tensor, text: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """(N, D) visual tokens, (M, D) instruction tokens -> r (N,) in (0, 1] (float64): mean cosine
    similarity over the instruction, min-max normalised as the official code; all ones when M == 0 or
    every token is equally relevant."""
    n = visual.shape[0]
    if text.shape[0] == 0:
        return torch.ones(n, dtype=torch.float64, device=visual.device)
    v = torch.nn.functional.normalize(visual.double(), dim=-1)
    t = torch.nn.functional.normalize(text.double(), dim=-1)
    a = (v @ t.T).mean(-1)
    a = -a if negate else a
    span = a.max() - a.min()
    if span <= 1e-12:
        return torch.ones(n, dtype=torch.float64, device=visual.device)
    return (a - a.min() + 1e-6) / span


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the rows of `features` (N, D); float64."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    r = relevance.double()
    return r[:, None] * (x @ x.T) * r[None, :]


def dpp_greedy_map(L: torch.Tensor, k: int, tol: float = 1e-10) -> torch.Tensor:
    """Fast greedy MAP for a DPP with kernel L (N, N): k indices in pick order, each maximising the
    log-determinant gain log d_j^2 = log(L_jj - |c_j|^2) (Chen et al. 2018; ties -> lower index).
    Once every remaining gain d_j^2 <= tol * max_i L_ii, the rest go by the largest L_jj."""
    L = L.double()
    n = int(L.shape[0])
    k = min(int(k), n)
    diag = torch.diagonal(L).clone()
    d2 = diag.clone()
    cis = torch.zeros(k, n, dtype=L.dtype, device=L.device)
    taken = torch.zeros(n, dtype=torch.bool, device=L.device)
    floor = tol * float(diag.max().clamp(min=0.0)) if n else 0.0
    picks: list[int] = []
    degenerate = False
    for i in range(k):
        gains = d2.masked_fill(taken, -math.inf)
        j = int(torch.argmax(gains))
        if not degenerate and float(gains[j]) <= floor:
            degenerate = True  # no volume left to gain: fill by quality
        if degenerate:
            j = int(torch.argmax(diag.masked_fill(taken, -math.inf)))
            picks.append(j)
            taken[j] = True
            continue
        e = (L[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(d2[j]))
        cis[i] = e
        d2 = d2 - e * e
        picks.append(j)
        taken[j] = True
    return torch.tensor(picks, dtype=torch.long, device=L.device)


@register("cdpruner")
@dataclass
class CDPruner(CountBudget, TokenReducer):
    """CDPruner (NeurIPS 2025): instruction-conditioned DPP (greedy MAP) over projected visual tokens, before the LLM.

    keep: a count (int) or ratio (float) of the sample's visual tokens; preset: 192 / 128 / 64 (for 576
    tokens, scaled). relevance: embeds (the instruction's language-model embeddings) | none (r = 1);
    negate: flip the relevance sign (the official LLaVA code does, for CLIP); theta: optional exp
    reweighting of the relevance. See strategies/cdpruner.py. arXiv 2506.10967.
    """

    keep: int | float = 0.25
    preset: int | None = None
    relevance: str = "embeds"
    negate: bool = False
    theta: float | None = None

    stage: ClassVar[str] = "projector"

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.keep
        if (
            isinstance(k, bool)
            or not isinstance(k, (int, float))
            or (isinstance(k, int) and k < 1)
            or (isinstance(k, float) and not 0.0 < k <= 1.0)
        ):
            raise ConfigError(f"cdpruner keep={k!r}; allowed: a count >= 1 or a ratio in (0, 1]")
        if self.relevance not in RELEVANCE_MODES:
            raise ConfigError(f"cdpruner relevance={self.relevance!r}; allowed: {list(RELEVANCE_MODES)}")
        if self.theta is not None and not 0.0 <= float(self.theta) < 1.0:
            raise ConfigError(f"cdpruner theta={self.theta}; allowed: [0, 1) or None (no reweighting)")

    def relevance_of(self, ctx, b: int) -> torch.Tensor:
        vis = ctx.visual_hidden(b)
        if self.relevance == "none":
            r = torch.ones(vis.shape[0], dtype=torch.float64, device=vis.device)
        else:
            r = instruction_relevance(vis, ctx.hidden[b, ctx.text[b]], self.negate)
        if self.theta is not None:
            r = torch.exp(float(self.theta) / (2.0 * (1.0 - float(self.theta))) * r)
        return r

    def decide(self, ctx) -> list[Decision]:
        out = []
        for b in range(ctx.batch_size):
            r = self.relevance_of(ctx, b)
            L = conditional_kernel(ctx.visual_hidden(b), r)
            picks = dpp_greedy_map(L, self.target(ctx.n_visual(b)))
            record = {"no_instruction": self.relevance == "embeds" and int(ctx.text[b].numel()) == 0}
            out.append(Decision(keep=picks.sort().values, record=record))
        return out
