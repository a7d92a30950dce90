"""How a prefill's stages decide: the per-prefill state, each stage's context for the reducer, its decisions
(recorded and replayed when asked), and applying an `llm`-stage decision to the hidden states and geometry.
`ReductionEngine` (engine.py) inherits this and owns the hooks that call it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .accounting import record_stage
from .attention import attention_source
from .checks import DeferredChecks
from .context import Slots, StageContext
from .decisions import apply_decisions
from .geometry import StageGeometry, llm_stage_geometry
from .reducer import Decision


@dataclass
class Prefill:
    """One prefill's state: slots, records, the geometry of its latest stage, the projections kept."""

    slots: Slots
    n_valid_in: torch.Tensor
    base_pos: torch.Tensor
    state: dict
    embeds: torch.Tensor
    samples: list[dict]
    layer0: dict | None = None  # the kwargs layer 0 received (cos/sin, position ids, mask)
    prev: tuple | None = None  # (layer index, input hidden, effective kwargs) of the last layer run
    proj: dict = field(default_factory=dict)  # (layer, "q"|"k") -> that layer's q/k_proj output (B, L, H*hd)
    current: StageGeometry | None = None
    checks: DeferredChecks = field(default_factory=DeferredChecks)  # read with the records at the end


class StageRunner:
    """The deciding half of `ReductionEngine`: uses its `adapter`, `reducer`, `replay`, `_run`, `_stages`,
    `_decisions` and `_replaying` attributes."""

    def _begin(self, ctx: StageContext) -> None:
        """Start the prefill's LLM part: the reducer's `begin`; the LM input's token counts."""
        if not self._replaying:
            self.reducer.begin(ctx)
        run = self._run
        run.n_valid_in = run.slots.n_valid()
        for s, n in zip(run.samples, run.slots.counts()[0]):
            s["tokens_lm_input"] = n

    def _keep_projection(self, layer: int, kind: str):
        """Forward hook: during a prefill, remember the layer's q/k projections (a reference, no copy) so the
        decision after it gets its attention rows without re-projecting (`StageContext.attention`)."""

        def hook(module, args, out):
            if self._run is not None:
                self._run.proj[(layer, kind)] = out

        return hook

    def _llm_decision(self, i: int, h: torch.Tensor) -> torch.Tensor:
        run = self._run
        decisions = self._decide(("llm", i), self._context("llm", i, h, run.slots))
        new_slots, new_h = apply_decisions(run.slots, h, decisions, run.checks)
        record_stage(run.samples, i, "llm", run.slots, new_slots, decisions)
        run.slots = new_slots
        run.current = llm_stage_geometry(
            self.adapter,
            self.reducer.positions,
            i,
            new_slots,
            new_h,
            run.layer0,
            run.base_pos,
            run.n_valid_in - new_slots.n_valid(),
        )
        self._stages.append(run.current)
        return new_h

    def _context(self, stage: str, layer: int, hidden, slots) -> StageContext:
        run = self._run
        return StageContext(
            stage=stage,
            layer=layer,
            hidden=hidden,
            slots=slots,
            adapter=self.adapter,
            state=run.state,
            embeds=run.embeds,
            checks=run.checks,
            _attn_source=attention_source(self.adapter, run, layer, hidden),
        )

    def _decide(self, key: tuple, ctx: StageContext) -> list[Decision]:
        if self.replay and key in self._decisions:
            return self._decisions[key]
        decisions = self.reducer.decide(ctx)
        if len(decisions) != ctx.batch_size:
            raise RuntimeError(
                f"{type(self.reducer).__name__}.decide returned {len(decisions)} decisions "
                f"for a batch of {ctx.batch_size}"
            )
        if self.replay:
            self._decisions[key] = decisions
        return decisions
