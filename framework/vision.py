"""The vision-stage interface: what a backbone's vision encoder offers strategies, and the plumbing
from encoder-side plans to decisions. ToMe's split: the adapters hold the surgery (`models/`), the
strategies keep only their rule, written once for every backbone.

An adapter's `vision_tower()` returns a `VisionTower` (None where the backbone offers none). Its
signals, each computed on demand from what the encoder itself computes:

* towers whose patches map onto LLM tokens (`inside = True`: CLIP on LLaVA-1.5, per crop on
  LLaVA-NeXT): encoder units (an image; a crop) of `unit_tokens` feature slots;
  `before_layer(i, fn)` runs fn(h) on encoder layer i's input h (n, N, D) and lets it return a new h
  (merged tokens) and an additive attention mask (ToMe's proportional attention); `keys(i, h)` and
  `cls_attention(i, h)` are layer i's head-mean keys and its CLS query's attention over the patches;
  `on_features(fn)` sees (and may replace) the features the projector receives;
* towers whose output tokens fuse fixed patch groups (`inside = False`: Qwen2-VL / 2.5-VL):
  `token_signals()`, a `TokenSignals` recorder of the attention each LLM visual token's patches
  receive and their keys, read per sample through the visual-token -> encoder-row map
  (`ctx.vision_map`).

Strategies that merge or select inside the encoder (ToMe, VisionZip) then work like this, since the
image-token count in `input_ids` is fixed:

1. their hooks compute the encoder units' *plans* (`UnitPlans`): per feature slot, the group (one
   surviving token) it belongs to; they write each surviving token's value into all of its group's
   slots of a full-size projector input (`broadcast_groups`), so the backbone's own packing and
   image-token scatter still match;
2. at the engine's projector-stage decision, `plan_decisions` turns the plans into one `Decision` per
   sample through the adapter's visual-token -> encoder-feature map (`ctx.vision_map`): one kept token
   per group, sources = the group's tokens (the engine records them).

Hooks are deterministic, so a replayed decision (no-cache generation) sees the same values again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import islice
from typing import Callable, ClassVar

import torch

from .reducer import Decision

LayerFn = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None] | None"]
FeatureFn = Callable[[torch.Tensor], "torch.Tensor | None"]


class TokenSignals(ABC):
    """Encoder signals per LLM visual token, for towers whose tokens fuse patch groups (Qwen2-VL).

    Attach `hooks()` (handles with `.remove()`); at the projector decision, `per_token(maps)` gives,
    per sample, (received (n,), keys (n, d)) of the tokens whose encoder rows are `maps[b]`
    (`ctx.vision_map(b)`): the attention the token's patches receive in the encoder and its keys."""

    @abstractmethod
    def hooks(self) -> list:
        """Forward hooks that record the signals of each encoder call."""

    @abstractmethod
    def per_token(self, maps: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, (received attention (n,), keys (n, d)) of its visual tokens."""


class VisionTower(ABC):
    """The one interface an adapter implements for vision-stage strategies (see the module docstring).

    A tower offers either the per-layer signals (`inside = True`) or `token_signals()`; an ability it
    lacks raises NotImplementedError naming the tower."""

    inside: ClassVar[bool] = False

    def _lacks(self, what: str):
        return NotImplementedError(f"{type(self).__name__} offers no {what}")

    # --- inside the encoder (patches map onto LLM tokens) ------------------------------------------
    @property
    def depth(self) -> int:
        """Encoder layers the LLM's features depend on (LLaVA: vision_feature_layer=-2 of 24 -> 23)."""
        raise self._lacks("per-layer signals")

    @property
    def n_layers(self) -> int:
        raise self._lacks("per-layer signals")

    @property
    def unit_tokens(self) -> int:
        """Feature slots per encoder unit (one image; one LLaVA-NeXT crop)."""
        raise self._lacks("encoder units")

    @property
    def cls_in_features(self) -> bool:
        """True when the projector's features include the class token (CLIP select strategy 'full')."""
        raise self._lacks("class token")

    def before_layer(self, i: int, fn: LayerFn):
        """Hook encoder layer i: fn(h) on its input (n, N, D); fn returns None (no change) or (h, mask)
        with mask an additive attention mask (n, 1, N, N) or None (the layer's own). One handle."""
        raise self._lacks("per-layer hooks")

    def keys(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """(n, N, d): encoder layer i's key projection of its input h, averaged over heads."""
        raise self._lacks("per-layer keys")

    def cls_attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """(n, N - 1) float32: layer i's CLS-query attention over the patches, summed over heads."""
        raise self._lacks("CLS attention")

    def on_features(self, fn: FeatureFn):
        """Hook the projector: fn(features (n_units, unit_tokens, D)) returns None or new features."""
        raise self._lacks("feature hooks")

    # --- per LLM token (output tokens fuse patch groups) -------------------------------------------
    def token_signals(self) -> TokenSignals:
        raise self._lacks("signals per LLM visual token")


@dataclass
class UnitPlans:
    """The surviving tokens of every encoder unit: `group` (n_units, unit_tokens) long gives, per feature
    slot, the group it belongs to (0..n_groups-1 within its unit; -1: in no group, dropped). One group
    becomes one token. Tensors rather than lists per group, so that no step reads the device per token."""

    group: torch.Tensor
    n_groups: int


def plans_from_source(source: torch.Tensor, drop_cls: bool) -> UnitPlans:
    """source (n_img, N', N0) in spatial order, CLIP token space (CLS = 0) -> the images' plans in
    feature-slot space (minus 1 when CLS is dropped from the features): group k is source row k."""
    # source is a partition (one 1 per column), so each original token's row is its column's argmax
    group = source.argmax(dim=1)
    if not drop_cls:
        return UnitPlans(group, source.shape[1])
    # CLS is protected, so row 0 holds it alone: drop that slot and that row
    return UnitPlans(group[:, 1:] - 1, source.shape[1] - 1)


def broadcast_groups(values: torch.Tensor, plans: UnitPlans) -> torch.Tensor:
    """values (n_units, K, D), value k of unit i standing for group k of plans -> (n_units, unit_tokens, D)
    with each group's value at every slot of the group (zeros at slots in no group): whichever of its
    slots survives the backbone's packing (LLaVA-NeXT unpads crops) carries the merged value."""
    group = plans.group.to(values.device)
    out = values.gather(1, group.clamp(min=0)[..., None].expand(-1, -1, values.shape[-1]))
    return out.masked_fill((group < 0)[..., None], 0)


def plan_decisions(ctx, plans: UnitPlans | None, per_unit: int, name: str) -> list[Decision]:
    """Per-sample decisions from per-unit plans (one per vision-encoder batch row, `per_unit` feature
    slots each), through the adapter's map from visual tokens to encoder features (`ctx.vision_map`).

    The visual tokens that come from one group's features form one token: the first of them is kept
    (it carries the group's value, see `broadcast_groups`), the others are its sources. Tokens from
    features in no group are dropped; tokens from no feature (LLaVA-NeXT newlines) are kept as is.
    The whole batch is grouped on the device; the host reads the group sizes once."""
    if plans is None:
        raise RuntimeError(
            f"{name}: no vision-side plan for this forward (were pixel_values given and the vision hooks attached?)"
        )
    if plans.group.shape[1] != per_unit:
        raise RuntimeError(f"{name}: plans of {plans.group.shape[1]} slots per unit, the tower has {per_unit}")
    dev = ctx.hidden.device
    maps = [ctx.vision_map(b).to(dev) for b in range(ctx.batch_size)]
    lens = [int(m.numel()) for m in maps]
    m = torch.cat(maps)
    sample = torch.cat([torch.full_like(mb, b) for b, mb in enumerate(maps)])
    key, n_keys = _group_keys(plans, m)
    first = _first_tokens(key, n_keys)
    n = first.numel()
    size = torch.zeros(n + 1, dtype=torch.long, device=dev).index_add_(0, first, torch.ones_like(first))
    # a unit's features belong to one sample (its image), so a group never spans two samples
    shared = (first < n) & (sample[first.clamp(max=n - 1)] != sample)
    # the one host copy: each group's size at its first token, and the two checks
    host = torch.cat([size[:n], (m >= plans.group.numel()).any().reshape(1), shared.any().reshape(1)]).tolist()
    if host[n]:
        raise RuntimeError(f"{name}: {len(plans.group)} encoder plans but the prompts hold tokens of more units")
    if host[n + 1]:
        raise RuntimeError(f"{name}: the prompts share an encoder unit's tokens between samples")
    at = iter(host)
    sizes = [[c for c in islice(at, k) if c] for k in lens]  # per sample, its groups' sizes by first token
    return _decisions(first, lens, sizes)


def _group_keys(plans: UnitPlans, m: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Encoder features `m` (n,) of the batch's visual tokens (-1: none) -> (each token's group key in
    0..n_keys-1, n_keys when it is dropped; n_keys): the unit group of its feature, or for a token from
    no feature a group of its own."""
    n_units, per_unit = plans.group.shape
    n_feat, groups = n_units * per_unit, n_units * plans.n_groups
    group = plans.group.to(m.device)
    gid = torch.where(group >= 0, group + torch.arange(n_units, device=m.device)[:, None] * plans.n_groups, -1)
    gid = torch.cat([gid.flatten(), gid.new_full((1,), -1)])  # the last entry: a feature beyond the plans
    g = gid[torch.where((m >= 0) & (m < n_feat), m, n_feat)]
    n_keys = groups + m.numel()
    key = torch.where(g >= 0, g, n_keys)
    return torch.where(m < 0, groups + torch.arange(m.numel(), device=m.device), key), n_keys


def _first_tokens(key: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Group keys (n,) in 0..n_keys (n_keys: dropped) -> each token's group's first token (n: dropped)."""
    n = key.numel()
    tok = torch.arange(n, device=key.device)
    first = torch.full((n_keys + 1,), n, device=key.device).scatter_reduce_(0, key, tok, "amin")
    first[n_keys] = n
    return first[key]


def _decisions(first: torch.Tensor, lens: list[int], sizes: list[list[int]]) -> list[Decision]:
    """Per sample (`lens` tokens each, concatenated), the decision keeping each group's first token with
    the group's tokens as its sources; `first` (n,) each token's group's first token (n: dropped),
    `sizes` per sample its groups' sizes in order of first token, read on the host."""
    n, dev = first.numel(), first.device
    kept = [sum(s) for s in sizes]
    local = torch.cat([torch.arange(k, device=dev) for k in lens])  # token index within its sample
    # all groups' members, group after group (stable sort: members ascending), dropped tokens last
    members = local[first.argsort(stable=True)].split([*kept, n - sum(kept)])
    firsts = torch.nonzero_static(first == torch.arange(n, device=dev), size=sum(map(len, sizes))).flatten()
    keeps = local[firsts].split([len(s) for s in sizes])
    return [Decision(keep=k, sources=list(m.split(s)), record={"sizes": s}) for k, m, s in zip(keeps, members, sizes)]


def token_signal_hooks(adapter, tower: VisionTower, state: dict, key: str) -> list:
    """Hooks for a strategy that reads `tower.token_signals()`: the recorder's own hooks, and a pre-hook
    on the model that hands the recorder to each forward as state[key] (read it with `token_signals`)."""
    recorder = tower.token_signals()

    def hand_over(module, args, kwargs):
        state[key] = recorder

    return [*recorder.hooks(), adapter.top.register_forward_pre_hook(hand_over, with_kwargs=True)]


def token_signals(ctx, key: str, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample, (received attention (n,), keys (n, d)) of its visual tokens, on the hidden states'
    device, from the recorder `token_signal_hooks` handed over as ctx.state[key]."""
    recorder = ctx.state.get(key)
    if recorder is None:
        raise RuntimeError(f"{name}: no vision-encoder signals for this forward (hooks not attached?)")
    dev = ctx.hidden.device
    return [
        (score.to(dev), keys.to(dev))
        for score, keys in recorder.per_token([ctx.vision_map(b) for b in range(ctx.batch_size)])
    ]
