"""apply_decisions (batched scatters, host offsets sent in one copy) against a plain per-sample reference."""

import pytest
import torch

from framework.checks import DeferredChecks
from framework.context import Slots
from framework.decisions import apply_decisions
from framework.errors import ConfigError
from framework.reducer import Decision, SourceGroups
from framework.syncs import SyncCounter


def source_lists(d: Decision) -> list[torch.Tensor]:
    """A decision's sources as one tensor per merged (or in-place) token."""
    if not isinstance(d.sources, SourceGroups):
        return list(d.sources)
    n = int(d.sources.group.max()) + 1
    return [d.sources.index[d.sources.group == g] for g in range(n)]


def reference(slots: Slots, hidden: torch.Tensor, decisions: list[Decision]):
    """Per sample, token by token: survivors in order, merged tokens after the last kept visual token,
    left padding with empty slots; members as the engine defines them."""
    B, L = slots.valid.shape
    seqs, members = [], []
    for b, d in enumerate(decisions):
        vis = [s for s in range(L) if slots.valid[b, s] and slots.visual[b, s]]
        keep = sorted(torch.as_tensor(d.keep).flatten().tolist())
        sources = source_lists(d)
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
        union = [m_in[torch.as_tensor(s).long()].any(0) for s in sources]
        if d.n_merged:
            at = max(i for i, (_, v, _) in enumerate(seq) if v) + 1
            firsts = [int(torch.as_tensor(s).min()) for s in sources]
            anchors = firsts if d.anchors is None else d.anchors.tolist()
            new = [(int(slots.index[b, vis[a]]), True, d.merged[j].to(h.dtype)) for j, a in enumerate(anchors)]
            seq = seq[:at] + new + seq[at:]
            members.append(torch.cat([m_in[keep], torch.stack(union)]))
        elif sources and len(sources) == len(keep):
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
        rest = perm[k:]
        if kind == "merge" and rest.numel():
            parts = list(torch.tensor_split(rest, min(3, rest.numel())))
            anchors = torch.stack([p.max() for p in parts]) if n % 2 else None
            decisions.append(
                Decision(keep=keep, merged=torch.randn(len(parts), D, generator=g), sources=parts, anchors=anchors)
            )
        elif kind == "groups" and rest.numel():  # SourceGroups, in a shuffled order
            m = min(3, rest.numel())
            group = torch.cat([torch.arange(m), torch.randint(0, m, (rest.numel() - m,), generator=g)])
            sources = SourceGroups(index=rest, group=group[torch.randperm(group.numel(), generator=g)])
            anchors = rest[:m].flip(0) if n % 2 else None
            merged = torch.randn(m, D, generator=g)
            decisions.append(Decision(keep=keep, merged=merged, sources=sources, anchors=anchors))
        elif kind in ("in_place", "groups_in_place"):
            ks = keep.sort().values
            parts = [torch.cat([r[None], rest[i :: len(ks)]]) for i, r in enumerate(ks)]
            if kind == "groups_in_place":
                group = torch.repeat_interleave(torch.arange(len(ks)), torch.tensor([p.numel() for p in parts]))
                parts = SourceGroups(index=torch.cat(parts), group=group)
            decisions.append(Decision(keep=keep, sources=parts, values=torch.randn(len(ks), D, generator=g)))
        elif kind == "values":
            values = torch.randn(k, D, generator=g) if n % 2 else None
            decisions.append(Decision(keep=keep, values=values))
        else:
            decisions.append(Decision(keep=keep))
    return slots, hidden, decisions


@pytest.mark.parametrize("kind", ["plain", "equal", "merge", "groups", "in_place", "groups_in_place", "values"])
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


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("equal", [True, False])
def test_bad_keeps_raise_one_clear_error_when_the_checks_are_read(B, equal):
    """A keep with a repeated index or one outside 0..n-1 is refused with a message naming the sample. In a
    prefill the check is deferred (read with the records at its end): applying the decision runs on clamped
    indices and raises nothing until `verify`."""
    g = torch.Generator().manual_seed(3)
    for bad, words in [("repeat", "keeps a visual token twice"), ("range", "keeps indices outside 0..")]:
        slots, hidden, decisions = random_case(g, B, "equal" if equal else "plain", widths=False)
        b = B - 1
        n = int((slots.visual & slots.valid)[b].sum())
        keep = torch.as_tensor(decisions[b].keep)
        if bad == "repeat":
            keep = torch.cat([keep[1:], keep[:1]]) if keep.numel() > 1 else keep
            keep[0] = keep[-1] if keep.numel() > 1 else keep[0]
        else:
            keep = keep.clone()
            keep[-1] = n + 5
        decisions[b] = Decision(keep=keep)
        if bad == "repeat" and keep.unique().numel() == keep.numel():
            continue  # a one-token keep cannot repeat
        with pytest.raises(ConfigError, match=f"sample {b} {words}"):
            apply_decisions(slots, hidden, decisions)
        checks = DeferredChecks()
        new, out = apply_decisions(slots, hidden, decisions, checks)  # runs, on clamped indices
        assert len(checks) == 1 and out.shape[0] == B
        with pytest.raises(ConfigError, match=f"sample {b} {words}"):
            checks.verify()


def test_an_empty_keep_is_refused_at_once():
    g = torch.Generator().manual_seed(5)
    slots, hidden, decisions = random_case(g, 2, "plain", widths=False)
    decisions[1] = Decision(keep=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match="sample 1 keeps 0 tokens"):
        apply_decisions(slots, hidden, decisions, DeferredChecks())


def test_faulty_keeps_are_repaired_until_the_check_raises():
    """Until the deferred check reports it, a keep with repeats or indices out of range is pushed into distinct
    indices in range (so later decisions index nothing out of range); a valid keep is left as it is."""
    from framework.decisions import _distinct_in_range

    g = torch.Generator().manual_seed(11)
    for _ in range(300):
        n = int(torch.randint(1, 30, (), generator=g))
        k = int(torch.randint(1, n + 1, (), generator=g))
        valid = torch.randperm(n, generator=g)[:k].sort().values
        assert torch.equal(_distinct_in_range(valid[None], n)[0], valid)
        faulty = torch.randint(-5, n + 5, (k,), generator=g).sort().values
        fixed = _distinct_in_range(faulty[None], torch.tensor([[n]]))[0]
        assert fixed.min() >= 0 and fixed.max() < n and bool((fixed[1:] > fixed[:-1]).all())


def test_source_groups_out_of_range_are_refused():
    g = torch.Generator().manual_seed(4)
    slots, hidden, decisions = random_case(g, 2, "equal", widths=False)
    n = int((slots.visual & slots.valid)[0].sum())
    keep = torch.as_tensor(decisions[0].keep)
    rest = torch.tensor([i for i in range(n) if i not in keep.tolist()])
    merged = torch.randn(1, hidden.shape[-1])
    decisions[0] = Decision(keep=keep, merged=merged, sources=SourceGroups(index=rest, group=torch.ones_like(rest)))
    with pytest.raises(ConfigError, match="sample 0: SourceGroups groups must lie in 0..0"):
        apply_decisions(slots, hidden, decisions)
    decisions[0] = Decision(
        keep=keep, merged=merged, sources=SourceGroups(index=rest + n, group=torch.zeros_like(rest))
    )
    with pytest.raises(ConfigError, match=f"sample 0: SourceGroups indices must lie in 0..{n - 1}"):
        apply_decisions(slots, hidden, decisions)


def _faulty(b: int, n: int, fault: str, D: int, g) -> Decision:
    """A merging decision for a sample with n visual tokens, with one fault."""
    keep, rest = torch.arange(n // 2), torch.arange(n // 2, n)
    merged = torch.randn(2, D, generator=g)
    parts = list(torch.tensor_split(rest, 2))
    if fault == "source lists":
        return Decision(keep=keep, merged=merged, sources=[parts[0], parts[1] + n])
    if fault == "SourceGroups":
        return Decision(keep=keep, merged=merged, sources=SourceGroups(rest - n, torch.arange(rest.numel()) % 2))
    if fault == "anchors":
        return Decision(keep=keep, merged=merged, sources=parts, anchors=torch.tensor([n // 2, n]))
    raise ValueError(fault)


@pytest.mark.parametrize(
    "fault,words",
    [
        ("source lists", "sources indices must lie in 0..{m}"),
        ("SourceGroups", "SourceGroups indices must lie in 0..{m}"),
        ("anchors", "anchors must lie in 0..{m}"),
    ],
)
def test_bad_sources_and_anchors_name_their_sample_when_the_checks_are_read(fault, words):
    """Checked for the whole batch at once: the message names the faulty sample (not the first), and until the
    checks are read the indices are clamped, so the prefill runs on."""
    g = torch.Generator().manual_seed(8)
    slots, hidden, decisions = random_case(g, 3, "merge", widths=False)
    n = (slots.visual & slots.valid).sum(1).tolist()
    decisions[1] = _faulty(1, n[1], fault, 5, g)
    message = f"sample 1: {words.format(m=n[1] - 1)}"
    with pytest.raises(ConfigError, match=message):
        apply_decisions(slots, hidden, decisions)
    checks = DeferredChecks()
    new, out = apply_decisions(slots, hidden, decisions, checks)
    assert out.shape[0] == 3 and all(int(m.shape[1]) == int(w.shape[1]) for m, w in zip(new.members, slots.members))
    with pytest.raises(ConfigError, match=message):
        checks.verify()


def test_merged_tokens_without_sources_or_their_anchors_are_refused_at_once():
    slots, hidden, decisions = random_case(torch.Generator().manual_seed(3), 2, "plain", widths=False)
    n = int((slots.visual & slots.valid)[1].sum())
    merged = torch.randn(2, hidden.shape[-1])
    keep = torch.arange(n - 1)
    decisions[1] = Decision(
        keep=keep, merged=merged, sources=[torch.tensor([n - 1]), torch.tensor([], dtype=torch.long)]
    )
    with pytest.raises(ConfigError, match="sample 1: merged token 1 has no sources"):
        apply_decisions(slots, hidden, decisions, DeferredChecks())
    decisions[1].anchors = torch.tensor([n - 1])
    with pytest.raises(ConfigError, match="sample 1: 1 anchors for 2 merged tokens"):
        apply_decisions(slots, hidden, decisions, DeferredChecks())
    decisions[1].anchors = torch.tensor([n - 1, 0])  # given anchors: an empty source set is allowed
    apply_decisions(slots, hidden, decisions)


def test_empty_source_groups_need_their_anchors():
    """A `SourceGroups` group left empty gives its merged token no source to take a position from: refused,
    naming the sample and the group, when the checks are read (the prefill runs on until then); with anchors
    given it is allowed."""
    g = torch.Generator().manual_seed(5)
    slots, hidden, decisions = random_case(g, 3, "plain", widths=False)
    n = (slots.visual & slots.valid).sum(1).tolist()
    merged = torch.randn(3, hidden.shape[-1], generator=g)

    def empty_group(b: int, anchors=None) -> Decision:  # groups 0 and 2 hold the rest, group 1 nothing
        rest = torch.arange(n[b] // 2, n[b])
        return Decision(
            keep=torch.arange(n[b] // 2), merged=merged, sources=SourceGroups(rest, (rest % 2) * 2), anchors=anchors
        )

    decisions[0] = empty_group(0, anchors=torch.tensor([0, 1, 2]))  # given anchors: no first source needed
    decisions[2] = empty_group(2)
    message = "sample 2: SourceGroups group 1 \\(merged token 1\\) has no sources"
    with pytest.raises(ConfigError, match=message):
        apply_decisions(slots, hidden, decisions)
    checks = DeferredChecks()
    new, _ = apply_decisions(slots, hidden, decisions, checks)
    assert [int(new.members[b].shape[0]) for b in (0, 2)] == [n[0] // 2 + 3, n[2] // 2 + 3]
    with pytest.raises(ConfigError, match=message):
        checks.verify()
    decisions[2] = empty_group(2, anchors=torch.tensor([n[2] - 1, 0, 1]))
    apply_decisions(slots, hidden, decisions)


@pytest.mark.parametrize("anchors", [True, False])
def test_merging_decisions_take_as_many_ops_at_any_batch(anchors):
    """Device-side merges (SourceGroups, as SparseVLM's recycling gives them): the checks of their sources and
    anchors and the default anchors run once for the batch, so the ops (GPU launches) do not grow with it."""

    def ops(B: int, n: int = 12, L: int = 16) -> int:
        g = torch.Generator().manual_seed(0)
        visual = torch.zeros(B, L, dtype=torch.bool)
        visual[:, 2 : 2 + n] = True
        members = [torch.eye(n, dtype=torch.bool) for _ in range(B)]
        slots = Slots(
            index=torch.arange(L).expand(B, L).clone(), valid=torch.ones_like(visual), visual=visual, members=members
        )
        decisions = []
        for _ in range(B):
            perm = torch.randperm(n, generator=g)
            rest = perm[5:9].sort().values
            sources = SourceGroups(rest, torch.tensor([0, 1, 0, 1]))
            merged = torch.randn(2, 4, generator=g)
            decisions.append(
                Decision(keep=perm[:5], merged=merged, sources=sources, anchors=rest[:2] if anchors else None)
            )
        with SyncCounter() as count:
            apply_decisions(slots, torch.randn(B, L, 4, generator=g), decisions, DeferredChecks())
        return count.ops

    assert ops(2) == ops(8)


def _on_meta(x):
    if torch.is_tensor(x):
        return x.to("meta")
    if isinstance(x, SourceGroups):
        return SourceGroups(_on_meta(x.index), _on_meta(x.group))
    if isinstance(x, (list, tuple)):
        return type(x)(_on_meta(v) for v in x)
    return x


@pytest.mark.parametrize("kind", ["plain", "equal", "merge", "groups", "in_place", "groups_in_place", "values"])
@pytest.mark.parametrize("B", [1, 3])
def test_apply_decisions_keeps_every_op_on_the_decisions_device(kind, B):
    """The meta device stands in for a GPU: every host-built index reaches it by a non-blocking copy, so
    nothing mixes a CPU tensor into a device op (which only a GPU would reject), nothing waits for the queue
    and nothing reads a value back (the checks are deferred)."""
    slots, hidden, decisions = random_case(torch.Generator().manual_seed(B), B, kind, widths=False)
    on_meta = Slots(
        index=_on_meta(slots.index),
        valid=_on_meta(slots.valid),
        visual=_on_meta(slots.visual),
        members=_on_meta(slots.members),
        _counts=slots.counts(),
    )
    fields = ("keep", "merged", "sources", "anchors", "values")
    moved = [Decision(**{f: _on_meta(getattr(d, f)) for f in fields}) for d in decisions]
    hidden_meta = _on_meta(hidden)
    with SyncCounter(sites=True) as syncs:
        new, out = apply_decisions(on_meta, hidden_meta, moved, DeferredChecks())
    assert syncs.count == 0, syncs.sites  # no read, no blocking copy, no host-built index
    want, want_out = apply_decisions(slots, hidden, decisions)
    assert out.device.type == "meta" and out.shape == want_out.shape and new.counts() == want.counts()
    assert all(m.device.type == "meta" and m.shape == w.shape for m, w in zip(new.members, want.members))
