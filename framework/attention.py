"""Rows-only attention: the attention probabilities of a few query rows over a layer's keys.

FastV, SparseVLM and PDrop need softmax(QK^T / sqrt(d)) for a handful of rows (raters, the last
token). Fused kernels (sdpa, flash) never return probabilities, and switching the whole model to eager
costs O(H L^2) memory in every layer. We recompute only the needed rows: O(R L) per head, post-RoPE,
causal, padding-aware, GQA-expanded, in fp32.
"""

from __future__ import annotations

import torch
from einops import rearrange


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); cos/sin (B, L, hd) as transformers' rotary modules return them."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B|1, L, ...) gathered along dim 1 at idx (B, R) -> (B, R, ...)."""
    if t.shape[0] == 1:  # one table for every row of idx: a single index_select
        return t.index_select(1, idx.view(-1)).view(*idx.shape, *t.shape[2:])
    if t.shape[0] != idx.shape[0]:
        t = t.expand(idx.shape[0], *t.shape[1:])
    view = idx.view(*idx.shape, *([1] * (t.dim() - 2)))
    return torch.gather(t, 1, view.expand(*idx.shape, *t.shape[2:]))


def project_keys(
    attn: torch.nn.Module, normed: torch.Tensor | None, cos, sin, projected: torch.Tensor | None = None
) -> torch.Tensor:
    """Post-RoPE keys (B, H_kv, L, hd) of an attention module for already-normed inputs (or from its
    k_proj output `projected`, when the layer's own projection was kept)."""
    projected = attn.k_proj(normed) if projected is None else projected
    k = rearrange(projected, "b l (h d) -> b h l d", d=attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    return apply_rope(k, cos, sin)


def attention_rows(
    attn: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_valid: torch.Tensor,
    keys: torch.Tensor | None = None,
    norm: torch.nn.Module | None = None,
    queries: torch.Tensor | None = None,
    keys_proj: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of query rows over all keys of one layer.

    attn: the layer's self-attention module (q_proj/k_proj, head_dim, scaling).
    hidden: (B, L, D) the layer's input; `norm` is its input layernorm (None: `hidden` is already normed).
      Only the query rows are normalised when `keys` are given.
    rows: (B, R) slot indices of the query rows (ascending or not).
    cos, sin: (B, L, hd) the position embeddings this layer used.
    key_valid: (B, L) bool, False for padding / empty slots.
    keys: (B, H_kv, L, hd) post-RoPE keys if already computed (the layer's KV cache); else recomputed.
    queries / keys_proj: (B, L, H*hd) the layer's own q_proj / k_proj outputs if kept (no re-projection).
    Returns (B, H, R, L) float32 probabilities; causal: row r sees keys with slot index <= rows[r].
    Masked keys get exactly 0; a row with no visible key (a padding row) is meaningless.
    """
    (B, R), L, hd = rows.shape, hidden.shape[1], attn.head_dim
    norm = norm if norm is not None else torch.nn.Identity()
    q_rows = attn.q_proj(norm(gather_rows(hidden, rows))) if queries is None else gather_rows(queries, rows)
    q = q_rows.view(B, R, -1, hd).transpose(1, 2)  # (B, H, R, hd)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = apply_rope(q, gather_rows(cos, rows), gather_rows(sin, rows))
    if keys is None:
        keys = project_keys(attn, norm(hidden) if keys_proj is None else None, cos, sin, keys_proj)
    H, groups = q.shape[1], q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    # the batched product torch.matmul would run, without its broadcasting steps
    logits = torch.bmm(q.float().reshape(B * H, R, hd), keys.float().reshape(B * H, L, hd).transpose(1, 2))
    logits = logits.view(B, H, R, L) * attn.scaling
    allowed = (torch.arange(L, device=rows.device) <= rows[..., None]) & key_valid[:, None]
    logits.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return torch.softmax(logits, dim=-1)


def attention_source(adapter, run, layer: int, hidden: torch.Tensor):
    """For a decision before decoder layer `layer`: a callable `which -> dict` with what recomputing
    attention rows needs (`StageContext.attention` / `keys`). which="previous": the layer just run, from
    `run.prev` (its input hidden states and effective kwargs), with its cached keys and its hooked q/k
    projections (`run.proj`) when their lengths match; which="current": this layer's own projections
    applied to `hidden`."""
    from .errors import ConfigError

    def source(which: str) -> dict:
        if which == "previous":
            j, h_in, kw = run.prev
            if j != layer - 1:
                raise RuntimeError("previous-layer attention is only available right after that layer")
        elif which == "current":
            j, h_in, kw = layer, hidden, run.prev[2]
        else:
            raise ConfigError(f"attention which={which!r}; allowed: 'previous', 'current'")
        norm, attn = adapter.attention_parts(j)
        cos, sin = kw["position_embeddings"]
        keys = None
        cache = kw.get("cache")
        if which == "previous" and cache is not None and cache.layers[j].get_seq_length() == h_in.shape[1]:
            keys = cache.layers[j].keys
        proj = {}
        if which == "previous":  # the projections that layer computed (hooked), when their length matches
            proj = {
                k: v for k in ("q", "k") if (v := run.proj.get((j, k))) is not None and v.shape[:2] == h_in.shape[:2]
            }
        return {
            "attn": attn,
            "hidden": h_in,
            "norm": norm,
            "cos": cos,
            "sin": sin,
            "keys": keys,
            "queries": proj.get("q"),
            "keys_proj": proj.get("k"),
        }

    return source
