"""Vision-encoder / projector plumbing for reducers that act before the LLM.

The image-token count in `input_ids` is fixed, so a reducer that merges or selects inside the vision
encoder (ToMe, VisionZip) or on the projector output (pooling, pre-LLM ToMe) works like this:

1. its hooks (returned from `extra_hooks`, removed on detach) compute, per image, a *plan*: the
   representative patch slots that survive (`reps`, sorted, i.e. spatial order) and the original
   patches each stands for (`groups`) per encoder unit (an image; a LLaVA-NeXT crop); they write each
   surviving token's value into all of its group's slots of a full-size projector input
   (`broadcast_groups`), so the backbone's own packing and image-token scatter still match;
2. at the engine's projector-stage decision, `plan_decisions` turns the plans into one `Decision` per
   sample through the adapter's visual-token -> encoder-feature map (`ctx.vision_map`): one kept token
   per group, sources = the group's tokens (the engine records them).

Hooks are deterministic, so a replayed decision (no-cache generation) sees the same values again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reducer import Decision


@dataclass
class ImagePlan:
    """One image's surviving tokens: `reps` (K,) sorted slot indices into the image's visual tokens,
    `groups[i]` the original slots that reps[i] stands for (reps[i] is its smallest member)."""

    reps: torch.Tensor
    groups: list[torch.Tensor]


def vision_layers(adapter) -> torch.nn.ModuleList:
    """The vision encoder's layers, as the backbone adapter locates them."""
    return adapter.vision_layers


def feature_depth(adapter) -> int:
    """How many encoder layers the LLM's visual features depend on (LLaVA: vision_feature_layer=-2
    of 24 -> 23; the last layer's output is unused)."""
    n = len(vision_layers(adapter))
    vfl = adapter.model.config.vision_feature_layer
    vfl = max(vfl) if isinstance(vfl, (list, tuple)) else vfl
    return vfl if vfl >= 0 else n + 1 + vfl


def cls_in_features(adapter) -> bool:
    """True when the features given to the projector include CLIP's CLS token (select strategy 'full')."""
    return getattr(adapter.model.config, "vision_feature_select_strategy", "default") == "full"


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
        raise RuntimeError(f"{name}: no vision-side plan for this forward (were pixel_values given and the "
                           f"vision hooks attached?)")
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
        out.append(Decision(keep=torch.tensor([g[0] for g in members], device=dev),
                            sources=[torch.tensor(g, device=dev) for g in members],
                            record={"sizes": [len(g) for g in members]}))
    return out
