"""Masks, positions and decode geometry after a reduction: what each decoder layer must be given so
that it sees exactly the slots it holds, at prefill and at every decode step.

* `prefill_mask` / `mask_kind`: the 4-D mask of a reduced sequence (padding and empty slots hidden),
  in the form the attention implementation takes (bool for sdpa, additive for eager);
* `StageGeometry` + `llm_stage_geometry`: after a decision before layer K, the mask, RoPE cos/sin and
  position ids that layers >= K receive in this prefill (`keep`: gathered from layer 0; `repack`:
  0..L'-1 from each sample's first position);
* `decode_layer_kwargs`: at a decode step, those layers' mask over (their cached slots + new tokens)
  and, for `repack`, positions shifted back by the tokens removed before them;
* `decode_lm_kwargs`: after a projector-stage reduction, generate's full-length 2-D mask / positions
  mapped onto the shortened cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import gather_rows
from .context import Slots


@dataclass
class StageGeometry:
    """What decode steps need to know about the slots that layers from `layer` on hold."""

    layer: int
    valid: torch.Tensor  # (B, L')
    removed: torch.Tensor  # (B,) valid tokens removed so far (for `repack` decode positions)
    kwargs: dict = field(default_factory=dict)  # prefill substitutions for layers >= layer
    _all_valid: bool | None = field(default=None, repr=False)

    @property
    def all_valid(self) -> bool:
        """No empty slot (asked at every decode step; computed once, since a GPU synchronises for it)."""
        if self._all_valid is None:
            self._all_valid = bool(self.valid.all())
        return self._all_valid


def mask_kind(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" mask in the implementation's form: bool (sdpa) or additive 0 / min (eager)."""
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def prefill_mask(
    valid: torch.Tensor, attn_implementation: str, dtype: torch.dtype, all_valid: bool
) -> torch.Tensor | None:
    """(B, 1, L', L') causal mask over valid slots; None when nothing is hidden (`all_valid`, known on the
    host) and sdpa can run its fused causal kernel (as the stock model does without padding)."""
    if attn_implementation == "sdpa" and all_valid:
        return None
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    # Empty / padding slots see only themselves, so no softmax row is empty; real tokens never see them.
    allowed = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=valid.device)[None]
    return mask_kind(allowed[:, None], attn_implementation, dtype)


def projector_positions(adapter, positions: str, slots: Slots, pos: torch.Tensor, base: torch.Tensor):
    """Position ids of the language model's reduced input: gathered (`keep`) or re-packed (`repack`)."""
    if positions == "keep":
        return adapter.gather_positions(pos, slots.index)
    return adapter.repack_positions(pos, slots, base)


def llm_stage_geometry(
    adapter,
    positions: str,
    layer: int,
    slots: Slots,
    hidden: torch.Tensor,
    layer0: dict,
    base_pos: torch.Tensor,
    removed: torch.Tensor,
) -> StageGeometry:
    """The mask, RoPE and position ids layers >= `layer` receive after a decision before `layer`;
    `layer0` holds the kwargs decoder layer 0 received in this prefill, `hidden` the reduced states."""
    geo = StageGeometry(layer, slots.valid, removed, _all_valid=slots.all_valid())
    geo.kwargs["attention_mask"] = prefill_mask(slots.valid, adapter.attn_implementation, hidden.dtype, geo.all_valid)
    if positions == "keep":
        pos0 = layer0.get("position_ids")
        if pos0 is None:  # layer 0's length
            pos0 = torch.arange(layer0["position_embeddings"][0].shape[1], device=hidden.device)[None]
        cos, sin = layer0["position_embeddings"]
        geo.kwargs["position_embeddings"] = (gather_rows(cos, slots.index), gather_rows(sin, slots.index))
        geo.kwargs["position_ids"] = gather_rows(pos0.expand(hidden.shape[0], -1), slots.index)
    else:
        pos = base_pos[:, None] + (slots.valid.long().cumsum(1) - 1).clamp(min=0)
        geo.kwargs["position_embeddings"] = adapter.rotary(hidden, pos)
        geo.kwargs["position_ids"] = pos
    return geo


def decode_layer_kwargs(
    adapter, positions: str, layer: int, hidden: torch.Tensor, kwargs: dict, geo: StageGeometry
) -> dict:
    """A decode step's mask (and, for `repack`, positions / RoPE) for decoder layer `layer`, whose cache
    holds the slots of `geo` followed by the tokens generated so far."""
    cache = kwargs.get("cache")
    B, q = hidden.shape[:2]
    Ls = geo.valid.shape[1]
    past = cache.layers[layer].get_seq_length() if cache is not None else 0
    n_new = past + q - Ls
    dev = hidden.device
    orig = kwargs.get("attention_mask")
    if orig is None and q == 1 and geo.all_valid:
        allowed = None  # nothing to hide: keep the stock (mask-free) decode path
    else:
        if orig is not None:
            tail = orig[..., -n_new:]
            tail = tail if tail.dtype == torch.bool else tail == 0
            tail = tail.expand(B, 1, q, n_new)
        else:
            j = torch.arange(n_new, device=dev)
            tail = (j[None, :] <= (n_new - q + torch.arange(q, device=dev))[:, None])[None, None]
            tail = tail.expand(B, 1, q, n_new)
        allowed = torch.cat([geo.valid[:, None, None, :].expand(B, 1, q, Ls), tail], -1)
    out = {"attention_mask": None if allowed is None else mask_kind(allowed, adapter.attn_implementation, hidden.dtype)}
    if positions == "repack":
        pos = kwargs.get("position_ids")
        if pos is None:
            raise RuntimeError("repack positions need the decoder to pass position_ids to its layers")
        pos = adapter.shift_positions(pos, -geo.removed)
        out["position_ids"] = pos
        out["position_embeddings"] = adapter.rotary(hidden, pos)
    return out


def decode_lm_kwargs(adapter, positions: str, geo: StageGeometry, kwargs: dict, cache) -> dict:
    """Decode after a projector-stage reduction: map generate's full-length 2-D mask / positions onto
    the shortened cache (`geo.kwargs["orig_len"]`: the prompt's length before the reduction)."""
    kw = dict(kwargs)
    q = kwargs["inputs_embeds"].shape[1]
    B, Ls = geo.valid.shape
    mask2d = kwargs.get("attention_mask")
    n_new = cache.get_seq_length() + q - Ls
    tail = mask2d[:, -n_new:] if mask2d is not None else torch.ones(B, n_new, dtype=torch.long, device=geo.valid.device)
    kw["attention_mask"] = torch.cat([geo.valid.long(), tail.long()], 1)
    pos = kwargs.get("position_ids")
    if pos is not None and positions == "repack":
        kw["position_ids"] = adapter.shift_positions(pos, -geo.removed)
    elif pos is None:  # a plain forward loop: continue after the prompt, in the chosen geometry
        start = geo.kwargs["orig_len"] if positions == "keep" else Ls
        kw["position_ids"] = (torch.arange(q, device=geo.valid.device)[None] + n_new - q + start).expand(B, q)
    return kw
