"""Bad input: one clear ConfigError naming the problem and what is allowed; detaching leaves the model stock."""

import dataclasses

import pytest
import torch

from framework import ConfigError, attach, build
from framework.accounting import parse_schedule
from models import adapter_class, adapter_for
from models.llava import LlavaAdapter
from tests.tiny import llava_inputs, make_llava


@pytest.fixture(scope="module")
def model():
    return make_llava(layers=4)


def test_unknown_strategy_lists_available():
    with pytest.raises(ConfigError, match=r"unknown strategy 'fastvv'; available: .*fastv"):
        build("fastvv")


def test_unknown_backbone_lists_available():
    with pytest.raises(ConfigError, match=r"unknown backbone 'llava9'; available: .*llava"):
        adapter_class("llava9")
    with pytest.raises(ConfigError, match="no adapter for model class Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_unknown_config_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['kepp'\] for strategy 'fastv'; allowed: .*keep"):
        build({"name": "fastv", "kepp": 3})


@pytest.mark.parametrize("keep", [0, -1, 1.5, 0.0])
def test_keep_below_one_or_bad_ratio(keep):
    with pytest.raises(ConfigError, match="allowed: a count >= 1 or a ratio"):
        build({"name": "fastv", "keep": keep})


def test_keep_larger_than_visual_tokens(model):
    x = llava_inputs(model, [(2, 3)])
    with attach(model, build({"name": "fastv", "keep": 17})), pytest.raises(ConfigError, match=r"allowed: 1\.\.16"):
        model(**x)


def test_prompt_without_image_tokens(model):
    x = llava_inputs(model, [(2, 3)])
    ids = x["input_ids"].masked_fill(x["input_ids"] == model.config.image_token_id, 5)
    with attach(model, build("fastv")), pytest.raises(ConfigError, match="has no image tokens"):
        model(**{**x, "input_ids": ids})


def test_pixel_token_count_mismatch(model):
    x = llava_inputs(model, [(2, 3)])
    ids = x["input_ids"].clone()
    ids[0, -1] = model.config.image_token_id  # 17 image tokens for one 16-token image
    with attach(model, build("fastv")), pytest.raises(ConfigError, match="do not match 1 image"):
        model(**{**x, "input_ids": ids})


def test_stage_the_backbone_lacks(model):
    class LlmOnly(LlavaAdapter):
        stages = ("llm",)

    with pytest.raises(ConfigError, match=r"stage 'projector' but backbone 'llava' supports only \['llm'\]"):
        with attach(model, build({"name": "random", "layer": 0, "keep": 4}), adapter=LlmOnly(model)):
            pass


@pytest.mark.parametrize("layer", [4, 9])
def test_layer_outside_the_model(model, layer):
    with pytest.raises(ConfigError, match=r"outside the model; allowed: 1\.\.3"):
        with attach(model, build({"name": "fastv", "layer": layer})):
            pass


def test_bad_positions_option():
    with pytest.raises(ConfigError, match=r"allowed: \['keep', 'repack'\]"):
        build({"name": "fastv", "positions": "shift"})


def test_bad_schedule():
    with pytest.raises(ConfigError, match="must increase"):
        parse_schedule("6:100,2:50", 32, 576)
    with pytest.raises(ConfigError, match="allowed 1..576"):
        parse_schedule("2:600", 32, 576)


def test_detach_after_error_leaves_model_stock(model):
    x = llava_inputs(model, [(2, 3)])
    with torch.no_grad():
        ref = model(**x).logits
        with pytest.raises(ConfigError):
            with attach(model, build({"name": "fastv", "keep": 40})):
                model(**x)
        hooks = [m for m in model.modules() if m._forward_pre_hooks]
        assert hooks == []
        assert torch.equal(model(**x).logits, ref)


def test_registry_build_from_omegaconf_and_available():
    from omegaconf import OmegaConf

    from framework.registry import available

    r = build(OmegaConf.create({"name": "fastv", "layer": 3, "keep": 0.25}))
    assert (r.layer, r.keep) == (3, 0.25)
    assert {"none", "random", "fastv"} <= set(available())
    assert available("fast*") == ["fastv"]
    assert dataclasses.asdict(r)["positions"] == "keep"


def test_attention_implementation_the_engine_cannot_serve(model):
    class FlashAdapter(LlavaAdapter):
        attn_implementation = "flash_attention_2"

    with pytest.raises(ConfigError, match=r"'flash_attention_2' is not supported.*allowed: 'eager', 'sdpa'"):
        with attach(model, build("fastv"), adapter=FlashAdapter(model)):
            pass
    assert [m for m in model.modules() if m._forward_pre_hooks] == []
