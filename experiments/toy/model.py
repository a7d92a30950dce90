"""The toy LLaVA: a *stock* ``transformers.LlavaForConditionalGeneration`` (a 2-layer CLIP vision tower, an
8-layer Llama) with a word-level tokenizer and a stock ``LlavaProcessor``, for the scenes of ``task``.

Every reduction strategy runs on it through the same adapter as real LLaVA-1.5. The image is 96 x 96 px with
``patch_size`` 8, so the "default" feature selection (CLS dropped) gives 144 visual tokens, row-major.

Prompt format (what ``encode_batch`` and the saved processor both produce)::

    <s> <image> x 144 what colour is the circle ? answer :      -> the next token is the answer word
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from experiments.toy import task

CHECKPOINT = Path(__file__).resolve().parent / "toy_llava"
TOY_NAME = "toy-llava"
SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
ANSWER_PROMPT = "answer :"
CAPTION_PROMPT = "describe :"
N_VISUAL = task.GRID**2
# the real CLIP normalisation, so the pipeline is LLaVA's
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CFG: dict[str, Any] = {
    "vision_hidden": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_hidden": 128,
    "text_layers": 8,
    "text_heads": 4,
    "mlp_ratio": 4,
    "init_std": 0.02,
    "attn_implementation": "sdpa",
    "seed": 0,
}


def build_tokenizer():
    """Word-level tokenizer built in code: the specials, then the task vocabulary; adds ``<s>`` in front."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL[k] for k in ("pad", "unk", "bos", "eos", "image")]
    vocab = {w: i for i, w in enumerate(specials + task.VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        model_max_length=512,
        extra_special_tokens={"image_token": SPECIAL["image"]},
    )


def build_processor(tokenizer=None):
    """A stock ``LlavaProcessor``: CLIP normalisation at 96 px (no resize), 144 ``<image>`` tokens per image."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        do_resize=True,
        size={"height": task.IMAGE_SIZE, "width": task.IMAGE_SIZE},
        do_center_crop=False,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=task.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=SPECIAL["image"],
    )


def build_toy_model(cfg: dict | None = None, tokenizer=None):
    """A freshly initialised stock ``LlavaForConditionalGeneration`` and its tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    c = {**DEFAULT_CFG, **(cfg or {})}
    tokenizer = tokenizer or build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=c["vision_hidden"],
        intermediate_size=c["mlp_ratio"] * c["vision_hidden"],
        num_hidden_layers=c["vision_layers"],
        num_attention_heads=c["vision_heads"],
        image_size=task.IMAGE_SIZE,
        patch_size=task.PATCH,
        projection_dim=c["vision_hidden"],
        initializer_range=c["init_std"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c["text_hidden"],
        intermediate_size=c["mlp_ratio"] * c["text_hidden"],
        num_hidden_layers=c["text_layers"],
        num_attention_heads=c["text_heads"],
        num_key_value_heads=c["text_heads"],
        max_position_embeddings=512,
        initializer_range=c["init_std"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(SPECIAL["image"]),
        image_seq_length=N_VISUAL,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(int(c["seed"]))
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=c["attn_implementation"])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_toy(model, tokenizer, path: str | os.PathLike) -> Path:
    """Weights, tokenizer and processor, loadable with stock ``from_pretrained`` calls."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_processor(tokenizer).save_pretrained(path)
    return path


def resolve_toy_path(path_or_name: str | os.PathLike = TOY_NAME) -> Path:
    return CHECKPOINT if str(path_or_name) in (TOY_NAME, "toy_llava") else Path(path_or_name)


def load_toy(path_or_name: str | os.PathLike = TOY_NAME, attn_implementation: str = "sdpa", dtype=torch.float32):
    """(model, tokenizer) from a folder, or the shipped checkpoint by name. Offline only."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    path = resolve_toy_path(path_or_name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy checkpoint at {path}")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------ inputs
def image_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """uint8 HxWx3 arrays (or PIL images) -> CLIP-normalised float tensor (B, 3, H, W)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def prompt_text(question: str) -> str:
    return " ".join([SPECIAL["bos"]] + [SPECIAL["image"]] * N_VISUAL + [question, ANSWER_PROMPT])


def encode_batch(samples, tokenizer, with_labels: bool = False) -> dict:
    """Left-padded batch: ``input_ids`` (the 144 ``<image>`` tokens in place), ``attention_mask``,
    ``pixel_values``; with ``with_labels`` also ``answer_ids`` (B,), the id of the one-word answer."""
    enc = tokenizer(
        [prompt_text(s.question) for s in samples], padding=True, return_tensors="pt", add_special_tokens=False
    )
    out = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": image_to_tensor([s.image for s in samples]),
    }
    if with_labels:
        out["answer_ids"] = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]))
    return out


def answer_token_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.convert_tokens_to_ids(task.ANSWER_WORDS))


# ------------------------------------------------------------------------------------------ packed training
def encode_packed(images, tokenizer) -> dict:
    """Several supervised blocks per image in one right-padded sequence, for training::

        <s> <image>*144 | q1 answer : | q2 answer : | ... | describe : red circle a 1 , ... </s>

    ``images``: one dict per image with ``image`` (uint8 array), ``questions`` [(question, answer)], optional
    ``caption`` (str) and ``keep`` (bool array over the 144 visual tokens, default all) with ``repack``
    (bool). Dropped visual tokens are seen by no other token; with ``repack`` the kept ones take positions
    1..n_kept and the blocks start right after them (as after a re-packing reducer), otherwise every token keeps
    its position. Each block sees the image prefix and itself only, at the positions it would have alone.

    Returns ``input_ids``, ``position_ids``, ``pixel_values``, ``allowed`` (B, 1, L, L) bool, and the supervised
    targets as flat tensors ``target_row``, ``target_pos``, ``target_ids`` and ``target_is_answer`` (False for
    caption tokens)."""
    ids_of = tokenizer.convert_tokens_to_ids
    prefix = ids_of([SPECIAL["bos"]] + [SPECIAL["image"]] * N_VISUAL)
    P = len(prefix)
    seqs = []
    for im in images:
        ids, blocks = list(prefix), []
        for q, a in im["questions"]:
            words = f"{q} {ANSWER_PROMPT}".split()
            blocks.append((len(ids), len(words), [None] * (len(words) - 1) + [a], True))
            ids += ids_of(words)
        if im.get("caption"):
            cap = im["caption"].split()
            words = CAPTION_PROMPT.split() + cap
            targets = [None] * (len(CAPTION_PROMPT.split()) - 1) + cap + [SPECIAL["eos"]]
            blocks.append((len(ids), len(words), targets, False))
            ids += ids_of(words)
        seqs.append((ids, blocks))
    B, L = len(images), max(len(s[0]) for s in seqs)
    input_ids = torch.full((B, L), tokenizer.pad_token_id, dtype=torch.long)
    position_ids = torch.arange(L).repeat(B, 1)
    allowed = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    rows, pos, tgt, is_answer = [], [], [], []
    for b, ((ids, blocks), im) in enumerate(zip(seqs, images)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        keep = torch.ones(P, dtype=torch.bool)
        if im.get("keep") is not None:
            keep[1:] = torch.as_tensor(np.asarray(im["keep"], bool))
        allowed[b, 0, :P, :P] = causal[:P, :P] & keep[None, :]
        allowed[b, 0, :P, :P] |= torch.eye(P, dtype=torch.bool)
        start_pos = P
        if im.get("repack") and im.get("keep") is not None:
            kept_idx = keep.nonzero().flatten()
            position_ids[b, kept_idx] = torch.arange(len(kept_idx))
            start_pos = len(kept_idx)
        for start, n, targets, answer_block in blocks:
            end = start + n
            allowed[b, 0, start:end, :P] = keep[None, :]
            allowed[b, 0, start:end, start:end] = causal[:n, :n]
            position_ids[b, start:end] = torch.arange(start_pos, start_pos + n)
            for k, t in enumerate(targets):
                if t is not None:
                    rows.append(b)
                    pos.append(start + k)
                    tgt.append(t)
                    is_answer.append(answer_block)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "pixel_values": image_to_tensor([im["image"] for im in images]),
        "allowed": allowed,
        "target_row": torch.tensor(rows),
        "target_pos": torch.tensor(pos),
        "target_ids": torch.tensor(ids_of(tgt)),
        "target_is_answer": torch.tensor(is_answer),
    }


class override_attention_mask:
    """Context manager: the decoder layers get the boolean (B, 1, L, L) mask ``allowed`` (True = may attend)
    instead of the model's own, through forward-pre-hooks on the stock layers (as a float mask for eager).
    For packed training and analysis only; reduction strategies go through the engine."""

    def __init__(self, model, allowed: torch.Tensor):
        self.layers = model.model.language_model.layers
        impl = getattr(model.config.text_config, "_attn_implementation", None) or "eager"
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            self.mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        else:
            self.mask = allowed
        self.handles = []

    def _hook(self, module, args, kwargs):
        kwargs["attention_mask"] = self.mask
        return args, kwargs

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False
