"""The vision stage's plans (framework/vision.py): the batched tensor forms give exactly what the rule
per group gives (the form they replaced, written here as the reference)."""

from types import SimpleNamespace

import pytest
import torch

from framework.merging import merge_to
from framework.vision import UnitPlans, broadcast_groups, plan_decisions, plans_from_source


def _reference_decisions(group: torch.Tensor, maps: list[torch.Tensor]):
    """Per sample, (keep, sources, sizes) by the rule itself: visual tokens from one unit group form one
    token kept at its first; tokens from no feature stand alone; tokens from slots in no group go."""
    n_units, per_unit = group.shape
    gid = torch.where(group >= 0, group + torch.arange(n_units)[:, None] * per_unit, -1).flatten().tolist()
    out = []
    for m in maps:
        groups: dict = {}
        for t, f in enumerate(m.tolist()):
            key = ("own", t) if f < 0 else gid[f]
            if key != -1:
                groups.setdefault(key, []).append(t)
        members = sorted(groups.values())
        out.append(([g[0] for g in members], members, [len(g) for g in members]))
    return out


def _ctx(maps):
    return SimpleNamespace(hidden=torch.zeros(1), batch_size=len(maps), vision_map=lambda b: maps[b])


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    n_units, per_unit, n_groups = 5, 12, 12
    group = torch.randint(-1, 6, (n_units, per_unit), generator=g)  # -1: a slot in no group
    maps = []
    for units in ([0, 1], [2], [3, 4]):  # a sample's tokens: its units' slots in some order, newlines (-1)
        feats = torch.cat([u * per_unit + torch.randperm(per_unit, generator=g) for u in units])
        m = torch.cat([feats, torch.full((4,), -1)])
        maps.append(m[torch.randperm(m.numel(), generator=g)])
    return UnitPlans(group, n_groups), maps


@pytest.mark.parametrize("seed", range(4))
def test_plan_decisions_match_the_rule_per_group(seed):
    plans, maps = _random_case(seed)
    got = plan_decisions(_ctx(maps), plans, plans.group.shape[1], "test")
    for d, (keep, members, sizes) in zip(got, _reference_decisions(plans.group, maps)):
        assert d.keep.dtype == torch.long and d.keep.tolist() == keep
        assert [s.tolist() for s in d.sources] == members and all(s.dtype == torch.long for s in d.sources)
        assert d.record == {"sizes": sizes}


def test_plan_decisions_refuse_tokens_of_units_beyond_the_plans():
    plans, maps = _random_case(0)
    few = UnitPlans(plans.group[:4], plans.n_groups)  # the last sample's tokens name unit 4
    with pytest.raises(RuntimeError, match="4 encoder plans but the prompts hold tokens of more units"):
        plan_decisions(_ctx(maps), few, plans.group.shape[1], "test")
    with pytest.raises(RuntimeError, match="share an encoder unit's tokens between samples"):
        plan_decisions(_ctx([maps[0], maps[0]]), plans, plans.group.shape[1], "test")
    with pytest.raises(RuntimeError, match="no vision-side plan"):
        plan_decisions(_ctx(maps), None, plans.group.shape[1], "test")


@pytest.mark.parametrize("drop_cls", [True, False])
def test_plans_from_source_and_broadcast(drop_cls):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=g)  # CLS + 16 patches per image
    merged, _, source = merge_to(x, 7, protected=1)
    plans = plans_from_source(source, drop_cls)
    c = 1 if drop_cls else 0
    assert plans.n_groups == 7 - c and plans.group.shape == (3, 17 - c)
    values = merged[:, c:]
    out = broadcast_groups(values, plans)
    for i in range(3):
        rows = source[i, c:, c:].bool()  # group k = source row k, in feature slots
        for k, row in enumerate(rows):
            assert plans.group[i, row].eq(k).all()
            assert torch.equal(out[i, row], values[i, k].expand(int(row.sum()), -1))
    # a slot in no group gets zeros
    plans.group[0, 2] = -1
    assert torch.equal(broadcast_groups(values, plans)[0, 2], torch.zeros(8))
