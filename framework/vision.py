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

1. their hooks compute, per encoder unit, a *plan*: the representative slots that survive (`reps`,
   sorted, i.e. spatial order) and the original slots each stands for (`groups`); they write each
   surviving token's value into all of its group's slots of a full-size projector input
   (`broadcast_groups`), so the backbone's own packing and image-token scatter still match;
2. at the engine's projector-stage decision, `plan_decisions` turns the plans into one `Decision` per
   sample through the adapter's visual-token -> encoder-feature map (`ctx.vision_map`): one kept token
   per group, sources = the group's tokens (the engine records them).

Hooks are deterministic, so a replayed decision (no-cache generation) sees the same values again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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
class ImagePlan:
    """One image's surviving tokens: `reps` (K,) sorted slot indices into the image's visual tokens,
    `groups[i]` the original slots that reps[i] stands for (reps[i] is its smallest member)."""

    reps: torch.Tensor
    groups: list[torch.Tensor]


def plans_from_source(source: torch.Tensor, drop_cls: bool) -> list[ImagePlan]:
    """source (n_img, N', N0) in spatial order, CLIP token space (CLS = 0) -> per-image plans in
    feature-slot space (minus 1 when CLS is dropped from the features)."""
    plans = []
    for s in source.bool():
        groups = [torch.nonzero(row).flatten() for row in s]
        if drop_cls:
            groups = [g - 1 for g in groups if not (g.numel() == 1 and int(g[0]) == 0)]
        reps = torch.stack([g.min() for g in groups])
        plans.append(ImagePlan(reps=reps, groups=groups))
    return plans


def broadcast_groups(values: torch.Tensor, plans: list[ImagePlan], n_slots: int) -> torch.Tensor:
    """values (n_units, K, D), value k of unit i standing for plans[i].groups[k] -> (n_units, n_slots, D)
    with each group's value at every slot of the group (zeros at slots in no group): whichever of its
    slots survives the backbone's packing (LLaVA-NeXT unpads crops) carries the merged value."""
    n, _, d = values.shape
    out = values.new_zeros(n, n_slots, d)
    for i, p in enumerate(plans):
        for k, g in enumerate(p.groups):
            out[i, g.to(values.device)] = values[i, k]
    return out


def plan_decisions(ctx, plans: list[ImagePlan] | None, per_unit: int, name: str) -> list[Decision]:
    """Per-sample decisions from per-unit plans (one per vision-encoder batch row, `per_unit` feature
    slots each), through the adapter's map from visual tokens to encoder features (`ctx.vision_map`).

    The visual tokens that come from one group's features form one token: the first of them is kept
    (it carries the group's value, see `broadcast_groups`), the others are its sources. Tokens from
    features in no group are dropped; tokens from no feature (LLaVA-NeXT newlines) are kept as is."""
    if plans is None:
        raise RuntimeError(
            f"{name}: no vision-side plan for this forward (were pixel_values given and the vision hooks attached?)"
        )
    gid, offset = [], 0
    for p in plans:
        a = torch.full((per_unit,), -1, dtype=torch.long)
        for k, g in enumerate(p.groups):
            a[g.cpu()] = offset + k
        offset += len(p.groups)
        gid.append(a)
    gid = torch.cat(gid) if gid else torch.zeros(0, dtype=torch.long)
    out = []
    for b in range(ctx.batch_size):
        m = ctx.vision_map(b).cpu()
        if int(m.max()) >= gid.numel():
            raise RuntimeError(f"{name}: {len(plans)} encoder plans but the prompts hold tokens of more units")
        key = torch.where(m >= 0, gid[m.clamp(min=0)], -1)
        own = torch.nonzero(m < 0).flatten()
        key[own] = offset + own  # tokens from no feature: a group each
        groups: dict[int, list[int]] = {}
        for t, k in enumerate(key.tolist()):
            if k >= 0:
                groups.setdefault(k, []).append(t)
        members = sorted(groups.values(), key=lambda g: g[0])
        dev = ctx.hidden.device
        out.append(
            Decision(
                keep=torch.tensor([g[0] for g in members], device=dev),
                sources=[torch.tensor(g, device=dev) for g in members],
                record={"sizes": [len(g) for g in members]},
            )
        )
    return out


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
