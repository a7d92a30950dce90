"""Pure tensor functions behind the merging / selection strategies (no model, no hooks).

Tokens are `[batch, tokens, channels]` unless stated. ToMe-style: matching is computed once and
returned as a closure that is then applied to features, sizes and source maps alike.
  * `bipartite_soft_matching(metric, r, protected)` -> `merge(x, mode)` (ToMe, Bolya et al. ICLR 2023)
  * `merge_wavg` (size-weighted average, sizes add), `merge_source` (provenance), `spatial_order`
  * `farthest_point_selection` / `farthest_points` (DivPrune's max-min diversity on cosine distance)
  * `grid_shape`, `pool_bins` (the cells of spatial average pooling of a visual grid to a target count)
  * `contextual_merge` (VisionZip's contextual tokens)
  * `scaled` (a budget quoted for 576 tokens, scaled to another token count)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .budget import REFERENCE_VISUAL_TOKENS

Merge = Callable[..., torch.Tensor]


def scaled(count: int | float, n: int, ref: int = REFERENCE_VISUAL_TOKENS) -> int:
    """A budget quoted for `ref` tokens (LLaVA-1.5's 576), for `n` tokens: round(count * n / ref), >= 1."""
    return max(1, min(n, round(count * n / ref)))


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> tuple[Merge, int]:
    """ToMe's bipartite soft matching: merge `r` tokens of set A (even indices) into set B (odd).

    metric: (B, N, C) similarity features (cosine is used). The first `protected` tokens (e.g. CLS)
    are never merged. Returns (merge, r_used); `merge(x, mode="sum"|"mean")` maps (B, N, C) ->
    (B, N - r_used, C) with output order [unmerged A, all of B] (use `spatial_order` afterwards).
    r is clamped to what one round can do; r <= 0 returns the identity.
    """
    B, N, _ = metric.shape
    n_a, n_b = (N + 1) // 2, N // 2
    pa, pb = (protected + 1) // 2, protected // 2  # protected tokens that fall in A / in B
    r = min(r, n_a - pa, n_b - pb)
    if r <= 0:
        return _identity, 0
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if pa:
            scores[:, :pa, :] = -math.inf
        if pb:
            scores[:, :, :pb] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # unmerged A, in their original order
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge, r


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average: merged = sum(size * x) / sum(size); sizes (B, N) add up."""
    if size is None:
        size = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    s = size[..., None].to(x.dtype)
    x = merge(x * s, mode="sum")
    s = merge(s, mode="sum")
    return x / s, s[..., 0]


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """source (B, N, N0): which original tokens each current token stands for (0/1 floats or bool)."""
    return merge(source.float(), mode="amax")


def spatial_order(source: torch.Tensor) -> torch.Tensor:
    """(B, N) permutation that sorts current tokens by their first original token (spatial order)."""
    n0 = source.shape[-1]
    ar = torch.arange(n0, device=source.device).expand_as(source)
    first = torch.where(source.bool(), ar, n0).min(dim=-1).values
    return first.argsort(dim=-1)


def gather_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) reordered along dim 1 by perm (B, N)."""
    idx = perm.view(*perm.shape, *([1] * (x.dim() - 2))).expand(*perm.shape, *x.shape[2:])
    return x.gather(1, idx)


def merge_to(
    x: torch.Tensor,
    target: int,
    metric: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    protected: int = 0,
):
    """Repeated bipartite rounds until `target` tokens remain; results in spatial order.

    Returns (x, size, source) with source (B, target, N0)."""
    B, N, _ = x.shape
    metric = x if metric is None else metric
    size = torch.ones(B, N, dtype=x.dtype, device=x.device) if size is None else size
    source = torch.eye(N, device=x.device)[None].expand(B, N, N) if source is None else source
    while x.shape[1] > target:
        merge, r = bipartite_soft_matching(metric, x.shape[1] - target, protected)
        if r == 0:
            break
        msize = size
        x, size = merge_wavg(merge, x, msize)
        metric, _ = merge_wavg(merge, metric, msize)
        source = merge_source(merge, source)
    perm = spatial_order(source)
    return gather_tokens(x, perm), size.gather(1, perm), gather_tokens(source, perm)


def cosine_distance(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) -> (N, N) float32 cosine distances 1 - cos(x_i, x_j) (written into `out` when given)."""
    xn = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.mm(xn, xn.T, out=out).neg_().add_(1.0)  # -s + 1 == 1 - s exactly


def farthest_point_selection(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min diversity selection on cosine distance; x (N, D) -> k indices (sorted).

    First pick: the token farthest from its nearest neighbour; then repeatedly the token whose
    minimum distance to the selected set is largest (ties -> lower index)."""
    return farthest_points([x], k)[0]


def farthest_points(xs: list[torch.Tensor], k: int) -> torch.Tensor:
    """`farthest_point_selection` for G samples of N tokens at once: xs G tensors (N, D) -> (G, min(k, N))
    indices, each row sorted (at least one pick). Distances are computed per sample; every loop step
    is row-wise (masked_fill, argmax, minimum within one sample's row), so a sample's picks are those
    it gets alone. The picks stay on the device: no host read per step."""
    G, N = len(xs), int(xs[0].shape[0])
    dist = torch.empty(G, N, N, dtype=torch.float32, device=xs[0].device)
    for g, x in enumerate(xs):
        cosine_distance(x, out=dist[g])
    # a token's distance to itself never counts: not for its nearest neighbour, and once picked it is
    # masked out of the scores below
    dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    rows = torch.arange(G, device=dist.device)
    i = dist.min(dim=2).values.argmax(dim=1)  # (G,) first picks
    picks = [i]
    mind = dist[rows, i]  # (G, N) each token's distance to the nearest selected one
    taken = torch.zeros(G, N, dtype=torch.bool, device=dist.device)
    for _ in range(min(k, N) - 1):
        taken.scatter_(1, i[:, None], True)
        # every taken token masked at every step: a NaN distance (a NaN token) would undo a single -inf
        i = mind.masked_fill_(taken, -math.inf).argmax(dim=1)
        picks.append(i)
        mind = torch.minimum(mind, dist[rows, i])
    return torch.stack(picks, dim=1).sort(dim=1).values


def grid_shape(target: int, rows: int, cols: int) -> tuple[int, int]:
    """(h, w) with h * w == target, h <= rows, w <= cols, closest to the grid's aspect ratio."""
    best = None
    for h in range(1, rows + 1):
        if target % h:
            continue
        w = target // h
        if w > cols:
            continue
        err = round(abs(math.log((h / w) / (rows / cols))), 9)  # ties -> fewer rows
        if best is None or err < best[0]:
            best = (err, h, w)
    if best is None:
        raise ValueError(f"no h x w == {target} grid fits inside a {rows} x {cols} grid")
    return best[1], best[2]


def pool_bins(n: int, m: int) -> list[tuple[int, int]]:
    """m pooling bins that partition 0..n (boundaries i * n // m): torch's adaptive_avg_pool bins when
    m divides n; otherwise its overlapping bins are made disjoint, so each token is in one cell."""
    return [(i * n // m, (i + 1) * n // m) for i in range(m)]


def contextual_merge(
    hidden: torch.Tensor, metric: torch.Tensor, n_ctx: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens from the non-dominant tokens of one image.

    hidden (R, D), metric (R, C) of the remaining tokens. Targets: uniform stride over the remaining
    list (step = R // n_ctx); every other token joins its most cosine-similar target. Contextual token
    = target hidden + mean of the hidden states assigned to it (the official sum).
    Returns (tokens (n_ctx, D), target indices (n_ctx,), assignment (R,) -> 0..n_ctx-1)."""
    R = hidden.shape[0]
    n_ctx = min(n_ctx, R)
    step = max(1, R // n_ctx)
    targets = torch.arange(0, R, step, device=hidden.device)[:n_ctx]
    m = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    is_t = torch.zeros(R, dtype=torch.bool, device=hidden.device)
    is_t[targets] = True
    # the R - n_ctx non-targets in order (a stable sort puts them first): no host read, unlike nonzero
    others = is_t.to(torch.uint8).argsort(stable=True)[: R - n_ctx]
    assign = torch.empty(R, dtype=torch.long, device=hidden.device)
    assign[targets] = torch.arange(n_ctx, device=hidden.device)
    out = hidden[targets].clone()
    if others.numel():
        sim = m[others] @ m[targets].T
        a = sim.argmax(dim=1)
        assign[others] = a
        # one-hot (O, n_ctx) by scatter: one_hot reads a's range on the host
        onehot = torch.zeros(a.numel(), n_ctx, dtype=hidden.dtype, device=hidden.device).scatter_(1, a[:, None], 1.0)
        counts = onehot.sum(0).clamp(min=1)[:, None]
        out = out + (onehot.T @ hidden[others]) / counts
    return out, targets, assign
