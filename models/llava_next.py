"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): AnyRes image tokens + Llama decoder.

One image becomes, in this order: the base (low-res) view's `side x side` tokens, then the high-res
crops' features, unpadded to the image's aspect ratio and laid out row by row, with one `image_newline`
token at the end of every row (an image without high-res crops gets a single trailing newline).
All of these sit at `image_token_id` positions in `input_ids`.

Newline tokens (`newline=`):
  * "visual" (default, as the official FastV / SparseVLM LLaVA-NeXT code does, which reduces the whole
    image-token range): newline tokens are visual tokens like any other; they can be dropped and they
    count towards the budget.
  * "keep": newline tokens are treated as text, so they are always kept and never counted in a budget
    (note: the last row's newline then is the first "text" slot after the image).

Spans (`ctx.spans(b)`): one span per image (base view + crops + newlines), in prompt order; budgets
per image therefore use `budget_scope="per_span"`.

Vision stage: the CLIP tower encodes every crop (base view first) as one unit, so vision-stage
strategies (ToMe, VisionZip) act per crop, as VisionZip's own LLaVA-NeXT code does. A merged token's
value is written to all of its patches' feature slots before the projector; the model then unpads and
packs as usual, and `vision_token_map` (the model's own packing run on index-valued features) tells
which LLM tokens come from which crop patch: one token per surviving group is kept (groups whose
patches were all unpadded away vanish, as dominant tokens do in VisionZip's code); newlines are kept.
Under `generate`, which passes only packed features, the image sizes come from a wrapper around
`get_image_features` (attached by the engine through `hooks`, removed on detach).
"""

from __future__ import annotations

import functools

import torch

from framework.backbones import register_adapter
from framework.context import split_rows
from framework.errors import ConfigError

from .base import BackboneAdapter, require
from .clip import ClipTower

NEWLINE_MODES = ("visual", "keep")


@register_adapter("llava_next", "LLaVA-NeXT AnyRes (LlavaNextForConditionalGeneration)")
class LlavaNextAdapter(BackboneAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    stages = ("vision", "projector", "llm")

    def __init__(self, model: torch.nn.Module, newline: str = "visual"):
        super().__init__(model)
        require(newline in NEWLINE_MODES, f"llava_next: newline={newline!r}; allowed: {list(NEWLINE_MODES)}")
        self.newline = newline
        self._layout_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._seen_sizes = None

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # --- AnyRes layout ----------------------------------------------------------------------------
    def image_feature_map(self, image_size) -> torch.Tensor:
        """(n_tokens,) long for one image of size (height, width): per LLM token, the encoder feature it
        comes from (crop * tokens_per_crop + slot, crops in the model's order, base view first), -1 at
        newline tokens. Runs the model's own `pack_image_features` on index-valued features, so the
        layout (crop grid, unpadding, newlines) is exactly the model's."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        key = tuple(int(x) for x in (image_size.tolist() if torch.is_tensor(image_size) else image_size))
        if key not in self._layout_cache:
            cfg = self.model.config
            v = cfg.vision_config
            n_crops = image_size_to_num_patches(list(key), cfg.image_grid_pinpoints, v.image_size)
            per = self.vision_unit_tokens
            feats = torch.arange(n_crops * per, dtype=torch.float64).view(n_crops, per, 1)
            packed, _ = self.model.model.pack_image_features(
                [feats],
                [list(key)],
                cfg.vision_feature_select_strategy,
                image_newline=torch.tensor([-1.0], dtype=torch.float64),
            )
            self._layout_cache[key] = packed[0][:, 0].round().long()
        return self._layout_cache[key]

    def image_layout(self, image_size) -> torch.Tensor:
        """(n_tokens,) bool for one image of size (height, width): True at its newline tokens."""
        return self.image_feature_map(image_size) < 0

    def _layouts(self, kwargs: dict) -> list[torch.Tensor]:
        """Newline layouts (host tensors) of all images of the batch, in order: from `image_sizes` (plain
        forward), else from the pre-encoded features `generate` passes (newline rows equal `image_newline`);
        either way one copy to the host for the batch, once per prompt."""
        sizes = kwargs.get("image_sizes")
        if sizes is not None:
            return [self.image_layout(s) for s in self._sizes_on_host(sizes)]
        enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        require(enc is not None, "llava_next: image_sizes must be passed with the images (the processor returns it)")
        feats = tuple(enc.pooler_output)
        nl = self.model.model.image_newline

        def read():
            flags = torch.cat([(f == nl.to(f)).all(-1) for f in feats]).cpu()
            return list(flags.split([int(f.shape[0]) for f in feats]))

        return self.read_once("layouts", feats, read)

    def _sizes_on_host(self, sizes) -> list[tuple[int, ...]]:
        """image_sizes as host tuples, read once per prompt (`read_once`) when they are a tensor."""
        if not torch.is_tensor(sizes):
            return _host_sizes(sizes)
        return self.read_once("image_sizes", (sizes,), lambda: _host_sizes(sizes))

    def _assign(self, input_ids: torch.Tensor, kwargs: dict) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """Per sample, the newline layouts of its images (images are consumed in batch order), and its
        image-token positions (one count copy and one static-size nonzero for the batch)."""
        layouts = self._layouts(kwargs)
        image = input_ids == self.image_token_id
        per_sample = self.image_tokens_per_sample(input_ids)
        out, j = [], 0
        for b, n in enumerate(per_sample):
            mine, total = [], 0
            while total < n and j < len(layouts):
                mine.append(layouts[j])
                total += int(layouts[j].numel())
                j += 1
            require(
                total == n and n > 0,
                f"llava_next: sample {b} has {n} image tokens (id {self.image_token_id}) but its images "
                f"need {total}; per-image counts from image_sizes: {[int(lay.numel()) for lay in layouts]}",
            )
            out.append(mine)
        require(j == len(layouts), f"llava_next: {len(layouts)} images given but the prompts hold only {j}")
        return out, split_rows(image, per_sample)

    def _image_sizes(self, kwargs: dict):
        """image_sizes of this forward: passed (plain forward), else the ones `generate` encoded with."""
        sizes = kwargs.get("image_sizes")
        if sizes is None and kwargs.get("pixel_values") is None:
            sizes = self._seen_sizes
        return sizes

    # --- vision stage: CLIP per crop -------------------------------------------------------------
    @property
    def vision_unit_tokens(self) -> int:
        """Feature tokens per encoder unit (one crop, the base view included)."""
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size) ** 2 + (self.model.config.vision_feature_select_strategy == "full")

    def vision_tower(self) -> ClipTower:
        """CLIP, one encoder unit per crop (the base view first)."""
        return ClipTower(self.model, self.vision_unit_tokens)

    def tokens_per_image(self) -> int:
        raise ConfigError(f"{self.family}: AnyRes images have variable token counts (no fixed tokens per image)")

    def hooks(self) -> list:
        """Record the image_sizes `get_image_features` is called with: `generate` encodes the images
        before the first forward and passes only the packed features, whose crop layout then needs them."""
        inner = self.model.model
        orig = inner.get_image_features

        @functools.wraps(orig)
        def get_image_features(*args, **kwargs):
            self._seen_sizes = kwargs["image_sizes"] if "image_sizes" in kwargs else args[1]
            return orig(*args, **kwargs)

        inner.get_image_features = get_image_features

        class _Handle:
            def remove(self_):
                inner.__dict__.pop("get_image_features", None)

        return [_Handle()]

    def vision_token_map(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """(B, L) long: at each image-token position the encoder feature it comes from, as unit *
        vision_unit_tokens + slot over the batch's crops in encoder order; -1 at newlines and elsewhere.
        None when the image sizes are unknown."""
        sizes = self._image_sizes(kwargs)
        if sizes is None:
            return None
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        maps, offset = [], 0
        per = self.vision_unit_tokens
        for size in self._sizes_on_host(sizes):
            m = self.image_feature_map(size)
            maps.append(torch.where(m >= 0, m + offset * per, m))
            offset += image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        require(
            [int(m.numel()) for m in maps] == [int(lay.numel()) for lay in self._layouts(kwargs)],
            f"{self.family}: the recorded image sizes do not match this forward's images",
        )
        return self._at_image_tokens(input_ids, (torch.cat(maps), -1))[0]

    def _at_image_tokens(self, input_ids: torch.Tensor, *values: tuple[torch.Tensor, object]) -> list[torch.Tensor]:
        """Per (host values, fill): a (B, L) tensor with the values at the image-token positions in row-major
        order (images are consumed in batch order), `fill` elsewhere: one static-size nonzero for all, and
        one scatter each."""
        image = (input_ids == self.image_token_id).flatten()
        at = torch.nonzero_static(image, size=int(values[0][0].numel())).squeeze(1)
        out = []
        for v, fill in values:
            t = torch.full((input_ids.numel(),), fill, dtype=v.dtype, device=input_ids.device)
            t[at] = v.to(t.device, non_blocking=True)
            out.append(t.view(input_ids.shape))
        return out

    # --- inputs -------------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict) -> bool:
        return (
            kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        )

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        self._assign(input_ids, kwargs)

    def _per_position(self, input_ids: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) image index per image-token position (-1 elsewhere) and (B, L) newline flags, written
        with one scatter each from host-built values."""
        assigned, _ = self._assign(input_ids, kwargs)
        ids = [torch.full((int(lay.numel()),), i, dtype=torch.long) for mine in assigned for i, lay in enumerate(mine)]
        lines = torch.cat([lay for mine in assigned for lay in mine])
        span, newline = self._at_image_tokens(input_ids, (torch.cat(ids), -1), (lines, False))
        return span, newline

    def visual_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        image = input_ids == self.image_token_id
        if self.newline == "visual":
            return image
        return image & ~self._per_position(input_ids, kwargs)[1]

    def visual_spans(self, input_ids: torch.Tensor, kwargs: dict, visual: torch.Tensor) -> torch.Tensor:
        span, _ = self._per_position(input_ids, kwargs)
        return span.masked_fill(~visual, -1)

    def visual_grids(self, input_ids: torch.Tensor, kwargs: dict):
        """Per image: the base view's side x side grid, then (when it has high-res crops) the unpadded
        crop grid, whose rows each end in a newline token (`row_end`). A crop-less image's single
        trailing newline is a layout token outside the grids."""
        from framework.context import Grid

        v = self.model.config.vision_config
        side = v.image_size // v.patch_size
        out = []
        for layouts, pos in zip(*self._assign(input_ids, kwargs)):
            grids, start = [], 0
            for lay in layouts:  # host layouts: their checks need nothing from the device
                chunk = pos[start : start + int(lay.numel())]
                start += int(lay.numel())
                grids.append(Grid(index=chunk[: side * side].view(side, side)))
                rest, nl = chunk[side * side :], lay[side * side :].numpy()
                rows = int(nl.sum())
                if rest.numel() > 1 and rows:
                    cols = rest.numel() // rows - 1
                    block = rest.view(rows, cols + 1)
                    require(bool(nl.reshape(rows, cols + 1)[:, -1].all()), "llava_next: unexpected AnyRes layout")
                    grids.append(Grid(index=block[:, :cols], row_end=block[:, -1]))
            out.append((grids, pos[:0]))
        return out

    def newline_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """(B, L) True at the image-newline positions (for analysis and overlays)."""
        return self._per_position(input_ids, kwargs)[1]


def _host_sizes(sizes) -> list[tuple[int, ...]]:
    """image_sizes (a tensor or nested sequence) as host tuples, in one copy for the batch."""
    rows = sizes.tolist() if torch.is_tensor(sizes) else sizes
    return [tuple(int(x) for x in (r.tolist() if torch.is_tensor(r) else r)) for r in rows]
