"""The backbone adapter contract: where things are in one model family. Nothing else.

The engine asks an adapter for the decoder layers, the rotary module, which prompt positions are
visual, and how position ids look (1-D for Llama; 3-D M-RoPE for Qwen2-VL). Adapters never import a
strategy, and strategies never import a model class.
"""

from __future__ import annotations

import torch

from framework.attention import gather_rows
from framework.errors import ConfigError


class BackboneAdapter:
    family: str = ""
    model_classes: tuple[str, ...] = ()
    stages: tuple[str, ...] = ("projector", "llm")
    stage_notes: dict[str, str] = {}  # why a stage is not offered (appended to the refusal)
    supports_repack: bool = True  # whether positions="repack" has a faithful meaning here
    repack_note: str = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    # --- where things are --------------------------------------------------------------------
    @property
    def top(self) -> torch.nn.Module:
        return self.model

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation or "eager"

    def fixed_tokens_per_image(self) -> int | None:
        """Visual tokens per image when every image has the same count (LLaVA-1.5, the toy); None when the count
        varies by image (AnyRes, dynamic resolution)."""
        return None

    def shape(self) -> dict:
        """Decoder shape for accounting: hidden d, FFN width m, layers, KV heads and head dim."""
        c = self.text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return {
            "layers": self.num_layers,
            "hidden": c.hidden_size,
            "ffn": c.intermediate_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads or c.num_attention_heads,
            "head_dim": head_dim,
        }

    def attention_parts(self, layer: int):
        lay = self.layers[layer]
        return lay.input_layernorm, lay.self_attn

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.language_model.rotary_emb(x, position_ids)

    # --- inputs ---------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: dict) -> bool:
        raise NotImplementedError

    def visual_mask(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        raise NotImplementedError

    def new_prompt(self) -> None:
        """Called by the engine before it reads each forward's prompt: drops what `read_once` kept."""
        self._read = {}

    def read_once(self, name: str, tensors: tuple, read):
        """`read()`, the host values of `tensors` (a prompt's ids, image sizes, grids), once per prompt: the
        engine asks an adapter for its checks, spans and grids in turn, and each host read stalls a GPU.
        Kept until the engine's next forward (`new_prompt`); until then the tensors are held (so their memory
        cannot be reused by another prompt) and compared by identity and, outside inference mode, in-place
        version (inference tensors have none)."""
        versions = tuple(t._version if torch.is_tensor(t) and not t.is_inference() else None for t in tensors)
        kept = self.__dict__.setdefault("_read", {})  # name -> (tensors, versions, values) of this prompt
        last = kept.get(name)
        if last is None or versions != last[1] or any(a is not b for a, b in zip(tensors, last[0])):
            last = kept[name] = (tensors, versions, read())
        return last[2]

    def image_tokens_per_sample(self, input_ids: torch.Tensor) -> list[int]:
        """Each sample's count of `image_token_id` on the host: one copy per prompt (`read_once`), shared by the
        adapter's checks, spans and grids."""
        return self.read_once("image_tokens", (input_ids,), lambda: (input_ids == self.image_token_id).sum(1).tolist())

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """Raise ConfigError on prompts the engine cannot reduce (no visual tokens, count mismatch)."""

    def visual_spans(self, input_ids: torch.Tensor, kwargs: dict, visual: torch.Tensor) -> torch.Tensor:
        """(B, L) long: the image / frame (0-based per sample, in prompt order) each visual position
        belongs to, -1 elsewhere. Default: runs of consecutive visual positions, cut into chunks of
        `fixed_tokens_per_image()` when the adapter has a fixed count per image (adjacent images)."""
        per = self.fixed_tokens_per_image()
        # a run starts at a visual position whose left neighbour is not visual (or, with a fixed count
        # per image, at every per-th visual token of the sample); batched, so no per-sample host copy
        starts = visual.clone()
        starts[:, 1:] &= ~visual[:, :-1]
        if per:
            starts |= visual & ((visual.long().cumsum(1) - 1) % per == 0)
        return torch.where(visual, starts.long().cumsum(1) - 1, -1)

    def hooks(self) -> list:
        """Adapter-side hooks the engine attaches (and removes on detach); handles with `.remove()`."""
        return []

    def vision_tower(self):
        """The vision encoder's signals for vision-stage strategies (`framework.vision.VisionTower`),
        or None where the backbone offers none."""
        return None

    def vision_token_map(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """For vision-stage strategies: (B, L) long, at each visual position the vision-encoder feature
        it comes from (unit * vision_unit_tokens + slot, units = the encoder's batch rows, in order),
        -1 where none (newlines, text). None where the backbone has no such 1:1 map."""
        return None

    def visual_grids(self, input_ids: torch.Tensor, kwargs: dict):
        """Per sample: (list of `framework.context.Grid` over sequence positions, (n,) positions of class
        tokens). Grids let strategies pool / lay out visual tokens in 2-D (see `StageContext.grids`).
        Return None where the adapter cannot tell (then `ctx.grids` raises)."""
        return None

    # --- positions (1-D default) --------------------------------------------------------------
    def text_positions(self, pos: torch.Tensor) -> torch.Tensor:
        return pos if pos.dim() == 2 else pos[None]

    def gather_positions(self, pos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return gather_rows(pos.expand(index.shape[0], -1), index)

    def repack_positions(self, pos: torch.Tensor, slots, base: torch.Tensor) -> torch.Tensor:
        return base[:, None] + (slots.valid.long().cumsum(1) - 1).clamp(min=0)

    def shift_positions(self, pos: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return pos + delta.to(pos.dtype)[:, None]


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)
