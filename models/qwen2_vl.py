"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

Visual tokens: the `image_token_id` and `video_token_id` positions of `input_ids` (the
vision-start/end markers around them are text). Samples hold different numbers of visual tokens
(dynamic resolution); the engine pads them with empty slots.

Positions are 3-D M-RoPE (temporal, height, width). The language model receives `position_ids` of
shape (3, B, L) from a plain forward, or (4, B, L) from `generate` (row 0 = 1-D text positions, used
for masks; rows 1-3 = T/H/W). Decoder layers receive `position_ids` = the text row (B, L) and
`position_embeddings` (cos, sin) of shape (B, L, head_dim) already recomposed from the three sections,
so the engine's layer-level gathers apply unchanged.

* `positions="keep"` (supported): every kept token keeps its original T/H/W position (gathered from
  the 3-/4-row ids at the projector stage, from cos/sin at the llm stage); decode continues at the
  model's own positions (text position + rope delta).
* `positions="repack"` is refused at setup with a ConfigError: a visual token's M-RoPE position is a
  grid coordinate, not a sequence index, so "renumber the survivors 0..L'-1" has no faithful 3-D
  meaning (shifting later text by the number of removed tokens would move it before the image's own
  H/W positions).

Spans (`ctx.spans(b)`): one per image; a video gives one span per temporal patch ("frame", the
default, `video_span="frame"`) or one for the whole video (`video_span="video"`).

Vision stage: refused for strategies that act inside the encoder (no CLS token; the patch merger
concatenates fixed spatial_merge_size^2 patch groups, so a patch merged or dropped inside the encoder
has no LLM token). VisionZip runs instead on the merged tokens with encoder signals per LLM token
(`vision_tower().token_signals()`, `vision_token_map`): see `VisionTokenSignals`.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from framework.backbones import register_adapter
from framework.errors import ConfigError
from framework.vision import TokenSignals, VisionTower

from .base import BackboneAdapter, require

VIDEO_SPANS = ("frame", "video")


@register_adapter("qwen2_vl", "Qwen2-VL (M-RoPE)")
class Qwen2VLAdapter(BackboneAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    stages = ("projector", "llm")
    supports_repack = False
    repack_note = "3-D M-RoPE positions are grid coordinates; use positions='keep'"
    stage_notes = {
        "vision": "its vision encoder has no CLS token and packs all images into one sequence "
        "with 2-D rotary positions (and windowed attention in 2.5); its patch merger "
        "concatenates fixed 2x2 patch neighbourhoods into one LLM token, so patches "
        "merged or dropped inside the encoder have no faithful LLM token; reduce at the "
        "projector stage (on the merged tokens) or in the LLM instead (VisionZip runs here on the "
        "merged tokens, with encoder attention signals per token)"
    }

    def __init__(self, model: torch.nn.Module, video_span: str = "frame"):
        super().__init__(model)
        require(video_span in VIDEO_SPANS, f"{self.family}: video_span={video_span!r}; allowed: {list(VIDEO_SPANS)}")
        self.video_span = video_span

    def _on_host(self, input_ids: torch.Tensor, kwargs: dict) -> tuple[np.ndarray, dict]:
        """The prompt's ids and the grids' rows on the host, read once per prompt (`read_once`)."""
        tensors = (input_ids, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"))

        def read():
            grids = {m: None if g is None else g.tolist() for m, g in zip(("image", "video"), tensors[1:])}
            return input_ids.cpu().numpy(), grids

        return self.read_once("prompt", tensors, read)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    @property
    def merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    # --- per-image projector hooks (LLaVA-1.5's fixed square grid) are not offered -------------
    def tokens_per_image(self) -> int:
        raise ConfigError(
            f"{self.family}: this strategy hooks the projector and needs a fixed square grid of "
            f"tokens per image (LLaVA-1.5); dynamic-resolution images have variable token counts. "
            "Use a strategy that decides on the language model's input or layers."
        )

    @property
    def projector(self):
        self.tokens_per_image()

    # --- inputs -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict) -> bool:
        enc = kwargs.get("mm_encoder_outputs") or {}
        return (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or enc.get("image") is not None
            or enc.get("video") is not None
        )

    def visual_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        require(
            kwargs.get("mm_token_type_ids") is not None,
            f"{self.family}: mm_token_type_ids (0 text, 1 image, 2 video) must be passed with images or "
            "videos; the model needs it for M-RoPE",
        )
        self._spans(input_ids, kwargs)

    def _items(self, input_ids: torch.Tensor, kwargs: dict, modality: str) -> list[tuple[int, int | None]]:
        """(tokens, tokens per frame or None) of each image / video of the batch, in order: from the
        grids (plain forward), else from the pre-encoded features `generate` passes instead."""
        grid = self._on_host(input_ids, kwargs)[1][modality]
        m2 = self.merge**2
        if grid is not None:
            return [(t * h * w // m2, h * w // m2) for t, h, w in grid]
        enc = (kwargs.get("mm_encoder_outputs") or {}).get(modality)
        return [] if enc is None else [(int(f.shape[0]), None) for f in enc.pooler_output]

    def _runs(self, input_ids: torch.Tensor, kwargs: dict, items: dict) -> list[list[tuple[int, np.ndarray, int]]]:
        """Per sample, its visual items in prompt order as (token id, positions, item index), matched to the
        batch's images / videos (consumed in batch order) and checked against their token counts. Reads the
        prompt in one host copy: a read per item would stall a GPU per image."""
        ids = self._on_host(input_ids, kwargs)[0]
        used = {k: 0 for k in items}
        out = []
        for b, row in enumerate(ids):
            vis = np.flatnonzero((row == self.image_token_id) | (row == self.video_token_id))
            require(vis.size > 0, f"{self.family}: sample {b} has no image/video tokens but visual inputs were given")
            runs, i = [], 0
            while i < vis.size:
                tok = int(row[vis[i]])
                kind = "image" if tok == self.image_token_id else "video"
                require(
                    used[tok] < len(items[tok]),
                    f"{self.family}: the prompts hold more {kind} tokens than the {kind} inputs "
                    f"({len(items[tok])} {kind}(s))",
                )
                n = items[tok][used[tok]][0]
                chunk = vis[i : i + n]
                require(
                    chunk.size == n and bool((row[chunk] == tok).all()),
                    f"{self.family}: sample {b}: a {kind} of {n} tokens needs {n} consecutive {kind} "
                    f"tokens (id {tok}); found fewer",
                )
                runs.append((tok, chunk, used[tok]))
                used[tok] += 1
                i += n
            out.append(runs)
        for tok, kind in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            require(
                used[tok] == len(items[tok]),
                f"{self.family}: {len(items[tok])} {kind}(s) given but the prompts hold tokens for {used[tok]}",
            )
        return out

    def _spans(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """(B, L) span id per visual position (-1 elsewhere); checks token counts against the inputs.

        Video frames come from the grid, or (under `generate`, which passes no grid) from changes of
        the temporal M-RoPE position that `generate` passes as position_ids. Labels are built on the host
        and written with one scatter."""
        items = {
            self.image_token_id: self._items(input_ids, kwargs, "image"),
            self.video_token_id: self._items(input_ids, kwargs, "video"),
        }
        pos = kwargs.get("position_ids")
        temporal = pos[-3] if pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4) else None
        L = input_ids.shape[1]
        at, labels = [], []
        for b, runs in enumerate(self._runs(input_ids, kwargs, items)):
            span = 0
            for tok, chunk, j in runs:
                n, per_frame = items[tok][j]
                if tok == self.video_token_id and self.video_span == "frame":
                    if per_frame is not None:
                        frame = np.arange(n) // per_frame
                    elif temporal is not None:
                        if not isinstance(temporal, np.ndarray):
                            temporal = temporal.cpu().numpy()  # once for the batch
                        t = temporal[b if temporal.shape[0] > 1 else 0, chunk]
                        frame = np.concatenate([[0], (t[1:] != t[:-1]).astype(np.int64)]).cumsum()
                    else:
                        frame = np.zeros(n, dtype=np.int64)
                    labels.append(span + frame)
                    span += int(frame[-1]) + 1
                else:
                    labels.append(np.full(n, span))
                    span += 1
                at.append(b * L + chunk)
        host = torch.from_numpy(np.concatenate([*at, *labels]).astype(np.int64))
        flat = host.to(input_ids.device, non_blocking=True)  # a blocking copy would wait for the queue
        n = host.numel() // 2
        out = torch.full((input_ids.numel(),), -1, dtype=torch.long, device=input_ids.device)
        out[flat[:n]] = flat[n:]
        return out.view(input_ids.shape)

    def visual_spans(self, input_ids: torch.Tensor, kwargs: dict, visual: torch.Tensor) -> torch.Tensor:
        return self._spans(input_ids, kwargs).masked_fill(~visual, -1)

    def visual_grids(self, input_ids: torch.Tensor, kwargs: dict):
        """One grid per image / video frame: (h, w) of image_grid_thw / video_grid_thw divided by
        spatial_merge_size (tokens are row-major per frame). Under `generate`, which passes no grids,
        the shape comes from the H/W rows of the M-RoPE position_ids it passes; None when neither is
        available. The prompt, grids and positions reach the host in one copy each."""
        from framework.context import Grid

        pos = kwargs.get("position_ids")
        hw = pos[-2:] if pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4) else None
        shapes, items = {}, {}
        for tok, modality in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            items[tok] = self._items(input_ids, kwargs, modality)
            grid = self._on_host(input_ids, kwargs)[1][modality]
            if grid is not None:
                shapes[tok] = [(t, h // self.merge, w // self.merge) for t, h, w in grid]
            else:
                if items[tok] and hw is None:
                    return None
                shapes[tok] = [None] * len(items[tok])
        runs = self._runs(input_ids, kwargs, items)
        hw_host = hw.cpu().numpy() if hw is not None and any(None in v for v in shapes.values()) else None
        at, per_sample = [], []
        for b, sample in enumerate(runs):
            mine = []
            for tok, chunk, j in sample:
                shape = shapes[tok][j]
                if shape is None:  # generate: the run of this item's tokens, shaped by its H/W positions
                    hb = hw_host[0, b if hw_host.shape[1] > 1 else 0, chunk]
                    wb = hw_host[1, b if hw_host.shape[1] > 1 else 0, chunk]
                    rows, cols = int(hb.max() - hb.min()) + 1, int(wb.max() - wb.min()) + 1
                    shape = (chunk.size // (rows * cols), rows, cols)
                mine.append(shape)
                at.append(chunk[: shape[0] * shape[1] * shape[2]])
            per_sample.append(mine)
        flat = torch.from_numpy(np.concatenate(at).astype(np.int64)).to(input_ids.device, non_blocking=True)
        out, off = [], 0
        for mine in per_sample:
            grids = []
            for t, rows, cols in mine:
                frames = flat[off : off + t * rows * cols].view(t, rows, cols)
                grids += [Grid(index=f) for f in frames]
                off += t * rows * cols
            out.append((grids, flat[:0]))
        return out

    # --- vision-encoder signals per LLM visual token (VisionZip) --------------------------------
    def vision_token_map(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """(B, L): at each image / video position, the row of the vision encoder's merged output that
        the model scatters there: image rows first (batch order, as `masked_scatter` fills them), then
        video rows (offset by the batch's image-token count); -1 elsewhere. Rows index the signals of
        `VisionTokenSignals` (Qwen's encoder batch has no fixed units, so there is no per-unit slot).
        Running counts over the flattened batch: nothing is read on the host."""
        img, vid = input_ids == self.image_token_id, input_ids == self.video_token_id
        rank_img = img.flatten().cumsum(0).view(img.shape) - 1
        rank_vid = vid.flatten().cumsum(0).view(vid.shape) - 1
        return torch.where(img, rank_img, torch.where(vid, img.sum() + rank_vid, -1))

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.model.visual

    def full_attention_block(self) -> int:
        """The last vision block that attends over whole images / frames (Qwen2-VL: every block)."""
        return len(self.visual.blocks) - 1

    def vision_window(self, grid_thw: torch.Tensor, kwargs: dict) -> dict:
        """Precomputed window kwargs for the encoder call (Qwen2.5-VL's window order), so that the encoder
        and `vision_block_order` share one computation; none for Qwen2-VL."""
        return {}

    def vision_block_order(self, grid_thw: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """Merged-token order inside the vision blocks (block unit u holds merged token order[u]), or
        None when the blocks see tokens in output order (Qwen2-VL)."""
        return None

    def vision_tower(self) -> "QwenTower":
        """Signals per LLM visual token (received attention, keys): see `VisionTokenSignals`."""
        return QwenTower(self)

    # --- positions: (3|4, B, L) M-RoPE ids at the language-model level ------------------------
    def text_positions(self, pos: torch.Tensor) -> torch.Tensor:
        if pos.dim() == 3:
            return pos[0]
        return pos if pos.dim() == 2 else pos[None]

    def gather_positions(self, pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if pos.dim() != 3:
            return super().gather_positions(pos, index)
        R = pos.shape[0]
        pos = pos.expand(R, index.shape[0], pos.shape[-1])
        return torch.gather(pos, 2, index[None].expand(R, -1, -1))

    def repack_positions(self, pos, slots, base):
        raise ConfigError(f"{self.family}: positions='repack' is not supported ({self.repack_note})")

    def shift_positions(self, pos, delta):
        raise ConfigError(f"{self.family}: positions='repack' is not supported ({self.repack_note})")

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        """cos/sin for (B, L) text positions (all three sections equal) or (3, B, L) M-RoPE ids."""
        return self.language_model.rotary_emb(x, position_ids)


@register_adapter("qwen2_5_vl", "Qwen2.5-VL (M-RoPE)")
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    def full_attention_block(self) -> int:
        """The last of `fullatt_block_indexes` (the other blocks attend within windows)."""
        return max(self.visual.config.fullatt_block_indexes)

    def vision_window(self, grid_thw: torch.Tensor, kwargs: dict) -> dict:
        """`window_index` / `cu_window_seqlens` from the model's own `get_vision_window_index`, given to the
        encoder call (which then uses them instead of computing them again); none when the caller gave them."""
        from transformers.vision_utils import get_vision_window_index

        if kwargs.get("window_index") is not None and kwargs.get("cu_window_seqlens") is not None:
            return {}
        v = self.visual
        index, cu = get_vision_window_index(
            grid_thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size
        )
        return {"window_index": index, "cu_window_seqlens": cu}

    def vision_block_order(self, grid_thw: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The window order Qwen2.5-VL's encoder permutes merged-token units into before its blocks
        (and undoes after the merger): the encoder call's `window_index` (see `vision_window`)."""
        if kwargs.get("window_index") is None:
            kwargs = {**kwargs, **self.vision_window(grid_thw, kwargs)}
        return kwargs["window_index"]


def received_attention(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, max_elements: int = 1 << 24
) -> torch.Tensor:
    """Attention each key receives, heads summed, averaged over the query rows of its own segment.

    q, k (S, H, d) post-RoPE, packed; cu_seqlens (n+1,) segment bounds (each segment attends only within
    itself, as Qwen's vision attention does). Returns (S,) float32: for key j of segment [s, e),
    (1 / (e - s)) * sum_{i in [s, e)} sum_h P_h[i, j] with P_h = softmax over [s, e) of
    scale * q_h k_h^T (the block's own attention probabilities). Query rows go in chunks, so the
    (H, S, S) map is never held."""
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    H = q.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qs = q[s:e].float().transpose(0, 1)  # (H, S, d)
        ks = k[s:e].float().transpose(0, 1)
        rows = max(1, max_elements // (H * (e - s)))
        col = torch.zeros(e - s, dtype=torch.float32, device=q.device)
        for r in range(0, e - s, rows):
            p = torch.softmax((qs[:, r : r + rows] @ ks.transpose(-1, -2)) * scale, dim=-1)
            col += p.sum((0, 1))
        out[s:e] = col / (e - s)
    return out


class QwenTower(VisionTower):
    """Qwen2-VL / 2.5-VL's encoder for vision-stage strategies: its merger fuses fixed patch groups,
    so it offers signals per LLM visual token only (no per-layer hooks inside the encoder)."""

    inside = False

    def __init__(self, adapter: Qwen2VLAdapter):
        self.adapter = adapter

    def token_signals(self) -> "VisionTokenSignals":
        return VisionTokenSignals(self.adapter)


class VisionTokenSignals(TokenSignals):
    """Encoder signals for each LLM visual token of Qwen2-VL / Qwen2.5-VL (VisionZip's dominance and keys).

    Hooks (`hooks()`): a pre-hook on the encoder records each call's grid_thw; a pre-hook on the
    attention of the last block that attends over whole images / frames (`full_attention_block`)
    recomputes that block's queries and keys (`qkv`, then the model's own 2-D vision RoPE) and stores,
    per merged token (spatial_merge_size^2 consecutive patches, in the merger's output order):
      * score: the attention its patches receive, heads summed, averaged over the query patches of
        their own attention segment (cu_seqlens: one image, or one video frame), summed over the
        token's patches (`received_attention`);
      * keys: that block's key projection (before RoPE, so similarity is about content, not relative
        position), averaged over heads and over the token's patches.
    One record per encoder call; a forward with images and videos calls the encoder twice (images,
    then videos), and `generate` encodes once before its first step, so `per_token` takes the calls
    made since it last read (or the same ones again: no-cache decoding re-reads without re-encoding).
    """

    def __init__(self, adapter: Qwen2VLAdapter):
        self.adapter = adapter
        self._grid: tuple | None = None  # (grid_thw, kwargs) of the encoder call in progress
        self._calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (score (N,), keys (N, d)) per call
        self._group: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def hooks(self) -> list:
        visual = self.adapter.visual
        attn = visual.blocks[self.adapter.full_attention_block()].attn
        return [
            visual.register_forward_pre_hook(self._encoder, with_kwargs=True),
            attn.register_forward_pre_hook(self._attention, with_kwargs=True),
        ]

    def _encoder(self, module, args, kwargs):
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        kwargs = {**kwargs, **self.adapter.vision_window(grid, kwargs)}  # one window order for both of us
        self._grid = (grid, dict(kwargs))
        return args, kwargs

    @torch.no_grad()
    def _attention(self, module, args, kwargs):
        if self._grid is None:
            raise RuntimeError(f"{self.adapter.family}: vision attention ran outside a vision-encoder call")
        x = args[0] if args else kwargs["hidden_states"]  # the block's normed input (packed patches)
        cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
        S = x.shape[0]
        q, k, _ = module.qkv(x).reshape(S, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
        q_rot, k_rot = rope(q, k, cos, sin)
        m2 = self.adapter.merge**2
        score = received_attention(q_rot, k_rot, cu, module.scaling).view(S // m2, m2).sum(1)
        keys = k.float().mean(1).view(S // m2, m2, -1).mean(1)
        grid, enc_kwargs = self._grid
        order = self.adapter.vision_block_order(grid, enc_kwargs)
        if order is not None:  # block unit u holds merged token order[u]: back to the merger's output order
            order = order.to(score.device)
            score = torch.empty_like(score).index_copy_(0, order, score)
            keys = torch.empty_like(keys).index_copy_(0, order, keys)
        self._calls = (self._calls + [(score, keys)])[-2:]  # per_token reads the last one or two
        self._grid = None

    def per_token(self, maps: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample, (score (n,), keys (n, d)) of the visual tokens whose encoder rows are `maps[b]`
        (`ctx.vision_map(b)`: rows of the batch's image outputs, then of its video outputs)."""
        stats = [torch.stack([m.max(), m.min()]) for m in maps if m.numel()]
        bounds = torch.stack(stats).tolist() if stats else []  # every sample's rows: one host copy
        total = max((hi + 1 for hi, _ in bounds), default=0)
        if any(lo < 0 for _, lo in bounds):
            raise RuntimeError(f"{self.adapter.family}: visual tokens without an encoder row")
        if self._calls:  # encoder calls since the last read: the images' call, then the videos' one
            group = next(
                (
                    self._calls[-n:]
                    for n in (1, 2)
                    if len(self._calls) >= n and sum(int(c[0].numel()) for c in self._calls[-n:]) == total
                ),
                None,
            )
            self._calls = []
            self._group = group
        group = self._group
        if group is None or sum(int(c[0].numel()) for c in group) != total:
            raise RuntimeError(
                f"{self.adapter.family}: no vision-encoder signals for the {total} visual tokens of "
                "this forward (was the vision encoder run while the reducer was attached?)"
            )
        score = torch.cat([c[0] for c in group])
        keys = torch.cat([c[1] for c in group])
        return [(score[m.to(score.device)], keys[m.to(score.device)]) for m in maps]
