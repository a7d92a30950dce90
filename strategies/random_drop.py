from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.reducer import ScoringReducer
from framework.registry import register


@register("random")
@dataclass
class RandomDrop(ScoringReducer):
    """Keep a seeded random subset of visual tokens (before LLM layer `layer`, or at the projector if layer=0).

    The draw depends only on `seed`, the sample's position in the batch being irrelevant: a sample gets
    the same subset alone or in a batch (the generator is re-seeded per sample from its visual count).
    """

    seed: int = 0
    layer: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 0:
            raise ConfigError(f"random: layer={self.layer}; allowed: 0 (projector) or a decoder layer >= 1")

    stages: ClassVar[tuple[str, ...]] = ("projector", "llm")

    def choose_stage(self) -> str:
        return "projector" if self.layer == 0 else "llm"

    def score(self, ctx, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(ctx.n_visual(b), generator=g).to(ctx.hidden.device)
