"""apply_decisions (batched scatters, host offsets sent in one copy) against a plain per-sample reference."""

import pytest
import torch

from framework.context import Slots
from framework.decisions import apply_decisions
from framework.reducer import Decision


def reference(slots: Slots, hidden: torch.Tensor, decisions: list[Decision]):
    """Per sample, token by token: survivors in order, merged tokens after the last kept visual token,
    left padding with empty slots; members as the engine defines them."""
    B, L = slots.valid.shape
    seqs, members = [], []
    for b, d in enumerate(decisions):
        vis = [s for s in range(L) if slots.valid[b, s] and slots.visual[b, s]]
        keep = sorted(set(torch.as_tensor(d.keep).flatten().tolist()))
        h = hidden[b].clone()
        if d.values is not None:
            for i, r in enumerate(keep):
                h[vis[r]] = d.values[i].to(h.dtype)
        kept = {vis[r] for r in keep}
        seq = [
            (int(slots.index[b, s]), bool(slots.visual[b, s]), h[s])
            for s in range(L)
            if slots.valid[b, s] and (not slots.visual[b, s] or s in kept)
        ]
        m_in = slots.members[b]
        union = [m_in[torch.as_tensor(s).long()].any(0) for s in d.sources]
        if d.n_merged:
            at = max(i for i, (_, v, _) in enumerate(seq) if v) + 1
            firsts = [int(torch.as_tensor(s).min()) for s in d.sources]
            anchors = firsts if d.anchors is None else d.anchors.tolist()
            new = [(int(slots.index[b, vis[a]]), True, d.merged[j].to(h.dtype)) for j, a in enumerate(anchors)]
            seq = seq[:at] + new + seq[at:]
            members.append(torch.cat([m_in[keep], torch.stack(union)]))
        elif d.sources and len(d.sources) == len(keep):
            members.append(torch.stack(union))
        else:
            members.append(m_in[keep])
        seqs.append(seq)
    L_out = max(len(s) for s in seqs)
    index = torch.zeros(B, L_out, dtype=torch.long)
    valid = torch.zeros(B, L_out, dtype=torch.bool)
    visual = torch.zeros(B, L_out, dtype=torch.bool)
    out = torch.zeros(B, L_out, hidden.shape[-1], dtype=hidden.dtype)
    for b, seq in enumerate(seqs):
        for j, (i, v, x) in enumerate(seq):
            p = L_out - len(seq) + j
            index[b, p], valid[b, p], visual[b, p], out[b, p] = i, True, v, x
    return index, valid, visual, out, members


def random_case(g: torch.Generator, B: int, kind: str, widths: bool):
    L, D = 14, 5
    valid = torch.ones(B, L, dtype=torch.bool)
    visual = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        valid[b, : int(torch.randint(0, 4, (), generator=g))] = False  # left padding
        visual[b, 2:] = torch.rand(L - 2, generator=g) < 0.7
        visual[b, 0] = True  # a visual flag on a padding slot (or the first slot) is read through `valid`
    n_visual = (visual & valid).sum(1).tolist()
    members = []
    for n in n_visual:
        w = int(torch.randint(n, n + 4, (), generator=g)) if widths else 20
        members.append(torch.rand(n, w, generator=g) < 0.3)
    index = torch.arange(L)[None].expand(B, L).clone() + 100 * torch.arange(B)[:, None]
    slots = Slots(index=index, valid=valid, visual=visual, members=members)
    hidden = torch.randn(B, L, D, generator=g)
    decisions = []
    for n in n_visual:
        perm = torch.randperm(n, generator=g)
        k = int(torch.randint(1, n + 1, (), generator=g)) if kind != "equal" else max(1, n // 2)
        keep = perm[:k]
        if kind == "repeats":
            keep = torch.cat([keep, keep[:1]])
        rest = perm[k:]
        if kind == "merge" and rest.numel():
            parts = list(torch.tensor_split(rest, min(3, rest.numel())))
            anchors = torch.stack([p.max() for p in parts]) if n % 2 else None
            decisions.append(
                Decision(keep=keep, merged=torch.randn(len(parts), D, generator=g), sources=parts, anchors=anchors)
            )
        elif kind == "in_place":
            ks = keep.sort().values
            parts = [torch.cat([r[None], rest[i :: len(ks)]]) for i, r in enumerate(ks)]
            decisions.append(Decision(keep=keep, sources=parts, values=torch.randn(len(ks), D, generator=g)))
        elif kind == "values":
            values = torch.randn(k, D, generator=g) if n % 2 else None
            decisions.append(Decision(keep=keep, values=values))
        else:
            decisions.append(Decision(keep=keep))
    return slots, hidden, decisions


@pytest.mark.parametrize("kind", ["plain", "equal", "repeats", "merge", "in_place", "values"])
@pytest.mark.parametrize("B", [1, 2, 4])
def test_apply_decisions_matches_the_per_sample_reference(kind, B):
    g = torch.Generator().manual_seed(B * 7 + len(kind))
    for trial in range(4):
        slots, hidden, decisions = random_case(g, B, kind, widths=trial % 2 == 1)
        new, out = apply_decisions(slots, hidden, decisions)
        index, valid, visual, want, members = reference(slots, hidden, decisions)
        assert torch.equal(new.valid, valid)
        assert torch.equal(new.index, index)
        assert torch.equal(new.visual, visual)
        assert torch.equal(out, want)
        assert all(torch.equal(a, b) for a, b in zip(new.members, members))
        # the host counts it carries are the ones the device would give
        assert new.counts() == (valid.sum(1).tolist(), (visual & valid).sum(1).tolist())
