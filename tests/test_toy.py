"""The toy testbed: generator, stock loading path, packed training inputs, relevance tool, shipped checkpoint."""

import numpy as np
import pytest
import torch

from experiments.toy import model as toy
from experiments.toy import relevance, task
from tests.tiny import TINY_TOY


# ------------------------------------------------------------------------------------------ generator
def test_answers_re_derived_from_the_scene_and_never_in_the_question():
    samples = task.generate(0, 600)
    assert {s.qtype for s in samples} == set(task.QTYPES)
    assert [s.qtype for s in samples].count("count") == 100  # balanced exactly
    for s in samples:
        assert task.answer_from_scene(s.scene, s.question) == s.answer
        assert task.qtype_of(s.question) == s.qtype
        assert s.answer not in s.question.split()
        assert s.relevant and all(0 <= p < toy.N_VISUAL for p in s.relevant)


def test_relevant_patches_are_the_asked_objects():
    for s in task.generate(1, 300):
        objects = [set(s.scene.patches(i)) for i in range(len(s.scene.blocks))]
        covered = [o for o in objects if o <= set(s.relevant)]
        assert set().union(*covered) == set(s.relevant)  # whole objects only
        assert len(s.relevant) <= toy.N_VISUAL // 9  # the 1/9 oracle can hold every relevant patch
        n = {"colour_of": 1, "shape_of": 1, "position": 1, "relation": 2}.get(s.qtype)
        if n is not None:
            assert len(covered) == n
        if s.qtype == "count":
            assert len(covered) == task.NUMBERS.index(s.answer) + 1
        if s.qtype == "relation":  # the neighbour's colour differs from the named object's
            colours = {task.COLOURS[s.scene.colours[i]] for i, o in enumerate(objects) if o <= set(s.relevant)}
            assert len(colours) == 2 and s.answer in colours


def test_scenes_are_redundant_and_crowded():
    rng = np.random.default_rng(3)
    scenes = [task.random_scene(rng) for _ in range(300)]
    n_patches = np.array([len(s.blocks) * task.BLOCK**2 for s in scenes])
    assert n_patches.min() >= 44 and n_patches.max() <= 60 and n_patches.mean() > toy.N_VISUAL / 3
    for s in scenes:
        assert len({tuple(b) for b in s.blocks}) == len(s.blocks)  # one object per block
        assert (np.bincount(s.colours, minlength=len(task.COLOURS)) == 1).sum() >= 2
        assert (np.bincount(s.shapes, minlength=len(task.SHAPES)) == 1).sum() >= 2
    img = scenes[0].render()
    assert img.shape == (task.IMAGE_SIZE, task.IMAGE_SIZE, 3) and img.dtype == np.uint8
    bg = [p for p in range(toy.N_VISUAL) if all(p not in scenes[0].patches(i) for i in range(len(scenes[0].blocks)))]
    r, c = divmod(bg[0], task.GRID)
    assert img[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].std() > 2  # textured background, not flat


def test_generation_is_deterministic_per_seed():
    a, b, c = task.generate(5, 30), task.generate(5, 30), task.generate(6, 30)
    assert [s.question for s in a] == [s.question for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.question for s in a] != [s.question for s in c]
    with pytest.raises(ValueError, match="allowed"):
        task.generate(0, 3, ["colour_at"])


# ------------------------------------------------------------------------------------------ model and inputs
@pytest.fixture(scope="module")
def tiny():
    model, tok = toy.build_toy_model(TINY_TOY)
    return model.eval(), tok


def test_stock_loading_path_answers_with_no_project_code(tiny, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, tok = tiny
    toy.save_toy(model, tok, tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc = AutoProcessor.from_pretrained(tmp_path)
    samples = task.generate(2, 3, ["colour_of", "relation", "exists"])  # different lengths: left padding
    inputs = proc(
        images=[Image.fromarray(s.image) for s in samples],
        text=[f"<image> {s.question} {toy.ANSWER_PROMPT}" for s in samples],
        return_tensors="pt",
        padding=True,
    )
    ours = toy.encode_batch(samples, tok)
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    assert torch.allclose(inputs["pixel_values"], ours["pixel_values"], atol=1e-6)
    with torch.no_grad():
        a = loaded(**inputs).logits[:, -1]
        b = model(**ours).logits[:, -1]
    assert torch.allclose(a, b, atol=1e-5)
    out = loaded.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 1)


@pytest.mark.parametrize("repack", [False, True])
def test_packed_question_equals_the_question_asked_alone(tiny, repack):
    model, tok = tiny
    rng = np.random.default_rng(0)
    s = task.make_sample(rng, "relation")
    other = task.pick(rng, s.scene, "colour_of")
    keep = np.zeros(toy.N_VISUAL, bool)
    keep[rng.choice(toy.N_VISUAL, 30, replace=False)] = True
    keep[s.relevant + other[2]] = True
    packed = toy.encode_packed(
        [
            {
                "image": s.image,
                "questions": [(s.question, s.answer), other[:2]],
                "caption": task.caption(s.scene),
                "keep": keep,
                "repack": repack,
            }
        ],
        tok,
    )
    alone = toy.encode_packed([{"image": s.image, "questions": [other[:2]], "keep": keep, "repack": repack}], tok)
    with torch.no_grad():
        logits = []
        for b in (packed, alone):
            with toy.override_attention_mask(model, b["allowed"]):
                out = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], position_ids=b["position_ids"])
            answers = b["target_pos"][b["target_is_answer"]]
            logits.append(out.logits[0, answers[-1]])
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    assert int((~packed["target_is_answer"]).sum()) == len(task.caption(s.scene).split()) + 1  # caption + </s>
    if repack:  # kept visual tokens at 1..n_kept, the question right after them
        assert int(alone["position_ids"][0, -1]) == int(keep.sum()) + len(other[0].split()) + 2


def test_masking_dropped_tokens_with_kept_positions_equals_removing_them(tiny):
    """`accuracy_with_keep` (relevance tool) prunes by masking: the answer logits equal those of a sequence
    from which the dropped visual tokens are removed, other positions unchanged."""
    model, tok = tiny
    s = task.generate(4, 1)[0]
    rng = np.random.default_rng(1)
    keep = np.zeros(toy.N_VISUAL, bool)
    keep[rng.choice(toy.N_VISUAL, 16, replace=False)] = True
    b = toy.encode_batch([s], tok)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(b["input_ids"])
        feats = model.model.get_image_features(pixel_values=b["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, embeds.shape[-1])
        image = b["input_ids"][0] == model.config.image_token_id
        embeds[0, image] = feats.to(embeds.dtype)
        idx = torch.cat(
            [
                torch.tensor([0]),
                1 + torch.from_numpy(np.flatnonzero(keep)),
                torch.arange(1 + toy.N_VISUAL, b["input_ids"].shape[1]),
            ]
        )
        ref = model.model.language_model(inputs_embeds=embeds[:, idx], position_ids=idx[None])[0][:, -1]
        ref = model.lm_head(ref).argmax(-1)
    acc = relevance.accuracy_with_keep(model, tok, [s], keep[None], repack=False)
    s.answer = tok.convert_ids_to_tokens(int(ref))
    assert relevance.accuracy_with_keep(model, tok, [s], keep[None], repack=False) == 1.0
    assert acc in (0.0, 1.0)


# ------------------------------------------------------------------------------------------ relevance tool
def test_selection_stats_on_known_scores():
    samples = task.generate(7, 40)
    scores = np.random.default_rng(0).random((len(samples), 2, toy.N_VISUAL)).astype(np.float32)
    for i, s in enumerate(samples):
        scores[i, 0, s.relevant] += 10.0  # layer 0 finds the relevant patches, layer 1 is noise
    st = relevance.selection_stats(scores, samples)
    assert st["recall 1/9"][0] == pytest.approx(1.0) and st["recall 1/3"][0] == pytest.approx(1.0)
    assert st["asked>other"][0] == pytest.approx(1.0)
    assert 0.3 < st["asked>other"][1] < 0.7 and st["recall 1/9"][1] < 0.4


def test_relevance_tool_runs_on_a_tiny_model(tiny):
    model, tok = tiny
    samples = task.generate(8, 12)
    scores = relevance.attention_scores(model, tok, samples)
    assert set(scores) == set(relevance.SOURCES)
    named = np.array([s.qtype != "position" for s in samples])  # position questions name no content
    assert np.isnan(scores["content"][~named]).all() and not np.isnan(scores["content"][named]).any()
    for k, v in scores.items():
        v = v[named] if k == "content" else v
        assert v.shape[1:] == (4, toy.N_VISUAL) and np.all(v >= 0)
        assert np.all(v.sum(-1) <= 1 + 1e-5)  # attention mass on visual tokens
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after the eager pass
    keep = relevance.oracle_keep(np.random.default_rng(0), samples, 16)
    assert (keep.sum(1) == 16).all() and all(keep[i, s.relevant].all() for i, s in enumerate(samples))
    full = relevance.accuracy_with_keep(model, tok, samples, np.ones((12, toy.N_VISUAL), bool), repack=True)
    from experiments.toy.train import evaluate

    assert full == pytest.approx(evaluate(model, tok, samples)["accuracy"])


# ------------------------------------------------------------------------------------------ shipped checkpoint
@pytest.mark.skipif(not (toy.CHECKPOINT / "model.safetensors").exists(), reason="no shipped checkpoint")
def test_shipped_checkpoint_answers_held_out_questions():
    from experiments.toy.train import evaluate

    model, tok = toy.load_toy()
    assert model.config.text_config.num_hidden_layers >= 8
    assert model.config.text_config._attn_implementation == "sdpa"
    from omegaconf import OmegaConf

    conf = toy.CHECKPOINT.parents[1] / "conf" / "task" / "toy_vqa.yaml"
    qtypes = list(OmegaConf.load(conf).qtypes)  # the question types the shipped toy answers
    result = evaluate(model, tok, task.heldout(300, qtypes=qtypes))
    assert result["accuracy"] >= 0.9 and min(result["by_type"].values()) >= 0.85, result


# ------------------------------------------------------------------------------------------ recipe
@pytest.mark.slow
def test_recipe_is_deterministic_per_seed(tmp_path):
    """The training command, run twice with one seed (a few steps of both stages, drops and curriculum
    included), writes the same weights; another seed writes others."""
    from safetensors.torch import load_file

    from experiments.toy.train import main

    small = [
        "--vision-steps",
        "2",
        "--steps",
        "4",
        "--images",
        "2",
        "--questions",
        "3",
        "--drop",
        "0.5",
        "--few-steps",
        "1",
        "--grow-steps",
        "2",
        "--log-every",
        "3",
        "--log-n",
        "12",
        "--heldout-n",
        "12",
    ]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        main(["--seed", seed, "--out", str(tmp_path / name), *small])
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "processor_config.json").exists() and (tmp_path / "a" / "eval.json").exists()
