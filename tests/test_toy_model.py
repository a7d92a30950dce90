"""The toy LLaVA: stock Llava built from configs, word-level tokenizer, save/load, masking helper, training."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.tasks import synthetic_vqa as task
from models import toy

TINY = dict(vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2,
            text_hidden=32, text_intermediate=64, text_layers=2, text_heads=2)


@pytest.fixture(scope="module")
def tiny():
    model, tok = toy.build_toy_model(TINY)
    return model.eval(), tok


def test_tokenizer_roundtrip_and_image_token():
    tok = toy.build_tokenizer()
    ids = tok("<s> <image> <image> what colour is at row c column 5 ? answer :", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[1] == ids[2] == tok.convert_tokens_to_ids("<image>")
    for w in task.VOCAB:
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(w)) == w


def test_stock_llava_64_visual_tokens(tiny):
    from transformers import LlavaForConditionalGeneration

    model, tok = tiny
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_feature_select_strategy == "default"
    s = task.generate(0, 4)
    b = toy.encode_batch(s, tok, with_labels=True)
    assert b["pixel_values"].shape == (4, 3, task.IMAGE_SIZE, task.IMAGE_SIZE)
    assert ((b["input_ids"] == model.config.image_token_id).sum(1) == 64).all()
    assert b["answer_ids"].tolist() == tok.convert_tokens_to_ids([x.answer for x in s])
    with torch.no_grad():
        feats = model.model.get_image_features(b["pixel_values"]).pooler_output
    assert len(feats) == 4 and feats[0].shape[0] == 64
    # factorised position init: table[r*8+c] = R[r] + C[c]
    vt = model.model.vision_tower
    pos = getattr(vt, "vision_model", vt).embeddings.position_embedding.weight[1:].reshape(8, 8, -1)
    assert torch.allclose(pos[1, 2] - pos[0, 2], pos[1, 5] - pos[0, 5], atol=1e-5)


def test_left_padding_does_not_change_logits(tiny):
    model, tok = tiny
    s = task.generate(1, 2)
    s[1].question = "what shape is left of the red square ?"  # arbitrary, just a different length
    s[0].question = "what colour is at row 1 column 2 ?"
    s.append(task.generate(2, 1)[0])
    s[2].question = "what shape ?"
    b = toy.encode_batch(s, tok)
    assert b["attention_mask"][2, 0] == 0  # left padded
    one = toy.encode_batch([s[2]], tok)
    with torch.no_grad():
        full = model(**b, logits_to_keep=1).logits[2, -1]
        alone = model(**one, logits_to_keep=1).logits[0, -1]
    assert torch.allclose(full, alone, atol=1e-4)


def test_save_load_roundtrip_identical_logits(tiny, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, tok = tiny
    toy.save_toy(model, tok, tmp_path / "ck")
    m2, t2 = toy.load_toy(tmp_path / "ck")
    m3 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    b = toy.encode_batch(task.generate(3, 6), tok)
    b2 = toy.encode_batch(task.generate(3, 6), t2)
    assert torch.equal(b["input_ids"], b2["input_ids"])
    with torch.no_grad():
        a, c, d = model(**b).logits, m2(**b2).logits, m3(**b2).logits
    real = b["attention_mask"].bool()  # padding rows are undefined (sdpa gives zeros, eager does not)
    assert torch.equal(a, c) and torch.allclose(a[real], d[real], atol=1e-5)


def test_block_image_keys(tiny):
    model, tok = tiny
    b = toy.encode_batch(task.generate(4, 3), tok)
    L = len(model.model.language_model.layers)
    with torch.no_grad():
        ref = model(**b).logits
        with toy.block_image_keys(model, b["input_ids"], b["attention_mask"], layers=[]):
            same = model(**b).logits
        keep_all = b["input_ids"] == model.config.image_token_id
        with toy.block_image_keys(model, b["input_ids"], b["attention_mask"], layers=range(L), keep=keep_all):
            same2 = model(**b).logits
        with toy.block_image_keys(model, b["input_ids"], b["attention_mask"], layers=range(L)):
            blocked = model(**b).logits
        # no image visible at all: the answer logits cannot depend on the pixels
        b2 = dict(b, pixel_values=torch.randn_like(b["pixel_values"]))
        with toy.block_image_keys(model, b2["input_ids"], b2["attention_mask"], layers=range(L)):
            blocked2 = model(**b2).logits
    real = b["attention_mask"].bool()  # padding rows are undefined
    assert torch.allclose(ref[real], same[real], atol=1e-5) and torch.allclose(ref[real], same2[real], atol=1e-5)
    assert not torch.allclose(ref[:, -1], blocked[:, -1], atol=1e-4)
    assert torch.allclose(blocked[:, -1], blocked2[:, -1], atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_questions_equal_each_question_alone(impl):
    """Packed training (several questions per image, block mask, per-question positions) gives every answer
    the logits it has when asked alone, so packing changes the cost of training, not what is trained."""
    model, tok = toy.build_toy_model(dict(TINY, attn_implementation=impl))
    model.eval()
    groups = task.generate_packed(5, 3, 6)
    b = toy.encode_packed(groups, tok)
    flat = [s for g in groups for s in g]
    assert len(b["answer_ids"]) == len(flat)
    assert b["answer_ids"].tolist() == tok.convert_tokens_to_ids([s.answer for s in flat])
    with torch.no_grad(), toy.override_attention_mask(model, b["allowed"]):
        packed = model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                       position_ids=b["position_ids"]).logits[b["answer_row"], b["answer_pos"]]
    one = toy.encode_batch(flat, tok)
    with torch.no_grad():
        alone = model(**one, logits_to_keep=1).logits[:, -1]
    assert torch.allclose(packed, alone, atol=1e-4)


def test_smoke_training_loss_falls():
    torch.manual_seed(0)
    model, tok = toy.build_toy_model(dict(TINY, attn_implementation="sdpa"))
    model.train()
    b = toy.encode_batch(task.generate(0, 32, region=2), tok, with_labels=True)
    ans = b.pop("answer_ids")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(**b, logits_to_keep=1).logits[:, -1], ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert losses[-1] < min(losses[:5])


def test_lightning_module_few_steps(tmp_path):
    """The real training entry point runs end to end (vision stage + QA stage), writes the CSV and a checkpoint."""
    from experiments import train_toy

    out = tmp_path / "toy"
    train_toy.main(["--out", str(out), "--ckpt-dir", str(tmp_path / "ck"), "--steps", "4", "--vis-steps", "2",
                    "--batch-size", "8", "--eval-every", "2", "--eval-n", "16", "--final-eval-n", "16",
                    "--layers", "2", "--hidden", "32", "--vision-hidden", "32", "--vision-layers", "1"])
    rows = (out / "train_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 3
    assert (out / "model.safetensors").exists() and (out / "eval.json").exists()
    assert (tmp_path / "ck" / "last.ckpt").exists()


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_training_continues_from_a_saved_checkpoint(tmp_path, resume):
    """--init-from starts from the saved weights (with lr 0 they come back unchanged), straight on the full
    region and all question types (--vis-steps 0 --regions 8 --first-qtypes ''); also under --resume when
    there is no checkpoint to resume yet (how experiments.toy_recipe calls it)."""
    from experiments import train_toy

    start, tok = toy.build_toy_model(dict(text_layers=2, text_hidden=32, text_intermediate=128, vision_hidden=32,
                                          vision_intermediate=128, vision_layers=1, seed=3, init_std=0.1))
    toy.save_toy(start, tok, tmp_path / "start")
    out = tmp_path / "cont"
    train_toy.main(["--out", str(out), "--ckpt-dir", str(tmp_path / "ck"), "--init-from", str(tmp_path / "start"),
                    "--steps", "2", "--vis-steps", "0", "--regions", "8", "--first-qtypes", "", "--lr", "0",
                    "--batch-size", "8", "--eval-every", "2", "--eval-n", "16", "--final-eval-n", "16",
                    "--layers", "2", "--hidden", "32", "--vision-hidden", "32", "--vision-layers", "1", *resume])
    rows = (out / "train_log.csv").read_text().strip().splitlines()
    assert rows[1].split(",")[2:4] == ["qa", "8"]  # no vision stage, full region from the first step
    after, _ = toy.load_toy(out)
    for (name, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """--stop-after N then --resume gives the uninterrupted run's weights and every logged number, including the
    running training loss and accuracy of the row that straddles the stop."""
    from experiments import train_toy

    small = ["--batch-size", "8", "--pack", "4", "--eval-every", "3", "--eval-n", "16", "--final-eval-n", "16",
             "--vis-steps", "2", "--layers", "2", "--hidden", "32", "--vision-hidden", "32", "--vision-layers", "1",
             "--steps", "8", "--seed", "5", "--lr", "3e-3", "--warmup", "1", "--accelerator", "cpu"]
    with pytest.raises(SystemExit, match=r"--stop-after 9: expected a step between 1 and --steps \(8\)"):
        train_toy.main(["--out", str(tmp_path / "bad"), *small, "--stop-after", "9"])
    train_toy.main(["--out", str(tmp_path / "whole"), "--ckpt-dir", str(tmp_path / "ck_whole"), *small])
    split = ["--out", str(tmp_path / "split"), "--ckpt-dir", str(tmp_path / "ck_split"), *small]
    train_toy.main([*split, "--stop-after", "4"])
    assert not (tmp_path / "split" / "eval.json").exists()  # stopped, not finished
    train_toy.main([*split, "--resume"])

    def log(name):
        return [{k: v for k, v in r.items() if k != "minutes"}
                for r in csv.DictReader(open(tmp_path / name / "train_log.csv"))]

    assert [r["step"] for r in log("whole")] == ["2", "3", "6", "8"]
    assert log("split") == log("whole")
    whole, _ = toy.load_toy(tmp_path / "whole")
    split_model, _ = toy.load_toy(tmp_path / "split")
    for (name, a), b in zip(whole.state_dict().items(), split_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_command_retraces_the_shipped_learning_curve(tmp_path):
    """Run 1 of the shipped recipe (``train_toy --seed 1`` with its defaults), from scratch, logs the same first
    rows as the shipped model's train_log.csv: the vision stage (step 150) and the first question steps (200).
    Fails when a change to the generator, the model or the training loop moves the recipe off the shipped path.
    On this CPU the rows repeat exactly; the tolerances leave room for another CPU's last bits."""
    from experiments import train_toy

    out = tmp_path / "run1"
    train_toy.main(["--out", str(out), "--ckpt-dir", str(tmp_path / "ck"), "--seed", "1", "--stop-after", "200",
                    "--accelerator", "cpu"])
    shipped = list(csv.DictReader(open(toy.SHIPPED["toy-llava"] / "train_log.csv")))
    again = list(csv.DictReader(open(out / "train_log.csv")))
    assert [r["step"] for r in again] == ["150", "200"]
    for new, old in zip(again, shipped):
        assert (new["step"], new["stage"], new["region"]) == (old["step"], old["stage"], old["region"])
        assert float(new["lr"]) == pytest.approx(float(old["lr"]), rel=1e-6)
        assert float(new["train_loss"]) == pytest.approx(float(old["train_loss"]), abs=2e-3), new["step"]
        for col in [c for c in old if c.startswith("acc") or c == "train_acc"]:
            if old[col] == "nan":  # no question asked in the vision stage
                assert new[col] == "nan", col
            else:
                assert float(new[col]) == pytest.approx(float(old[col]), abs=0.02), (new["step"], col)


@pytest.mark.parametrize("name", sorted(toy.SHIPPED))
def test_shipped_checkpoint_loads_and_matches_its_eval(name):
    """Each shipped checkpoint loads offline by name (also via plain from_pretrained), is small, and its
    accuracy on a 400-question slice of the fixed held-out set agrees with the clean accuracy in eval.json."""
    import json

    from transformers import LlavaForConditionalGeneration

    from experiments.train_toy import EVAL_SEED_FINAL, evaluate

    folder = toy.SHIPPED[name]
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"no shipped checkpoint in {folder}")
    model, tok = toy.load_toy(name)
    LlavaForConditionalGeneration.from_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size <= 20 * 2**20
    assert model.config.text_config.num_hidden_layers >= 6
    assert (folder / "train_log.csv").exists()
    rec = json.loads((folder / "eval.json").read_text())["clean"]["overall"]
    acc = evaluate(model, tok, task.heldout(2000, EVAL_SEED_FINAL)[:400])["overall"]
    assert abs(acc - rec) < 0.08


def test_relevance_by_layer_matches_a_direct_topk(tiny):
    from experiments.relevance import TOP_K, relevance_by_layer

    model, tok = tiny
    s = task.generate(9, 1)
    rel = relevance_by_layer(model, tok, s)
    b = toy.encode_batch(s, tok)
    with torch.no_grad():
        maps = model(**b, output_attentions=True).attentions
    pos = (b["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    (r, c), = s[0].relevant
    for layer, a in enumerate(maps):
        score = a[0].mean(0)[-1, pos]
        want = [float(r * task.GRID + c in torch.topk(score, k).indices.tolist()) for k in TOP_K]
        assert rel["last_token"][layer].tolist() == want
    assert rel["raters"].shape == (len(maps), len(TOP_K))


def test_qtype_weights_parse_and_fail_clearly():
    from experiments.train_toy import _weights

    types = list(task.QTYPES)
    assert _weights(None, types) is None
    assert _weights("left_of=2,above=3", types) == [1.0, 1.0, 2.0, 3.0]
    for bad in ("lft=2", "left_of=x", "above=-1", "colour_at=0,shape_at=0,left_of=0,above=0"):
        with pytest.raises(SystemExit, match="qtype-weights"):
            _weights(bad, types)


def _fake_recipe_stages(monkeypatch, validation: dict):
    """train_toy.main writes <out>/eval.json and records its arguments; a try's validation accuracy comes from
    ``validation`` (by directory name)."""
    from experiments import toy_recipe, train_toy

    calls = []

    def fake_main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps({"clean": {"overall": validation.get(out.name, 0.0)}}))

    monkeypatch.setattr(train_toy, "main", fake_main)
    monkeypatch.setattr(toy_recipe, "validation_accuracy", lambda path: validation[Path(path).name])
    return calls


def test_recipe_runs_run1_then_the_shipped_continuation(tmp_path, monkeypatch):
    """One command = run 1 (train_toy defaults) + the continuation the shipped README documents; a try that
    reaches the validation target ends the tries, and finished stages are not redone."""
    from experiments import toy_recipe

    calls = _fake_recipe_stages(monkeypatch, {"final_try1": 0.99, "other_try1": 0.9})
    monkeypatch.chdir(tmp_path)
    toy_recipe.main(["--seed", "1", "--out", "final"])
    assert calls[0] == ["--out", "final_run1", "--seed", "1", "--resume"]
    assert calls[1] == ["--out", "final_try1", "--init-from", "final_run1", "--seed", "11", "--vis-steps", "0",
                        "--regions", "8", "--first-qtypes", "", "--lr", "1e-3", "--warmup", "100", "--steps",
                        "5500", "--decay-frac", "0.3", "--qtype-weights", "left_of=2,above=2", "--focus-cells", "0.5",
                        "--resume"]
    assert len(calls) == 2
    recipe = json.loads((tmp_path / "final" / "recipe.json").read_text())
    assert recipe["chosen"] == 1 and [t["data_seed"] for t in recipe["tries"]] == [11]
    calls.clear()
    toy_recipe.main(["--seed", "1", "--out", "final"])  # everything finished: nothing is trained again
    assert calls == []
    toy_recipe.main(["--seed", "2", "--out", "other", "--ckpt-dir", "ck/two", "--tries", "1"])
    assert [c[c.index("--ckpt-dir") + 1] for c in calls] == [str(Path("ck/two/run1")), str(Path("ck/two/try1"))]


def test_recipe_retries_a_stuck_continuation_and_keeps_the_best(tmp_path, monkeypatch):
    """Below the target, the continuation is tried again from run 1's weights with the next data seed; with no
    try at the target, the best on validation is what <out> holds."""
    from experiments import toy_recipe

    calls = _fake_recipe_stages(monkeypatch, {"m_try1": 0.90, "m_try2": 0.95, "m_try3": 0.93, "n_try1": 0.9,
                                              "n_try2": 0.985})
    monkeypatch.chdir(tmp_path)
    toy_recipe.main(["--seed", "0", "--out", "m", "--tries", "3"])
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "10", "11", "12"]
    assert all(c[c.index("--init-from") + 1] == "m_run1" for c in calls[1:])
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["chosen"] == 2 and [t["validation"] for t in recipe["tries"]] == [0.90, 0.95, 0.93]
    assert json.loads((tmp_path / "m" / "eval.json").read_text())["clean"]["overall"] == 0.95
    calls.clear()
    toy_recipe.main(["--seed", "0", "--out", "n", "--tries", "3"])  # the second try reaches 0.98: no third
    assert [c[1] for c in calls] == ["n_run1", "n_try1", "n_try2"]
    assert json.loads((tmp_path / "n" / "recipe.json").read_text())["chosen"] == 2
    with pytest.raises(SystemExit, match="--tries 0"):
        toy_recipe.main(["--seed", "0", "--out", "n", "--tries", "0"])


def test_recipe_validation_set_is_not_the_test_set():
    """Tries are picked on their own questions: not the held-out test set, not the learning curve's."""
    from experiments import toy_recipe, train_toy
    from experiments.tasks import synthetic_vqa as task

    val = {s.question + str(s.scene.colours) for s in task.generate(train_toy.EVAL_SEED_VALIDATION, 300)}
    for seed in (train_toy.EVAL_SEED_FINAL, train_toy.EVAL_SEED_LOG):
        assert not val & {s.question + str(s.scene.colours) for s in task.generate(seed, 300)}
    assert toy_recipe.validation_accuracy("toy-llava") > 0.97  # the shipped model, on the validation set


def test_regrow_regions_restarts_the_curriculum_for_all_types(tmp_path):
    """--regrow-regions: once the lookups are learned on the full grid, all four types are asked on the
    2x2 region again and the region grows 2 -> 4 -> 6 -> 8 once more (advance-acc 0: advance as soon as allowed)."""
    from experiments import train_toy

    out = tmp_path / "toy"
    train_toy.main(["--out", str(out), "--ckpt-dir", str(tmp_path / "ck"), "--steps", "451", "--vis-steps", "1",
                    "--batch-size", "8", "--pack", "8", "--eval-every", "25", "--eval-n", "8", "--final-eval-n", "8",
                    "--layers", "1", "--hidden", "16", "--vision-hidden", "16", "--vision-layers", "1",
                    "--advance-acc", "0", "--min-region-steps", "1", "--regrow-regions"])
    regions = [int(r["region"]) for r in csv.DictReader(open(out / "train_log.csv")) if r["stage"] == "qa"]
    grown = [r for i, r in enumerate(regions) if i == 0 or r != regions[i - 1]]
    assert grown == [2, 4, 6, 8, 2, 4, 6, 8]


def test_focus_cells_weighs_cells_by_their_training_error():
    """--focus-cells F: (1 - F) uniform over the askable cells + F in proportion to each cell's error."""
    from experiments.train_toy import focus_cell_weights

    g, i = task.GRID, task.QTYPES.index("left_of")
    miss, count = np.zeros((len(task.QTYPES), g, g)), np.full((len(task.QTYPES), g, g), 98.0)
    miss[i, 5, 3] = 98.0  # every left_of question about row f column 4 was missed
    w = focus_cell_weights(miss, count, ["left_of", "above"], 8, 0.5)
    p = task.cell_probabilities(w["left_of"], "left_of")
    err = np.full(56, 1 / 100)
    err[5 * 7 + 2] = 99 / 100  # the 56 askable cells (column 1 cannot be asked), in row-major order
    assert p[5 * g + 3] == pytest.approx(0.5 / 56 + 0.5 * err.max() / err.sum())
    assert p.reshape(g, g)[:, 0].sum() == 0 and p.sum() == pytest.approx(1)
    assert np.allclose(task.cell_probabilities(w["above"], "above")[g:], 1 / 56)  # above: no errors -> uniform


def test_focus_cells_counts_every_training_answer(tmp_path):
    """The per-cell error counts behind --focus-cells see every answer of every QA step (decayed by 0.98 a step)
    and are kept in the Lightning checkpoint, so a resumed run draws the same cells."""
    from experiments import train_toy

    train_toy.main(["--out", str(tmp_path / "toy"), "--ckpt-dir", str(tmp_path / "ck"), "--steps", "6",
                    "--vis-steps", "1", "--batch-size", "8", "--pack", "4", "--eval-every", "100", "--eval-n", "8",
                    "--final-eval-n", "8", "--layers", "1", "--hidden", "16", "--vision-hidden", "16",
                    "--vision-layers", "1", "--focus-cells", "0.7"])
    ck = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    miss, count = np.array(ck["toy_cell_errors"])
    d = train_toy.CELL_ERROR_DECAY
    assert count.sum() == pytest.approx(8 * sum(d ** k for k in range(5)))  # 5 QA steps of 8 answers
    assert 0 <= miss.sum() <= count.sum() and (miss <= count + 1e-9).all()
    with pytest.raises(SystemExit, match="--focus-cells"):
        train_toy.main(["--out", str(tmp_path / "x"), "--focus-cells", "0.5", "--pack", "1"])


def test_focus_cells_waits_for_the_phase_that_asks_every_type():
    """With --first-qtypes (run 1's lookups-first curriculum) the focus starts only once all types are asked, so
    the first phase draws the same uniform batches with or without --focus-cells."""
    from experiments import train_toy

    hp = dict(layers=1, hidden=16, vision_hidden=16, vision_layers=1, seed=0, eval_n=4, focus_cells=0.5,
              first_qtypes="colour_at,shape_at", regions="2,4,6,8", curriculum="adaptive", vis_steps=1)
    module = train_toy.build_lightning_module(None)(hp)
    module._cell_miss[task.QTYPES.index("colour_at"), 1, 1] = 5.0
    assert module._current_qtypes()[0] == ["colour_at", "shape_at"]
    assert module._focus_weights(["colour_at", "shape_at"], 2) is None
    module._cur["phase"] = 1
    qtypes = module._current_qtypes()[0]
    assert qtypes == task.QTYPES
    w = module._focus_weights(qtypes, 8)["colour_at"]
    assert w[1, 1] > w[0, 0] and w.sum() == pytest.approx(1)
