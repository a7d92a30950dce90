"""CDPruner: fast greedy DPP MAP == naive log-det greedy == the host loop it replaced (stop and fill included,
batched == alone, no host reads), the conditional kernel, relevance, exact budgets, batch == alone on a tiny
LLaVA."""

import math

import pytest
import torch

from framework import ConfigError, attach, build
from framework.accounting import account
from framework.syncs import SyncCounter
from strategies.cdpruner import conditional_kernel, dpp_greedy_map, instruction_relevance
from tests.tiny import alone, llava_inputs, make_llava, positions


def naive_greedy(L: torch.Tensor, k: int) -> list[int]:
    """Each step adds the item whose inclusion gives the largest log det(L_S) (ties -> lower index)."""
    L = L.double()
    chosen: list[int] = []
    for _ in range(k):
        best, best_j = -math.inf, None
        for j in range(L.shape[0]):
            if j in chosen:
                continue
            idx = torch.tensor(chosen + [j])
            sign, logdet = torch.linalg.slogdet(L[idx][:, idx])
            value = float(logdet) if float(sign) > 0 else -math.inf
            if value > best + 1e-9:
                best, best_j = value, j
        chosen.append(best_j)
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_fast_greedy_equals_naive_log_det_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(14, 24, generator=g)
    r = torch.rand(14, generator=g, dtype=torch.float64) + 0.05
    L = conditional_kernel(x, r)
    assert dpp_greedy_map(L, 9).tolist() == naive_greedy(L, 9)


def test_constant_relevance_is_plain_dpp_diversity():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 12, generator=g)
    plain = dpp_greedy_map(conditional_kernel(x, torch.ones(16)), 10).tolist()
    assert dpp_greedy_map(conditional_kernel(x, torch.full((16,), 0.3)), 10).tolist() == plain
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    assert plain == naive_greedy(xn @ xn.T, 10)
    # a non-constant relevance changes the picks (the condition matters)
    r = torch.linspace(0.05, 1.0, 16, dtype=torch.float64)
    assert dpp_greedy_map(conditional_kernel(x, r), 10).tolist() != plain


def test_kernel_and_relevance_worked_example():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0]])
    a = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)], dtype=torch.float64)  # cosines to the instruction
    assert torch.allclose(instruction_relevance(v, t), (a + 1e-6) / 1.0)
    assert torch.allclose(instruction_relevance(v, t, negate=True), (-a + 1 + 1e-6) / 1.0)
    assert torch.equal(instruction_relevance(v, t[:0]), torch.ones(3, dtype=torch.float64))
    r = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    S = torch.tensor(
        [[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]],
        dtype=torch.float64,
    )
    assert torch.allclose(conditional_kernel(v, r), r[:, None] * S * r[None, :])


def test_budget_exact_on_a_singular_kernel():
    """Duplicated tokens make L singular: the picks stay distinct and exactly k, the duplicates last."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, generator=g)
    x = torch.cat([base, base, base[:2]])  # 10 tokens, rank 4
    r = torch.ones(10)
    for k in (1, 4, 7, 10):
        picks = dpp_greedy_map(conditional_kernel(x, r), k)
        assert picks.numel() == k and picks.unique().numel() == k
    first4 = dpp_greedy_map(conditional_kernel(x, r), 4).tolist()
    assert sorted(first4) == [0, 1, 2, 3]  # one of each distinct token before any duplicate


def host_loop_greedy(L: torch.Tensor, k: int, tol: float = 1e-10) -> list[int]:
    """The former `dpp_greedy_map`: reads each pick on the host and stops the gain loop there."""
    L = L.double()
    n = L.shape[0]
    diag = torch.diagonal(L).clone()
    d2 = diag.clone()
    cis = torch.zeros(k, n, dtype=L.dtype)
    taken = torch.zeros(n, dtype=torch.bool)
    floor = tol * float(diag.max().clamp(min=0.0))
    picks, degenerate = [], False
    for i in range(k):
        gains = d2.masked_fill(taken, -math.inf)
        j = int(torch.argmax(gains))
        degenerate = degenerate or float(gains[j]) <= floor
        if degenerate:  # no volume left to gain: fill by quality
            j = int(torch.argmax(diag.masked_fill(taken, -math.inf)))
        else:
            cis[i] = (L[j] - cis[:i, j] @ cis[:i]) / math.sqrt(float(d2[j]))
            d2 = d2 - cis[i] * cis[i]
        picks.append(j)
        taken[j] = True
    return picks


def _kernels(seed: int, n: int = 24, samples: int = 5) -> torch.Tensor:
    """Kernels with duplicate tokens (sample s has rank n - 3s - 1: the gain loop stops after 23, 20, 17, 14
    picks), tied relevances, a zero token and a NaN relevance (the last sample), stacked (samples, n, n)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(samples):
        x = torch.randn(n, 32, generator=g).round()
        x[n - 3 * s - 1 :] = x[: 3 * s + 1].clone()  # rank <= n - 3s - 1
        x[s] = 0.0
        r = (torch.rand(n, generator=g, dtype=torch.float64) + 0.05).round(decimals=1)
        if s == samples - 1:
            r[2] = math.nan
        out.append(conditional_kernel(x, r))
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(3))
def test_device_loop_equals_the_host_loop_batched_or_alone(seed):
    L = _kernels(seed)
    for k in (1, 5, 18, 24):
        batched = dpp_greedy_map(L, k)
        assert batched.shape == (L.shape[0], k)
        for s in range(L.shape[0]):
            assert dpp_greedy_map(L[s], k).tolist() == batched[s].tolist() == host_loop_greedy(L[s], k)


def test_greedy_map_reads_nothing_on_the_host():
    L = _kernels(0)
    v, t = torch.randn(10, 4), torch.randn(3, 4)
    with SyncCounter(sites=True) as syncs:
        dpp_greedy_map(L, 20)  # the gain loop stops inside the budget on three of the samples
        dpp_greedy_map(L[0], 3)
        instruction_relevance(v, t)
        flat = instruction_relevance(torch.ones(10, 4), t)  # every token equally relevant
    assert syncs.count == 0, syncs.sites
    assert torch.equal(flat, torch.ones(10, dtype=torch.float64))


def test_config_errors():
    for cfg, message in [
        ({"relevance": "clip"}, "relevance='clip'"),
        ({"theta": 1.0}, "theta=1.0"),
        ({"preset": 100}, "preset=100"),
        ({"keep": 0}, "keep"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build({"name": "cdpruner", **cfg})


# ---------------------------------------------------------------- on a tiny LLaVA (64 visual tokens)
PROMPTS = [(3, 7), (1, 4), (6, 0)]  # the last prompt has no instruction after the image


@pytest.fixture(scope="module")
def llava8():
    return make_llava(layers=4, grid=8)


@pytest.mark.parametrize(
    "cfg,kept",
    [
        ({"keep": 10}, 10),
        ({"preset": 64}, 7),
        ({"keep": 0.5}, 32),
        ({"keep": 12, "relevance": "none"}, 12),
        ({"keep": 9, "negate": True, "theta": 0.5}, 9),
    ],
)
def test_batch_equals_alone_and_budget(llava8, cfg, kept):
    x = llava_inputs(llava8, PROMPTS)
    reducer = build({"name": "cdpruner", **cfg})
    with torch.no_grad(), attach(llava8, reducer) as eng:
        out = llava8(**x, position_ids=positions(x["attention_mask"]))
    rec = eng.last_record
    assert [r["visual_per_layer"] for r in rec] == [[kept] * 4] * 3
    assert [a.equivalent_tokens for a in account(eng)] == [kept] * 3
    assert [r["stages"][0]["no_instruction"] for r in rec] == [False, False, cfg.get("relevance") != "none"]
    for b in range(len(PROMPTS)):
        xa = alone(x, b)
        with torch.no_grad(), attach(llava8, build({"name": "cdpruner", **cfg})) as eng1:
            o = llava8(**xa)
        assert (o.logits[0, -1] - out.logits[b, -1]).abs().max() < 1e-5
        assert eng1.last_record[0]["stages"][0]["groups"] == rec[b]["stages"][0]["groups"]


def test_instruction_changes_the_selection(llava8):
    """Same image, different instructions -> different kept tokens (the relevance conditions the DPP)."""
    x = llava_inputs(llava8, [(3, 7)], seed=0)
    y = {**x, "input_ids": x["input_ids"].clone()}
    y["input_ids"][0, -7:] = torch.randint(3, 90, (7,), generator=torch.Generator().manual_seed(5))
    kept = []
    for inp in (x, y):
        with torch.no_grad(), attach(llava8, build({"name": "cdpruner", "keep": 8})) as eng:
            llava8(**inp)
        kept.append(eng.last_record[0]["stages"][0]["groups"])
    assert kept[0] != kept[1]
