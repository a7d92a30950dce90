"""Vision-encoder / projector plumbing for reducers that act before the LLM.

The image-token count in `input_ids` is fixed, so a reducer that merges or selects inside the vision
encoder (ToMe, VisionZip) or on the projector output (pooling, pre-LLM ToMe) works like this:

1. its hooks (returned from `extra_hooks`, removed on detach) compute, per image, a *plan*: the
   representative patch slots that survive (`reps`, sorted, i.e. spatial order) and the original
   patches each stands for (`groups`); they write the surviving tokens' values into those slots of a
   full-size tensor (projector input or output), so LLaVA's image-token scatter still matches;
2. at the engine's projector-stage decision, `plan_decisions` turns the plans into one `Decision` per
   sample: keep = the representative slots, sources = their groups (the engine records them).

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


def scatter_slots(values: torch.Tensor, reps: torch.Tensor, n_slots: int) -> torch.Tensor:
    """values (n_img, K, D) -> (n_img, n_slots, D) with values at `reps` (n_img, K), zeros elsewhere."""
    n, _, d = values.shape
    out = values.new_zeros(n, n_slots, d)
    return out.scatter(1, reps[..., None].expand(-1, -1, d), values)


def plan_decisions(ctx, plans: list[ImagePlan] | None, per_image: int, name: str) -> list[Decision]:
    """Per-sample decisions from per-image plans (images in batch order, `per_image` slots each)."""
    if plans is None:
        raise RuntimeError(f"{name}: no vision-side plan for this forward (were pixel_values given and the "
                           f"vision hooks attached?)")
    out, cursor = [], 0
    for b in range(ctx.batch_size):
        n = ctx.n_visual(b)
        if n % per_image:
            raise RuntimeError(f"{name}: sample {b} has {n} visual tokens, not a multiple of {per_image}")
        keep, sources = [], []
        for j in range(n // per_image):
            p = plans[cursor]
            cursor += 1
            keep.append(p.reps + j * per_image)
            sources.extend(g + j * per_image for g in p.groups)
        keep = torch.cat(keep)
        order = keep.argsort()
        out.append(Decision(keep=keep[order], sources=[sources[i] for i in order.tolist()],
                            record={"sizes": [int(sources[i].numel()) for i in order.tolist()]}))
    if cursor != len(plans):
        raise RuntimeError(f"{name}: {len(plans)} image plans but the prompts hold {cursor} images")
    return out
