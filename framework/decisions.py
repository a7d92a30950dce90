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
    slots = Slots(index=torch.arange(L, device=dev)[None].expand(B, L).clone(), valid=valid, visual=visual, members=[])
    n_visual = slots.counts()[1]
    slots.members = [torch.eye(n, dtype=torch.bool, device=dev) for n in n_visual]
    # each sample's visual positions, from one static-size nonzero (no host round trip per sample)
    at = torch.split(torch.nonzero_static(visual, size=sum(n_visual))[:, 1], n_visual)
    spans, vmap = pending.get("spans"), pending.get("vision_map")
    slots.span = None if spans is None else [spans[b].index_select(0, at[b]) for b in range(B)]
    slots.vision_map = None if vmap is None else [vmap[b].index_select(0, at[b]) for b in range(B)]
    slots.grids, slots.cls = visual_grids(pending.get("grids"), visual)
    return slots


def visual_grids(grids, visual: torch.Tensor):
    """Adapter grids (sequence positions) -> grids of visual-token indices; a `row_end` that is not
    visual (LLaVA-NeXT newline='keep') is dropped; returns (grids, class-token indices) per sample.
    Whether each grid, row end and class token is visual is read in one host copy for the batch."""
    if grids is None:
        return None, None
    dev = visual.device
    entries = [(b, g) for b, (sample, _) in enumerate(grids) for g in sample]
    ended = [(b, g) for b, g in entries if g.row_end is not None]
    cls_at = [c.to(dev) for _, c in grids]
    flags = [visual[b, g.index.to(dev)].all().reshape(1) for b, g in entries]
    flags += [visual[b, g.row_end.to(dev)].all().reshape(1) for b, g in ended]
    flags += [visual[b, c] for b, c in enumerate(cls_at)]  # which class-token positions are visual
    flags = torch.cat(flags).tolist() if flags else []
    if not all(flags[: len(entries)]):
        raise RuntimeError("adapter grid covers non-visual positions")
    ends_visual = iter(flags[len(entries) : len(entries) + len(ended)])
    cls_visual = iter(flags[len(entries) + len(ended) :])
    out, cls = [], []
    for b, (sample, _) in enumerate(grids):
        vidx = visual[b].long().cumsum(0) - 1
        mine = []
        for g in sample:
            ends = g.row_end.to(dev) if g.row_end is not None and next(ends_visual) else None
            mine.append(Grid(index=vidx[g.index.to(dev)], row_end=None if ends is None else vidx[ends]))
        out.append(mine)
        kept = [j for j in range(int(cls_at[b].numel())) if next(cls_visual)]
        cls.append(vidx[cls_at[b][torch.tensor(kept, dtype=torch.long, device=dev)]])
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


def _checked_keeps(decisions: list[Decision], n_visual: list[int], dev) -> list[torch.Tensor]:
    """Each decision's kept visual indices, sorted and unique; every index must lie in 0..n-1 and at least one
    token must survive. One host round trip for the whole batch: the keeps are sorted (one sort when they
    have equal lengths), and `unique` (whose size the host must learn) runs only on a keep with repeats."""
    keeps = [torch.as_tensor(d.keep, device=dev).long().flatten() for d in decisions]
    if len({k.numel() for k in keeps}) == 1:
        keeps = list(torch.stack(keeps).sort(-1).values.unbind(0))
    else:
        keeps = [k.sort().values for k in keeps]
    none = torch.zeros((), dtype=torch.bool, device=dev)
    lo = torch.stack([k[0] if k.numel() else k.new_tensor(-1) for k in keeps])
    hi = torch.stack([k[-1] if k.numel() else k.new_tensor(0) for k in keeps])
    repeats = torch.stack([(k[1:] == k[:-1]).any() if k.numel() > 1 else none for k in keeps])
    bad = (lo < 0) | (hi >= torch.tensor(n_visual, device=dev))
    for b, (is_bad, repeated) in enumerate(torch.stack([bad, repeats]).T.tolist()):
        if is_bad:
            raise ConfigError(
                f"decision for sample {b} keeps {keeps[b].unique().numel()} tokens with indices outside "
                f"0..{n_visual[b] - 1}; a decision must keep at least 1 of the {n_visual[b]} visual tokens"
            )
        if repeated:
            keeps[b] = keeps[b].unique(sorted=True)
    return keeps


def _new_members(slots: Slots, decisions: list[Decision], keeps: list[torch.Tensor], dev) -> list[torch.Tensor]:
    """Per sample, which input visual tokens each surviving / merged visual token stands for."""
    members = []
    for b, (d, keep) in enumerate(zip(decisions, keeps)):
        m = slots.members[b][keep]
        sources = [torch.as_tensor(s, device=dev).long() for s in d.sources]
        if not d.n_merged and len(sources) == keep.numel():  # kept tokens that absorbed others in place
            m = _union_rows(slots.members[b], sources)
        if d.n_merged:
            if len(sources) != d.n_merged:
                raise ConfigError(f"decision for sample {b}: {d.n_merged} merged tokens but {len(sources)} source sets")
            m = torch.cat([m, _union_rows(slots.members[b], sources)])
        members.append(m)
    return members


def apply_decisions(slots: Slots, hidden: torch.Tensor, decisions: list[Decision]) -> tuple[Slots, torch.Tensor]:
    """Gather survivors (original order), insert merged tokens after the last kept visual token,
    drop padding, and left-pad samples to a common length with empty slots.

    Batched: one scatter for the whole batch (the per-sample work is only each sample's kept indices and
    its `members` rows), so the op count and host round trips do not grow with the batch."""
    B, L = slots.valid.shape
    dev = hidden.device
    vis = slots.visual & slots.valid
    n_valid, n_visual = slots.counts()
    keeps = _checked_keeps(decisions, n_visual, dev)
    members = _new_members(slots, decisions, keeps, dev)
    # slot_of[b, r]: the slot of sample b's visual token r (flat over the batch: b * R + r)
    R = max(max(n_visual), 1)
    flat_vis = torch.nonzero_static(vis.flatten(), size=sum(n_visual)).squeeze(1)
    rank = vis.long().cumsum(1) - 1
    slot_of = torch.zeros(B * R, dtype=torch.long, device=dev)
    slot_of[(flat_vis // L) * R + rank.flatten()[flat_vis]] = flat_vis % L
    sizes = [k.numel() for k in keeps]
    sample_of = torch.repeat_interleave(
        torch.arange(B, device=dev), torch.tensor(sizes, device=dev), output_size=sum(sizes)
    )
    kept_slots = slot_of[sample_of * R + torch.cat(keeps)]
    kept = torch.zeros(B * L, dtype=torch.bool, device=dev)
    kept[sample_of * L + kept_slots] = True
    kept = kept.view(B, L)
    survive = slots.valid & (~vis | kept)

    if any(d.values is not None for d in decisions):  # new values for kept tokens, at their own slots
        hidden = hidden.clone()
        for b, (d, keep) in enumerate(zip(decisions, keeps)):
            if d.values is None:
                continue
            if int(d.values.shape[0]) != keep.numel():
                raise ConfigError(
                    f"decision for sample {b}: {int(d.values.shape[0])} values for {keep.numel()} kept tokens"
                )
            hidden[b, slot_of[b * R + keep]] = d.values.to(hidden.dtype)

    n_merged = [d.n_merged for d in decisions]
    n_new = torch.tensor(n_merged, device=dev)
    count = survive.long().cumsum(1)  # survivors up to and including each slot
    # merged tokens go right after the last kept visual token: after `at` survivors
    last_kept = torch.where(kept, torch.arange(L, device=dev), 0).amax(1, keepdim=True)
    at = count.gather(1, last_kept).squeeze(1)
    n_out = count[:, -1] + n_new
    # the new counts on the host, from the old ones and the decisions (no copy from the device)
    n_survive = [v - n + s for v, n, s in zip(n_valid, n_visual, sizes)]
    n_out_host = [s + m for s, m in zip(n_survive, n_merged)]
    L_out = max(n_out_host)
    pad = L_out - n_out
    # flat (b * L + slot) of every survivor, in order
    src = torch.nonzero_static(survive.flatten(), size=sum(n_survive)).squeeze(1)
    b_s, c = src // L, count.flatten()[src]
    dest = b_s * L_out + pad[b_s] + c - 1 + torch.where(c > at[b_s], n_new[b_s], 0)

    index = torch.zeros(B * L_out, dtype=torch.long, device=dev)
    visual = torch.zeros(B * L_out, dtype=torch.bool, device=dev)
    out = hidden.new_zeros(B * L_out, hidden.shape[-1])
    index[dest] = slots.index.flatten()[src]
    visual[dest] = slots.visual.flatten()[src]
    out.index_copy_(0, dest, hidden.reshape(B * L, -1).index_select(0, src))
    if sum(n_merged):
        merging = [b for b, n in enumerate(n_merged) if n]
        b_m = torch.repeat_interleave(torch.tensor(merging, device=dev), n_new[merging], output_size=sum(n_merged))
        dest_m = b_m * L_out + pad[b_m] + at[b_m] + torch.cat([torch.arange(n_merged[b], device=dev) for b in merging])
        anchors = []
        for b in merging:
            d = decisions[b]
            if d.anchors is not None:
                anchors.append(torch.as_tensor(d.anchors, device=dev).long().flatten())
            else:
                anchors.append(torch.stack([torch.as_tensor(s, device=dev).long().min() for s in d.sources]))
        anchor_slots = slot_of[b_m * R + torch.cat(anchors)]
        index[dest_m] = slots.index.flatten()[b_m * L + anchor_slots]
        visual[dest_m] = True
        out.index_copy_(0, dest_m, torch.cat([decisions[b].merged.to(hidden.dtype) for b in merging]))
    index, visual, out = index.view(B, L_out), visual.view(B, L_out), out.view(B, L_out, -1)
    valid = torch.arange(L_out, device=dev)[None] >= pad[:, None]
    counts = (n_out_host, [s + m for s, m in zip(sizes, n_merged)])
    new = Slots(index=index, valid=valid, visual=visual, members=members, span=slots.span, _counts=counts)
    new._n_spans = slots._n_spans  # the input spans do not change
    return new, out
