from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.merging import contextual_merge, scaled
from framework.reducer import TokenReducer
from framework.registry import register
from framework.vision import ImagePlan, cls_in_features, feature_depth, plan_decisions, vision_layers

PRESETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}


def cls_attention_and_keys(layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLS query's attention over the patches (summed over heads) and head-mean keys of a CLIP
    layer, from its input h (n, N, D): ((n, N-1), (n, N, d))."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    n, N, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(n, 1, attn.num_heads, -1).transpose(1, 2)  # (n, H, 1, d)
    k = attn.k_proj(x).view(n, N, attn.num_heads, -1).transpose(1, 2)  # (n, H, N, d)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0]  # (n, H, N)
    return probs[:, :, 1:].sum(1), k.mean(1)


@register("visionzip")
@dataclass
class VisionZip(TokenReducer):
    """VisionZip (Yang et al., CVPR 2025): dominant + contextual visual tokens, chosen in the vision encoder.

    Dominant: the `dominant` patches with the most CLS attention (summed over heads) in the encoder
    layer that produces LLaVA's features (the second-to-last CLIP layer). Contextual: the remaining
    patches are split into `contextual` targets (uniform stride) and the rest, each joined to its most
    key-similar target (cosine of head-mean keys); contextual token = target + mean of its members
    (the official sum), in vision-feature space before the projector. Presets (576 patches, scaled by
    n/576): 192 -> 162+30, 128 -> 108+20, 64 -> 54+10. Tokens keep spatial order (a contextual token
    sits at its target's slot). When LLaVA drops CLS from the features (select strategy 'default')
    the dominant tokens are all patches; with 'full' CLS is kept as one of them, as in the official
    code. LLaVA-NeXT: per CLIP crop (base view included), as VisionZip's LLaVA-NeXT code does; budgets
    are per crop. arXiv 2412.04467.
    """

    dominant: int = 54
    contextual: int = 10
    preset: int | None = None

    stage: ClassVar[str] = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"visionzip preset={self.preset}; allowed: {sorted(PRESETS)}")
        if self.dominant < 1 or self.contextual < 0:
            raise ConfigError(f"visionzip dominant={self.dominant} (>= 1), contextual={self.contextual} (>= 0)")

    def refusal_hint(self, adapter) -> str:
        return ("VisionZip's dominant tokens are chosen by CLS attention inside a CLIP-style encoder; "
                "supported: LLaVA-1.5 and LLaVA-NeXT (per crop); elsewhere use divprune / pooling / "
                "tome placement='projector'")

    def counts(self, patches: int) -> tuple[int, int]:
        if self.preset is not None:
            d, c = PRESETS[self.preset]
            return scaled(d, patches), scaled(c, patches)
        if self.dominant + self.contextual > patches:
            raise ConfigError(f"visionzip keeps {self.dominant}+{self.contextual} tokens of {patches} patches")
        return self.dominant, self.contextual

    def extra_hooks(self, adapter, engine):
        self._per_image = adapter.vision_unit_tokens
        self._full = cls_in_features(adapter)
        self._plans = self._signals = None
        layer = vision_layers(adapter)[feature_depth(adapter) - 1]

        def grab(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                self._signals = cls_attention_and_keys(module, h)

        return [layer.register_forward_pre_hook(grab, with_kwargs=True),
                adapter.projector.register_forward_pre_hook(self._select)]

    def _select(self, module, args):
        sig, self._signals = self._signals, None
        if sig is None:
            return None
        cls_attn, keys = sig
        feats = args[0]
        c = 1 if self._full else 0
        patches = feats.shape[1] - c
        n_dom, n_ctx = self.counts(patches)
        new, plans = feats.clone(), []
        for i in range(feats.shape[0]):
            nd = n_dom - c
            order = torch.sort(cls_attn[i], descending=True, stable=True).indices
            dom = order[:nd].sort().values
            rem = order[nd:].sort().values
            groups = {int(p) + c: torch.tensor([int(p) + c]) for p in dom}
            if c:
                groups[0] = torch.tensor([0])
            if n_ctx and rem.numel():
                tok, targets, assign = contextual_merge(feats[i, rem + c], keys[i, rem + 1], n_ctx)
                slots = rem[targets] + c
                new[i, rem + c] = tok[assign].to(feats.dtype)  # every member slot (see broadcast_groups)
                for j, s in enumerate(slots.tolist()):
                    groups[s] = rem[assign == j] + c
            reps = sorted(groups)
            plans.append(ImagePlan(reps=torch.tensor(reps, device=feats.device),
                                   groups=[groups[s].to(feats.device) for s in reps]))
        self._plans = plans
        return (new, *args[1:])

    def decide(self, ctx):
        plans, self._plans = self._plans, None
        return plan_decisions(ctx, plans, self._per_image, "visionzip")
