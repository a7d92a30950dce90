from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.merging import grid_pool, grid_shape, scaled
from framework.reducer import TokenReducer, resolve_count
from framework.registry import register
from framework.vision import ImagePlan, cls_in_features, plan_decisions

PRESETS = {192: 192, 128: 128, 64: 64}


@register("pooling")
@dataclass
class Pooling(TokenReducer):
    """Spatial average pooling of each image's visual grid to the target count (before the LLM).

    keep: tokens per image, a count (int) or a ratio (float); preset: 192 / 128 / 64 (quoted for 576
    tokens, scaled by n/576). The target t is pooled as an h x w grid with h * w = t and the aspect
    closest to the image grid's (192 -> 12 x 16, 128 -> 8 x 16, 64 -> 8 x 8 on 24 x 24), with adaptive
    pooling bins. Pooling acts on the projector output (the LLM's embedding space); each pooled token
    sits at its cell's top-left slot, so tokens stay in spatial (row-major) order.
    """

    keep: int | float = 0.25
    preset: int | None = None

    stage: ClassVar[str] = "projector"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"pooling preset={self.preset}; allowed: {sorted(PRESETS)}")

    def target(self, n: int) -> int:
        return scaled(PRESETS[self.preset], n) if self.preset is not None else resolve_count(self.keep, n)

    def extra_hooks(self, adapter, engine):
        self._per_image = adapter.tokens_per_image()
        self._cls = 1 if cls_in_features(adapter) else 0
        self._plans = None
        return [adapter.projector.register_forward_hook(self._hook)]

    def _hook(self, module, args, out):
        n_img, P, _ = out.shape
        c = self._cls
        side = int(round((P - c) ** 0.5))
        if side * side != P - c:
            raise ConfigError(f"pooling needs a square grid of patches per image, got {P - c}")
        h, w = grid_shape(self.target(P - c), side, side)
        new = out.clone()
        plans = []
        for i in range(n_img):
            pooled, cells = grid_pool(out[i, c:], side, side, h, w)
            reps = torch.stack([cl.min() for cl in cells]) + c
            new[i, reps] = pooled.to(out.dtype)
            groups = [cl + c for cl in cells]
            if c:
                reps = torch.cat([reps.new_zeros(1), reps])
                groups = [reps.new_zeros(1)] + groups
            plans.append(ImagePlan(reps=reps, groups=groups))
        self._plans = plans
        return new

    def decide(self, ctx):
        plans, self._plans = self._plans, None
        return plan_decisions(ctx, plans, self._per_image, "pooling")
