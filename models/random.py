"""Random-weight stock backbones by family and shape: the one builder behind the tests, the runner's
`random_llava` backbones and the benchmarks (no downloads, no processors).

`random_backbone(family, shape, attn="sdpa", dtype=torch.float32, seed=0)` builds the stock
transformers class of `family` (llava, llava_next, qwen2_vl, qwen2_5_vl) from `shape`:

  text:    hidden, ffn, layers, heads, vocab; kv_heads (default: heads), max_positions (16384),
           mrope_section (Qwen; default: head_dim / 2 split 2:3:3, as Qwen2-VL-7B's [16, 24, 24])
  vision:  CLIP (llava, llava_next): hidden, ffn, layers, heads, patch, grid (patches per side);
           qwen2_vl: hidden (embed_dim), ffn (hidden x mlp_ratio), layers, heads, patch, merge, temporal_patch;
           qwen2_5_vl: the same plus window and fullatt (full-attention block indexes)
  tokens:  image, video, vision_start, vision_end ids (default: vocab - 1, - 2, - 3, - 4)
  feature_layer (LLaVA's vision_feature_layer, default -2), select ("default" | "full"),
  pinpoints (LLaVA-NeXT's AnyRes grid, default 1x1, 1x2, 2x1, 2x2 tiles)

Weights come from `torch.manual_seed(seed)`; generation never stops on a random eos (eos None, pad 0)
and never emits a visual or marker token (no-cache decoding would re-read it as visual input).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from framework.errors import ConfigError

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
TEXT_KEYS = {"hidden", "ffn", "layers", "heads", "vocab", "kv_heads", "max_positions", "mrope_section"}
VISION_KEYS = {
    "llava": {"hidden", "ffn", "layers", "heads", "patch", "grid"},
    "llava_next": {"hidden", "ffn", "layers", "heads", "patch", "grid"},
    "qwen2_vl": {"hidden", "ffn", "layers", "heads", "patch", "merge", "temporal_patch"},
    "qwen2_5_vl": {"hidden", "ffn", "layers", "heads", "patch", "merge", "temporal_patch", "window", "fullatt"},
}
TOP_KEYS = {"text", "vision", "tokens", "feature_layer", "select", "pinpoints"}
TOKEN_KEYS = {"image", "video", "vision_start", "vision_end"}


def _check(what: str, given: Mapping, allowed: set, required: set = frozenset()) -> None:
    unknown, missing = sorted(set(given) - allowed), sorted(set(required) - set(given))
    if unknown or missing:
        raise ConfigError(
            f"random backbone {what}: "
            + (f"unknown key(s) {unknown}; " if unknown else "")
            + (f"missing {missing}; " if missing else "")
            + f"allowed: {sorted(allowed)}"
        )


def _tokens(shape: Mapping, vocab: int) -> dict[str, int]:
    t = dict(shape.get("tokens") or {})
    _check("tokens", t, TOKEN_KEYS)
    return {
        "image": t.get("image", vocab - 1),
        "video": t.get("video", vocab - 2),
        "vision_start": t.get("vision_start", vocab - 3),
        "vision_end": t.get("vision_end", vocab - 4),
    }


def _decoder_fields(t: Mapping) -> dict:
    """The decoder shape fields Llama and Qwen2 text configs share."""
    return dict(
        vocab_size=t["vocab"],
        hidden_size=t["hidden"],
        intermediate_size=t["ffn"],
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        num_key_value_heads=t.get("kv_heads", t["heads"]),
        max_position_embeddings=t.get("max_positions", 16384),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llama(t: Mapping):
    from transformers import LlamaConfig

    return LlamaConfig(**_decoder_fields(t))


def _clip(v: Mapping):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=v["hidden"],
        intermediate_size=v["ffn"],
        num_hidden_layers=v["layers"],
        num_attention_heads=v["heads"],
        image_size=v["patch"] * v["grid"],
        patch_size=v["patch"],
        projection_dim=v["hidden"],
    )


def _qwen_text(t: Mapping) -> dict:
    half = t["hidden"] // t["heads"] // 2
    t_part = half // 4
    section = t.get("mrope_section") or [t_part, (half - t_part) // 2, half - t_part - (half - t_part) // 2]
    return dict(
        **_decoder_fields(t),
        rope_parameters={"rope_type": "default", "mrope_section": list(section), "rope_theta": 10000.0},
    )


def _config(family: str, shape: Mapping, tok: dict):
    import transformers as tf

    t, v = shape["text"], shape["vision"]
    if family in ("llava", "llava_next"):
        common = dict(
            vision_config=_clip(v),
            text_config=_llama(t),
            image_token_index=tok["image"],
            image_seq_length=v["grid"] ** 2,
            vision_feature_layer=shape.get("feature_layer", -2),
            vision_feature_select_strategy=shape.get("select", "default"),
        )
        if family == "llava":
            return tf.LlavaConfig(**common)
        s = v["patch"] * v["grid"]
        tiles = [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
        return tf.LlavaNextConfig(image_grid_pinpoints=shape.get("pinpoints", tiles), **common)
    ids = dict(
        image_token_id=tok["image"],
        video_token_id=tok["video"],
        vision_start_token_id=tok["vision_start"],
        vision_end_token_id=tok["vision_end"],
    )
    vision = dict(
        depth=v["layers"],
        num_heads=v["heads"],
        patch_size=v["patch"],
        spatial_merge_size=v["merge"],
        temporal_patch_size=v["temporal_patch"],
        in_channels=3,
    )
    if family == "qwen2_vl":
        if v["ffn"] % v["hidden"]:
            raise ConfigError(f"qwen2_vl vision ffn={v['ffn']}: a multiple of its hidden={v['hidden']} (mlp_ratio)")
        vision.update(embed_dim=v["hidden"], hidden_size=t["hidden"], mlp_ratio=v["ffn"] // v["hidden"])
        return tf.Qwen2VLConfig(text_config=_qwen_text(t), vision_config=vision, **ids)
    vision.update(
        hidden_size=v["hidden"],
        intermediate_size=v["ffn"],
        out_hidden_size=t["hidden"],
        window_size=v["window"],
        fullatt_block_indexes=list(v["fullatt"]),
    )
    return tf.Qwen2_5_VLConfig(text_config=_qwen_text(t), vision_config=vision, **ids)


MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def random_backbone(
    family: str, shape: Mapping[str, Any], attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:
    """A stock `family` model with random weights (seeded), in eval mode; see the module docstring."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"random backbone family {family!r}; allowed: {list(FAMILIES)}")
    _check("shape", shape, TOP_KEYS, {"text", "vision"})
    _check("text shape", shape["text"], TEXT_KEYS, {"hidden", "ffn", "layers", "heads", "vocab"})
    _check(f"{family} vision shape", shape["vision"], VISION_KEYS[family], VISION_KEYS[family])
    tok = _tokens(shape, shape["text"]["vocab"])
    cfg = _config(family, shape, tok)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[family])._from_config(cfg, attn_implementation=attn, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.suppress_tokens = sorted(set(tok.values()))
    return model.eval()
