"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417): text-guided visual-token sparsification.

Per prompt:
  1. Raters (once, from the LM input embeddings, fp32): r = mean over visual tokens of
     softmax_text(H_v H_q^T) over the text after the image; raters = text tokens with r > mean(r)
     (strict, as the code; the paper writes >=). Options: `raters` = selected | all_text | last_token |
     all_tokens (every valid token currently in the sequence).
  2. At each pruning layer l: P = head-mean attention probabilities of layer l, rater rows x current
     visual columns (recycled tokens included), rows-only (never the full map); score = mean over rows.
     The layer still runs on every token; its *output* is pruned, so the decision is taken before
     decoder layer l+1 (`decision_layers` = [l+1 for l in layers]).
  3. Keep count per sample (`budget`):
       fixed     -- v1.5 code / paper v4 results: keep = min(keep[l], Nv-1) at layers [2, 6, 15].
       rank_v1   -- v1 code: keep = min(int(scale*rank(P) + bias), Nv-1) at layers [2, 6, 15, 19];
                    the layer is skipped when Nv - rank(P) == 0 (torch.linalg.matrix_rank, fp32,
                    default tolerance).
       rank_paper-- paper Eq. 7: delete N = int(lam * (Nv - rank(P))); skipped when N == 0.
     In every mode at least one visual token survives (1 <= keep <= Nv-1 when the layer prunes).
  4. Recycling (`recycling`): of the deleted tokens, the top int(tau*n_deleted)+1 by score are clustered
     by DPC-kNN (`framework.clustering`, C = int(theta*L_r)+1 clusters, k = C) on the pruning layer's
     output hidden states; each cluster becomes one token (`merge` = mean (code) | sum (paper Eq. 10);
     `assign` = euclidean (code) | cosine (paper)), placed right after the kept visual tokens, anchored
     at the cluster centre. Merged tokens are ordinary visual tokens at later layers.

Variants (`variant`):
  v1.5 -- the official v1.5 / main-branch default code (above): all heads, recycling on, repacked positions.
  plus -- SparseVLM+ (official main branch, `USE_VERSION=2_0`):
     * attention "gravity" correction: the rater x visual probabilities are divided elementwise by the
       RoPE-only term G = Q1 K1^T / sqrt(hd) (all-ones query and key vectors rotated by the layer's
       rotary tables at the current positions; for plain RoPE G = 2 sum_i cos(delta theta_i) / sqrt(hd),
       sqrt(hd) at distance 0), which undoes RoPE's long-range decay. The official code divides by G
       unguarded; G can approach 0 or turn negative at long distances (past ~800 tokens for LLaMA's
       RoPE), so here it is clamped from below at `gravity_floor` x sqrt(hd) (default 0.01; at LLaVA-1.5
       distances G stays above ~0.1 sqrt(hd), so the official results are unchanged);
     * priority heads: the head mean is taken over the `priority_heads` heads with the largest corrected
       rater x visual mass (the official code: 14 of 32 heads; default round(14 H / 32) for H heads). The
       official code picks the heads on sample 0 of the batch for every sample; here each sample picks its
       own (recorded as `heads`), so a sample's heads do not depend on its batch;
     * original positions kept (`positions` keep) and no recycling, unless given explicitly;
     * its own fixed keep tables (below).
  `sparsevlm_plus` is this strategy with variant=plus.

Presets (`preset` = "192" | "128" | "96" | "64") are those of the official code for LLaVA-1.5-7B
(32 layers, 576 visual tokens): fixed keeps [300,200,110] / [303,110,36] / [238,48,26] / [66,30,17];
SparseVLM+ fixed keeps [300,200,118] / [238,108,60] / [246,54,28] / [66,34,20];
rank_v1 (scale, bias) = (13.5,0) / (9,6) / (0.8,0) (no 96). For other models they are scaled: pruning
layers by num_layers/32 (rounded half up, kept strictly increasing and <= num_layers-2), fixed keep counts
by n_visual/576 (rounded, per sample, from the sample's visual-token count at the LM input). Explicit
`layers` / `keep` / `scale` / `bias` fields override the preset and are used as given (no scaling).

Positions: `positions` defaults to "repack" for v1.5 (survivors and merged tokens renumbered 0..L'-1 after
each pruning, decode positions shifted by the removed count per stage), which is what the official
v1/v1.5 code does (`position_ids[:, :L_new]`); "keep" (original RoPE positions; merged tokens at their
centre's position) is the default for SparseVLM+ and what the LightCompress port does. Merged tokens
follow the official cluster order (descending density x distance of their centres).

Batches: raters, scores, ranks and keep counts are per sample. Record (per stage, per sample):
`raters` (LM-input indices), `n_raters`, `rater_fallback` (True when the
last prompt token had to rate because no text follows the image), `rank` (rank modes), `skipped`, `heads`
(SparseVLM+: the priority heads), and with `record_scores` the scores and the rater slots used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.attention import gather_rows, rotate_half
from framework.budget import REFERENCE_VISUAL_TOKENS, nearest_preset, scale_to_depth
from framework.clustering import ASSIGN_MODES, MERGE_MODES, cluster
from framework.context import split_rows
from framework.errors import ConfigError
from framework.reducer import Decision, SourceGroups, TokenReducer, topk_indices
from framework.registry import register

BUDGETS = ("fixed", "rank_v1", "rank_paper")
RATER_MODES = ("selected", "all_text", "last_token", "all_tokens")
REF_LAYERS, REF_VISUAL = 32, REFERENCE_VISUAL_TOKENS
FIXED_LAYERS = [2, 6, 15]
RANK_LAYERS = [2, 6, 15, 19]
FIXED_PRESETS = {"192": [300, 200, 110], "128": [303, 110, 36], "96": [238, 48, 26], "64": [66, 30, 17]}
RANK_PRESETS = {"192": (13.5, 0.0), "128": (9.0, 6.0), "64": (0.8, 0.0)}
VARIANTS = ("v1.5", "plus")
PLUS_PRESETS = {"192": [300, 200, 118], "128": [238, 108, 60], "96": [246, 54, 28], "64": [66, 34, 20]}
REF_HEADS, PLUS_HEADS = 32, 14  # SparseVLM+ averages 14 of LLaVA-1.5-7B's 32 heads


def rater_mask(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 (code form) as a mask over the text tokens: r > mean(r), where
    r = mean over visual tokens of softmax over text of (H_v H_q^T). fp32."""
    if text_embeds.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text_embeds.device)
    r = (visual_embeds.float() @ text_embeds.float().T).softmax(dim=-1).mean(0)
    return r > r.mean()


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6: indices of the text tokens `rater_mask` selects."""
    return torch.nonzero(rater_mask(visual_embeds, text_embeds)).flatten()


def matrix_ranks(Ps: list[torch.Tensor]) -> list[int]:
    """torch.linalg.matrix_rank of each matrix in fp32 with its default tolerance (max(m, n) * eps times its
    largest singular value), in one batched call and one host copy: zero rows and columns pad the matrices
    to one shape without changing their singular values, and each keeps its own relative tolerance."""
    if not Ps:
        return []
    shapes = [tuple(p.shape) for p in Ps]
    if len(set(shapes)) == 1:
        A = torch.stack([p.float() for p in Ps])
    else:
        A = Ps[0].new_zeros(len(Ps), max(r for r, _ in shapes), max(n for _, n in shapes), dtype=torch.float32)
        for a, p in zip(A, Ps):
            a[: p.shape[0], : p.shape[1]] = p
    eps = torch.finfo(torch.float32).eps
    rtol = torch.tensor([eps * max(r, n) for r, n in shapes]).to(A.device, non_blocking=True)  # no wait
    return torch.linalg.matrix_rank(A, rtol=rtol).tolist()


def rank_keep(P: torch.Tensor, scale: float, bias: float) -> tuple[int | None, int]:
    """v1 code: (keep, rank) with keep = min(int(scale*rank(P)+bias), Nv-1) (at least 1), or keep=None
    when Nv - rank(P) == 0 (the layer is skipped). rank: torch.linalg.matrix_rank in fp32, default tol."""
    rank = matrix_ranks([P])[0]
    return v1_keep(rank, int(P.shape[-1]), scale, bias), rank


def v1_keep(rank: int, nv: int, scale: float, bias: float) -> int | None:
    """`rank_keep` from a known rank."""
    return None if nv - rank == 0 else max(1, min(int(scale * rank + bias), nv - 1))


def rope_gravity(cos_q: torch.Tensor, sin_q: torch.Tensor, cos_k: torch.Tensor, sin_k: torch.Tensor) -> torch.Tensor:
    """SparseVLM+'s RoPE-only term Q1 K1^T / sqrt(hd), fp32: all-ones vectors rotated with the rotary
    tables of R query positions (cos_q, sin_q: (R, hd)) and L key positions ((L, hd)) -> (R, L)."""
    hd = cos_q.shape[-1]
    ones = torch.ones(hd, dtype=torch.float32, device=cos_q.device)
    q = ones * cos_q.float() + rotate_half(ones) * sin_q.float()
    k = ones * cos_k.float() + rotate_half(ones) * sin_k.float()
    return (q @ k.T) / hd**0.5


def priority_heads(attn: torch.Tensor, n: int) -> torch.Tensor:
    """The n heads (ascending indices) with the largest total rater x visual mass; attn (H, R, Nv);
    ties -> lower index."""
    return topk_indices(attn.sum((1, 2)), min(int(n), int(attn.shape[0])))


def scale_layers(layers: list[int], n_layers: int) -> list[int]:
    """Reference pruning layers (of 32) -> this depth: round half up, strictly increasing, <= n_layers-2."""
    return scale_to_depth(layers, n_layers, last=n_layers - 2, what="pruning layers")


@register("sparsevlm")
@dataclass
class SparseVLM(TokenReducer):
    """SparseVLM: text raters score visual tokens at a few layers; pruned tokens are partly recycled.

    variant: v1.5 | plus (SparseVLM+: gravity-corrected priority-head scores, its keep tables, original
    positions and no recycling unless given; priority_heads, gravity_floor: see the module docstring).
    budget: fixed | rank_v1 | rank_paper. preset: "192" | "128" | "96" | "64" (LLaVA-1.5-7B values,
    scaled to other depths / visual counts; see the module docstring). layers: pruning layers
    (0-indexed; the layer's output is pruned) overriding the preset; keep: fixed keep counts per layer;
    scale/bias: rank_v1 parameters; lam: rank_paper's lambda. raters: selected | all_text | last_token |
    all_tokens. recycling, tau (0.3), theta (0.1), merge (mean | sum), assign (euclidean | cosine).
    positions / recycling: None = the variant's (v1.5: repack, on; plus: keep, off).
    """

    positions: str | None = None  # type: ignore[assignment]  # resolved from the variant
    variant: str = "v1.5"
    priority_heads: int | None = None
    gravity_floor: float = 0.01
    budget: str = "fixed"
    preset: str = "192"
    layers: list[int] | None = None
    keep: list[int] | None = None
    scale: float | None = None
    bias: float | None = None
    lam: float = 1.0
    raters: str = "selected"
    recycling: bool | None = None
    tau: float = 0.3
    theta: float = 0.1
    merge: str = "mean"
    assign: str = "euclidean"
    record_scores: bool = False

    @classmethod
    def for_budget(cls, fields, budget, n_visual):
        """The preset nearest budget x 576 / n_visual in this mode's table (the strategy scales presets to
        the model); rank_paper (Eq. 7) sets its own count, so no budget applies (sweep `lam` instead)."""
        if fields.get("budget", cls.budget) == "rank_paper":
            return None
        return {**fields, "preset": nearest_preset(cls.preset_table(fields), budget, n_visual, cls.registry_name)}

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"sparsevlm variant={self.variant!r}; allowed: {list(VARIANTS)}")
        plus = self.variant == "plus"
        if self.positions is None:
            self.positions = "keep" if plus else "repack"
        if self.recycling is None:
            self.recycling = not plus
        super().__post_init__()
        if self.priority_heads is not None and (not plus or int(self.priority_heads) < 1):
            raise ConfigError(
                f"sparsevlm priority_heads={self.priority_heads}: a head count >= 1, and only with "
                f"variant='plus' (v1.5 averages all heads)"
            )
        if not 0.0 < self.gravity_floor <= 1.0:
            raise ConfigError(f"sparsevlm gravity_floor={self.gravity_floor}; allowed: (0, 1] (a share of sqrt(hd))")
        for name, value, allowed in (
            ("budget", self.budget, BUDGETS),
            ("raters", self.raters, RATER_MODES),
            ("merge", self.merge, MERGE_MODES),
            ("assign", self.assign, ASSIGN_MODES),
        ):
            if value not in allowed:
                raise ConfigError(f"sparsevlm {name}={value!r}; allowed: {list(allowed)}")
        self.preset = str(self.preset)
        if self.budget == "fixed" and self.keep is None and self.preset not in self._fixed_table():
            raise ConfigError(f"sparsevlm fixed preset={self.preset!r}; allowed: {sorted(self._fixed_table())}")
        if self.budget == "rank_v1" and (self.scale is None or self.bias is None) and self.preset not in RANK_PRESETS:
            raise ConfigError(
                f"sparsevlm rank_v1 preset={self.preset!r}; allowed: {sorted(RANK_PRESETS)} (or give scale and bias)"
            )
        if (self.scale is None) != (self.bias is None):
            raise ConfigError(
                f"sparsevlm scale={self.scale} bias={self.bias}: give both (rank_v1) or neither (the preset's)"
            )
        n_layers = (
            len(self.layers)
            if self.layers is not None
            else len(FIXED_LAYERS if self.budget == "fixed" else RANK_LAYERS)
        )
        if self.keep is not None and len(self.keep) != n_layers:
            where = "layers" if self.layers is not None else f"the preset's layers {FIXED_LAYERS}"
            raise ConfigError(f"sparsevlm keep has {len(self.keep)} counts for {n_layers} pruning layers ({where})")
        if self.layers is not None and (
            any(int(x) < 0 for x in self.layers) or any(b <= a for a, b in zip(self.layers, self.layers[1:]))
        ):
            raise ConfigError(f"sparsevlm layers={list(self.layers)}: must be >= 0 and strictly increasing")
        if self.keep is not None and any(int(k) < 1 for k in self.keep):
            raise ConfigError(f"sparsevlm keep counts must be >= 1, got {self.keep}")
        if not 0.0 <= self.tau <= 1.0 or not 0.0 <= self.theta <= 1.0:
            raise ConfigError(f"sparsevlm tau and theta must be in [0, 1], got {self.tau}, {self.theta}")
        self._n_layers = REF_LAYERS

    # ------------------------------------------------------------------ schedule
    def _fixed_table(self) -> dict[str, list[int]]:
        return PLUS_PRESETS if self.variant == "plus" else FIXED_PRESETS

    @classmethod
    def preset_table(cls, fields: dict) -> dict:
        """The presets (keys quoted for 576 visual tokens) that the config's budget mode and variant use:
        RANK_PRESETS for rank_v1, else the variant's fixed table."""
        if (fields.get("budget") or "fixed") == "rank_v1":
            return RANK_PRESETS
        return PLUS_PRESETS if (fields.get("variant") or cls.variant) == "plus" else FIXED_PRESETS

    def setup(self, adapter) -> None:
        self._n_layers = int(adapter.num_layers)
        if self.layers is not None and max(self.layers) > self._n_layers - 2:
            raise ConfigError(
                f"sparsevlm layers={list(self.layers)}: a pruning layer's output feeds a later "
                f"layer, so each must be <= {self._n_layers - 2} in this {self._n_layers}-layer decoder"
            )
        super().setup(adapter)

    def prune_layers(self) -> list[int]:
        if self.layers is not None:
            return [int(x) for x in self.layers]
        ref = FIXED_LAYERS if self.budget == "fixed" else RANK_LAYERS
        return scale_layers(ref, self._n_layers) if self._n_layers != REF_LAYERS else list(ref)

    def decision_layers(self) -> list[int]:
        return [layer + 1 for layer in self.prune_layers()]

    def _fixed_keep(self, stage: int, n_visual_input: int) -> int:
        if self.keep is not None:
            return int(self.keep[stage])
        k = self._fixed_table()[self.preset][stage]
        return k if n_visual_input == REF_VISUAL else max(1, round(k * n_visual_input / REF_VISUAL))

    def _scale_bias(self) -> tuple[float, float]:
        if self.scale is not None and self.bias is not None:
            return float(self.scale), float(self.bias)
        return RANK_PRESETS[self.preset]

    # ------------------------------------------------------------------ raters
    def begin(self, ctx) -> None:
        """Choose the raters once per prompt; store their LM-input indices in ctx.state (on the host for the
        records, and padded to one (B, R) tensor for the slot look-up at each decision). Every sample's
        choice reaches the host in one copy."""
        if self.raters == "all_tokens":  # resolved at each decision point
            return
        candidates, chosen = [], []  # per sample: the text's LM-input indices, and which of them rate
        for b, text in enumerate(ctx.text):
            candidates.append(ctx.slots.index[b].index_select(0, text))
            if self.raters == "selected":
                emb = ctx.embeds[b]
                chosen.append(rater_mask(emb.index_select(0, ctx.visual[b]), emb.index_select(0, text)))
            else:  # all_text; last_token: the last prompt token when it is text, else the fallback
                n = int(text.numel())
                keep = torch.ones(n, dtype=torch.bool) if self.raters == "all_text" else torch.arange(n) == n - 1
                chosen.append(keep.to(text.device))
        index, rates = torch.stack([torch.cat(candidates), torch.cat(chosen).long()]).tolist()
        raters, i = [], 0
        for text in ctx.text:
            n = int(text.numel())
            raters.append([j for j, r in zip(index[i : i + n], rates[i : i + n]) if r])
            i += n
        counts = [len(r) for r in raters]
        width = max(1, *counts)
        # padding repeats a sample's first rater; -1 (matches no slot) marks a sample without raters
        pad = [r + r[:1] * (width - len(r)) if r else [-1] * width for r in raters]
        ctx.state["sparsevlm_lookup"] = {
            # non-blocking: a blocking host -> device copy would wait for the queue (a sync on a GPU)
            "ids": torch.tensor(pad, dtype=torch.long).to(ctx.hidden.device, non_blocking=True),
            "counts": counts,
            "host": raters,
        }

    def _rater_rows(self, ctx) -> tuple[torch.Tensor, list[int]]:
        """(B, R) current slots of every sample's raters, padded (by repeating a rater), and the counts R_b.
        A sample without raters (no text after the image) has its last prompt token, the last valid slot."""
        look = ctx.state["sparsevlm_lookup"]
        ids, counts = look["ids"], look["counts"]
        slots = ctx.slots
        # the slot holding each rater's LM-input index among the non-visual slots (each index occurs once)
        match = (slots.index[:, None, :] == ids[:, :, None]) & (slots.valid & ~slots.visual)[:, None, :]
        found, rows = match.max(-1)
        if 0 in counts:  # no text after the image: the last prompt token rates instead
            fallback = torch.tensor([n == 0 for n in counts]).to(rows.device, non_blocking=True)[:, None]
            rows, found = torch.where(fallback, slots.last_slots()[:, None], rows), found | fallback
            counts = [max(n, 1) for n in counts]
        ctx.check(found.all(), "sparsevlm: a rater token is no longer in the sequence")
        return rows, counts

    # ------------------------------------------------------------------ decisions
    def decide(self, ctx) -> list[Decision]:
        stage = self.decision_layers().index(ctx.layer)
        B = ctx.batch_size
        rows, probs, records = self._rater_attention(ctx)
        vis = ctx.visual
        nv = [int(v.numel()) for v in vis]
        P, scores = self._scores(ctx, rows, probs, records)
        if self.record_scores:
            for b in range(B):
                records[b].update(scores=scores[b], rater_slots=rows[b], visual_slots=vis[b])  # lists at the end
        ranks = [None] * B
        if self.budget != "fixed":  # every sample's rank in one batched call and one host copy
            ranked = [b for b in range(B) if nv[b] > 1]
            for b, r in zip(ranked, matrix_ranks([P[b] for b in ranked])):
                ranks[b] = r
        keep_n = [self._keep_count(ctx, b, stage, nv[b], ranks[b], records[b]) for b in range(B)]
        out: list[Decision] = [None] * B  # type: ignore[list-item]
        for b in range(B):
            records[b]["skipped"] = keep_n[b] is None
            if keep_n[b] is None:
                out[b] = Decision(keep=torch.arange(nv[b], device=vis[b].device), record=records[b])
        pruned = [b for b in range(B) if keep_n[b] is not None]
        for bs in _groups([(nv[b], keep_n[b]) for b in pruned], pruned):  # equal shapes: one sort
            for b, decision in zip(bs, self._prune(ctx, bs, keep_n[bs[0]], [scores[b] for b in bs], records)):
                out[b] = decision
        return out

    def _rater_attention(self, ctx) -> tuple[list[torch.Tensor], torch.Tensor, list[dict]]:
        """Per sample the raters' current slots, their attention rows (B, H, R, L') over the previous layer,
        and the start of the sample's record (raters, their count, whether the fallback rated)."""
        if self.raters == "all_tokens":
            n_valid = ctx.slots.counts()[0]
            rows = split_rows(ctx.slots.valid, n_valid)
            probs = ctx.attention_batch(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), which="previous")
            records = [  # the raters' indices reach the host with the records, at the end of the prefill
                {"raters": ctx.slots.index[b, rows[b]], "n_raters": n, "rater_fallback": False}
                for b, n in enumerate(n_valid)
            ]
            return rows, probs, records
        padded, counts = self._rater_rows(ctx)
        probs = ctx.attention_batch(padded, which="previous")
        # no text after the image (or no rater selected): the last prompt token rates instead
        look = ctx.state["sparsevlm_lookup"]
        records = [{"raters": r, "n_raters": n, "rater_fallback": not r} for r, n in zip(look["host"], counts)]
        return [padded[b, :n] for b, n in enumerate(counts)], probs, records

    def _scores(self, ctx, rows, probs, records) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sample P (R_b, Nv_b), the rater x visual block, and the visual tokens' scores (Nv_b,);
        samples of equal shapes share one gather and two means."""
        B, vis = ctx.batch_size, ctx.visual
        counts = [int(r.numel()) for r in rows]
        P: list[torch.Tensor] = [None] * B  # type: ignore[list-item]
        scores: list[torch.Tensor] = [None] * B  # type: ignore[list-item]
        if self.variant != "plus":
            for bs in _groups([(int(vis[b].numel()), counts[b]) for b in range(B)]):
                # the gather before the head mean (as the official code): a float32 mean's summation order
                # depends on where an element sits in its block, so the other order can differ by an ulp
                A = _rows(probs, bs)[:, :, : counts[bs[0]]]  # (G, H, R, L')
                Pg = _columns(A, [vis[b] for b in bs]).mean(1)
                sg = Pg.mean(1)
                for i, b in enumerate(bs):
                    P[b], scores[b] = Pg[i], sg[i]
            return P, scores
        rope = ctx.rope("previous")
        heads = []
        for b in range(B):
            P[b], h = self.rater_visual_block(ctx, b, rows[b], probs[b, :, : counts[b]], rope)
            scores[b] = P[b].mean(0)
            heads.append(h)
        for b, h in enumerate(torch.stack(heads)):  # reach the host with the records, at the end
            records[b]["heads"] = h
        return P, scores

    def _prune(self, ctx, bs: list[int], k: int, scores: list[torch.Tensor], records) -> list[Decision]:
        """Decisions for samples `bs` that keep `k` of the same number of visual tokens."""
        vis = ctx.visual
        n = int(vis[bs[0]].numel())
        # one stable sort: the top k are kept, and the best of the rest (deleted tokens by descending
        # score, ties to the lower index, as a top-k over the deleted ones ranks them) are recycled
        order = torch.sort(_stack(scores), dim=-1, descending=True, stable=True).indices
        keep = order[:, :k].sort(-1).values
        if not self.recycling:
            return [Decision(keep=keep[i], record=records[b]) for i, b in enumerate(bs)]
        n_rec = min(int(self.tau * (n - k)) + 1, n - k)
        recycled = order[:, k : k + n_rec].sort(-1).values  # ascending visual index
        n_clusters = int(self.theta * n_rec + 1e-9) + 1
        cols = _stack([vis[b] for b in bs]).gather(1, recycled)  # (G, n_rec) slots
        feats = gather_rows(_rows(ctx.hidden, bs), cols)  # the pruning layer's output hidden states
        merged, labels, centres = cluster(feats, n_clusters, merge=self.merge, assign=self.assign)  # (G, ...)
        anchors = recycled.gather(1, centres)  # each merged token takes its centre's position
        out = []
        for i, b in enumerate(bs):
            out.append(
                Decision(
                    keep=keep[i],
                    merged=merged[i].to(ctx.hidden.dtype),
                    sources=SourceGroups(index=recycled[i], group=labels[i]),  # no cluster sizes on the host
                    anchors=anchors[i],
                    record=records[b],
                )
            )
        return out

    def _keep_count(self, ctx, b: int, stage: int, nv: int, rank: int | None, record: dict) -> int | None:
        """Visual tokens sample b keeps at this stage (None: the layer is skipped); rank modes record the rank
        (`rank`: of the sample's P, None in fixed mode)."""
        if nv <= 1:
            return None
        if self.budget == "fixed":
            n_in = int(ctx.slots.members[b].shape[1])
            return max(1, min(self._fixed_keep(stage, n_in), nv - 1))
        record["rank"] = rank
        if self.budget == "rank_v1":
            return v1_keep(rank, nv, *self._scale_bias())
        n_del = int(self.lam * (nv - rank))
        return None if n_del <= 0 else max(1, min(nv - n_del, nv - 1))

    def rater_visual_block(
        self, ctx, b: int, rows: torch.Tensor, probs: torch.Tensor, rope
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P (R, Nv): the head-mean rater x visual probabilities; SparseVLM+: gravity-corrected and
        averaged over this sample's priority heads (their indices, ascending, are the second value)."""
        vis = ctx.visual[b]
        A = probs[:, :, vis].float()  # (H, R, Nv)
        if rope is None:
            return A.mean(0), None
        r = b if rope[0].shape[0] > 1 else 0  # one table for the batch when all samples share positions
        cos, sin = rope[0][r], rope[1][r]
        G = rope_gravity(cos[rows], sin[rows], cos[vis], sin[vis])
        A = A / G.clamp(min=self.gravity_floor * cos.shape[-1] ** 0.5)
        n = self.priority_heads or max(1, int(PLUS_HEADS * A.shape[0] / REF_HEADS + 0.5))
        heads = priority_heads(A, n)
        return A[heads].mean(0), heads


def _groups(keys: list, samples: list[int] | None = None) -> list[list[int]]:
    """Samples (default 0..len(keys)-1) grouped by equal key, in first-seen order: per-sample work of equal
    shapes runs as one batched op (every op used is row-wise or a fixed-order reduction, so a sample's
    values do not depend on its group)."""
    out: dict = {}
    for b, key in zip(range(len(keys)) if samples is None else samples, keys):
        out.setdefault(key, []).append(b)
    return list(out.values())


def _columns(A: torch.Tensor, cols: list[torch.Tensor]) -> torch.Tensor:
    """A (G, ..., L) at each sample's columns (G tensors (N,)) -> (G, ..., N); one index_select when G is 1."""
    if len(cols) == 1:
        return A.index_select(-1, cols[0])
    c = torch.stack(cols)
    return A.gather(-1, c.view(c.shape[0], *[1] * (A.dim() - 2), c.shape[1]).expand(*A.shape[:-1], c.shape[1]))


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0][None] if len(ts) == 1 else torch.stack(ts)


def _rows(t: torch.Tensor, bs: list[int]) -> torch.Tensor:
    """t[bs] along the batch dim, as a view when bs is a contiguous run (else the rows' index reaches the
    device by a non-blocking copy: indexing with the list would wait for the queue)."""
    if bs[-1] - bs[0] == len(bs) - 1:
        return t[bs[0] : bs[-1] + 1]
    return t.index_select(0, torch.tensor(bs).to(t.device, non_blocking=True))


@register("sparsevlm_plus")
@dataclass
class SparseVLMPlus(SparseVLM):
    """SparseVLM+ (official main branch, USE_VERSION=2_0): gravity-corrected priority-head scores, no recycling.

    The same strategy as `sparsevlm` with variant="plus" (see strategies/sparsevlm.py): RoPE-gravity
    corrected rater attention averaged over per-sample priority heads, original positions, keep tables
    192: [300,200,118], 128: [238,108,60], 96: [246,54,28], 64: [66,34,20] at layers 2/6/15 of 32.
    """

    variant: str = "plus"

    def __post_init__(self) -> None:
        if self.variant != "plus":
            raise ConfigError(
                f"sparsevlm_plus variant={self.variant!r}: it is variant='plus'; "
                f"use strategy 'sparsevlm' for variant={self.variant!r}"
            )
        super().__post_init__()
