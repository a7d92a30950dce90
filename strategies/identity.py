from dataclasses import dataclass

from framework.reducer import Decision, TokenReducer
from framework.registry import register


@register("none")
@dataclass
class Identity(TokenReducer):
    """No reduction: the stock model, bit for bit (the baseline every ratio is measured against)."""

    @classmethod
    def for_budget(cls, fields, budget, n_visual):
        return None  # nothing is reduced: no budget applies

    def decide(self, ctx) -> list[Decision]:  # never called: no decision points
        raise AssertionError("the identity reducer has no decision points")
