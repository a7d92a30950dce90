from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from framework.clustering import merge_rows
from framework.errors import ConfigError
from framework.merging import grid_shape, pool_bins
from framework.reducer import CountBudget, Decision, TokenReducer, grouped_decision
from framework.registry import register


def _fits(target: int, rows: int, cols: int) -> bool:
    """Whether some h x w == target fits inside a rows x cols grid."""
    return any(target % h == 0 and target // h <= cols for h in range(1, rows + 1))


def split_budget(t: int, sizes: list[tuple[int, int]]) -> list[int]:
    """Split t pooled tokens over grids (rows, cols): close to proportional to their sizes, each count
    a feasible h x w inside its grid, every grid >= 1 when t allows. Raises ConfigError if impossible."""
    n = [r * c for r, c in sizes]
    total = sum(n)
    k = len(sizes)
    lo = 1 if t >= k else 0
    ideal = [t * x / total for x in n]

    def ok(c: int, g: int) -> bool:
        return c == 0 or (c <= n[g] and _fits(c, *sizes[g]))

    def dfs(g: int, left: int) -> list[int] | None:
        if g == k - 1:
            return [left] if lo <= left <= n[g] and ok(left, g) else None
        cands = sorted(range(lo, min(n[g], left - lo * (k - g - 1)) + 1), key=lambda c: (abs(c - ideal[g]), c))
        for c in cands:
            if ok(c, g) and sum(n[g + 1 :]) >= left - c:
                rest = dfs(g + 1, left - c)
                if rest is not None:
                    return [c] + rest
        return None

    out = dfs(0, t)
    if out is None:
        raise ConfigError(f"pooling: {t} tokens cannot be split into h x w grids inside {sizes}")
    return out


@register("pooling")
@dataclass
class Pooling(CountBudget, TokenReducer):
    """Spatial average pooling of each image's (or video frame's) visual grids, before the LLM.

    Acts on the projected visual tokens (the LLM's input embeddings) at the projector decision, with
    the 2-D grids the backbone adapter reports (`ctx.grids`): LLaVA-1.5 one side x side grid per image;
    Qwen2-VL / 2.5-VL one (h, w) / spatial_merge_size grid per image or video frame; LLaVA-NeXT per
    image the base view's grid and the unpadded high-res crop grid.

    keep: pooled tokens per span (image / frame), a count (int) or a ratio (float) of the span's grid
    tokens; preset: 192 / 128 / 64 (quoted for 576 tokens, scaled by n/576). Across several grids of one
    span (LLaVA-NeXT base + crops; Qwen video_span="video" frames) the budget is split in proportion to
    their sizes (each grid >= 1 token, each share a feasible h x w). A target t is pooled as an h x w grid
    with h * w = t and the aspect closest to the grid's (192 -> 12 x 16, 128 -> 8 x 16, 64 -> 8 x 8 on 24 x
    24), with pooling bins that partition the grid (adaptive pooling's when they divide it); each pooled
    token sits at its cell's top-left slot (and takes its position), so tokens stay in spatial order.

    Layout tokens are kept on top of the budget: CLIP's CLS (select strategy 'full'); LLaVA-NeXT's
    newlines (newline='visual'): one per pooled crop row, the one closing the bin's last row (as
    LLaVA-NeXT's own `anyres_max` downsampling keeps one newline per row), and a crop-less image's
    single newline. Under newline='keep' newlines are text and untouched.
    """

    keep: int | float = 0.25
    preset: int | None = None

    stage: ClassVar[str] = "projector"

    def decide(self, ctx):
        return [self._sample(ctx, b) for b in range(ctx.batch_size)]

    def _sample(self, ctx, b: int) -> Decision:
        """Every cell of every grid at once: each grid token's cell is known on the host (the bins are), so
        the means are one scatter-add and nothing is read on the host."""
        x = ctx.visual_hidden(b)
        members, labels, first_at, covered, n_cells = [], [], [], [], 0
        at = 0  # where the next members start in the concatenated members
        for grids in ctx.grids(b):
            if not grids:
                continue
            sizes = [(g.rows, g.cols) for g in grids]
            shares = split_budget(self.target(sum(r * c for r, c in sizes)), sizes)
            for g, t in zip(grids, shares):
                covered += [g.index.flatten()] + ([] if g.row_end is None else [g.row_end])
                if t == 0:
                    continue
                h, w = grid_shape(t, g.rows, g.cols)
                rows, cols = _bin_of(g.rows, h), _bin_of(g.cols, w)
                cell = (rows[:, None] * w + cols[None, :]).ravel()  # row-major grid token -> its cell
                members.append(g.index.flatten())
                labels.append(n_cells + cell)
                first_at.append(at + np.unique(cell, return_index=True)[1])  # a cell's top-left token
                at, n_cells = at + cell.size, n_cells + h * w
                if g.row_end is not None:  # one newline per pooled row: the one closing its last row
                    members.append(g.row_end)
                    labels.append(n_cells + rows)
                    first_at.append(at + np.cumsum(np.bincount(rows, minlength=h)) - 1)
                    at, n_cells = at + rows.size, n_cells + h
        # layout tokens (CLS, a lone newline): in no grid, kept as they are
        in_grid = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if covered:
            in_grid.index_fill_(0, torch.cat(covered), True)
        n_layout = x.shape[0] - sum(int(c.numel()) for c in covered)
        members.append(torch.nonzero_static(~in_grid, size=n_layout).flatten())
        labels.append(n_cells + np.arange(n_layout))
        first_at.append(at + np.arange(n_layout))
        index, label = torch.cat(members), np.concatenate(labels)
        host = torch.from_numpy(np.concatenate([label, np.concatenate(first_at), np.bincount(label)]).astype(np.int64))
        label_t, first_t, count = host.to(x.device, non_blocking=True).split([label.size, *[n_cells + n_layout] * 2])
        means = merge_rows(x[index], label_t, n_cells + n_layout, "mean", count[:, None])
        return grouped_decision(index[first_t], index, label_t, means.to(x.dtype), sizes=count)


def _bin_of(n: int, m: int) -> np.ndarray:
    """(n,) the `pool_bins(n, m)` bin of each of n rows (or columns)."""
    return np.repeat(np.arange(m), [b - a for a, b in pool_bins(n, m)])
