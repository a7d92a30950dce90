"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP vision tower + MLP projector + Llama decoder."""

from __future__ import annotations

import torch

from framework.backbones import register_adapter
from framework.context import split_rows

from .base import BackboneAdapter, require
from .clip import ClipTower


@register_adapter("llava", "LLaVA-1.5 (LlavaForConditionalGeneration)")
class LlavaAdapter(BackboneAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    stages = ("vision", "projector", "llm")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def tokens_per_image(self) -> int:
        v = self.model.config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    def fixed_tokens_per_image(self) -> int:
        return self.tokens_per_image()

    @property
    def vision_unit_tokens(self) -> int:
        return self.tokens_per_image()

    def vision_tower(self) -> ClipTower:
        """CLIP, one encoder unit per image."""
        return ClipTower(self.model, self.vision_unit_tokens)

    def vision_token_map(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Image j of the batch (prompt order) holds encoder features j * per .. (j + 1) * per - 1."""
        image = input_ids == self.image_token_id
        flat = torch.cumsum(image.flatten().long(), 0).view(image.shape) - 1
        return torch.where(image, flat, torch.full_like(flat, -1))

    def visual_grids(self, input_ids: torch.Tensor, kwargs: dict):
        """One side x side grid per image (row-major patches); with select strategy 'full' the image's
        first token is CLIP's CLS (a class token, outside the grid)."""
        from framework.context import Grid

        per = self.tokens_per_image()
        c = 1 if self.model.config.vision_feature_select_strategy == "full" else 0
        side = int(round((per - c) ** 0.5))
        is_image = input_ids == self.image_token_id
        out = []
        for pos in split_rows(
            is_image, self.image_tokens_per_sample(input_ids)
        ):  # no host round trip beyond the counts
            grids, cls = [], []
            for j in range(0, pos.numel() - per + 1, per):
                chunk = pos[j : j + per]
                cls.append(chunk[:c])
                grids.append(Grid(index=chunk[c:].view(side, side)))
            out.append((grids, torch.cat(cls) if c and cls else pos[:0]))
        return out

    def has_visual_input(self, kwargs: dict) -> bool:
        # generate() encodes images before the first forward and passes them as mm_encoder_outputs
        return (
            kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") is not None
        )

    def n_images(self, kwargs: dict) -> int:
        if kwargs.get("pixel_values") is not None:
            return int(kwargs["pixel_values"].shape[0])
        return len(kwargs["mm_encoder_outputs"]["image"].pooler_output)

    def visual_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        return input_ids == self.image_token_id

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        per_sample = self.image_tokens_per_sample(input_ids)
        per_image = self.tokens_per_image()
        n_images = self.n_images(kwargs)
        require(
            all(n > 0 for n in per_sample),
            f"a prompt has no image tokens (id {self.image_token_id}) but pixel_values were given; "
            f"every sample needs {per_image} image tokens per image",
        )
        require(
            sum(per_sample) == n_images * per_image and all(n % per_image == 0 for n in per_sample),
            f"image tokens per sample {per_sample} do not match {n_images} image(s) x "
            f"{per_image} tokens per image; allowed: a multiple of {per_image} per sample, "
            f"{n_images * per_image} in all",
        )
