"""framework.merging's selection helpers without host reads: DivPrune's farthest points (batched == alone ==
the host loop it replaced) and VisionZip's contextual merge (== its nonzero / one_hot form)."""

from __future__ import annotations

import math

import torch

from framework import attach, build
from framework.merging import contextual_merge, farthest_point_selection, farthest_points
from framework.syncs import SyncCounter
from tests.tiny import llava_inputs, make_llava, positions


def host_loop_farthest(x: torch.Tensor, k: int) -> list[int]:
    """The former `farthest_point_selection`: reads each pick on the host."""
    N = x.shape[0]
    xn = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1.0 - xn @ xn.T
    if N == 1:
        return [0]
    off = dist + torch.diag(torch.full((N,), math.inf))
    chosen = [int(torch.argmax(off.min(dim=1).values))]
    mind = dist[chosen[0]].clone()
    taken = torch.zeros(N, dtype=torch.bool)
    taken[chosen[0]] = True
    for _ in range(min(k, N) - 1):
        i = int(torch.argmax(mind.masked_fill(taken, -math.inf)))
        chosen.append(i)
        taken[i] = True
        mind = torch.minimum(mind, dist[i])
    return sorted(chosen)


def _samples(seed: int, n: int = 30) -> list[torch.Tensor]:
    """Tokens with exact ties (rounded, duplicated), a zero token, and one sample with a NaN token."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for s in range(4):
        x = torch.randn(n, 5, generator=g).round()
        x[n - 4 :] = x[:4].clone()
        x[s] = 0.0
        if s == 3:
            x[7, 1] = math.nan
        xs.append(x)
    return xs


def test_farthest_points_batched_equals_alone_and_the_host_loop():
    for seed in range(3):
        xs = _samples(seed)
        for k in (1, 2, 9, 30):
            batched = farthest_points(xs, k)
            assert batched.shape == (len(xs), k)
            for s, x in enumerate(xs):
                assert farthest_point_selection(x, k).tolist() == batched[s].tolist() == host_loop_farthest(x, k)
    one = torch.randn(1, 4)
    assert farthest_point_selection(one, 3).tolist() == [0]


def test_selection_helpers_read_nothing_on_the_host():
    xs = _samples(0)
    hidden, metric = torch.randn(23, 6), torch.randn(23, 4)
    with SyncCounter(sites=True) as syncs:
        farthest_points(xs, 12)
        farthest_point_selection(xs[0], 5)
        contextual_merge(hidden, metric, 5)
    assert syncs.count == 0, syncs.sites


def test_contextual_merge_equals_its_nonzero_one_hot_form():
    g = torch.Generator().manual_seed(2)
    for R, n_ctx in [(23, 5), (10, 10), (7, 3), (1, 1), (40, 1)]:
        for dtype in (torch.float32, torch.bfloat16):
            hidden = torch.randn(R, 6, generator=g).to(dtype)
            metric = torch.randn(R, 4, generator=g).round()  # ties between targets
            tok, targets, assign = contextual_merge(hidden, metric, n_ctx)
            is_t = torch.zeros(R, dtype=torch.bool)
            is_t[targets] = True
            others = torch.nonzero(~is_t).flatten()
            m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            a = (m[others] @ m[targets].T).argmax(dim=1)
            assert torch.equal(assign[others], a) and torch.equal(assign[targets], torch.arange(len(targets)))
            ref = hidden[targets].clone()
            if others.numel():
                onehot = torch.nn.functional.one_hot(a, len(targets)).to(dtype)
                ref = ref + (onehot.T @ hidden[others]) / onehot.sum(0).clamp(min=1)[:, None]
            assert tok.dtype == dtype and torch.equal(tok, ref)


def test_divprune_batch_equals_alone():
    """Samples of one batch share a greedy loop; each keeps what it keeps alone (the rule on its projected
    visual tokens)."""
    model = make_llava(layers=4, grid=8)
    x = llava_inputs(model, [(3, 7), (1, 4), (6, 0)])
    with torch.no_grad():
        proj = model.model.get_image_features(pixel_values=x["pixel_values"]).pooler_output
        with attach(model, build({"name": "divprune", "keep": 10})) as eng:
            model(**x, position_ids=positions(x["attention_mask"]))
    for b, rec in enumerate(eng.last_record):
        assert rec["stages"][0]["kept"] == farthest_point_selection(proj[b], 10).tolist()
