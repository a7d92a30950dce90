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
    # chosen on the device (no host read); a NaN span takes the division, as a host `if` would
    return torch.where(span <= 1e-12, 1.0, (a - a.min() + 1e-6) / span)


def conditional_kernel(
    features: torch.Tensor, relevance: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of the rows of `features` (N, D); float64 (written
    into `out` when given)."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    r = relevance.double()
    return torch.mul(r[:, None] * (x @ x.T), r[None, :], out=out)


def dpp_greedy_map(L: torch.Tensor, k: int, tol: float = 1e-10) -> torch.Tensor:
    """Fast greedy MAP for a DPP with kernel L (N, N): k indices in pick order, each maximising the
    log-determinant gain log d_j^2 = log(L_jj - |c_j|^2) (Chen et al. 2018; ties -> lower index).
    Once every remaining gain d_j^2 <= tol * max_i L_ii, the rest go by the largest L_jj.

    L (G, N, N): G samples at once -> (G, k), each row what its sample gets alone (every step is
    row-wise; the one matrix product runs per sample). No host read: the picks stay on the device, the
    loop always runs k steps, and the stop is applied afterwards (the picks after it are replaced)."""
    if L.dim() == 2:
        return dpp_greedy_map(L[None], k, tol)[0]
    L = L.double()
    G, n = int(L.shape[0]), int(L.shape[-1])
    k = min(int(k), n)
    dev = L.device
    if k == 0:
        return torch.zeros(G, 0, dtype=torch.long, device=dev)
    diag = L.diagonal(dim1=1, dim2=2).clone()  # (G, n)
    d2 = diag.clone()  # the gains d_j^2; -inf once taken
    cis = torch.zeros(G, k, n, dtype=L.dtype, device=dev)  # per sample C: one row per pick
    cc = torch.zeros(G, n, dtype=L.dtype, device=dev)  # c_j . C of each sample's pick
    cis_of, cc_of = cis.unbind(0), cc.split(1)  # per sample: its C, its cc row (views made once)
    taken = torch.zeros(G, n, dtype=torch.bool, device=dev)
    picks, gains = [], []
    for i in range(k):  # a step is 11 ops + one product per sample (kernel launches on a GPU)
        j = d2.argmax(dim=1, keepdim=True)  # (G, 1)
        dj = d2.gather(1, j)
        c = cis.gather(2, j[:, None].expand(G, k, 1)).view(G, k)  # c_j (zero from row i on)
        for g in range(G):  # the product a sample gets alone (a batched matmul may sum in another order)
            torch.mm(c[g : g + 1, :i], cis_of[g][:i], out=cc_of[g])
        e = torch.div(L.gather(1, j[:, None].expand(G, 1, n)).view(G, n) - cc, dj.sqrt(), out=cis[:, i])
        taken.scatter_(1, j, True)
        d2 = (d2 - e * e).masked_fill_(taken, -math.inf)  # masked after every update: NaN stays out
        picks.append(j)
        gains.append(dj)
    picks, gain = torch.cat(picks, dim=1), torch.cat(gains, dim=1)  # (G, k)
    # From the first pick without volume to gain (d_j^2 <= floor: L singular, duplicate tokens,
    # k > rank), the rest of the budget goes to the largest L_jj among the tokens not picked before.
    floor = tol * diag.max(dim=1, keepdim=True).values.clamp(min=0.0)
    good = (gain <= floor).cumsum(dim=1) == 0  # the picks before the stop
    # tokens picked before the stop (scatter_add: the discarded picks after it may repeat an index)
    before = torch.zeros(G, n, dtype=torch.long, device=dev).scatter_add_(1, picks, good.long()) > 0
    # repeated argmax of L_jj over the tokens not yet picked == a stable descending sort
    by_quality = torch.sort(diag.masked_fill(before, -math.inf), dim=1, descending=True, stable=True).indices
    slot = (torch.arange(k, device=dev) - good.sum(dim=1, keepdim=True)).clamp(min=0)
    return torch.where(good, picks, by_quality.gather(1, slot))


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
        # samples with the same visual-token count share one greedy loop (row-wise: picks as alone)
        by_count: dict[int, list[int]] = {}
        for b in range(ctx.batch_size):
            by_count.setdefault(ctx.n_visual(b), []).append(b)
        keep: list = [None] * ctx.batch_size
        for n, group in by_count.items():
            L = torch.empty(len(group), n, n, dtype=torch.float64, device=ctx.hidden.device)
            for g, b in enumerate(group):
                conditional_kernel(ctx.visual_hidden(b), self.relevance_of(ctx, b), out=L[g])
            for b, picks in zip(group, dpp_greedy_map(L, self.target(n))):
                keep[b] = picks.sort().values
        return [
            Decision(keep=keep[b], record={"no_instruction": self.relevance == "embeds" and ctx.text[b].numel() == 0})
            for b in range(ctx.batch_size)
        ]
