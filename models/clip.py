"""The CLIP vision tower of LLaVA-1.5 and LLaVA-NeXT as a `framework.vision.VisionTower`.

The surgery vision-stage strategies need, written once for both LLaVA adapters: where the encoder
layers and the projector are, how an encoder layer receives its input and attention mask (so a hook
can hand it merged tokens and an additive mask), and the layer's keys and CLS attention recomputed
from its input with its own layer norm and projections.
"""

from __future__ import annotations

import torch

from framework.vision import FeatureFn, LayerFn, VisionTower


class ClipTower(VisionTower):
    """CLIP encoder units (an image; a LLaVA-NeXT crop) of `unit_tokens` feature slots; CLS first."""

    inside = True

    def __init__(self, model: torch.nn.Module, unit_tokens: int):
        self.model = model
        self._unit_tokens = unit_tokens

    @property
    def layers(self) -> torch.nn.ModuleList:
        tower = self.model.model.vision_tower  # CLIPVisionModel (transformers 5: no .vision_model level)
        return (tower.encoder if hasattr(tower, "encoder") else tower.vision_model.encoder).layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def depth(self) -> int:
        vfl = self.model.config.vision_feature_layer
        vfl = max(vfl) if isinstance(vfl, (list, tuple)) else vfl
        return vfl if vfl >= 0 else self.n_layers + 1 + vfl

    @property
    def unit_tokens(self) -> int:
        return self._unit_tokens

    @property
    def cls_in_features(self) -> bool:
        return getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"

    def before_layer(self, i: int, fn: LayerFn):
        def hook(module, args, kwargs):
            out = fn(args[0] if args else kwargs["hidden_states"])
            if out is None:
                return None
            h, mask = out
            if args:
                args = (h, mask if mask is not None else (args[1] if len(args) > 1 else None), *args[2:])
            else:
                kwargs = {**kwargs, "hidden_states": h}
            if not args or len(args) < 2:
                kwargs = {**kwargs, "attention_mask": mask if mask is not None else kwargs.get("attention_mask")}
            return args, kwargs

        return self.layers[i].register_forward_pre_hook(hook, with_kwargs=True)

    @staticmethod
    def _keys(layer, x: torch.Tensor) -> torch.Tensor:
        """(n, N, H, d) key projection of the normed input x."""
        k = layer.self_attn.k_proj(x)
        return k.view(*k.shape[:2], layer.self_attn.num_heads, -1)

    @torch.no_grad()
    def keys(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return self._keys(layer, layer.layer_norm1(h)).mean(2)

    @torch.no_grad()
    def cls_attention(self, i: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        q = attn.q_proj(x[:, :1]).view(x.shape[0], 1, attn.num_heads, -1).transpose(1, 2)  # (n, H, 1, d)
        k = self._keys(layer, x).transpose(1, 2)  # (n, H, N, d)
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0]  # (n, H, N)
        return probs[:, :, 1:].sum(1)

    def on_features(self, fn: FeatureFn):
        def hook(module, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])

        return self.model.model.multi_modal_projector.register_forward_pre_hook(hook)
