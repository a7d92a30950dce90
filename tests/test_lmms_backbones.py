"""The lmms-eval plugin on every backbone family, through its public entry (`SparseVLMLmms(...)` then
`generate_until`), with the families' stock processors over the toy tokenizer: a reducer acts (fewer visual
tokens after its layer), and batch 2 answers exactly as batch 1."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.tiny import TINY_TOY

TEXT = {"hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2, "layers": 4, "max_positions": 4096}
VISION = {"hidden": 32, "ffn": 64, "layers": 2, "heads": 4, "patch": 14}


def _tokenizer(extra=()):
    from experiments.toy.model import build_tokenizer

    tok = build_tokenizer()
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    return tok


def _ids(tok, image: str) -> dict:
    return {
        "image": tok.convert_tokens_to_ids(image),
        "video": len(tok) + 1,
        "vision_start": len(tok) + 2,
        "vision_end": len(tok) + 3,
    }


def toy_llava():
    from experiments.toy.model import build_processor, build_toy_model

    model, tok = build_toy_model(TINY_TOY)
    return model, build_processor(tok)


def llava_next():
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from models.random import random_backbone

    tok = _tokenizer()
    tiles = [[28, 28], [28, 56], [56, 28], [56, 56]]
    model = random_backbone(
        "llava_next",
        {
            "text": {**TEXT, "vocab": len(tok) + 8},
            "vision": {**VISION, "grid": 2},
            "tokens": _ids(tok, "<image>"),
            "pinpoints": tiles,
        },
    )
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=tiles
    )
    return model, LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=14,
        image_token="<image>",
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )


def qwen2_vl():
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.random import random_backbone

    class ImagesOnly(Qwen2VLProcessor):
        """The stock processor for images; its video processor needs torchvision, which this venv leaves out."""

        def check_argument_for_proper_class(self, name, arg):
            return (
                None
                if name == "video_processor" and arg is None
                else super().check_argument_for_proper_class(name, arg)
            )

    specials = ["<image>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]  # the toy's image token pads
    tok = _tokenizer(specials[1:])
    ids = dict(zip(["image", "video", "vision_start", "vision_end"], tok.convert_tokens_to_ids(specials)))
    model = random_backbone(
        "qwen2_vl",
        {"text": {**TEXT, "vocab": len(tok) + 8}, "tokens": ids, "vision": {**VISION, "merge": 2, "temporal_patch": 2}},
    )
    images = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    # Qwen2-VL's own template, shortened: each image as <|vision_start|><|image_pad|><|vision_end|>, the pad
    # being the tokenizer's image token
    template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "{{ '<|vision_start|> <image> <|vision_end|> ' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}{{ ' answer :' }}{% endif %}"
    )
    return model, ImagesOnly(image_processor=images, tokenizer=tok, chat_template=template)


@pytest.mark.parametrize("build", [toy_llava, llava_next, qwen2_vl])
def test_plugin_on_every_backbone_batch_2_equals_batch_1(build):
    from experiments.lmms_plugin import SparseVLMLmms
    from experiments.toy import task as toy_task

    model, proc = build()
    model.generation_config.eos_token_id = None
    samples = toy_task.generate(3, 3, ["colour_of", "relation", "exists"])  # prompts of different lengths
    docs = {i: {"image": Image.fromarray(np.asarray(s.image))} for i, s in enumerate(samples)}
    reqs = [
        SimpleNamespace(
            args=(s.question, {"until": ["\n"], "max_new_tokens": 3}, lambda doc: [doc["image"]], i, "fake", "test")
        )
        for i, s in enumerate(samples)
    ]
    answers = {}
    for bs in (1, 2):
        lm = SparseVLMLmms(
            model=model,
            processor=proc,
            strategy="fastv",
            budget=6,
            batch_size=bs,
            attn_implementation="sdpa",
            max_new_tokens=3,
        )
        lm.task_dict = {"fake": {"test": docs}}
        answers[bs] = (lm.generate_until(reqs), [r["accounting"]["visual_per_layer"] for r in lm.records])
    assert answers[1] == answers[2] and len(answers[1][0]) == 3
    for per_layer in answers[1][1]:
        assert per_layer[0] > 6 and per_layer[-1] == 6  # all visual tokens in, the budget after FastV's layer
    fixed = lm.adapter.fixed_tokens_per_image()  # asked of the adapter: a count or None, never raises
    assert fixed == (144 if build is toy_llava else None)  # AnyRes / dynamic resolution: no fixed count
