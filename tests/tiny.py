"""Tiny random models and inputs for tests and examples (no hub access)."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

VOCAB, IMAGE_TOKEN = 128, 100


def llama_config(layers: int = 4, **kw) -> LlamaConfig:
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    args.update(kw)
    return LlamaConfig(**args)


def make_llava(layers: int = 4, attn: str = "sdpa", grid: int = 4, seed: int = 0, **text_kw):
    torch.manual_seed(seed)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=14 * grid, patch_size=14, projection_dim=32)
    cfg = LlavaConfig(vision_config=clip, text_config=llama_config(layers, **text_kw), image_token_index=IMAGE_TOKEN,
                      image_seq_length=grid * grid, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).eval()
    # the generation config must not stop early on a random eos
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def llava_inputs(model, prompts: list[tuple[int, int]], seed: int = 0):
    """A left-padded batch; each prompt = (tokens before the image, tokens after the image)."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.config.image_seq_length
    seqs = []
    for pre, post in prompts:
        before = torch.randint(3, 90, (pre,), generator=g)
        after = torch.randint(3, 90, (post,), generator=g)
        seqs.append(torch.cat([torch.tensor([1]), before, torch.full((n_img,), IMAGE_TOKEN), after]))
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    size = model.config.vision_config.image_size
    pixels = torch.randn(len(seqs), 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """generate()'s convention for left padding: cumsum(mask) - 1, padding at 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
