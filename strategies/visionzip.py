from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.budget import nearest_preset
from framework.errors import ConfigError
from framework.merging import contextual_merge, scaled
from framework.reducer import TokenReducer, grouped_decision
from framework.registry import register
from framework.vision import UnitPlans, plan_decisions, token_signal_hooks, token_signals

PRESETS = {192: (162, 30), 128: (108, 20), 64: (54, 10)}


def zip_tokens(score: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_dom: int, n_ctx: int):
    """VisionZip's rule on one unit's n tokens (an image, a crop, a video frame): score (n,) dominance,
    keys (n, d), values (n, D). The top `n_dom` by score are dominant (ties: lower index); the rest
    merge into `n_ctx` contextual tokens (`contextual_merge`: uniform-stride targets, each other token
    joins its most key-similar target; value = target + mean of its members).

    Returns (dominant (k,) sorted indices, the rest (r,) sorted indices, targets (m,) indices, assign
    (r,): which contextual token each of the rest joins (0..m-1; a target its own), values (m, D)); as
    tensors, so that no step reads the device per token."""
    n = int(score.numel())
    n_dom = min(n_dom, n)
    n_ctx = min(n_ctx, n - n_dom)  # a preset on a tiny image / frame
    order = torch.sort(score.float(), descending=True, stable=True).indices
    dom = order[:n_dom].sort().values
    rem = order[n_dom:].sort().values
    if not n_ctx or not rem.numel():
        return dom, rem, rem[:0], rem[:0], values[:0]
    tok, targets, assign = contextual_merge(values[rem], keys[rem], n_ctx)
    return dom, rem, rem[targets], assign, tok


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

    Qwen2-VL / Qwen2.5-VL (vision towers with signals per LLM token, `inside = False`): the encoder has
    no CLS token and its merger concatenates spatial_merge_size^2 consecutive patches into one LLM
    token, so selection and merging act on the merger output (the LLM's visual tokens) at the projector
    decision, with signals from the encoder: dominance of a token = the attention its patches *receive*,
    heads summed, averaged over all query patches of the same image / video frame (its attention
    segment), summed over the token's patches, in the last block with full attention (Qwen2-VL: the last
    block; 2.5: the last of `fullatt_block_indexes`). This received-attention score is what
    VisionZip-style ports to encoders without CLS use in place of CLS attention. Keys: that block's key
    projection averaged over heads and over the token's patches. Per image (per video frame by default;
    per video under the adapter's `video_span="video"`): the top `dominant` tokens keep their values,
    the rest merge into `contextual` tokens (same rule as above), each at its target's slot and 3-D
    position; dominant / contextual counts apply per image as given, presets scale by the image's token
    count / 576.
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
        return (
            "VisionZip's dominant tokens are chosen by CLS attention inside a CLIP-style encoder, or by "
            "received attention per merged token (Qwen2-VL / 2.5-VL); supported: LLaVA-1.5, LLaVA-NeXT "
            "(per crop), Qwen2-VL / 2.5-VL (per image); elsewhere use divprune / pooling / "
            "tome placement='projector'"
        )

    @staticmethod
    def _per_token(adapter) -> bool:
        """True on backbones whose vision tower gives encoder signals per LLM token (no vision stage)."""
        tower = adapter.vision_tower()
        return tower is not None and not tower.inside

    def setup(self, adapter) -> None:
        if not self._per_token(adapter):
            return super().setup(adapter)
        # Signals from the encoder, decision on its merged tokens: a projector-stage decision (the
        # engine applies vision- and projector-stage decisions alike, at the language model's input).
        if "projector" not in adapter.stages:
            raise ConfigError(
                f"VisionZip on backbone {adapter.family!r} decides on the merged visual tokens, "
                f"but the backbone supports only {list(adapter.stages)}"
            )
        self.check_positions(adapter)

    def counts(self, patches: int) -> tuple[int, int]:
        if self.preset is not None:
            d, c = PRESETS[self.preset]
            return scaled(d, patches), scaled(c, patches)
        if self.dominant + self.contextual > patches:
            raise ConfigError(f"visionzip keeps {self.dominant}+{self.contextual} tokens of {patches} patches")
        return self.dominant, self.contextual

    def hooks(self, adapter, state):
        """Inside CLIP-style towers: CLS attention and keys at the layer that produces the features, then
        selection on the projector's input (per-unit plans in state["visionzip_plans"]). Towers with
        signals per LLM token (Qwen2-VL): their recorder, read at the projector decision."""
        tower = adapter.vision_tower()
        if not tower.inside:
            return token_signal_hooks(adapter, tower, state, "visionzip_tokens")
        i = tower.depth - 1

        def grab(h):
            state["visionzip_signals"] = (tower.cls_attention(i, h), tower.keys(i, h))

        def select(feats):
            sig = state.pop("visionzip_signals", None)
            if sig is None:
                return None
            new, state["visionzip_plans"] = self._select(feats, *sig, cls_kept=tower.cls_in_features)
            return new

        return [tower.before_layer(i, grab), tower.on_features(select)]

    def _select(self, feats: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, cls_kept: bool):
        """Projector input (n, N, D) of CLIP units, CLS attention over the patches (n, N0 - 1), keys in
        CLIP token space (n, N0, d) -> (new input with contextual values broadcast, per-unit plans).
        A kept CLS counts as one of the dominant tokens, as in the official code."""
        c = 1 if cls_kept else 0
        n, slots, _ = feats.shape
        n_dom, n_ctx = self.counts(slots - c)
        new = feats.clone()
        # a group per surviving token, numbered by its token's slot; slots in none stay -1 (dropped)
        group = torch.full((n, slots), -1, dtype=torch.long, device=feats.device)
        group[:, :c] = 0  # a kept CLS: a dominant token of its own
        for i in range(n):
            dom, rem, targets, assign, tok = zip_tokens(cls_attn[i], keys[i, 1:], feats[i, c:], n_dom - c, n_ctx)
            group[i, dom + c] = dom + c
            if targets.numel():
                group[i, rem + c] = targets[assign] + c
                new[i, rem + c] = tok[assign].to(feats.dtype)  # every member slot (see broadcast_groups)
        return new, UnitPlans(group, slots)

    def decide(self, ctx):
        if self._per_token(ctx.adapter):
            signals = token_signals(ctx, "visionzip_tokens", "visionzip")
            sizes = _span_sizes(ctx)
            return [
                self._sample(ctx.visual_hidden(b), score, keys, sizes[b]) for b, (score, keys) in enumerate(signals)
            ]
        return plan_decisions(
            ctx, ctx.state.pop("visionzip_plans", None), ctx.adapter.vision_tower().unit_tokens, "visionzip"
        )

    def _sample(self, x: torch.Tensor, score: torch.Tensor, keys: torch.Tensor, sizes: list[int]):
        """One sample's LLM visual tokens x (n, D), with score (n,) and keys (n, d), in spans (image / frame)
        of `sizes` consecutive tokens: the rule per span; contextual tokens sit at their targets' slots. Every
        group is labelled on the device, so nothing is read on the host."""
        reps, index, label, values, dominant, contextual = [], [], [], [], [], []
        start = n_groups = 0
        for n in sizes:
            if not n:  # a span with no token left
                continue
            part = slice(start, start + n)
            dom, rem, targets, assign, tok = zip_tokens(score[part], keys[part], x[part], *self.counts(n))
            k, m = int(dom.numel()), int(targets.numel())
            reps += [dom + start, targets + start]
            index += [dom + start, rem + start] if m else [dom + start]
            label.append(torch.arange(n_groups, n_groups + k, device=x.device))  # a dominant token: its own group
            if m:
                label.append(assign + (n_groups + k))  # the rest join their targets' groups
            values += [x[dom + start], tok]
            dominant.append(dom + start)
            contextual.append(targets + start)
            start, n_groups = start + n, n_groups + k + m
        d = grouped_decision(torch.cat(reps), torch.cat(index), torch.cat(label), torch.cat(values), dtype=x.dtype)
        d.record.update(dominant=torch.cat(dominant), contextual=torch.cat(contextual))  # ascending: spans in order
        return d


def _span_sizes(ctx) -> list[list[int]]:
    """Per sample, the token counts of its spans (images / frames: runs of consecutive visual tokens, in
    order), in one host copy for the batch; that the spans are such runs is checked at the end of the
    prefill."""
    for b in range(ctx.batch_size):
        ids = ctx.span_ids(b)
        ctx.check((ids[1:] >= ids[:-1]).all(), "visionzip: a sample's spans are not runs of consecutive tokens")
    return ctx.span_sizes()
