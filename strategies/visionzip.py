from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.budget import nearest_preset
from framework.errors import ConfigError
from framework.merging import contextual_merge, scaled
from framework.reducer import Decision, TokenReducer, groups_decision
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

    Qwen2-VL / Qwen2.5-VL (adapters with `vision_token_signals`): the encoder has no CLS token and its
    merger concatenates spatial_merge_size^2 consecutive patches into one LLM token, so selection and
    merging act on the merger output (the LLM's visual tokens) at the projector decision, with signals
    from the encoder: dominance of a token = the attention its patches *receive*, heads summed, averaged
    over all query patches of the same image / video frame (its attention segment), summed over the
    token's patches, in the last block with full attention (Qwen2-VL: the last block; 2.5: the last of
    `fullatt_block_indexes`). This received-attention score is what VisionZip-style ports to encoders
    without CLS use in place of CLS attention. Keys: that block's key projection averaged over heads
    and over the token's patches. Per image (per video frame by default; per video under the adapter's
    `video_span="video"`): the top `dominant` tokens keep their values, the rest merge into
    `contextual` tokens (same rule as above), each at its target's slot and 3-D position; dominant /
    contextual counts apply per image as given, presets scale by the image's token count / 576.
    """

    dominant: int = 54
    contextual: int = 10
    preset: int | None = None

    stage: ClassVar[str] = "vision"

    @classmethod
    def for_budget(cls, fields, budget, n_visual):
        """The preset nearest the budget (scaled to 576 visual tokens)."""
        return {**fields, "preset": nearest_preset(PRESETS, budget, n_visual, "visionzip")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"visionzip preset={self.preset}; allowed: {sorted(PRESETS)}")
        if self.dominant < 1 or self.contextual < 0:
            raise ConfigError(f"visionzip dominant={self.dominant} (>= 1), contextual={self.contextual} (>= 0)")

    def refusal_hint(self, adapter) -> str:
        return ("VisionZip's dominant tokens are chosen by CLS attention inside a CLIP-style encoder, or by "
                "received attention per merged token (Qwen2-VL / 2.5-VL); supported: LLaVA-1.5, LLaVA-NeXT "
                "(per crop), Qwen2-VL / 2.5-VL (per image); elsewhere use divprune / pooling / "
                "tome placement='projector'")

    @staticmethod
    def _per_token(adapter) -> bool:
        """True on backbones without a vision stage whose adapter gives encoder signals per LLM token."""
        return "vision" not in adapter.stages and hasattr(adapter, "vision_token_signals")

    def setup(self, adapter) -> None:
        if not self._per_token(adapter):
            return super().setup(adapter)
        # Signals from the encoder, decision on its merged tokens: a projector-stage decision (the
        # engine applies vision- and projector-stage decisions alike, at the language model's input).
        if "projector" not in adapter.stages:
            raise ConfigError(f"VisionZip on backbone {adapter.family!r} decides on the merged visual tokens, "
                              f"but the backbone supports only {list(adapter.stages)}")
        self.check_positions(adapter)

    def counts(self, patches: int) -> tuple[int, int]:
        if self.preset is not None:
            d, c = PRESETS[self.preset]
            return scaled(d, patches), scaled(c, patches)
        if self.dominant + self.contextual > patches:
            raise ConfigError(f"visionzip keeps {self.dominant}+{self.contextual} tokens of {patches} patches")
        return self.dominant, self.contextual

    def hooks(self, adapter, state):
        """CLIP backbones: CLS attention and keys from the feature layer (state["visionzip_signals"]), then
        selection at the projector (per-unit plans in state["visionzip_plans"]). Qwen2-VL: the adapter's
        encoder signals, handed to each forward as state["visionzip_tokens"]."""
        if self._per_token(adapter):
            tokens = adapter.vision_token_signals()

            def hand_over(module, args, kwargs):
                state["visionzip_tokens"] = tokens

            return [*tokens.hooks(), adapter.top.register_forward_pre_hook(hand_over, with_kwargs=True)]
        layer = vision_layers(adapter)[feature_depth(adapter) - 1]

        def grab(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():
                state["visionzip_signals"] = cls_attention_and_keys(module, h)

        def select(module, args):
            sig = state.pop("visionzip_signals", None)
            if sig is None:
                return None
            new, state["visionzip_plans"] = self._select(args[0], *sig, cls_kept=cls_in_features(adapter))
            return (new, *args[1:])

        return [layer.register_forward_pre_hook(grab, with_kwargs=True),
                adapter.projector.register_forward_pre_hook(select)]

    def _select(self, feats: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, cls_kept: bool):
        """Projector input (n, N, D) -> (new input with contextual values broadcast, per-unit plans)."""
        c = 1 if cls_kept else 0
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
        return new, plans

    def decide(self, ctx):
        if self._per_token(ctx.adapter):
            return self._decide_tokens(ctx)
        return plan_decisions(ctx, ctx.state.pop("visionzip_plans", None), ctx.adapter.vision_unit_tokens,
                              "visionzip")

    # ------------------------------------------------------------------ merged tokens (Qwen2-VL)
    def _decide_tokens(self, ctx) -> list[Decision]:
        tokens = ctx.state.get("visionzip_tokens")
        if tokens is None:
            raise RuntimeError("visionzip: no vision-encoder signals for this forward (hooks not attached?)")
        signals = tokens.per_token([ctx.vision_map(b) for b in range(ctx.batch_size)])
        return [self._sample(ctx.visual_hidden(b), score.to(ctx.hidden.device), keys.to(ctx.hidden.device),
                             ctx.span_ids(b))
                for b, (score, keys) in enumerate(signals)]

    def _sample(self, x: torch.Tensor, score: torch.Tensor, keys: torch.Tensor, spans: torch.Tensor) -> Decision:
        """One sample: x (n, D) its visual tokens, score (n,) dominance, keys (n, d), spans (n,) image /
        frame id. Dominant tokens keep their values; contextual tokens sit at their targets' slots."""
        reps, groups, values, dominant, contextual = [], [], [], [], []
        for s in spans.unique():
            idx = torch.nonzero(spans == s).flatten()
            n = int(idx.numel())
            n_dom, n_ctx = self.counts(n)
            n_dom = min(n_dom, n)
            n_ctx = min(n_ctx, n - n_dom)  # a preset on a tiny image / frame
            order = torch.sort(score[idx].float(), descending=True, stable=True).indices
            dom = idx[order[:n_dom]].sort().values
            rem = idx[order[n_dom:]].sort().values
            for i in dom:
                reps.append(i)
                groups.append(i[None])
                values.append(x[i])
            dominant += dom.tolist()
            if n_ctx and rem.numel():
                tok, targets, assign = contextual_merge(x[rem], keys[rem], n_ctx)
                for j, t in enumerate(targets):
                    reps.append(rem[t])
                    groups.append(rem[assign == j])
                    values.append(tok[j])
                contextual += rem[targets].tolist()
        d = groups_decision(reps, groups, values, dtype=x.dtype)
        d.record.update(dominant=sorted(dominant), contextual=sorted(contextual))
        return d
