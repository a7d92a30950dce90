"""The reduction engine: applies a reducer's decisions to a stock transformers VLM through hooks.

Three kinds of forward pre-hooks, all removed on `detach` (so a detached model is the stock model):
  * on the top-level model: learn which prompt positions are visual (from `input_ids`) and check inputs;
  * on the language model: start a prefill (slots, reducer.begin), apply `projector`-stage decisions
    to the input embeddings / 2-D mask / position ids; at decode, keep the 2-D mask and positions
    consistent with the shortened cache;
  * on every decoder layer: apply `llm`-stage decisions before chosen layers, and substitute the
    reduced mask / positions in later layers, at prefill and at every decode step.
The parts: `stages` (a prefill's state, each stage's context and decisions), `decisions` (slots, applying
decisions), `geometry` (masks, positions, decode), `accounting` (per-layer records), `attention` (rows-only
attention). Samples may keep different numbers of tokens:
they are left-padded with empty slots that no real token attends to, so each decoder layer's KV cache
holds exactly the slots that layer saw. Prefill only: decode steps never re-decide.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import torch

from .accounting import finish_records, new_records, record_stage
from .backbones import adapter_for
from .decisions import apply_decisions, initial_slots, read_prompt
from .errors import ConfigError
from .geometry import (
    StageGeometry,
    decode_layer_kwargs,
    decode_lm_kwargs,
    projector_positions,
)
from .reducer import Decision, TokenReducer
from .stages import Prefill, StageRunner

_ATTACHED: "weakref.WeakKeyDictionary[torch.nn.Module, ReductionEngine]" = weakref.WeakKeyDictionary()
"""model -> the engine attached to it: a second reducer on the same model is refused, not silently stacked."""


class ReductionEngine(StageRunner):
    """Attach a `TokenReducer` to a loaded model. Use `attach(model, reducer)` as a context manager."""

    def __init__(self, model: torch.nn.Module, reducer: TokenReducer, adapter=None, replay: bool = False):
        self.model = model
        self.reducer = reducer
        self.adapter = adapter if adapter is not None else adapter_for(model)
        if self.adapter.attn_implementation not in ("eager", "sdpa"):
            raise ConfigError(
                f"attention implementation {self.adapter.attn_implementation!r} is not supported "
                "by the reduction engine (it rebuilds 4-D masks per layer); allowed: 'eager', "
                "'sdpa' (model.set_attn_implementation('sdpa'))"
            )
        reducer.setup(self.adapter)
        self.replay = replay
        self._decisions: dict[tuple, list[Decision]] = {}
        self._handles: list = []
        self._pending: dict | None = None
        self._run: Prefill | None = None
        self._proj: StageGeometry | None = None  # projector-stage geometry, for decode
        self._stages: list[StageGeometry] = []  # llm-stage geometries, for decode
        self._step: dict = {}
        # what the reducer's own hooks learn during one forward (e.g. in the vision encoder); handed to
        # that forward's prefill as `ctx.state`, then emptied
        self._forward_state: dict = {}
        self.records: list[list[dict]] = []  # one list of per-sample records per prefill
        self.layer_set = set(reducer.decision_layers())
        self._pre_llm = reducer.stage in ("vision", "projector")

    # ------------------------------------------------------------------ attach / detach
    def attach(self) -> "ReductionEngine":
        if self._handles:
            return self
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self:
            raise ConfigError(
                f"this model already has a reducer attached ({type(other.reducer).__name__}); one reducer per "
                "model at a time: leave the first `with attach(...)` block (or call its engine's detach()) "
                "before attaching another, or compose them with strategy 'chain'"
            )
        _ATTACHED[self.model] = self
        a = self.adapter
        self._handles.extend(a.hooks())
        self._handles.append(a.top.register_forward_pre_hook(self._top_hook, with_kwargs=True))
        self._handles.append(a.language_model.register_forward_pre_hook(self._lm_hook, with_kwargs=True))
        for i, layer in enumerate(a.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        for i in sorted(self.layer_set):  # the layer before a decision: keep its projections for attention rows
            attn = a.attention_parts(i - 1)[1] if i >= 1 else None
            for kind in ("q", "k"):
                lin = getattr(attn, f"{kind}_proj", None)
                if isinstance(lin, torch.nn.Module):
                    self._handles.append(lin.register_forward_hook(self._keep_projection(i - 1, kind)))
        try:
            self._handles.extend(self.reducer.hooks(a, self._forward_state))
        except Exception:  # e.g. a strategy refusing this backbone: leave the stock model behind
            self.detach()
            raise
        return self

    def detach(self) -> None:
        self.adapter.new_prompt()  # nothing of the last prompt stays held
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._pending = self._run = self._proj = None
        self._stages, self._step = [], {}
        self._forward_state.clear()

    def __enter__(self) -> "ReductionEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def last_record(self) -> list[dict]:
        return self.records[-1] if self.records else []

    # ------------------------------------------------------------------ hooks
    def _top_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        acts = bool(self.layer_set) or self.reducer.stage != "llm"
        embeds = kwargs.get("inputs_embeds")
        if acts and input_ids is None and embeds is not None and embeds.shape[1] > 1:
            warnings.warn(
                f"{type(self.reducer).__name__} not applied: the engine finds visual tokens in "
                "input_ids, and this call passed inputs_embeds only",
                stacklevel=2,
            )
        if input_ids is None or input_ids.shape[1] == 1:
            return None
        self.adapter.new_prompt()
        self._pending = read_prompt(self.adapter, input_ids, kwargs, self._pre_llm)
        if self._pending is None and acts:
            warnings.warn(
                f"{type(self.reducer).__name__} not applied: the prompt has no visual input, so the stock "
                "model runs it",
                stacklevel=2,
            )
        return None

    def _lm_hook(self, module, args, kwargs):
        cache = kwargs.get("cache")
        embeds = kwargs.get("inputs_embeds")
        self._step = {}
        if cache is not None and cache.get_seq_length() > 0:  # a decode step
            self._run = None
            if self._proj is None:
                return None
            return args, decode_lm_kwargs(self.adapter, self.reducer.positions, self._proj, kwargs, cache)
        self._proj, self._stages, self._run = None, [], None
        pending, self._pending = self._pending, None
        if pending is None or embeds is None:
            return None
        B, L, _ = embeds.shape
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones(B, L, dtype=torch.bool, device=embeds.device)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(L, device=embeds.device)[None].expand(B, L)
        slots = initial_slots(pending, valid)
        first = valid.float().argmax(1)
        base = self.adapter.text_positions(pos).gather(1, first[:, None]).squeeze(1)
        n_valid, n_visual = slots.counts()
        run = Prefill(
            slots=slots,
            n_valid_in=valid.sum(1),
            base_pos=base,
            state=dict(self._forward_state),
            embeds=embeds,
            samples=new_records(n_visual, n_valid),
        )
        self._forward_state.clear()
        self._run = run
        self._replaying = self.replay and bool(self._decisions)  # this prefill re-applies recorded decisions
        self.records.append(run.samples)
        if self.reducer.stage == "llm":
            self._begin(self._context("projector", 0, embeds, slots))
            return None
        decisions = self._decide(("projector", 0), self._context("projector", 0, embeds, slots))
        new_slots, new_embeds = apply_decisions(slots, embeds, decisions, run.checks)
        record_stage(run.samples, 0, "projector", slots, new_slots, decisions)
        kw = {
            **kwargs,
            "inputs_embeds": new_embeds,
            "attention_mask": new_slots.valid.long(),
            "position_ids": projector_positions(self.adapter, self.reducer.positions, new_slots, pos, base),
        }
        # The reduced sequence is now the language model's input: later (llm) stages index into it.
        new_slots.index = torch.arange(new_slots.length, device=embeds.device)[None].expand_as(new_slots.index).clone()
        run.slots, run.embeds = new_slots, new_embeds
        self._proj = StageGeometry(
            0, new_slots.valid, run.n_valid_in - new_slots.n_valid(), {"orig_len": L}, _all_valid=new_slots.all_valid()
        )
        # LLM-stage members of a chain see the language model's (reduced) input from here on
        self._begin(self._context("projector", 0, new_embeds, new_slots))
        return args, kw

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            run = self._run
            h = args[0] if args else kwargs["hidden_states"]
            if run is None:  # decode step (or an unreduced prefill)
                return self._layer_decode(i, h, args, kwargs) if self._stages else None
            if i == 0:
                run.layer0 = kwargs
            if i in self.layer_set:
                h = self._llm_decision(i, h)
                run.proj.clear()
            kw = {**kwargs, **run.current.kwargs} if run.current is not None else kwargs
            run.prev = (i, h, kw)
            if i == self.adapter.num_layers - 1:
                finish_records(run.samples, self.adapter.num_layers, run.checks)
                self._run = None
            if run.current is None:
                return None
            return (h, *args[1:]) if args else (), ({**kw, "hidden_states": h} if not args else kw)

        return hook

    def _layer_decode(self, i: int, h, args, kwargs):
        geo = next((g for g in reversed(self._stages) if g.layer <= i), None)
        if geo is None:
            return None
        if geo.layer not in self._step:  # once per step for all layers sharing a geometry
            self._step[geo.layer] = decode_layer_kwargs(self.adapter, self.reducer.positions, i, h, kwargs, geo)
        return (h, *args[1:]) if args else (), {**kwargs, **self._step[geo.layer]}


@contextmanager
def attach(model: torch.nn.Module, reducer: TokenReducer, adapter=None, replay: bool = False):
    """`with attach(model, reducer) as engine: model.generate(...)`; hooks are always removed."""
    engine = ReductionEngine(model, reducer, adapter=adapter, replay=replay)
    engine.attach()
    try:
        yield engine
    finally:
        engine.detach()
