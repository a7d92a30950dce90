"""DPC-kNN clustering and cluster merging as pure tensor functions (SparseVLM's token recycling).

Density-peak clustering (Rodriguez & Laio 2014) with kNN densities, as in TCFormer and SparseVLM's
`cluster_and_merge`:

  d_ij   = ||x_i - x_j|| / sqrt(D)                         (Euclidean, scaled by the feature size)
  rho_i  = exp(-mean_{j in kNN_k(i)} d_ij^2)               (the point itself, distance 0, is among its k)
  delta_i = min_{j denser than i} d_ij,  or max_ij d_ij for the densest point
  centres = the C points with the largest rho * delta, in descending order of rho * delta (the official
            code's `topk` order: cluster c, and so merged token c, belongs to the c-th best centre)
  labels  = nearest centre (Euclidean, as the code) or most cosine-similar centre (as the paper says);
            each centre belongs to its own cluster.

Distances do not depend on a common offset: the points are centred and the Gram form |x|^2 + |y|^2 - 2xy
is taken in float64 (in float32 it cancels catastrophically when the points share a large common component,
as hidden states do). This matches float64 direct differences to float32 rounding and is ~8x faster than
`cdist`'s direct-difference mode. Deterministic: the official code adds U(0,1)*1e-6 to rho to break ties;
here "denser" means a larger rho, or an equal rho at a lower index, and every other tie (centre scores,
assignment) goes to the lower index. Everything is computed in float32.

"Denser" is an order: a stable sort by descending rho lists the points densest first, so the points denser
than the p-th one are exactly the first p; delta is then a running minimum along the rows of the distance
matrix permuted into that order (one N x N pass instead of building the N x N "denser" mask).
"""

from __future__ import annotations

import numpy as np
import torch

MERGE_MODES = ("mean", "sum")
ASSIGN_MODES = ("euclidean", "cosine")


def scaled_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N), or (G, N, D) -> (G, N, N): Euclidean distances divided by sqrt(D), float32
    (invariant to a common offset; exact zeros on the diagonal)."""
    y = x.double() if x.device.type != "mps" else x.cpu().double()  # MPS has no float64
    y = y - y.mean(-2, keepdim=True)
    sq = (y * y).sum(-1)
    gram = torch.baddbmm if y.dim() == 3 else torch.addmm  # the same products per sample (tested)
    d2 = gram(sq[..., :, None] + sq[..., None, :], y, y.transpose(-1, -2), alpha=-2.0).clamp_(min=0.0)
    d2.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    return (d2.sqrt_() / (x.shape[-1] ** 0.5)).to(x.device, torch.float32)


def k_smallest(dist: torch.Tensor, k: int) -> torch.Tensor:
    """(..., M) -> (..., k): each row's k smallest values in ascending order, as topk(largest=False) gives
    them. On the CPU, past a few dozen columns, numpy's vectorised sort is several times faster than
    torch.topk; sorting is exact, so the values are the same."""
    if dist.device.type == "cpu" and dist.shape[-1] >= 32:
        return torch.from_numpy(np.sort(dist.detach().numpy(), axis=-1)[..., :k])
    return torch.topk(dist, k, dim=-1, largest=False).values


def dpc_knn(
    x: torch.Tensor, n_clusters: int, k: int | None = None, assign: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of x (N, D) into `n_clusters` groups by DPC-kNN; x (G, N, D) clusters G samples of
    N rows at once, each on its own.

    k: neighbours for the density (default `n_clusters`, as the official code), clipped to N.
    assign: "euclidean" (nearest centre; official code) or "cosine" (most similar centre; the paper).
    Returns (labels (N,) in 0..C-1, centres (C,) row indices by descending rho * delta; label c <-> centres[c]),
    with a leading G for a batch.
    """
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign={assign!r}; allowed: {list(ASSIGN_MODES)}")
    single = x.dim() == 2
    xb = x[None] if single else x
    G, N = int(xb.shape[0]), int(xb.shape[1])
    if N == 0:
        raise ValueError("dpc_knn needs at least one point")
    C = max(1, min(int(n_clusters), N))
    k = max(1, min(int(k if k is not None else C), N))
    dist = scaled_distances(x)[None] if single else scaled_distances(x)
    knn = k_smallest(dist, k)
    rho = torch.exp(-(knn**2).mean(-1))
    # densest first, equal rho by lower index: the points denser than the p-th are the first p
    rho_sorted, order = torch.sort(rho, dim=-1, descending=True, stable=True)
    # delta of the p-th point: min over the first p columns of its row (dist in density order); the
    # densest point has no denser one and takes the largest distance
    rows = dist.gather(1, order[:, :, None].expand(G, N, N))
    prefix_min = rows.gather(2, order[:, None, :].expand(G, N, N)).cummin(-1).values
    delta_sorted = torch.cat([dist.amax((1, 2))[:, None], prefix_min.diagonal(-1, dim1=1, dim2=2)], dim=1)
    score = torch.empty_like(rho).scatter_(1, order, rho_sorted * delta_sorted)
    centres = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :C]
    if C == 1:  # one cluster: nothing to assign
        labels = torch.zeros(G, N, dtype=torch.long, device=x.device)
    elif assign == "euclidean":  # first minimum = lower-index centre
        labels = torch.argmin(dist.gather(2, centres[:, None, :].expand(G, N, C)), dim=-1)
    else:
        xn = torch.nn.functional.normalize(xb.float(), dim=-1)
        labels = torch.argmax(xn @ xn.gather(1, centres[:, :, None].expand(G, C, xn.shape[-1])).transpose(1, 2), -1)
    if C > 1:
        labels.scatter_(1, centres, torch.arange(C, device=x.device).expand(G, C))
    return (labels[0], centres[0]) if single else (labels, centres)


def merge_clusters(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, merge: str = "mean") -> torch.Tensor:
    """(N, D) rows -> (C, D): the mean (official code) or element-wise sum (paper Eq. 10) of each cluster."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}; allowed: {list(MERGE_MODES)}")
    counts = torch.bincount(labels, minlength=n_clusters).clamp(min=1)[:, None] if merge == "mean" else None
    return merge_rows(x, labels, n_clusters, merge, counts)


def merge_rows(x: torch.Tensor, labels: torch.Tensor, n_clusters: int, merge: str, counts) -> torch.Tensor:
    """(N, D) rows -> (C, D) float32 row sums per label, in row order, with nothing read on the host; mean:
    divided by counts ((C, 1) integer tensor, >= 1, the labels' counts; float32 / integer divides by the
    count as a float32, exactly as dividing by the converted count)."""
    out = torch.zeros(n_clusters, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(0, labels, x.float())
    return out / counts if merge == "mean" else out


def cluster_and_merge(
    x: torch.Tensor, n_clusters: int, **options
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """DPC-kNN + merge. Returns (merged (C, D) float32, sources: per cluster the row indices of x in
    ascending order, centres (C,) the row index of each cluster's centre), clusters in the official order
    (descending rho * delta of their centres). options: those of `cluster` (k, merge, assign), and ids (N,):
    report sources and centres as ids[row] instead. Splitting the sources reads their sizes on the host."""
    ids = options.pop("ids", None)
    merged, labels, centres = cluster(x, n_clusters, **options)
    counts = torch.bincount(labels, minlength=int(centres.numel()))
    order = torch.sort(labels, stable=True).indices  # each cluster's rows in ascending order
    if ids is not None:
        order, centres = ids.index_select(0, order), ids.index_select(0, centres)
    return merged, list(torch.split(order, counts.tolist())), centres


def cluster(
    x: torch.Tensor, n_clusters: int, k: int | None = None, merge: str = "mean", assign: str = "euclidean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`cluster_and_merge` without reading anything on the host: (merged (C, D) float32, labels (N,) each
    row's cluster in 0..C-1, centres (C,) row indices), the form `SourceGroups` takes; x (G, N, D) gives
    each of G samples its own clusters (a leading G on every output)."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}; allowed: {list(MERGE_MODES)}")
    labels, centres = dpc_knn(x, n_clusters, k=k, assign=assign)
    C = int(centres.shape[-1])
    # a batch is one merge over all samples' rows: sample g's cluster c is row g * C + c (each row's sum
    # still in row order, so each sample gets what it gets alone)
    lead = labels.shape[:-1]
    flat = labels if not lead else (labels + torch.arange(lead[0], device=x.device)[:, None] * C).flatten()
    # each cluster has its centre: no empty cluster (counted by a scatter: bincount would sync a GPU for
    # its output size)
    n_out = C * (lead[0] if lead else 1)
    counts = torch.zeros(n_out, dtype=torch.long, device=x.device).index_add_(0, flat, torch.ones_like(flat))
    merged = merge_rows(x.reshape(-1, x.shape[-1]), flat, n_out, merge, counts[:, None])
    return merged.view(*lead, C, x.shape[-1]), labels, centres
