"""What a reducer sees at a decision point (`StageContext`), and the slot bookkeeping behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import attention_rows, project_keys


@dataclass
class Grid:
    """A 2-D block of one image's / frame's visual tokens, row-major: `index` (rows, cols) holds the
    sample's visual-token indices (sequence positions as adapters report them; the engine maps them to
    visual-token indices). `row_end` (rows,) are tokens that close each row (LLaVA-NeXT's image_newline),
    or None. Adapters report grids through `visual_grids`; strategies read them as `ctx.grids(b)`."""

    index: torch.Tensor
    row_end: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.index.shape[0])

    @property
    def cols(self) -> int:
        return int(self.index.shape[1])


@dataclass
class Slots:
    """The current token sequence of a batch, as slots (B, L').

    index: slot -> index into the language model's input sequence (RoPE source in `keep` mode);
      for merged tokens the anchor's index.
    valid: False for padding and for the empty slots that let samples keep different counts.
    visual: True for visual tokens (kept, or merged).
    members: per sample, (n_visual, n_visual_at_input) bool: which input visual tokens each current
      visual token stands for (identity until something merges).
    """

    index: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    members: list[torch.Tensor]
    span: list[torch.Tensor] | None = None  # per sample, (n_visual_at_input,) input span (image/frame) id
    grids: list[list[Grid]] | None = None  # per sample, the input visual tokens' grids (until a reduction)
    cls: list[torch.Tensor] | None = None  # per sample, visual-token indices of class tokens (CLIP 'full')
    vision_map: list[torch.Tensor] | None = None  # per sample, (n_visual_at_input,) encoder feature or -1
    _counts: tuple[list[int], list[int]] | None = field(default=None, repr=False, compare=False)
    _n_spans: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def length(self) -> int:
        return int(self.index.shape[1])

    def counts(self) -> tuple[list[int], list[int]]:
        """Per sample (valid slots, visual tokens) on the host. One copy for the batch when first asked
        (a GPU synchronises for it); `apply_decisions` gives the Slots it returns theirs without a copy."""
        if self._counts is None:
            n = torch.stack([self.valid.sum(1), (self.visual & self.valid).sum(1)]).tolist()
            self._counts = (n[0], n[1])
        return self._counts

    def all_valid(self) -> bool:
        """No padding or empty slot (from the host counts)."""
        return all(n == self.length for n in self.counts()[0])

    def last_slots(self) -> torch.Tensor:
        """(B,) each sample's last valid slot: its last prompt token (left padding puts it at the end)."""
        pos = torch.arange(self.length, device=self.index.device)
        return torch.where(self.valid, pos, -1).amax(1)

    def text_mask(self) -> torch.Tensor:
        """(B, L') valid non-visual slots after each sample's last visual token (the prompt text that follows
        the image); without visual tokens, every valid non-visual slot."""
        pos = torch.arange(self.length, device=self.index.device)
        last_visual = torch.where(self.visual & self.valid, pos, -1).amax(1, keepdim=True)
        return self.valid & ~self.visual & (pos > last_visual)

    def n_valid(self) -> torch.Tensor:
        return self.valid.sum(1)

    def visual_span_ids(self, b: int) -> torch.Tensor:
        """(n_visual,) the input span (image / video frame, 0-based) of each current visual token of
        sample b; a merged token belongs to the span of its first member. All 0 without span info."""
        m = self.members[b]
        if self.span is None or m.shape[0] == 0:
            return torch.zeros(m.shape[0], dtype=torch.long, device=self.index.device)
        return self.span[b][m.float().argmax(1)]

    def n_spans(self, b: int) -> int:
        """Input spans (images / frames) of sample b, at least 1; read for the whole batch in one copy."""
        if self.span is None:
            return 1
        if self._n_spans is None:
            top = torch.stack([s.max() if s.numel() else s.new_zeros(()) for s in self.span])
            self._n_spans = [t + 1 for t in top.tolist()]
        return self._n_spans[b]


@dataclass
class StageContext:
    """Signals for one decision point. Everything is per batch; `b` indexes samples.

    stage: "projector" or "llm"; layer: the decoder layer the decision applies before (llm).
    hidden: (B, L', D) hidden states entering that layer (the input embeddings at the projector).
    visual / text: per sample, slot indices of the current visual tokens / the prompt text after them.
    state: scratch space shared by all decision points of one prefill (e.g. SparseVLM's raters).
    checks: where `check` defers its checks to (the prefill's; None: checks run at once).
    """

    stage: str
    layer: int
    hidden: torch.Tensor
    slots: Slots
    adapter: Any
    state: dict[str, Any]
    embeds: torch.Tensor | None = None
    checks: Any = None
    _attn_source: Callable[[str], dict] | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def visual(self) -> list[torch.Tensor]:
        if "visual" not in self._cache:
            self._cache["visual"] = split_rows(self.slots.visual & self.slots.valid, self.slots.counts()[1])
        return self._cache["visual"]

    @property
    def text(self) -> list[torch.Tensor]:
        """Per sample, the slots of the prompt text after the image (`Slots.text_mask`)."""
        if "text" not in self._cache:
            mask = self.slots.text_mask()
            self._cache["text"] = split_rows(mask, mask.sum(1).tolist())
        return self._cache["text"]

    def check(self, ok: torch.Tensor, message: str, error: type[Exception] = RuntimeError) -> None:
        """Raise `error(message)` unless the bool tensor `ok` is all True: at the end of the prefill, with the
        records (`framework.checks`), so the host need not wait for the device's answer now."""
        from .checks import DeferredChecks

        pending = DeferredChecks() if self.checks is None else self.checks
        pending.add_flag(ok, message, error)
        if self.checks is None:
            pending.verify()

    def span_ids(self, b: int) -> torch.Tensor:
        """(n_visual,) input span (image / video frame) id of each current visual token of sample b."""
        return self.slots.visual_span_ids(b)

    def spans(self, b: int) -> list[torch.Tensor]:
        """Per input span (image / frame) of sample b, the slot indices of its current visual tokens
        (empty once a span lost all its tokens). Index `ctx.visual[b]` positions via `span_ids`."""
        ids = self.span_ids(b)
        return [self.visual[b][ids == s] for s in range(self.slots.n_spans(b))]

    def span_sizes(self, masks: list[torch.Tensor] | None = None) -> list[list[int]]:
        """Per sample, how many of its current visual tokens each input span holds (only those where
        `masks[b]` is True, if given): the whole batch in one host copy."""
        counts = []
        for b in range(self.batch_size):
            ids = self.span_ids(b)
            ones = torch.ones_like(ids) if masks is None else masks[b].long()
            counts.append(
                torch.zeros(self.slots.n_spans(b), dtype=torch.long, device=ids.device).index_add_(0, ids, ones)
            )
        flat = iter(torch.cat(counts).tolist())
        return [[next(flat) for _ in range(int(c.numel()))] for c in counts]

    def grids(self, b: int) -> list[list[Grid]]:
        """Per span (image / frame) of sample b, its 2-D token grids (indices into `ctx.visual[b]`):
        LLaVA-1.5 one side x side grid per image; LLaVA-NeXT the base view's grid, then the unpadded
        crop grid with its newline tokens as `row_end` (newline='visual'); Qwen2-VL one grid per frame
        (grid_thw / spatial_merge_size). Visual tokens of a span outside its grids (a class token, a
        crop-less image's single newline) are layout tokens. Known only before any reduction."""
        g = self.slots.grids
        if g is None or self.n_visual(b) != int(self.slots.members[b].shape[1]):
            raise RuntimeError(
                "visual grids are known only at the projector stage, before any reduction, on "
                "backbones whose adapter reports them (visual_grids)"
            )
        if "grid_spans" not in self._cache:  # every sample's grids' spans in one host copy
            firsts = [
                self.span_ids(i)[torch.stack([gr.index.flatten()[0] for gr in g[i]])] for i in range(len(g)) if g[i]
            ]
            spans = iter(torch.cat(firsts).tolist() if firsts else [])
            self._cache["grid_spans"] = [[next(spans) for _ in g[i]] for i in range(len(g))]
        out: list[list[Grid]] = [[] for _ in range(self.slots.n_spans(b))]
        for grid, span in zip(g[b], self._cache["grid_spans"][b]):
            out[span].append(grid)
        return out

    def vision_map(self, b: int) -> torch.Tensor:
        """(n_visual,) for sample b: the vision-encoder feature each visual token comes from (unit *
        tokens per unit + slot, encoder batch order), -1 for tokens from no feature (newlines).
        Known at the projector stage, before any reduction, on backbones with a vision stage."""
        m = self.slots.vision_map
        if m is None or self.n_visual(b) != int(self.slots.members[b].shape[1]):
            raise RuntimeError(
                "the vision-feature map is known only at the projector stage, before any "
                "reduction, on backbones whose adapter reports it (vision_token_map)"
            )
        return m[b]

    def cls_tokens(self, b: int) -> torch.Tensor:
        """Visual-token indices (into ctx.visual[b]) of class tokens kept in the features (CLIP 'full')."""
        c = self.slots.cls
        return c[b] if c is not None else torch.zeros(0, dtype=torch.long, device=self.hidden.device)

    def n_visual(self, b: int) -> int:
        return int(self.visual[b].numel())

    def visual_hidden(self, b: int) -> torch.Tensor:
        return self.hidden[b, self.visual[b]]

    def attention(self, rows: list[torch.Tensor], which: str = "previous") -> list[torch.Tensor]:
        """Attention probabilities (H, R_b, L') of the given query slots, per sample.

        which="previous": the layer just run (layer-1), with its own keys (from the KV cache when
        present); which="current": this layer's projections applied to `hidden` (PDrop's rule).
        Rows-only: never materialises the L' x L' map.
        """
        R = max(1, max(int(r.numel()) for r in rows))
        if self.batch_size == 1 and int(rows[0].numel()) == R:
            padded = rows[0][None]
        else:  # padding rows (slot 0) are computed and dropped
            padded = torch.zeros(self.batch_size, R, dtype=torch.long, device=self.hidden.device)
            for b, r in enumerate(rows):
                padded[b, : r.numel()] = r
        probs = self.attention_batch(padded, which)
        return [probs[b, :, : rows[b].numel()] for b in range(self.batch_size)]

    def attention_batch(self, rows: torch.Tensor, which: str = "previous") -> torch.Tensor:
        """`attention` for one (B, R) tensor of query slots (every sample R rows; pad with any slot and
        drop those rows): probabilities (B, H, R, L'). A row's values do not depend on the other rows."""
        if self.stage != "llm" or self._attn_source is None:
            raise RuntimeError("attention rows are available only at llm-stage decision points")
        src = self._attn_source(which)
        return attention_rows(
            src["attn"],
            src["hidden"],
            rows,
            src["cos"],
            src["sin"],
            self.slots.valid,
            keys=src.get("keys"),
            norm=src["norm"],
            queries=src.get("queries"),
            keys_proj=src.get("keys_proj"),
        )

    def rope(self, which: str = "previous") -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, L', hd): the rotary tables of the current slots' positions as the layer
        (`which` as in `attention`) applied them (M-RoPE already recomposed to one table)."""
        if self.stage != "llm" or self._attn_source is None:
            raise RuntimeError("rotary tables are available only at llm-stage decision points")
        src = self._attn_source(which)
        return src["cos"], src["sin"]

    def keys(self, which: str = "previous") -> torch.Tensor:
        """Post-RoPE keys (B, H_kv, L', hd) of the previous layer (from its KV cache when present) or of
        this layer's projections applied to `hidden` (which="current")."""
        if self.stage != "llm" or self._attn_source is None:
            raise RuntimeError("keys are available only at llm-stage decision points")
        src = self._attn_source(which)
        if src["keys"] is not None:
            return src["keys"]
        if src.get("keys_proj") is not None:
            return project_keys(src["attn"], None, src["cos"], src["sin"], src["keys_proj"])
        return project_keys(src["attn"], src["norm"](src["hidden"]), src["cos"], src["sin"])


def split_rows(mask: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per row of a (B, L) bool mask with `counts` True entries per row (known on the host), its True
    columns in ascending order: one static-size nonzero for the batch, so no host round trip."""
    cols = torch.nonzero_static(mask, size=sum(counts))[:, 1]
    return list(torch.split(cols, counts))
