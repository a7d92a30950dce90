"""Slots from a prompt, and decisions applied to slots.

`initial_slots` turns the language model's prefill input (2-D mask, the adapter's visual positions,
spans, grids and vision-feature map) into `Slots`; `apply_decisions` gathers each sample's survivors in
their original order, inserts merged tokens after the last kept visual token and left-pads samples to
a common length with empty slots.
"""

from __future__ import annotations

import torch

from .context import Grid, Slots
from .errors import ConfigError
from .reducer import Decision


def read_prompt(adapter, input_ids: torch.Tensor, kwargs: dict, vision_map: bool) -> dict | None:
    """What the adapter reads from a prompt with visual input (None without): visual positions, their
    spans (image / frame), 2-D grids and, for reducers acting before the LLM, the vision-feature map."""
    if not adapter.has_visual_input(kwargs):
        ids = [
            t
            for t in (getattr(adapter, "image_token_id", None), getattr(adapter, "video_token_id", None))
            if isinstance(t, int)
        ]
        n = sum(int((input_ids == t).sum()) for t in ids)
        if n:
            raise ConfigError(
                f"the prompt holds {n} image/video tokens (ids {ids}) but no pixel values were "
                "given: the model would read them as text; pass the images (pixel_values), or "
                "leave the image tokens out for a text-only prompt"
            )
        return None
    adapter.check_inputs(input_ids, kwargs)
    visual = adapter.visual_mask(input_ids, kwargs)
    return {
        "visual": visual,
        "spans": adapter.visual_spans(input_ids, kwargs, visual),
        "grids": adapter.visual_grids(input_ids, kwargs),
        "vision_map": adapter.vision_token_map(input_ids, kwargs) if vision_map else None,
    }


def initial_slots(pending: dict, valid: torch.Tensor) -> Slots:
    """Slots of a prefill's input: `valid` (B, L) the 2-D mask; `pending` what the top-level hook read
    from the prompt through the adapter (visual mask, spans, grids, vision-feature map)."""
    B, L = valid.shape
    dev = valid.device
    visual = pending["visual"] & valid
    members = [torch.eye(int(n), dtype=torch.bool, device=dev) for n in visual.sum(1)]
    spans = pending.get("spans")
    slots = Slots(
        index=torch.arange(L, device=dev)[None].expand(B, L).clone(),
        valid=valid,
        visual=visual,
        members=members,
        span=None if spans is None else [sp[v] for sp, v in zip(spans, visual)],
    )
    slots.grids, slots.cls = visual_grids(pending.get("grids"), visual)
    vmap = pending.get("vision_map")
    slots.vision_map = None if vmap is None else [vmap[b][visual[b]] for b in range(B)]
    return slots


def visual_grids(grids, visual: torch.Tensor):
    """Adapter grids (sequence positions) -> grids of visual-token indices; a `row_end` that is not
    visual (LLaVA-NeXT newline='keep') is dropped; returns (grids, class-token indices) per sample."""
    if grids is None:
        return None, None
    out, cls = [], []
    for b, (sample, cls_pos) in enumerate(grids):
        vidx = visual[b].long().cumsum(0) - 1
        mine = []
        for g in sample:
            index = g.index.to(visual.device)
            if not bool(visual[b, index].all()):
                raise RuntimeError("adapter grid covers non-visual positions")
            ends = g.row_end.to(visual.device) if g.row_end is not None else None
            ends = vidx[ends] if ends is not None and bool(visual[b, ends].all()) else None
            mine.append(Grid(index=vidx[index], row_end=ends))
        cls_pos = cls_pos.to(visual.device)
        out.append(mine)
        cls.append(vidx[cls_pos[visual[b, cls_pos]]])
    return out, cls


def _union_rows(members: torch.Tensor, sources: list[torch.Tensor]) -> torch.Tensor:
    """(len(sources), n_in) bool: per source set, the union of those rows of `members` (one gather and
    one scatter for all sets, instead of a few small ops per set)."""
    dev = members.device
    sizes = [int(s.numel()) for s in sources]
    group = torch.repeat_interleave(
        torch.arange(len(sources), device=dev), torch.tensor(sizes, device=dev), output_size=sum(sizes)
    )
    rows = torch.cat([s.reshape(-1) for s in sources]) if sources else torch.zeros(0, dtype=torch.long, device=dev)
    out = torch.zeros(len(sources), members.shape[1], dtype=torch.int32, device=dev)
    return out.index_add_(0, group, members[rows].int()) > 0


def apply_decisions(slots: Slots, hidden: torch.Tensor, decisions: list[Decision]) -> tuple[Slots, torch.Tensor]:
    """Gather survivors (original order), insert merged tokens after the last kept visual token,
    drop padding, and left-pad samples to a common length with empty slots."""
    B = hidden.shape[0]
    dev = hidden.device
    seq_idx, seq_hidden, seq_vis, members = [], [], [], []
    for b, d in enumerate(decisions):
        vis = slots.visual_slots(b)
        n = int(vis.numel())
        keep = torch.as_tensor(d.keep, device=dev).long().flatten().unique(sorted=True)
        if keep.numel() < 1 or bool((keep[0] < 0) | (keep[-1] >= n)):  # sorted: one host round trip for both
            raise ConfigError(
                f"decision for sample {b} keeps {keep.numel()} tokens with indices outside "
                f"0..{n - 1}; a decision must keep at least 1 of the {n} visual tokens"
            )
        drop = torch.ones(n, dtype=torch.bool, device=dev)
        drop[keep] = False
        survive = slots.valid[b].clone()
        survive[vis[drop]] = False
        order = torch.nonzero(survive).flatten()
        idx = slots.index[b, order]
        hid = hidden[b, order]
        if d.values is not None:  # new values for the kept tokens, at their own slots
            if int(d.values.shape[0]) != keep.numel():
                raise ConfigError(
                    f"decision for sample {b}: {int(d.values.shape[0])} values for {keep.numel()} kept tokens"
                )
            hid = hid.index_copy(0, torch.searchsorted(order, vis[keep]), d.values.to(hid.dtype))
        is_vis = slots.visual[b, order]
        m = slots.members[b][keep]
        if not d.n_merged and len(d.sources) == keep.numel():  # kept tokens that absorbed others in place
            m = _union_rows(slots.members[b], [torch.as_tensor(s, device=dev).long() for s in d.sources])
        if d.n_merged:
            sources = [torch.as_tensor(s, device=dev).long() for s in d.sources]
            if len(sources) != d.n_merged:
                raise ConfigError(f"decision for sample {b}: {d.n_merged} merged tokens but {len(sources)} source sets")
            anchors = (
                torch.as_tensor(d.anchors, device=dev).long()
                if d.anchors is not None
                else torch.stack([s.min() for s in sources])
            )
            at = int(torch.nonzero(order == vis[keep].max()).flatten()[0]) + 1
            idx = torch.cat([idx[:at], slots.index[b, vis[anchors]], idx[at:]])
            hid = torch.cat([hid[:at], d.merged.to(hid.dtype), hid[at:]])
            is_vis = torch.cat([is_vis[:at], torch.ones(d.n_merged, dtype=torch.bool, device=dev), is_vis[at:]])
            m = torch.cat([m, _union_rows(slots.members[b], sources)])
        seq_idx.append(idx)
        seq_hidden.append(hid)
        seq_vis.append(is_vis)
        members.append(m)
    L = max(int(t.numel()) for t in seq_idx)
    index = torch.zeros(B, L, dtype=torch.long, device=dev)
    valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
    out = hidden.new_zeros(B, L, hidden.shape[-1])
    for b in range(B):
        n = seq_idx[b].numel()
        index[b, L - n :] = seq_idx[b]
        valid[b, L - n :] = True
        visual[b, L - n :] = seq_vis[b]
        out[b, L - n :] = seq_hidden[b]
    return Slots(index=index, valid=valid, visual=visual, members=members, span=slots.span), out
