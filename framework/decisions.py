"""Slots from a prompt, and decisions applied to slots.

`initial_slots` turns the language model's prefill input (2-D mask, the adapter's visual positions,
spans, grids and vision-feature map) into `Slots`; `apply_decisions` gathers each sample's survivors in
their original order, inserts merged tokens after the last kept visual token and left-pads samples to
a common length with empty slots.
"""

from __future__ import annotations

import numpy as np
import torch

from .checks import DeferredChecks
from .context import Grid, Slots
from .errors import ConfigError
from .reducer import Decision, SourceGroups


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
    if len(set(n_visual)) == 1:  # one identity per sample, in one tensor (not shared: each its own rows)
        slots.members = list(torch.eye(n_visual[0], dtype=torch.bool, device=dev).repeat(B, 1, 1).unbind(0))
    else:
        slots.members = [torch.eye(n, dtype=torch.bool, device=dev) for n in n_visual]
    # every sample's visual positions (flat, b * L + position) at once, without a host round trip
    at = torch.nonzero_static(visual.flatten(), size=sum(n_visual)).squeeze(1)
    spans, vmap = pending.get("spans"), pending.get("vision_map")
    slots.span = None if spans is None else list(spans.flatten().index_select(0, at).split(n_visual))
    slots.vision_map = None if vmap is None else list(vmap.flatten().index_select(0, at).split(n_visual))
    slots.grids, slots.cls = visual_grids(pending.get("grids"), visual)
    return slots


def visual_grids(grids, visual: torch.Tensor):
    """Adapter grids (sequence positions) -> grids of visual-token indices; a `row_end` that is not
    visual (LLaVA-NeXT newline='keep') is dropped; returns (grids, class-token indices) per sample.
    Every position the grids name is looked up in one gather for the batch, and whether it is visual is read
    in one host copy."""
    if grids is None:
        return None, None
    dev, (B, L) = visual.device, visual.shape
    entries = [(b, g) for b, (sample, _) in enumerate(grids) for g in sample]
    ended = [(b, g) for b, g in entries if g.row_end is not None]
    # grid cells, then row ends, then each sample's class tokens: flat positions b * L + position
    parts = [g.index.to(dev).flatten() for _, g in entries] + [g.row_end.to(dev) for _, g in ended]
    parts += [c.to(dev) for _, c in grids]
    sizes = [int(p.numel()) for p in parts]
    owner = [b for b, _ in entries] + [b for b, _ in ended] + list(range(B))
    flat = _cat(parts) + _to_device(dev, {"offset": np.repeat(np.asarray(owner) * L, sizes)})["offset"]
    flags = visual.flatten()[flat].tolist()
    vidx = (visual.long().cumsum(1) - 1).flatten()[flat]  # each position's visual-token index in its sample
    n_cells, n_ends = sum(sizes[: len(entries)]), sum(sizes[len(entries) : len(entries) + len(ended)])
    if not all(flags[:n_cells]):
        raise RuntimeError("adapter grid covers non-visual positions")
    pieces = iter(vidx.split(sizes))
    cells = [next(pieces).view(g.index.shape) for _, g in entries]
    ends = iter([next(pieces) for _ in ended])
    at, out = n_cells, [[] for _ in grids]
    for (b, g), index in zip(entries, cells):
        end = None
        if g.row_end is not None:
            end = next(ends)
            end, at = (end if all(flags[at : at + end.numel()]) else None), at + end.numel()
        out[b].append(Grid(index=index, row_end=end))
    # the class tokens that are visual, picked on the device by host indices (one copy, no wait)
    cls_flags, cls_sizes = flags[n_cells + n_ends :], sizes[len(entries) + len(ended) :]
    visual_cls = [n_cells + n_ends + i for i, f in enumerate(cls_flags) if f]
    kept = vidx[_to_device(dev, {"cls": visual_cls})["cls"]] if visual_cls else vidx[:0]
    starts = _starts(cls_sizes)
    per_sample = [sum(cls_flags[s : s + n]) for s, n in zip(starts, cls_sizes)]
    return out, list(kept.split(per_sample))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without a copy (an op) for a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _starts(sizes) -> np.ndarray:
    """Where each of consecutive blocks of these sizes starts (exclusive cumulative sum)."""
    return np.cumsum([0, *sizes])[:-1]


def _to_device(dev, arrays: dict) -> dict[str, torch.Tensor]:
    """Host ints -> long tensors on `dev`, all in one copy: a separate `torch.tensor(..., device=dev)` each
    would be one launch each and, blocking, a wait for the queue to drain. Non-blocking is safe from a
    pageable source: it is staged before the call returns."""
    if not arrays:
        return {}
    parts = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays.values()]
    flat = torch.from_numpy(np.concatenate(parts)).to(dev, non_blocking=True)
    return dict(zip(arrays, flat.split([len(p) for p in parts])))


def _unions(table: torch.Tensor, rows: torch.Tensor, group: torch.Tensor, n_out: int) -> torch.Tensor:
    """(n_out, width) bool: new row g is the union of the `table` rows rows[i] with group[i] == g (one gather
    and one integer scatter for all unions)."""
    out = torch.zeros(n_out, table.shape[1], dtype=torch.int32, device=table.device)
    return out.index_add_(0, group, table[rows].int()) > 0


def _distinct_in_range(s: torch.Tensor, n) -> torch.Tensor:
    """Sorted rows s (G, k) -> strictly increasing rows in 0..n-1 (n an int or (G, 1)), equal to s where s
    already is: a row whose indices repeat or leave the range is pushed apart and into it."""
    a = torch.arange(s.shape[-1], device=s.device)
    low = (s.clamp(min=0) - a).cummax(-1).values + a  # strictly increasing, >= 0
    return torch.minimum(low, n - s.shape[-1] + a)  # and <= n - 1


def _keep_flags(s: torch.Tensor) -> torch.Tensor:
    """Sorted, non-empty keeps (G, k) -> (3, G): each one's first and last index, and whether one repeats."""
    return torch.stack([s[:, 0], s[:, -1], (s[:, 1:] == s[:, :-1]).any(1)])


def _checked_keeps(decisions: list[Decision], n_visual: list[int], dev, checks: DeferredChecks) -> list[torch.Tensor]:
    """Each decision's kept visual indices, sorted (one sort for the batch when they have equal lengths).
    Whether they lie in 0..n-1 and are distinct goes to `checks` (read at the end of the prefill, without a
    host round trip here); until then a faulty keep is repaired into distinct indices in 0..n-1 (a valid
    one is unchanged), so that the slots match the host counts and nothing later indexes out of range."""
    keeps = [torch.as_tensor(d.keep, device=dev).long().flatten() for d in decisions]
    for b, (k, n) in enumerate(zip(keeps, n_visual)):
        if not 1 <= k.numel() <= n:
            raise ConfigError(
                f"decision for sample {b} keeps {k.numel()} tokens; it must keep 1..{n} distinct indices of its "
                f"{n} current visual tokens"
            )
    if len({k.numel() for k in keeps}) == 1:
        s = (keeps[0][None] if len(keeps) == 1 else torch.stack(keeps)).sort(-1).values
        flags = _keep_flags(s)
        # the sample sizes travel without a blocking copy (which would wait for the queue)
        n = n_visual[0] if len(keeps) == 1 else _to_device(dev, {"n": n_visual})["n"][:, None]
        keeps = list(_distinct_in_range(s, n))
    else:
        keeps = [k.sort().values for k in keeps]
        flags = torch.cat([_keep_flags(k[None]) for k in keeps], 1)
        keeps = [_distinct_in_range(k[None], m)[0] for k, m in zip(keeps, n_visual)]

    def message(flags) -> str | None:  # flags (3, B): first and last kept index, whether one repeats
        for b, (lo, hi, repeats) in enumerate(flags.T.tolist()):
            if lo < 0 or hi >= n_visual[b]:
                return (
                    f"decision for sample {b} keeps indices outside 0..{n_visual[b] - 1}; a decision keeps "
                    f"indices of the sample's {n_visual[b]} current visual tokens"
                )
            if repeats:
                return f"decision for sample {b} keeps a visual token twice; `keep` must hold distinct indices"
        return None

    checks.add(flags, message)
    return keeps


def _member_rows(decisions: list[Decision], keeps: list[torch.Tensor], dev) -> list[tuple]:
    """Per sample, (rows kept as they are, source rows to union, each one's union (0..n_groups-1: a host
    array, or a device tensor from `SourceGroups`), n_groups, what the sources came as): the kept tokens'
    `members` rows, then one union per merged token; kept tokens that absorbed others in place are their
    source sets instead. The sources' ranges are checked (and clamped) for the whole batch in `_block_members`."""
    plan = []
    for b, (d, keep) in enumerate(zip(decisions, keeps)):
        if isinstance(d.sources, SourceGroups):
            rows = torch.as_tensor(d.sources.index, device=dev).long().flatten()
            group = torch.as_tensor(d.sources.group, device=dev).long().flatten()
            if rows.shape != group.shape:
                raise ConfigError(
                    f"decision for sample {b}: SourceGroups has {rows.numel()} indices but {group.numel()} groups"
                )
            n_groups = d.n_merged or keep.numel()
            plan.append(([keep] if d.n_merged else [], rows, group, n_groups, "SourceGroups"))
            continue
        sources = [torch.as_tensor(s, device=dev).long().flatten() for s in d.sources]
        sizes = [s.numel() for s in sources]
        group = np.repeat(np.arange(len(sources)), sizes)
        if not d.n_merged and len(sources) == keep.numel():  # kept tokens that absorbed others in place
            plan.append(([], _cat(sources), group, len(sources), "sources"))
        elif d.n_merged:
            if len(sources) != d.n_merged:
                raise ConfigError(f"decision for sample {b}: {d.n_merged} merged tokens but {len(sources)} source sets")
            if d.anchors is None and 0 in sizes:
                raise ConfigError(
                    f"decision for sample {b}: merged token {sizes.index(0)} has no sources, so it has no position; "
                    "list the current visual tokens it stands for, or give `anchors`"
                )
            plan.append(([keep], _cat(sources), group, len(sources), "sources"))
        else:
            plan.append(([keep], None, None, 0, None))
    return plan


def _range_message(samples: list[int], spans: list[tuple]):
    """The wording of `_block_members`' range check: flags (2, N) of the union rows and groups that were out
    of range; spans: per union entry, (its slice of N, the plan entry's index, n_visual, n_groups, kind)."""

    def message(bad) -> str | None:
        for (lo, hi), j, n, n_groups, kind in spans:
            where = f"decision for sample {samples[j]}: {kind}"
            if bad[0][lo:hi].any():
                return f"{where} indices must lie in 0..{n - 1} (its current visual tokens)"
            if bad[1][lo:hi].any():
                return f"{where} groups must lie in 0..{n_groups - 1} (one per new token)"
        return None

    return message


def _empty_message(samples: list[int], spans: list[tuple]):
    """The wording of the check that every merged token without a given anchor has a source: flags (G,) of the
    unions whose first source was needed but that have none; spans: per plan entry with unions, (its slice of
    G, the entry's index)."""

    def message(bad) -> str | None:
        for (lo, hi), j in spans:
            if bad[lo:hi].any():
                g = int(np.flatnonzero(bad[lo:hi])[0])
                return (
                    f"decision for sample {samples[j]}: SourceGroups group {g} (merged token {g}) has no sources, "
                    "so it has no position; give it a current visual token, or give `anchors`"
                )
        return None

    return message


def _block_members(
    members: list[torch.Tensor], plan: list[tuple], dev, samples: list[int], checks, firsts: list[bool] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """New members of samples whose members have the same width, whatever the number of samples: the kept
    rows in one gather from the stacked members, the merged tokens' unions in one gather and one integer
    scatter (only their source rows: the scatter is the slow part on a CPU), and at batch > 1 one more
    gather that puts each sample's rows in order (its kept rows, then its unions). The union rows and groups
    are checked against each sample's range in one comparison (read at the end of the prefill; clamped into
    range until then). firsts (per sample, whether it needs them): also each union's first source (current
    visual index), per sample, in one scatter: merged tokens' default anchors. A union without sources has no
    first source; where one is needed, that is an error (read with the range check; clamped until then)."""
    direct, unions, groups, n_direct, n_union, spans = [], [], [], [], [], []
    d_off, u_off, g_off, bounds, fill, empty = [], [], [], [], [], []
    n_rows = 0
    for j, (off, m, (kept, rows, group, n_groups, kind)) in enumerate(
        zip(_starts([m.shape[0] for m in members]), members, plan)
    ):
        n, g0 = int(m.shape[0]), sum(n_union)
        n_direct.append(sum(k.numel() for k in kept))
        direct += kept
        d_off.append(np.full(n_direct[-1], off))
        if n_groups:
            k = rows.numel()
            unions.append(rows)
            groups.append(group)
            u_off.append(np.full(k, off))
            g_off.append(np.full(k, g0))
            # rows lie in off..off+n-1 of the stacked members, groups in g0..g0+n_groups-1 of the unions
            bounds.append(np.array([[off, g0], [off + n - 1, g0 + n_groups - 1]])[..., None].repeat(k, axis=2))
            if firsts:  # an empty union keeps n (no visual token); the check flags it where its first is used
                fill.append(np.array([[n], [n - 1 if firsts[j] else n]]).repeat(n_groups, axis=1))
                empty.append(((g0, g0 + n_groups), j))
            spans.append(((n_rows, n_rows + k), j, n, n_groups, kind))
            n_rows += k
        n_union.append(n_groups)
    batch = len(members) > 1
    host = {"d_off": np.concatenate(d_off)} if batch and direct else {}
    on_host = all(isinstance(g, np.ndarray) for g in groups)
    if unions:
        if on_host:
            host["group"] = np.concatenate(groups) + np.concatenate(g_off)
        else:  # device groups (SourceGroups): the host parts travel with the offsets, one add for all
            host.update({("group", i): g for i, g in enumerate(groups) if isinstance(g, np.ndarray)})
            host["g_off"] = np.concatenate(g_off)
        if batch:
            host["u_off"] = np.concatenate(u_off)
        if n_rows:
            host["bounds"] = np.concatenate(bounds, axis=2)  # (low / high, row / group, N)
        if firsts:
            host["fill"] = np.concatenate(fill, axis=1)  # (initial value / highest allowed, union)
    # stacked as [every kept row; every union]: at batch > 1 with both, sample b's rows are picked in order
    reorder = batch and any(n_union) and any(n_direct)
    if reorder:
        d0, u0 = _starts(n_direct), sum(n_direct) + _starts(n_union)
        host["order"] = np.concatenate(
            [np.r_[np.arange(d, d + nd), np.arange(u, u + nu)] for d, nd, u, nu in zip(d0, n_direct, u0, n_union)]
        )
    ints = _to_device(dev, host)
    table, parts, first = _cat(members), [], None
    if direct:  # row r of sample b is row off_b + r of the stacked members
        parts.append(table[_cat(direct) + ints["d_off"] if batch else _cat(direct)])
    if unions:
        rows = _cat(unions) + ints["u_off"] if batch else _cat(unions)
        if on_host:
            group = ints["group"]
        else:
            group = _cat([ints[("group", i)] if isinstance(g, np.ndarray) else g for i, g in enumerate(groups)])
            group = group + ints["g_off"] if len(groups) > 1 else group
        if n_rows:
            lim = ints["bounds"].view(2, 2, n_rows)
            rows, group = _clamped(torch.stack([rows, group]), lim[0], lim[1], _range_message(samples, spans), checks)
        parts.append(_unions(table, rows, group, sum(n_union)))
        if firsts:
            local = rows - ints["u_off"] if batch else rows
            fill = ints["fill"].view(2, -1)
            first = fill[0].scatter_reduce(0, group, local, "amin")
            first = list(_clamped(first, None, fill[1], _empty_message(samples, empty), checks).split(n_union))
    out = _cat(parts) if parts else table[:0]
    if reorder:
        out = out[ints["order"]]
    return list(out.split([d + u for d, u in zip(n_direct, n_union)])), first


def _new_members(
    slots: Slots, decisions: list[Decision], keeps: list[torch.Tensor], dev, checks, firsts: list[bool] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per sample, which input visual tokens each surviving / merged visual token stands for (and, with
    `firsts`, each union's first source); samples whose members have the same width (the same input visual
    tokens) together."""
    plan = _member_rows(decisions, keeps, dev)
    if len({int(m.shape[1]) for m in slots.members}) == 1:
        return _block_members(slots.members, plan, dev, list(range(len(plan))), checks, firsts)
    each = [
        _block_members([m], [p], dev, [b], checks, [True] if firsts and firsts[b] else None)
        for b, (m, p) in enumerate(zip(slots.members, plan))
    ]
    return [m[0] for m, _ in each], [f and f[0] for _, f in each]


def _given_anchors(decisions: list[Decision], samples: list[int], n_visual: list[int], dev) -> tuple:
    """The anchors that decisions give (current visual indices), all at once: (their concatenation, its host
    bounds (2, N): 0 and n_visual - 1 per anchor, for the layout's copy, and the wording of their range check,
    which `_clamped` adds once the bounds are on the device)."""
    given = [torch.as_tensor(d.anchors, device=dev).long().flatten() for d in decisions]
    for b, d, a in zip(samples, decisions, given):
        if a.numel() != d.n_merged:
            raise ConfigError(f"decision for sample {b}: {a.numel()} anchors for {d.n_merged} merged tokens")
    sizes = [a.numel() for a in given]
    high = np.repeat([n_visual[b] - 1 for b in samples], sizes)
    bounds = np.stack([np.zeros_like(high), high])
    spans = list(zip(samples, _starts(sizes), sizes))

    def message(bad) -> str | None:
        for b, start, size in spans:
            if bad[start : start + size].any():
                return f"decision for sample {b}: anchors must lie in 0..{n_visual[b] - 1}"
        return None

    return _cat(given), bounds, message


def _clamped(values: torch.Tensor, low: torch.Tensor | None, high: torch.Tensor, message, checks) -> torch.Tensor:
    """`values` clamped element-wise into [low, high] (low None: no lower bound), so that nothing later indexes
    out of range; whether any was out of range goes to `checks` (read at the end of the prefill; `message`
    names the sample)."""
    clamped = torch.clamp(values, low, high)
    checks.add(values != clamped, message)
    return clamped


def _layout(n_visual, sizes, n_merged, pad, L_out) -> dict:
    """Host ints the batched layout needs on the device (see `apply_decisions`): at batch 1 without merged
    tokens none (the offsets are 0)."""
    B, merging = len(sizes), [b for b, n in enumerate(n_merged) if n]
    first_visual, first_kept = _starts(n_visual), _starts(sizes)
    last = [first_kept[b] + sizes[b] - 1 for b in merging]  # each merging sample's last kept token
    host = {}
    if B > 1:
        host["voff_k"] = np.repeat(first_visual, sizes)  # sample b's visual token r: the batch's first_visual[b] + r
        host["base"] = [b * L_out + pad[b] - (0 if merging else 1) for b in range(B)]
        host["pad"] = pad
    if merging:
        weight = np.ones(sum(sizes), dtype=np.int64)
        weight[last] += [n_merged[b] for b in merging]
        host["weight"] = weight
        host["last_m"] = np.repeat(last, [n_merged[b] for b in merging])
        host["step"] = np.concatenate([np.arange(1, n_merged[b] + 1) for b in merging])
        if B > 1:
            host["voff_m"] = np.repeat(first_visual[merging], [n_merged[b] for b in merging])
    return host


def apply_decisions(
    slots: Slots, hidden: torch.Tensor, decisions: list[Decision], checks: DeferredChecks | None = None
) -> tuple[Slots, torch.Tensor]:
    """Gather survivors (original order), insert merged tokens after the last kept visual token,
    drop padding, and left-pad samples to a common length with empty slots. The checks of the decisions'
    indices go to `checks` (the engine reads them at the end of the prefill); without, they run at once.

    Batched: one scatter per output for the whole batch (the per-sample work is only each sample's kept
    indices), so the op count and host round trips do not grow with the batch; per-sample offsets are
    known on the host and travel in one copy."""
    B, L = slots.valid.shape
    dev = hidden.device
    n_valid, n_visual = slots.counts()
    pending = DeferredChecks() if checks is None else checks
    keeps = _checked_keeps(decisions, n_visual, dev, pending)
    n_merged = [d.n_merged for d in decisions]
    merging = [b for b, n in enumerate(n_merged) if n]
    # merged tokens without anchors take their first source's position
    firsts = [bool(d.n_merged) and d.anchors is None for d in decisions]
    members, first = _new_members(slots, decisions, keeps, dev, pending, firsts if any(firsts) else None)
    sizes = [k.numel() for k in keeps]
    for b, d in enumerate(decisions):
        if d.values is not None and int(d.values.shape[0]) != sizes[b]:
            raise ConfigError(f"decision for sample {b}: {int(d.values.shape[0])} values for {sizes[b]} kept tokens")
    # the new counts on the host, from the old ones and the decisions (no copy from the device)
    n_survive = [v - n + s for v, n, s in zip(n_valid, n_visual, sizes)]
    n_out_host = [s + m for s, m in zip(n_survive, n_merged)]
    L_out = max(n_out_host)
    pad = [L_out - n for n in n_out_host]
    given_at = [b for b in merging if decisions[b].anchors is not None]
    host = _layout(n_visual, sizes, n_merged, pad, L_out)
    if given_at:
        own_anchors, host["anchor_bounds"], anchor_message = _given_anchors(
            [decisions[b] for b in given_at], given_at, n_visual, dev
        )
    ints = _to_device(dev, host)

    vis = slots.visual & slots.valid
    # flat slot (b * L + slot) of every visual token, by sample then order
    vis_slots = torch.nonzero_static(vis.flatten(), size=sum(n_visual)).squeeze(1)
    kept = _cat(keeps)
    if B > 1:
        kept = kept + ints["voff_k"]
    kept = vis_slots[kept]  # flat slots of the kept tokens
    # each slot's weight in the new sequence: 1 for a survivor (valid text, kept visual), else 0; a sample's
    # last kept visual token also counts the merged tokens that follow it
    survive = (slots.valid ^ vis).flatten()  # valid and not visual
    if merging:
        w = survive.long().index_copy_(0, kept, ints["weight"])
        survive = w > 0
    else:
        w = survive.index_fill_(0, kept, True)
    count = w.view(B, L).cumsum(1)
    # a survivor's output slot: the weight before it in its sample, after the sample's row and left
    # padding (`base`: b * L_out + pad_b, less 1 when nothing merges; 0 at batch 1)
    if merging:
        pos = count - w.view(B, L)
    else:
        pos = count - 1 if B == 1 else count  # at batch > 1 `base` takes the 1 off
    if B > 1:
        pos = pos + ints["base"][:, None]
    spare = B * L_out  # one spare row takes the slots that do not survive (a scatter without a nonzero)
    dest = torch.where(survive.view(B, L), pos, spare).flatten()

    index = slots.index.new_zeros(spare + 1).index_copy_(0, dest, slots.index.flatten())
    visual = slots.visual.new_zeros(spare + 1).index_copy_(0, dest, slots.visual.flatten())
    out = hidden.new_zeros(spare + 1, hidden.shape[-1]).index_copy_(0, dest, hidden.reshape(B * L, -1))
    given = [b for b, d in enumerate(decisions) if d.values is not None]
    if given:  # new values for kept tokens, at their own slots
        fk = _starts(sizes)
        at = kept if len(given) == B else torch.cat([kept[fk[b] : fk[b] + sizes[b]] for b in given])
        out.index_copy_(0, dest[at], _cat([decisions[b].values.to(hidden.dtype) for b in given]))
    if merging:  # merged tokens right after their sample's last kept visual token
        at = dest[kept[ints["last_m"]]] + ints["step"]
        if given_at:
            low, high = ints["anchor_bounds"].view(2, -1)
            own_anchors = _clamped(own_anchors, low, high, anchor_message, pending)
        if len(given_at) == len(merging):
            anchors = own_anchors
        else:  # each merging sample's own anchors, or its unions' first sources, in sample order
            split = own_anchors.split([decisions[b].n_merged for b in given_at]) if given_at else []
            own = dict(zip(given_at, split))
            anchors = _cat([own[b] if b in own else first[b] for b in merging])
        if B > 1:
            anchors = anchors + ints["voff_m"]
        index.index_copy_(0, at, slots.index.flatten()[vis_slots[anchors]])
        visual.index_fill_(0, at, True)
        out.index_copy_(0, at, _cat([decisions[b].merged.to(hidden.dtype) for b in merging]))
    index, visual, out = index[:spare].view(B, L_out), visual[:spare].view(B, L_out), out[:spare].view(B, L_out, -1)
    if B == 1:
        valid = torch.ones(1, L_out, dtype=torch.bool, device=dev)
    else:
        valid = torch.arange(L_out, device=dev)[None] >= ints["pad"][:, None]
    counts = (n_out_host, [s + m for s, m in zip(sizes, n_merged)])
    if checks is None:
        pending.verify()
    # the input spans do not change, nor their count
    return Slots(
        index=index,
        valid=valid,
        visual=visual,
        members=members,
        span=slots.span,
        _counts=counts,
        _n_spans=slots._n_spans,
    ), out
