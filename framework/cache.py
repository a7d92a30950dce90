"""A KV cache that appends in place: `generate(..., cache=GrowingCache())`.

transformers' `DynamicCache` concatenates every layer's whole cache with each new token, so a decode step
copies the cache once per layer: O(cached tokens x batch) bytes per step, which dominates CPU decode at
batch 8 (~70 % of a step at 640 cached tokens). `GrowingLayer` keeps spare capacity after the cached tokens
and writes new ones into it, so a step copies only what it adds (amortised: the buffer grows by a quarter
when full). The layer's `keys` / `values` are views of the filled part, so everything that reads a
`DynamicLayer` (masks, sequence lengths, the engine's reuse of cached keys, crop, beam reordering) works
unchanged; the attention inputs are the same numbers, so outputs equal `DynamicCache`'s.

Works with or without a reducer attached: layers pruned at prefill simply hold fewer slots.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys / values are the filled prefix of a buffer with spare room for `reserve`
    (or a quarter more) tokens."""

    def __init__(self, reserve: int = 64):
        super().__init__()
        self.reserve = int(reserve)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _filled_prefix_of_buffer(self) -> bool:
        """`keys` still views the start of the buffer (crop keeps that; reorder / batch select replace it)."""
        k, buf = self.keys, self._k
        return (
            buf is not None
            and k.dim() == 4
            and k.data_ptr() == buf.data_ptr()
            and k.shape[:2] == buf.shape[:2]
            and k.stride() == buf.stride()
            and self.values.data_ptr() == self._v.data_ptr()
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, q = self.get_seq_length(), key_states.shape[-2]
        fits = self._filled_prefix_of_buffer() and n + q <= self._k.shape[-2]
        if not fits:
            capacity = n + q + max(self.reserve, (n + q) // 4)
            k = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if n:
                k[..., :n, :].copy_(self.keys)
                v[..., :n, :].copy_(self.values)
            self._k, self._v = k, v
        self._k[..., n : n + q, :].copy_(key_states)
        self._v[..., n : n + q, :].copy_(value_states)
        self.keys, self.values = self._k[..., : n + q, :], self._v[..., : n + q, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s (one per decoder layer, created on first use)."""

    def __init__(self, reserve: int = 64):
        super().__init__()
        self.layer_class_to_replicate = lambda: GrowingLayer(reserve)
