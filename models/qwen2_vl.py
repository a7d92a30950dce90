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
"""
from __future__ import annotations

import torch

from framework.errors import ConfigError

from .base import BackboneAdapter, require

VIDEO_SPANS = ("frame", "video")


class Qwen2VLAdapter(BackboneAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    stages = ("projector", "llm")
    supports_repack = False
    repack_note = "3-D M-RoPE positions are grid coordinates; use positions='keep'"
    stage_notes = {"vision": "its vision encoder has no CLS token and packs all images into one sequence "
                             "with 2-D rotary positions (and windowed attention in 2.5); its patch merger "
                             "concatenates fixed 2x2 patch neighbourhoods into one LLM token, so patches "
                             "merged or dropped inside the encoder have no faithful LLM token; reduce at the "
                             "projector stage (on the merged tokens) or in the LLM instead"}

    def __init__(self, model: torch.nn.Module, video_span: str = "frame"):
        super().__init__(model)
        require(video_span in VIDEO_SPANS, f"{self.family}: video_span={video_span!r}; allowed: {list(VIDEO_SPANS)}")
        self.video_span = video_span

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
        raise ConfigError(f"{self.family}: this strategy hooks the projector and needs a fixed square grid of "
                          f"tokens per image (LLaVA-1.5); dynamic-resolution images have variable token counts. "
                          "Use a strategy that decides on the language model's input or layers.")

    @property
    def projector(self):
        self.tokens_per_image()

    # --- inputs -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict) -> bool:
        enc = kwargs.get("mm_encoder_outputs") or {}
        return (kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
                or enc.get("image") is not None or enc.get("video") is not None)

    def visual_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        require(kwargs.get("mm_token_type_ids") is not None,
                f"{self.family}: mm_token_type_ids (0 text, 1 image, 2 video) must be passed with images or "
                "videos; the model needs it for M-RoPE")
        self._spans(input_ids, kwargs)

    def _items(self, kwargs: dict, modality: str) -> list[tuple[int, int | None]]:
        """(tokens, tokens per frame or None) of each image / video of the batch, in order: from the
        grids (plain forward), else from the pre-encoded features `generate` passes instead."""
        grid = kwargs.get(f"{modality}_grid_thw")
        m2 = self.merge ** 2
        if grid is not None:
            return [(int(t) * int(h) * int(w) // m2, int(h) * int(w) // m2) for t, h, w in grid.tolist()]
        enc = (kwargs.get("mm_encoder_outputs") or {}).get(modality)
        return [] if enc is None else [(int(f.shape[0]), None) for f in enc.pooler_output]

    def _spans(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """(B, L) span id per visual position (-1 elsewhere); checks token counts against the inputs.

        Video frames come from the grid, or (under `generate`, which passes no grid) from changes of
        the temporal M-RoPE position that `generate` passes as position_ids."""
        items = {self.image_token_id: self._items(kwargs, "image"), self.video_token_id: self._items(kwargs, "video")}
        pos = kwargs.get("position_ids")
        temporal = pos[-3] if pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4) else None
        used = {k: 0 for k in items}
        out = torch.full(input_ids.shape, -1, dtype=torch.long, device=input_ids.device)
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            vis = torch.nonzero((ids == self.image_token_id) | (ids == self.video_token_id)).flatten()
            require(vis.numel() > 0, f"{self.family}: sample {b} has no image/video tokens but visual inputs "
                                     "were given")
            labels = torch.empty(vis.numel(), dtype=torch.long)
            i, span = 0, 0
            while i < vis.numel():
                tok = int(ids[vis[i]])
                kind = "image" if tok == self.image_token_id else "video"
                require(used[tok] < len(items[tok]),
                        f"{self.family}: the prompts hold more {kind} tokens than the {kind} inputs "
                        f"({len(items[tok])} {kind}(s))")
                n, per_frame = items[tok][used[tok]]
                used[tok] += 1
                chunk = vis[i:i + n]
                require(chunk.numel() == n and bool((ids[chunk] == tok).all()),
                        f"{self.family}: sample {b}: a {kind} of {n} tokens needs {n} consecutive {kind} "
                        f"tokens (id {tok}); found fewer")
                if kind == "video" and self.video_span == "frame":
                    if per_frame is not None:
                        frame = torch.arange(n) // per_frame
                    elif temporal is not None:
                        t = temporal[b if temporal.shape[0] > 1 else 0, chunk].cpu()
                        frame = torch.cat([torch.zeros(1, dtype=torch.long), (t[1:] != t[:-1]).long()]).cumsum(0)
                    else:
                        frame = torch.zeros(n, dtype=torch.long)
                    labels[i:i + n] = span + frame
                    span += int(frame[-1]) + 1
                else:
                    labels[i:i + n] = span
                    span += 1
                i += n
            out[b, vis] = labels.to(out.device)
        for tok, kind in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            require(used[tok] == len(items[tok]),
                    f"{self.family}: {len(items[tok])} {kind}(s) given but the prompts hold tokens for {used[tok]}")
        return out

    def visual_spans(self, input_ids: torch.Tensor, kwargs: dict, visual: torch.Tensor) -> torch.Tensor:
        return self._spans(input_ids, kwargs).masked_fill(~visual, -1)

    def visual_grids(self, input_ids: torch.Tensor, kwargs: dict):
        """One grid per image / video frame: (h, w) of image_grid_thw / video_grid_thw divided by
        spatial_merge_size (tokens are row-major per frame). Under `generate`, which passes no grids,
        the shape comes from the H/W rows of the M-RoPE position_ids it passes; None when neither is
        available."""
        from framework.context import Grid

        pos = kwargs.get("position_ids")
        hw = pos[-2:] if pos is not None and pos.dim() == 3 and pos.shape[0] in (3, 4) else None
        shapes = {}
        for tok, modality in ((self.image_token_id, "image"), (self.video_token_id, "video")):
            grid = kwargs.get(f"{modality}_grid_thw")
            if grid is not None:
                shapes[tok] = [(int(t), int(h) // self.merge, int(w) // self.merge) for t, h, w in grid.tolist()]
            else:
                n_items = len(self._items(kwargs, modality))
                if n_items and hw is None:
                    return None
                shapes[tok] = [None] * n_items
        used = {k: 0 for k in shapes}
        out = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b]
            vis = torch.nonzero((ids == self.image_token_id) | (ids == self.video_token_id)).flatten()
            grids, i = [], 0
            while i < vis.numel():
                tok = int(ids[vis[i]])
                shape = shapes[tok][used[tok]]
                used[tok] += 1
                if shape is None:  # generate: the run of this item's tokens, shaped by its H/W positions
                    n = int(self._items(kwargs, "image" if tok == self.image_token_id else "video")[used[tok] - 1][0])
                    chunk = vis[i:i + n]
                    hb = hw[0, b if hw.shape[1] > 1 else 0, chunk]
                    wb = hw[1, b if hw.shape[1] > 1 else 0, chunk]
                    rows, cols = int(hb.max() - hb.min()) + 1, int(wb.max() - wb.min()) + 1
                    shape = (n // (rows * cols), rows, cols)
                t, rows, cols = shape
                chunk = vis[i:i + t * rows * cols]
                grids += [Grid(index=f.view(rows, cols)) for f in chunk.view(t, rows * cols)]
                i += t * rows * cols
            out.append((grids, vis[:0]))
        return out

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


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
