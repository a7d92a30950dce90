"""DPC-kNN recycling: distances that do not depend on a common offset, and the official cluster order."""

import pytest
import torch

import framework.clustering as clustering
from framework.clustering import cluster_and_merge, dpc_knn, scaled_distances
from framework.syncs import SyncCounter


def _reference_distances(x: torch.Tensor) -> torch.Tensor:
    """Direct differences in float64, divided by sqrt(D), rounded to float32 once."""
    x = x.double()
    return ((x[:, None] - x[None]).pow(2).sum(-1).sqrt() / x.shape[-1] ** 0.5).float()


def _gram_distances(x: torch.Tensor) -> torch.Tensor:
    """The fp32 |x|^2 + |y|^2 - 2xy form (what the offset breaks)."""
    x = x.float()
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2.sqrt() / x.shape[-1] ** 0.5


def _offset_cases(n_cases=30, n=60, d=256, offset=50.0):
    """Random tokens (spread 1 per channel) sharing a common component of 50x their spread."""
    g = torch.Generator().manual_seed(0)
    for _ in range(n_cases):
        x = torch.randn(n, d, generator=g) + offset * torch.randn(d, generator=g)
        yield x


def _partition(monkeypatch, x, distances, c=5):
    with monkeypatch.context() as m:
        m.setattr(clustering, "scaled_distances", distances)
        labels, centres = dpc_knn(x, c)
    return labels.tolist(), centres.tolist()


def test_distances_do_not_depend_on_a_shared_offset(monkeypatch):
    agree, gram_agree = 0, 0
    for x in _offset_cases():
        ref = _reference_distances(x)
        assert torch.allclose(scaled_distances(x), ref, rtol=1e-5, atol=1e-6)
        want = _partition(monkeypatch, x, _reference_distances)
        agree += dpc_knn(x, 5)[0].tolist() == want[0] and dpc_knn(x, 5)[1].tolist() == want[1]
        gram_agree += _partition(monkeypatch, x, _gram_distances) == want
    assert agree == 30
    # the offset is large enough to matter: with the fp32 Gram form only 19 of these 30 partitions agree
    assert gram_agree < 27, gram_agree


def test_offset_invariance_of_the_partition():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 32, generator=g)
    labels, centres = dpc_knn(x, 4)
    shifted = x + 10.0 * torch.randn(32, generator=g)  # a common component of 10x the spread
    l2, c2 = dpc_knn(shifted, 4)
    assert l2.tolist() == labels.tolist() and c2.tolist() == centres.tolist()


def test_merged_tokens_follow_the_official_centre_order():
    # 1-D, C = k = 2. kNN densities (self + nearest): points 0,1: exp(-0.125); points 2,3,4: exp(-0.02).
    # Densest: point 2 (ties -> lower index), delta = max distance 10.4; point 0: delta 10 (to point 2);
    # point 1: delta 0.5; points 3, 4: delta 0.2. rho * delta: [8.82, 0.44, 10.19, 0.20, 0.20].
    # Official (topk) order: centre 2 first, then centre 0; ascending index would put centre 0 first.
    x = torch.tensor([[0.0], [0.5], [10.0], [10.2], [10.4]])
    labels, centres = dpc_knn(x, 2)
    assert centres.tolist() == [2, 0]
    assert labels.tolist() == [1, 1, 0, 0, 0]
    merged, sources, centres = cluster_and_merge(x, 2)
    assert torch.allclose(merged, torch.tensor([[10.2], [0.25]]))
    assert [s.tolist() for s in sources] == [[2, 3, 4], [0, 1]]
    assert centres.tolist() == [2, 0]


@pytest.mark.parametrize("assign", ["euclidean", "cosine"])
def test_centres_are_sorted_by_density_times_distance(assign):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 16, generator=g)
    labels, centres = dpc_knn(x, 6, assign=assign)
    dist = _reference_distances(x)
    rho = torch.exp(-(torch.topk(dist, 6, largest=False).values ** 2).mean(-1))
    idx = torch.arange(50)
    denser = (rho[None] > rho[:, None]) | ((rho[None] == rho[:, None]) & (idx[None] < idx[:, None]))
    delta = torch.where(denser, dist, torch.inf).min(-1).values
    delta = torch.where(denser.any(-1), delta, dist.max())
    score = (rho * delta)[centres]
    assert bool((score[:-1] >= score[1:]).all())
    assert labels[centres].tolist() == list(range(6))


def _dpc_mask_reference(x: torch.Tensor, C: int):
    """DPC-kNN with the explicit N x N "denser" mask (larger rho, or equal rho at a lower index)."""
    N = x.shape[0]
    dist = scaled_distances(x)
    rho = torch.exp(-(torch.topk(dist, C, dim=-1, largest=False).values ** 2).mean(-1))
    idx = torch.arange(N)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    delta = dist.masked_fill(~denser, float("inf")).min(-1).values
    delta = torch.where(denser.any(-1), delta, dist.max())
    centres = torch.sort(rho * delta, descending=True, stable=True).indices[:C]
    labels = torch.argmin(dist[:, centres], dim=-1)
    labels[centres] = torch.arange(C)
    return labels, centres


@pytest.mark.parametrize("dup", [False, True])
def test_density_order_matches_the_denser_mask(dup):
    """delta from the density-sorted running minimum equals the masked minimum over denser points,
    ties in rho (duplicated points) included."""
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 5, 17, 60):
        x = torch.randn(n, 8, generator=g)
        if dup and n > 2:
            x[1::3] = x[0]  # equal rows: equal rho, order by index
        for c in {1, 2, max(1, n // 4)}:
            labels, centres = dpc_knn(x, c)
            ref_labels, ref_centres = _dpc_mask_reference(x, min(c, n))
            assert torch.equal(labels, ref_labels) and torch.equal(centres, ref_centres)
            merged, sources, cen = cluster_and_merge(x, c, ids=torch.arange(n) + 100)
            assert torch.equal(cen, ref_centres + 100)
            assert [s.tolist() for s in sources] == [
                (torch.nonzero(ref_labels == i).flatten() + 100).tolist() for i in range(min(c, n))
            ]


@pytest.mark.parametrize("n", [5, 40, 154])
def test_k_smallest_equals_topk(n):
    """The CPU path (numpy's sort past a few dozen columns) returns topk's values in topk's order,
    ties (duplicate points, zero distances) included."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 24, generator=g).round()  # coarse values: many equal distances
    x[1] = x[0]
    dist = scaled_distances(x)
    for k in (1, 2, n // 3 + 1, n):
        ref = torch.topk(dist, k, dim=-1, largest=False).values
        assert torch.equal(clustering.k_smallest(dist, k), ref)


@pytest.mark.parametrize("assign", ["euclidean", "cosine"])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_a_batch_clusters_each_sample_as_alone(assign, merge):
    """cluster on (G, N, D) equals cluster on each (N, D) bit for bit: merged tokens, labels and centres,
    one cluster and tied (duplicated) points included."""
    g = torch.Generator().manual_seed(7)
    for n, d in ((1, 8), (6, 8), (40, 64), (151, 256)):
        x = torch.randn(3, n, d, generator=g) * 3 + 5
        if n > 4:
            x[1, 1::3] = x[1, 0]
        for c in {1, 2, max(1, n // 10)}:
            merged, labels, centres = clustering.cluster(x, c, merge=merge, assign=assign)
            for i in range(3):
                m1, l1, c1 = clustering.cluster(x[i], c, merge=merge, assign=assign)
                assert torch.equal(merged[i], m1) and torch.equal(labels[i], l1) and torch.equal(centres[i], c1)


@pytest.mark.parametrize("assign", ["euclidean", "cosine"])
def test_clustering_keeps_every_op_on_the_points_device(assign):
    """The meta device stands in for a GPU: no host tensor enters a device op, nothing is read back."""
    for shape in ((3, 40, 16), (40, 16)):
        with SyncCounter(sites=True) as syncs:
            merged, labels, centres = clustering.cluster(torch.randn(*shape, device="meta"), 5, assign=assign)
        assert syncs.count == 0, syncs.sites
        lead = shape[:-2]
        assert merged.device.type == labels.device.type == centres.device.type == "meta"
        assert merged.shape == (*lead, 5, 16) and labels.shape == shape[:-1] and centres.shape == (*lead, 5)
