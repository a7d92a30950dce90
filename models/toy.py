"""The toy LLaVA: a *stock* ``transformers.LlavaForConditionalGeneration`` (small CLIP vision tower + small
Llama) with a word-level tokenizer, for the synthetic grid VQA task in ``experiments.tasks.synthetic_vqa``.

Because it is a stock Llava, every token-reduction strategy runs on it through the same adapter as real
LLaVA-1.5.  The image is ``GRID*CELL`` pixels with ``patch_size == CELL`` so the Llava "default" feature
selection (CLS dropped) gives exactly 64 visual tokens, one per grid cell (row-major).

Prompt format (``encode_batch``)::

    <s> <image> x 64 what colour is at row c column 5 ? answer :      -> next token = the answer word

``load_toy("toy-llava")`` loads the checkpoint shipped in ``models/toy_llava/``; ``"toy-llava-seed2"`` the
second one in ``models/toy_llava_seed2/`` (run 1 of the recipe with seed 2: 100 %, and attention finds the
question's cell, so attention-based methods separate from random on it; see models/toy_llava/README.md).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from experiments.tasks import synthetic_vqa as task

TOY_DIR = Path(__file__).resolve().parent / "toy_llava"
TOY_NAME = "toy-llava"
SHIPPED = {TOY_NAME: TOY_DIR, "toy-llava-seed2": TOY_DIR.with_name("toy_llava_seed2")}  # name -> folder

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
ANSWER_PROMPT = "answer :"

# CLIP-style normalisation constants (the real CLIP values, so the pipeline looks like LLaVA's)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CFG: dict[str, Any] = {
    "grid": task.GRID,
    "cell": task.CELL,
    "vision_hidden": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_intermediate": 512,
    "text_hidden": 128,
    "text_layers": 6,
    "text_heads": 4,
    "text_intermediate": 512,
    "vision_feature_layer": -1,
    "init_std": 0.02,
    "factorised_pos": True,
    "attn_implementation": "eager",
}


def build_tokenizer():
    """Word-level tokenizer built in code (no downloads): specials + the task vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["pad"], SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["image"]]
    vocab = {w: i for i, w in enumerate(specials + list(task.VOCAB))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        model_max_length=256,
        extra_special_tokens={"image_token": SPECIAL["image"]},
    )
    return fast


def _cfg(cfg: Any | None) -> dict[str, Any]:
    out = dict(DEFAULT_CFG)
    if cfg is not None:
        try:  # OmegaConf / dataclass / dict
            from omegaconf import OmegaConf

            if OmegaConf.is_config(cfg):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        out.update(dict(cfg))
    return out


def build_toy_model(cfg: Any | None = None, tokenizer=None):
    """A freshly initialised stock ``LlavaForConditionalGeneration`` (and its tokenizer)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    c = _cfg(cfg)
    tokenizer = tokenizer or build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(SPECIAL["image"])
    n_img = c["grid"] ** 2
    vision = CLIPVisionConfig(
        hidden_size=c["vision_hidden"],
        intermediate_size=c["vision_intermediate"],
        num_hidden_layers=c["vision_layers"],
        num_attention_heads=c["vision_heads"],
        image_size=c["grid"] * c["cell"],
        patch_size=c["cell"],
        num_channels=3,
        projection_dim=c["vision_hidden"],
        initializer_range=c["init_std"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=c["text_hidden"],
        intermediate_size=c["text_intermediate"],
        num_hidden_layers=c["text_layers"],
        num_attention_heads=c["text_heads"],
        num_key_value_heads=c["text_heads"],
        max_position_embeddings=256,
        initializer_range=c["init_std"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_img,
        vision_feature_select_strategy="default",
        vision_feature_layer=c["vision_feature_layer"],
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(int(c.get("seed", 0)))
    model = LlavaForConditionalGeneration(config)
    model.config._attn_implementation = c["attn_implementation"]
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = c["attn_implementation"]
    if c["factorised_pos"]:
        init_factorised_positions(model, c["grid"])
    return model, tokenizer


@torch.no_grad()
def init_factorised_positions(model, grid: int) -> None:
    """Initialise the CLIP per-patch position table as row-vector + column-vector sums
    (research/synthetic.md section 7: this plus a region curriculum removes the retrieval plateau)."""
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)  # older transformers wrap CLIPVisionTransformer
    emb = vt.embeddings.position_embedding.weight  # (1 + grid^2, d)
    d = emb.shape[1]
    g = torch.Generator().manual_seed(1234)
    rows = torch.randn(grid, d, generator=g) * 0.5
    cols = torch.randn(grid, d, generator=g) * 0.5
    table = (rows[:, None, :] + cols[None, :, :]).reshape(grid * grid, d)
    emb[1:] = table
    emb[0] = 0.0


def save_toy(model, tokenizer, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def resolve_toy_path(path_or_name: str | os.PathLike = TOY_NAME) -> Path:
    name = str(path_or_name)
    return SHIPPED.get(name) or SHIPPED.get(name.replace("_", "-")) or Path(path_or_name)


def load_toy(path_or_name: str | os.PathLike = TOY_NAME, attn_implementation: str = "eager", dtype=torch.float32):
    """Load (model, tokenizer) from a folder, or a shipped checkpoint by name (``SHIPPED``). Offline only."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    path = resolve_toy_path(path_or_name)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy checkpoint at {path}")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    model.eval()
    return model, tokenizer


def image_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """uint8 HxWx3 arrays (or PIL images) -> normalised float tensor (B, 3, H, W)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def prompt_text(question: str, n_image_tokens: int = task.GRID ** 2) -> str:
    return " ".join([SPECIAL["bos"]] + [SPECIAL["image"]] * n_image_tokens + [question, ANSWER_PROMPT])


def encode_batch(samples, tokenizer, n_image_tokens: int = task.GRID ** 2, with_labels: bool = False) -> dict:
    """Left-padded batch: ``input_ids`` (the 64 ``<image>`` tokens expanded in place), ``attention_mask``,
    ``pixel_values``; with ``with_labels`` also ``answer_ids`` (B,), the id of the single answer token,
    which is the next token after the last prompt position."""
    texts = [prompt_text(s.question, n_image_tokens) for s in samples]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    out = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": image_to_tensor([s.image for s in samples]),
    }
    if with_labels:
        out["answer_ids"] = torch.tensor(tokenizer.convert_tokens_to_ids([s.answer for s in samples]))
    return out


def answer_token_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.convert_tokens_to_ids(list(task.ANSWER_WORDS)))


def _decoder_layers(model):
    lm = model.model.language_model
    return lm.layers


def image_block_mask(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, L, L) attention mask (True = may attend): causal, key padding, and image-token keys
    blocked except where ``keep`` (B, L) is True.  Self-attention is always allowed so no row is empty."""
    B, L = input_ids.shape
    image = input_ids == model.config.image_token_id
    blocked = image if keep is None else image & ~keep.bool()
    allowed = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    allowed = allowed & ~blocked[:, None, None, :]
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=input_ids.device)[None, None]
    return allowed


class override_attention_mask:
    """Context manager: decoder layers in ``layers`` (default all) get the boolean (B, 1, L, L) mask ``allowed``
    (True = may attend) instead of the model's own, as a float mask for eager and a bool mask for sdpa, through
    forward-pre-hooks on the stock decoder layers.  Used for analysis and packed training, not for strategies."""

    def __init__(self, model, allowed: torch.Tensor, layers=None):
        self.model = model
        n = len(_decoder_layers(model))
        self.layers = list(range(n)) if layers is None else [i for i in layers if 0 <= i < n]
        impl = getattr(model.config.text_config, "_attn_implementation", None) or "eager"
        if impl == "eager":
            dtype = next(model.parameters()).dtype
            self.mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        else:
            self.mask = allowed
        self.handles = []

    def _hook(self, module, args, kwargs):
        kwargs["attention_mask"] = self.mask
        return args, kwargs

    def __enter__(self):
        layers = _decoder_layers(self.model)
        for i in self.layers:
            self.handles.append(layers[i].register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


class block_image_keys(override_attention_mask):
    """Emulates visual-token dropping for analysis (not a reduction strategy): decoder layers in ``layers`` see
    no image-token keys (except where ``keep`` (B, L) is True)."""

    def __init__(self, model, input_ids, attention_mask=None, layers=None, keep=None):
        super().__init__(model, image_block_mask(model, input_ids, attention_mask, keep), layers)


def encode_packed(groups, tokenizer, n_image_tokens: int = task.GRID ** 2) -> dict:
    """Several questions per image in one sequence, for training: ``<s> <image>*64 | q1 answer : | q2 answer :
    | ...`` (right-padded).  ``allowed`` (B, 1, L, L) lets each question see the image prefix and itself only,
    and ``position_ids`` give every question the positions it would have alone, so each answer's logits equal
    those of the question asked alone (checked in the tests).  ``answer_pos`` / ``answer_ids`` (N,) and
    ``answer_row`` (N,) locate the N supervised answers (the last token of each question block)."""
    prefix = tokenizer.convert_tokens_to_ids([SPECIAL["bos"]] + [SPECIAL["image"]] * n_image_tokens)
    P = len(prefix)
    seqs, blocks = [], []
    for g in groups:
        ids, bl = list(prefix), []
        for s in g:
            q = tokenizer.convert_tokens_to_ids(f"{s.question} {ANSWER_PROMPT}".split())
            bl.append((len(ids), len(q)))
            ids += q
        seqs.append(ids)
        blocks.append(bl)
    B, L = len(groups), max(len(x) for x in seqs)
    input_ids = torch.full((B, L), tokenizer.pad_token_id, dtype=torch.long)
    position_ids = torch.arange(L).repeat(B, 1)
    allowed = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1, 1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[:, 0, :P, :P] = causal[:P, :P]
    rows, pos, ans = [], [], []
    for b, (ids, bl, g) in enumerate(zip(seqs, blocks, groups)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        for (start, n), s in zip(bl, g):
            end = start + n
            allowed[b, 0, start:end, :P] = True
            allowed[b, 0, start:end, start:end] = causal[:n, :n]
            position_ids[b, start:end] = torch.arange(P, P + n)
            rows.append(b)
            pos.append(end - 1)
            ans.append(s.answer)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "pixel_values": image_to_tensor([g[0].image for g in groups]),
        "allowed": allowed,
        "answer_row": torch.tensor(rows),
        "answer_pos": torch.tensor(pos),
        "answer_ids": torch.tensor(tokenizer.convert_tokens_to_ids(ans)),
    }
