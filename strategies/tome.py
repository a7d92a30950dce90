from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.errors import ConfigError
from framework.merging import (
    bipartite_soft_matching,
    gather_tokens,
    merge_source,
    merge_to,
    merge_wavg,
    spatial_order,
)
from framework.reducer import CountBudget, Decision, TokenReducer, grouped_decision
from framework.registry import register
from framework.vision import broadcast_groups, plan_decisions, plans_from_source

PLACEMENTS = ("vision", "projector")


def prop_attn_mask(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ToMe's proportional attention as an additive mask: log(size) of each key, (n, 1, N, N)."""
    n, N = size.shape
    return size.log().to(dtype)[:, None, None, :].expand(n, 1, N, N)


def layer_schedule(r: int | list[int] | None, total: int, depth: int) -> list[int]:
    """Merges per encoder layer: an explicit r (int: every layer; list: per layer) or `total` spread
    evenly over the `depth` layers that feed the features (earlier layers take the remainder)."""
    if r is not None:
        rs = [r] * depth if isinstance(r, int) else list(r)
        return (rs + [0] * depth)[:depth]
    return [total // depth + (1 if i < total % depth else 0) for i in range(depth)]


@register("tome")
@dataclass
class ToMe(CountBudget, TokenReducer):
    """ToMe (Bolya et al., ICLR 2023): bipartite soft matching with size-weighted averaging.

    placement="vision": inside the vision encoder, before each layer that feeds the LLM's features
      (LLaVA: the first 23 of 24 CLIP layers). Metric: that layer's keys (head mean, cosine); CLS is
      protected; sizes are tracked and, with `prop_attn`, log(size) is added to the attention logits
      of later layers (an additive mask). Merges per layer: `r` (int, or a list per layer, ToMe's
      schedule; clamped to half the tokens as in ToMe) or, when r is None, the `keep`/`preset` budget
      spread evenly over the layers (extra bipartite rounds when one layer must merge more than half).
      Runs on CLIP-style encoders whose patches map onto LLM tokens (LLaVA-1.5 per image, LLaVA-NeXT
      per crop, the budget then per crop); Qwen2-VL / 2.5-VL refuse it at setup (the adapter says why).
    placement="projector": on the projected visual tokens of each span (image / video frame) at the
      projector decision, on any backbone: repeated bipartite rounds (metric: the tokens themselves)
      from N down to the budget; class tokens (CLIP 'full') are kept unmerged, outside the budget.
    keep: tokens per image / span (count or ratio); preset: 192 / 128 / 64 (for 576, scaled by n/576).
    Merged tokens sit at their first patch's slot, so tokens stay in spatial order; the engine records
    each token's patch group. Modifications vs the paper: merging happens before a layer (on its input
    residual stream, with its keys) rather than between its attention and MLP.
    """

    placement: str = "vision"
    keep: int | float = 0.5
    preset: int | None = None
    r: int | list[int] | None = None
    prop_attn: bool = True

    registry_name: ClassVar[str] = "tome"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"tome placement={self.placement!r}; allowed: {list(PLACEMENTS)}")
        if self.r is not None and self.placement != "vision":
            raise ConfigError("tome: r (per-layer merges) applies to placement='vision' only; use keep/preset")
        rs = [self.r] if isinstance(self.r, int) else (self.r or [])
        if any(not isinstance(v, int) or v < 0 for v in rs):
            raise ConfigError(f"tome r={self.r!r}; allowed: an int >= 0 or a list of them")

    stages: ClassVar[tuple[str, ...]] = PLACEMENTS

    def choose_stage(self) -> str:
        return self.placement

    def refusal_hint(self, adapter) -> str:
        return "tome placement='projector' runs on every backbone"

    # ------------------------------------------------------------------ hooks
    def hooks(self, adapter, state):
        """Vision placement: merge before each encoder layer that feeds the features (per-forward sizes
        and sources in state["tome_merge"]), then broadcast the merged values at the projector and leave
        the per-unit plans in state["tome_plans"] for `decide`."""
        if self.placement == "projector":
            return []
        tower = adapter.vision_tower()
        hooks = [tower.before_layer(i, self._layer_hook(tower, i, state)) for i in range(tower.n_layers)]
        hooks.append(tower.on_features(self._scatter_hook(state, tower.cls_in_features)))
        return hooks

    def _layer_hook(self, tower, i: int, state: dict):
        depth = tower.depth

        def hook(h):
            if i == 0:
                n, N, _ = h.shape
                patches = N - 1
                sched = layer_schedule(self.r, patches - self.target(patches), max(1, depth))
                state["tome_merge"] = {
                    "size": h.new_ones(n, N),
                    "schedule": sched,
                    "source": torch.eye(N, device=h.device)[None].expand(n, N, N),
                    "merged": False,  # sizes are all 1 until a merge: known on the host, no device read
                }
            st = state.get("tome_merge")
            if st is None:
                return None
            if i < depth and st["schedule"][i] > 0:
                h = self._merge(tower.keys(i, h), h, st, st["schedule"][i])
            mask = None
            if self.prop_attn and st["merged"]:
                mask = prop_attn_mask(st["size"], h.dtype)
            return h, mask

        return hook

    def _merge(self, metric: torch.Tensor, h: torch.Tensor, st: dict, r: int) -> torch.Tensor:
        """r merges of h (n, N, D) by the layer's keys `metric` (CLS protected), sizes and sources tracked."""
        size, source = st["size"], st["source"]
        while r > 0:
            merge, done = bipartite_soft_matching(metric, r, protected=1)
            if done == 0:
                break
            metric, _ = merge_wavg(merge, metric, size)
            h, size2 = merge_wavg(merge, h, size)
            source = merge_source(merge, source)
            size = size2
            st["merged"] = True
            r = r - done if self.r is None else 0  # paper mode: one clamped round per layer
        perm = spatial_order(source)
        st["size"], st["source"] = size.gather(1, perm), gather_tokens(source, perm)
        return gather_tokens(h, perm)

    @staticmethod
    def _scatter_hook(state: dict, cls_kept: bool):
        def hook(feats):
            st = state.pop("tome_merge", None)
            if st is None:
                return None
            plans = plans_from_source(st["source"], drop_cls=not cls_kept)
            if feats.shape[1] != plans.n_groups:
                raise RuntimeError(
                    f"tome: the projector got {feats.shape[1]} tokens per image but {plans.n_groups} "
                    f"merged tokens were tracked"
                )
            state["tome_plans"] = plans
            return broadcast_groups(feats, plans)

        return hook

    def _projector_decision(self, ctx, b: int, free: torch.Tensor, sizes: list[int]) -> Decision:
        """Sample b's merges per span, among its `free` tokens (not CLS; `sizes[s]` of them in span s): each
        merged token's group labelled on the device, so nothing is read on the host."""
        x = ctx.visual_hidden(b)
        ids = ctx.span_ids(b)
        reps, index, label, values = [], [], [], []
        n_groups = 0
        for s, n in enumerate(sizes):
            if not n:
                continue
            toks = torch.nonzero_static((ids == s) & free, size=n).flatten()
            merged, _, source = merge_to(x[toks][None], self.target(n))
            row = source[0].argmax(0)  # source is a partition: each token's merged row is its column's argmax
            first = torch.full((merged.shape[1],), x.shape[0], dtype=torch.long, device=x.device)
            reps.append(first.scatter_reduce_(0, row, toks, "amin"))  # a group's first token represents it
            index.append(toks)
            label.append(row + n_groups)
            values.append(merged[0])
            n_groups += merged.shape[1]
        cls = ctx.cls_tokens(b)  # class tokens stay as they are
        reps.append(cls)
        index.append(cls)
        label.append(torch.arange(n_groups, n_groups + cls.numel(), device=x.device))
        values.append(x[cls])
        return grouped_decision(torch.cat(reps), torch.cat(index), torch.cat(label), torch.cat(values), dtype=x.dtype)

    def decide(self, ctx):
        if self.placement == "projector":
            free = []
            for b in range(ctx.batch_size):
                mask = torch.ones(ctx.n_visual(b), dtype=torch.bool, device=ctx.hidden.device)
                free.append(mask.index_fill_(0, ctx.cls_tokens(b), False))
            sizes = ctx.span_sizes(free)  # one host copy for the batch
            return [self._projector_decision(ctx, b, free[b], sizes[b]) for b in range(ctx.batch_size)]
        return plan_decisions(ctx, ctx.state.pop("tome_plans", None), ctx.adapter.vision_tower().unit_tokens, "tome")
