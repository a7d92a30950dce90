"""The reduction engine: applies a reducer's decisions to a stock transformers VLM through hooks.

Three kinds of forward pre-hooks, all removed on `detach` (so a detached model is the stock model):
  * on the top-level model: learn which prompt positions are visual (from `input_ids`) and check inputs;
  * on the language model: start a prefill (slots, reducer.begin), apply `projector`-stage decisions
    to the input embeddings / 2-D mask / position ids; at decode, keep the 2-D mask and positions
    consistent with the shortened cache;
  * on every decoder layer: apply `llm`-stage decisions before chosen layers (gather hidden states,
    RoPE cos/sin, rebuild the 4-D mask), and substitute the same mask/positions in later layers, at
    prefill and at every decode step.
Samples may keep different numbers of tokens: they are left-padded with empty slots that no real
token attends to. Each decoder layer's KV cache therefore holds exactly the slots that layer saw.
Prefill only: decode steps never re-decide.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .attention import gather_rows
from .backbones import adapter_for
from .context import Grid, Slots, StageContext
from .errors import ConfigError
from .reducer import Decision, TokenReducer


@dataclass
class StageGeometry:
    """What decode steps need to know about the slots that layers from `layer` on hold."""

    layer: int
    valid: torch.Tensor  # (B, L')
    removed: torch.Tensor  # (B,) valid tokens removed so far (for `repack` decode positions)
    kwargs: dict = field(default_factory=dict)  # prefill substitutions for layers >= layer


@dataclass
class _Prefill:
    slots: Slots
    n_valid_in: torch.Tensor
    base_pos: torch.Tensor
    state: dict
    embeds: torch.Tensor
    layer0: dict | None = None  # the kwargs layer 0 received (cos/sin, position ids, mask)
    prev: tuple | None = None  # (layer index, input hidden, effective kwargs) of the last layer run
    proj: dict = field(default_factory=dict)  # (layer, "q"|"k") -> that layer's q/k_proj output (B, L, H*hd)
    current: StageGeometry | None = None
    samples: list[dict] = field(default_factory=list)


class ReductionEngine:
    """Attach a `TokenReducer` to a loaded model. Use `attach(model, reducer)` as a context manager."""

    def __init__(self, model: torch.nn.Module, reducer: TokenReducer, adapter=None, replay: bool = False):
        self.model = model
        self.reducer = reducer
        self.adapter = adapter if adapter is not None else adapter_for(model)
        if self.adapter.attn_implementation not in ("eager", "sdpa"):
            raise ConfigError(f"attention implementation {self.adapter.attn_implementation!r} is not supported "
                              "by the reduction engine (it rebuilds 4-D masks per layer); allowed: 'eager', "
                              "'sdpa' (model.set_attn_implementation('sdpa'))")
        reducer.setup(self.adapter)
        self.replay = replay
        self._decisions: dict[tuple, list[Decision]] = {}
        self._handles: list = []
        self._pending: dict | None = None
        self._run: _Prefill | None = None
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
        pixels = self.adapter.has_visual_input(kwargs)
        acts = bool(self.layer_set) or self.reducer.stage != "llm"
        if acts and input_ids is None and kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1:
            warnings.warn(f"{type(self.reducer).__name__} not applied: the engine finds visual tokens in "
                          "input_ids, and this call passed inputs_embeds only", stacklevel=2)
        if input_ids is None or input_ids.shape[1] == 1:
            return None
        if not pixels:
            self._pending = None
            return None
        self.adapter.check_inputs(input_ids, kwargs)
        self._pending = {"visual": self.adapter.visual_mask(input_ids, kwargs)}
        a = self.adapter
        self._pending["spans"] = a.visual_spans(input_ids, kwargs, self._pending["visual"])  # image/frame ids
        self._pending["grids"] = a.visual_grids(input_ids, kwargs)  # per sample, Grids of sequence positions
        self._pending["vision_map"] = a.vision_token_map(input_ids, kwargs) if self._pre_llm else None
        return None

    def _lm_hook(self, module, args, kwargs):
        cache = kwargs.get("cache")
        embeds = kwargs.get("inputs_embeds")
        prefill = cache is None or cache.get_seq_length() == 0
        self._step = {}
        if not prefill:
            self._run = None
            return self._lm_decode(args, kwargs, cache) if self._proj is not None else None
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
        visual = pending["visual"] & valid
        n_vis = visual.sum(1)
        members = [torch.eye(int(n), dtype=torch.bool, device=embeds.device) for n in n_vis]
        slots = Slots(index=torch.arange(L, device=embeds.device)[None].expand(B, L).clone(),
                      valid=valid, visual=visual, members=members,
                      span=None if pending.get("spans") is None else [sp[v] for sp, v in zip(pending["spans"], visual)])
        slots.grids, slots.cls = _visual_grids(pending.get("grids"), visual)
        vmap = pending.get("vision_map")
        slots.vision_map = None if vmap is None else [vmap[b][visual[b]] for b in range(B)]
        first = valid.float().argmax(1)
        base = self.adapter.text_positions(pos).gather(1, first[:, None]).squeeze(1)
        run = _Prefill(slots=slots, n_valid_in=valid.sum(1), base_pos=base, state=dict(self._forward_state),
                       embeds=embeds)
        self._forward_state.clear()
        run.samples = [{"n_visual_input": int(n), "stages": [], "tokens_in": int(v)}
                       for n, v in zip(n_vis, run.n_valid_in)]
        self._run = run
        self._replaying = self.replay and bool(self._decisions)  # this prefill re-applies recorded decisions
        self.records.append(run.samples)
        ctx = self._context("projector", 0, embeds, slots)
        if self.reducer.stage not in ("projector", "vision"):
            self._begin(ctx)
            self._finish_projector()
            return None
        decisions = self._decide(("projector", 0), ctx)
        new_slots, new_embeds = apply_decisions(slots, embeds, decisions)
        self._record(0, "projector", slots, new_slots, decisions)
        kw = dict(kwargs)
        kw["inputs_embeds"] = new_embeds
        kw["attention_mask"] = new_slots.valid.long()
        kw["position_ids"] = self._stage_positions(new_slots, pos, run)
        # The reduced sequence is now the language model's input: later (llm) stages index into it.
        new_slots.index = torch.arange(new_slots.length, device=embeds.device)[None].expand_as(new_slots.index).clone()
        run.slots, run.embeds = new_slots, new_embeds
        self._proj = StageGeometry(0, new_slots.valid, run.n_valid_in - new_slots.n_valid())
        self._proj.kwargs["orig_len"] = L
        # LLM-stage members of a chain see the language model's (reduced) input from here on
        self._begin(self._context("projector", 0, new_embeds, new_slots))
        self._finish_projector()
        return args, kw

    def _begin(self, ctx: StageContext) -> None:
        if not self._replaying:
            self.reducer.begin(ctx)

    def _finish_projector(self) -> None:
        run = self._run
        run.n_valid_in = run.slots.n_valid()
        for s, n in zip(run.samples, run.n_valid_in):
            s["tokens_lm_input"] = int(n)

    def _lm_decode(self, args, kwargs, cache):
        """Decode after a projector-stage reduction: map generate's full-length 2-D mask/positions."""
        g = self._proj
        kw = dict(kwargs)
        q = kwargs["inputs_embeds"].shape[1]
        mask2d = kwargs.get("attention_mask")
        n_new = cache.get_seq_length() + q - g.valid.shape[1]
        tail = (mask2d[:, -n_new:] if mask2d is not None
                else torch.ones(g.valid.shape[0], n_new, dtype=torch.long, device=g.valid.device))
        kw["attention_mask"] = torch.cat([g.valid.long(), tail.long()], 1)
        pos = kwargs.get("position_ids")
        if pos is not None and self.reducer.positions == "repack":
            kw["position_ids"] = self.adapter.shift_positions(pos, -g.removed)
        elif pos is None:  # a plain forward loop: continue after the prompt, in the chosen geometry
            start = g.kwargs["orig_len"] if self.reducer.positions == "keep" else g.valid.shape[1]
            kw["position_ids"] = (torch.arange(q, device=g.valid.device)[None] + n_new - q
                                  + start).expand(g.valid.shape[0], q)
        return args, kw

    def _keep_projection(self, layer: int, kind: str):
        """Forward hook: during a prefill, remember the layer's q/k projections (a reference, no copy) so the
        decision after it gets its attention rows without re-projecting (`StageContext.attention`)."""

        def hook(module, args, out):
            if self._run is not None:
                self._run.proj[(layer, kind)] = out

        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            run = self._run
            h = args[0] if args else kwargs["hidden_states"]
            if run is None:  # decode step (or an unreduced prefill)
                return self._layer_decode(i, h, args, kwargs) if self._stages else None
            if i == 0:
                run.layer0 = kwargs
            if i in self.layer_set:
                h = self._llm_decision(i, h, kwargs)
                run.proj.clear()
            kw = {**kwargs, **run.current.kwargs} if run.current is not None else kwargs
            run.prev = (i, h, kw)
            if i == self.adapter.num_layers - 1:
                self._finish_prefill()
            if run.current is None:
                return None
            return (h, *args[1:]) if args else (), ({**kw, "hidden_states": h} if not args else kw)

        return hook

    def _llm_decision(self, i: int, h: torch.Tensor, kwargs) -> torch.Tensor:
        run = self._run
        ctx = self._context("llm", i, h, run.slots)
        decisions = self._decide(("llm", i), ctx)
        new_slots, new_h = apply_decisions(run.slots, h, decisions)
        self._record(i, "llm", run.slots, new_slots, decisions)
        run.slots = new_slots
        geo = StageGeometry(i, new_slots.valid, run.n_valid_in - new_slots.n_valid())
        l0 = run.layer0
        geo.kwargs["attention_mask"] = self._prefill_mask(new_slots.valid, l0.get("attention_mask"), h.dtype)
        pos0 = l0.get("position_ids")
        if pos0 is None:
            pos0 = torch.arange(l0["position_embeddings"][0].shape[1], device=h.device)[None]  # layer-0 length
        if self.reducer.positions == "keep":
            cos, sin = l0["position_embeddings"]
            geo.kwargs["position_embeddings"] = (gather_rows(cos, new_slots.index), gather_rows(sin, new_slots.index))
            geo.kwargs["position_ids"] = gather_rows(pos0.expand(h.shape[0], -1), new_slots.index)
        else:
            pos = run.base_pos[:, None] + (new_slots.valid.long().cumsum(1) - 1).clamp(min=0)
            geo.kwargs["position_embeddings"] = self.adapter.rotary(new_h, pos)
            geo.kwargs["position_ids"] = pos
        run.current = geo
        self._stages.append(geo)
        return new_h

    def _layer_decode(self, i: int, h, args, kwargs):
        geo = None
        for g in self._stages:
            if g.layer <= i:
                geo = g
        if geo is None:
            return None
        if geo.layer not in self._step:
            self._step[geo.layer] = self._decode_kwargs(i, h, kwargs, geo)
        kw = {**kwargs, **self._step[geo.layer]}
        return (h, *args[1:]) if args else (), kw

    def _decode_kwargs(self, i, h, kwargs, geo: StageGeometry) -> dict:
        cache = kwargs.get("cache")
        q = h.shape[1]
        Ls = geo.valid.shape[1]
        past = cache.layers[i].get_seq_length() if cache is not None else 0
        n_new = past + q - Ls
        B = h.shape[0]
        dev = h.device
        orig = kwargs.get("attention_mask")
        if orig is not None:
            tail = orig[..., -n_new:]
            tail = tail if tail.dtype == torch.bool else tail == 0
            tail = tail.expand(B, 1, q, n_new)
        else:
            j = torch.arange(n_new, device=dev)
            tail = (j[None, :] <= (n_new - q + torch.arange(q, device=dev))[:, None])[None, None].expand(B, 1, q, n_new)
        allowed = torch.cat([geo.valid[:, None, None, :].expand(B, 1, q, Ls), tail], -1)
        if orig is None and q == 1 and bool(geo.valid.all()):
            allowed = None  # nothing to hide: keep the stock (mask-free) decode path
        out = {"attention_mask": None if allowed is None else self._mask_kind(allowed, h.dtype)}
        if self.reducer.positions == "repack":
            pos = kwargs.get("position_ids")
            if pos is None:
                raise RuntimeError("repack positions need the decoder to pass position_ids to its layers")
            pos = self.adapter.shift_positions(pos, -geo.removed)
            out["position_ids"] = pos
            out["position_embeddings"] = self.adapter.rotary(h, pos)
        return out

    # ------------------------------------------------------------------ helpers
    def _context(self, stage: str, layer: int, hidden, slots) -> StageContext:
        run = self._run
        return StageContext(stage=stage, layer=layer, hidden=hidden, slots=slots, adapter=self.adapter,
                            state=run.state, embeds=run.embeds, _attn_source=self._attn_source(layer, hidden))

    def _attn_source(self, layer: int, hidden: torch.Tensor):
        def source(which: str) -> dict:
            run = self._run
            if which == "previous":
                j, h_in, kw = run.prev
                if j != layer - 1:
                    raise RuntimeError("previous-layer attention is only available right after that layer")
            elif which == "current":
                j, h_in, kw = layer, hidden, run.prev[2]
            else:
                raise ConfigError(f"attention which={which!r}; allowed: 'previous', 'current'")
            norm, attn = self.adapter.attention_parts(j)
            cos, sin = kw["position_embeddings"]
            keys = None
            cache = kw.get("cache")
            if which == "previous" and cache is not None and cache.layers[j].get_seq_length() == h_in.shape[1]:
                keys = cache.layers[j].keys
            proj = {}
            if which == "previous":  # the projections that layer computed (hooked), when their length matches
                proj = {k: v for k in ("q", "k") if (v := run.proj.get((j, k))) is not None
                        and v.shape[:2] == h_in.shape[:2]}
            return {"attn": attn, "hidden": h_in, "norm": norm, "cos": cos, "sin": sin, "keys": keys,
                    "queries": proj.get("q"), "keys_proj": proj.get("k")}

        return source

    def _decide(self, key: tuple, ctx: StageContext) -> list[Decision]:
        if self.replay and key in self._decisions:
            return self._decisions[key]
        decisions = self.reducer.decide(ctx)
        if len(decisions) != ctx.batch_size:
            raise RuntimeError(f"{type(self.reducer).__name__}.decide returned {len(decisions)} decisions "
                               f"for a batch of {ctx.batch_size}")
        if self.replay:
            self._decisions[key] = decisions
        return decisions

    def _stage_positions(self, slots: Slots, pos: torch.Tensor, run: _Prefill) -> torch.Tensor:
        if self.reducer.positions == "keep":
            return self.adapter.gather_positions(pos, slots.index)
        return self.adapter.repack_positions(pos, slots, run.base_pos)

    def _prefill_mask(self, valid: torch.Tensor, like, dtype) -> torch.Tensor | None:
        if self.adapter.attn_implementation == "sdpa" and bool(valid.all()):
            return None  # sdpa then runs its fused causal kernel, as the stock model does without padding
        L = valid.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
        # Empty / padding slots see only themselves, so no softmax row is empty; real tokens never see them.
        allowed = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=valid.device)[None]
        return self._mask_kind(allowed[:, None], dtype)

    def _mask_kind(self, allowed: torch.Tensor, dtype) -> torch.Tensor:
        if self.adapter.attn_implementation == "eager":
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(dtype).min)
        return allowed

    def _record(self, layer: int, stage: str, before: Slots, after: Slots, decisions) -> None:
        for b, (s, d) in enumerate(zip(self._run.samples, decisions)):
            groups = [torch.nonzero(m).flatten().tolist() for m in after.members[b]]
            n_kept = int(torch.as_tensor(d.keep).unique().numel())  # kept tokens come first, merged ones after
            s["stages"].append({
                "stage": stage, "layer": layer,
                "visual_before": int(before.members[b].shape[0]), "visual_after": len(groups),
                "kept": sorted(g[0] for g in groups[:n_kept] if len(g) == 1),
                "groups": groups, "n_merged": d.n_merged, **d.record,
            })

    def _finish_prefill(self) -> None:
        run = self._run
        n_layers = self.adapter.num_layers
        for b, s in enumerate(run.samples):
            vis_in, tok_in = [], []
            n_vis = s["stages"][0]["visual_after"] if s["stages"] and s["stages"][0]["stage"] == "projector" \
                else s["n_visual_input"]
            n_tok = s["tokens_lm_input"]
            stages = {st["layer"]: st for st in s["stages"] if st["stage"] == "llm"}
            for i in range(n_layers):
                if i in stages:
                    n_tok -= stages[i]["visual_before"] - stages[i]["visual_after"]
                    n_vis = stages[i]["visual_after"]
                vis_in.append(n_vis)
                tok_in.append(n_tok)
            s["visual_per_layer"] = vis_in
            s["tokens_per_layer"] = tok_in
        self._run = None


def _visual_grids(grids, visual: torch.Tensor):
    """Adapter grids (sequence positions) -> grids of visual-token indices; a `row_end` that is not
    visual (LLaVA-NeXT newline='keep') is dropped; returns (grids, class-token indices) per sample."""
    if grids is None:
        return None, None
    out, cls = [], []
    for b, (sample, cls_pos) in enumerate(grids):
        vidx = visual[b].long().cumsum(0) - 1
        mine = []
        for g in sample:
            index = g.index.to(visual.device)
            if not bool(visual[b, index].all()):
                raise RuntimeError("adapter grid covers non-visual positions")
            ends = g.row_end.to(visual.device) if g.row_end is not None else None
            ends = vidx[ends] if ends is not None and bool(visual[b, ends].all()) else None
            mine.append(Grid(index=vidx[index], row_end=ends))
        cls_pos = cls_pos.to(visual.device)
        out.append(mine)
        cls.append(vidx[cls_pos[visual[b, cls_pos]]])
    return out, cls


def apply_decisions(slots: Slots, hidden: torch.Tensor, decisions: list[Decision]) -> tuple[Slots, torch.Tensor]:
    """Gather survivors (original order), insert merged tokens after the last kept visual token,
    drop padding, and left-pad samples to a common length with empty slots."""
    B = hidden.shape[0]
    dev = hidden.device
    seq_idx, seq_hidden, seq_vis, members = [], [], [], []
    for b, d in enumerate(decisions):
        vis = slots.visual_slots(b)
        n = int(vis.numel())
        keep = torch.as_tensor(d.keep, device=dev).long().flatten().unique(sorted=True)
        if keep.numel() < 1 or int(keep.min()) < 0 or int(keep.max()) >= n:
            raise ConfigError(f"decision for sample {b} keeps {keep.numel()} tokens with indices outside "
                              f"0..{n - 1}; a decision must keep at least 1 of the {n} visual tokens")
        drop = torch.ones(n, dtype=torch.bool, device=dev)
        drop[keep] = False
        survive = slots.valid[b].clone()
        survive[vis[drop]] = False
        order = torch.nonzero(survive).flatten()
        idx = slots.index[b, order]
        hid = hidden[b, order]
        if d.values is not None:  # new values for the kept tokens, at their own slots
            if int(d.values.shape[0]) != keep.numel():
                raise ConfigError(f"decision for sample {b}: {int(d.values.shape[0])} values for {keep.numel()} "
                                  "kept tokens")
            hid = hid.index_copy(0, torch.searchsorted(order, vis[keep]), d.values.to(hid.dtype))
        is_vis = slots.visual[b, order]
        m = slots.members[b][keep]
        if not d.n_merged and len(d.sources) == keep.numel():  # kept tokens that absorbed others in place
            m = torch.stack([slots.members[b][torch.as_tensor(s, device=dev).long()].any(0) for s in d.sources])
        if d.n_merged:
            sources = [torch.as_tensor(s, device=dev).long() for s in d.sources]
            if len(sources) != d.n_merged:
                raise ConfigError(f"decision for sample {b}: {d.n_merged} merged tokens but {len(sources)} source sets")
            anchors = (torch.as_tensor(d.anchors, device=dev).long() if d.anchors is not None
                       else torch.stack([s.min() for s in sources]))
            at = int(torch.nonzero(order == vis[keep].max()).flatten()[0]) + 1
            idx = torch.cat([idx[:at], slots.index[b, vis[anchors]], idx[at:]])
            hid = torch.cat([hid[:at], d.merged.to(hid.dtype), hid[at:]])
            is_vis = torch.cat([is_vis[:at], torch.ones(d.n_merged, dtype=torch.bool, device=dev), is_vis[at:]])
            m = torch.cat([m, torch.stack([slots.members[b][s].any(0) for s in sources])])
        seq_idx.append(idx)
        seq_hidden.append(hid)
        seq_vis.append(is_vis)
        members.append(m)
    L = max(int(t.numel()) for t in seq_idx)
    index = torch.zeros(B, L, dtype=torch.long, device=dev)
    valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
    visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
    out = hidden.new_zeros(B, L, hidden.shape[-1])
    for b in range(B):
        n = seq_idx[b].numel()
        index[b, L - n:] = seq_idx[b]
        valid[b, L - n:] = True
        visual[b, L - n:] = seq_vis[b]
        out[b, L - n:] = seq_hidden[b]
    return Slots(index=index, valid=valid, visual=visual, members=members, span=slots.span), out


@contextmanager
def attach(model: torch.nn.Module, reducer: TokenReducer, adapter=None, replay: bool = False):
    """`with attach(model, reducer) as engine: model.generate(...)`; hooks are always removed."""
    engine = ReductionEngine(model, reducer, adapter=adapter, replay=replay)
    engine.attach()
    try:
        yield engine
    finally:
        engine.detach()
