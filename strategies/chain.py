from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from framework.errors import ConfigError
from framework.reducer import TokenReducer
from framework.registry import build, register

PRE_LLM = ("vision", "projector")


@register("chain")
@dataclass
class Chain(TokenReducer):
    """Several reducers at their own stages in one model, e.g. ToMe in the vision encoder + FastV in the LLM.

    reducers: member configs (`{"name": ..., **fields}`) or built reducers, e.g.
    `{"name": "chain", "reducers": [{"name": "tome", "keep": 192}, {"name": "fastv", "layer": 2, "keep": 64}]}`.
    At most one member acts before the LLM (vision / projector stage); LLM members must use disjoint
    decision layers and all members the same `positions` mode. The projector-stage decision goes to
    the pre-LLM member, each LLM decision to the member that owns that layer; `begin`, `setup` and
    `hooks` go to every member.
    """

    reducers: list[Any] = field(default_factory=list)
    positions: str | None = None  # None: the members' common mode

    def __post_init__(self) -> None:
        if not self.reducers:
            raise ConfigError("chain needs at least one reducer in `reducers`")
        self.members = [r if isinstance(r, TokenReducer) else build(r) for r in self.reducers]
        pre = [m for m in self.members if m.stage in PRE_LLM]
        if len(pre) > 1:
            raise ConfigError(
                f"chain: at most one member may act before the LLM, got {[type(m).__name__ for m in pre]}"
            )
        modes = {m.positions for m in self.members}
        if len(modes) > 1:
            raise ConfigError(f"chain: members disagree on positions {sorted(modes)}; set the same mode on all")
        mode = modes.pop()
        if self.positions is not None and self.positions != mode:
            raise ConfigError(
                f"chain positions={self.positions!r} but its members use {mode!r}; set positions on the members"
            )
        self.positions = mode
        super().__post_init__()
        self._owner = self._layer_owners()

    def _layer_owners(self) -> dict[int, TokenReducer]:
        """Decision layer -> member; members' layers may depend on the model, so this is redone in setup."""
        seen: dict[int, TokenReducer] = {}
        for m in self.members:
            for k in m.decision_layers():
                if k in seen:
                    raise ConfigError(
                        f"chain: {type(seen[k]).__name__} and {type(m).__name__} both decide before layer {k}"
                    )
                seen[k] = m
        return seen

    stages: ClassVar[tuple[str, ...]] = ("projector", "llm")

    def choose_stage(self) -> str:
        return "projector" if any(m.stage in PRE_LLM for m in self.members) else "llm"

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self.registry_name,
            "positions": self.positions,
            "reducers": [m.config_dict() for m in self.members],
        }

    def decision_layers(self) -> list[int]:
        return sorted(self._owner)

    def setup(self, adapter) -> None:
        for m in self.members:
            m.setup(adapter)
        self._owner = self._layer_owners()

    def hooks(self, adapter, state):
        return [h for m in self.members for h in m.hooks(adapter, state)]

    def begin(self, ctx) -> None:
        for m in self.members:
            m.begin(ctx)

    def decide(self, ctx):
        if ctx.stage == "projector":
            return next(m for m in self.members if m.stage in PRE_LLM).decide(ctx)
        return self._owner[ctx.layer].decide(ctx)
