"""Visual-token budgets: one reference count, the nearest-preset rule, and applying a sweep budget.

A sweep gives a budget as a count of visual tokens; each strategy maps it to its own fields with the
classmethod `TokenReducer.for_budget` (default: `keep` receives the count). Presets quoted in the papers
are for LLaVA-1.5's 576 visual tokens (`REFERENCE_VISUAL_TOKENS`) and are scaled to other models.
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConfigError

REFERENCE_VISUAL_TOKENS = 576  # LLaVA-1.5: the token count the papers' 192 / 128 / 64 budgets refer to
REFERENCE_LAYERS = 32  # LLaVA-1.5-7B: the decoder depth the papers' layer schedules refer to


def scale_to_depth(layers: list[int], n_layers: int, last: int, what: str = "layers", first: int = 0) -> list[int]:
    """A layer schedule quoted for 32 decoder layers -> this depth: each index x n_layers / 32, rounded half up,
    at least ``first``, kept strictly increasing; an index beyond ``last`` is an error."""
    out: list[int] = []
    for layer in layers:
        v = int(layer * n_layers / REFERENCE_LAYERS + 0.5)
        out.append(max(v, out[-1] + 1) if out else max(v, first))
    if out and out[-1] > last:
        raise ConfigError(f"cannot place {len(layers)} {what} in a {n_layers}-layer decoder")
    return out


def nearest_preset(presets: Mapping[Any, Any], budget: int, n_visual: int, what: str = "this strategy"):
    """The preset key (quoted for 576 visual tokens) nearest to budget x 576 / n_visual, in the table's
    key type; a budget more than 15 % from every preset is an error listing the budgets that fit."""
    ref = REFERENCE_VISUAL_TOKENS
    target = budget * ref / n_visual
    best = min(presets, key=lambda p: abs(int(p) - target))
    if abs(int(best) - target) > 0.15 * int(best):  # never snap a budget silently to a far preset
        allowed = sorted({round(int(p) * n_visual / ref) for p in presets})
        raise ConfigError(
            f"budget {budget} of {n_visual} visual tokens matches no preset of {what} "
            f"({sorted(int(p) for p in presets)} of {ref}); allowed budgets: {allowed}, "
            "or set the strategy's own fields"
        )
    return best


def apply_budget(cfg: Any, budget: int | None, n_visual: int) -> tuple[dict, int | None]:
    """A strategy config (name or mapping) with a budget of visual tokens applied through its class's
    `for_budget` -> (fields with 'name', the budget used: None when none was given or the strategy
    sets its own count). Budgets outside 1..n_visual are a ConfigError."""
    from .registry import strategy_fields

    cls, fields = strategy_fields(cfg)
    name = cls.registry_name
    if budget is None:
        return {"name": name, **fields}, None
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ConfigError(f"budget must be a count of visual tokens (int), got {budget!r}")
    if not 1 <= budget <= n_visual:
        raise ConfigError(
            f"budget {budget} is not allowed: the backbone has {n_visual} visual tokens; allowed 1..{n_visual}"
        )
    mapped = cls.for_budget(dict(fields), budget, n_visual)
    if mapped is None:
        return {"name": name, **fields}, None
    return {"name": name, **mapped}, budget
