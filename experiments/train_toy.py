"""Train the toy LLaVA (a stock transformers Llava) on the synthetic grid VQA task with PyTorch Lightning.

    python -m experiments.train_toy --out models/toy_llava            # full run (CPU, 1 thread, ~90 minutes)
    python -m experiments.train_toy --out models/toy_llava --resume   # continue from the last Lightning ckpt
    python -m experiments.train_toy --out runs/more --init-from models/toy_llava ...  # train saved weights further

On a GPU (``--accelerator auto``, the default, takes one when there is one) a step takes milliseconds instead of
~0.7 s: six runs sharing one H200 made ~13 steps/s each. CPU runs are deterministic per seed; a GPU run agrees with
the CPU run of its seed through the vision stage and then follows its own path (other last bits).

Recipe (research/synthetic.md section 7, plus what this project measured; the defaults are run 1 of the
shipped checkpoint, which was then continued with ``--init-from``: see models/toy_llava/README.md): CLIP
position table initialised factorised (row + column sums); weight init std 0.1
(0.02 keeps the image signal from reaching the answer); stage 1 = vision tower + projector on dense
per-patch targets (colour, shape, row, column) through a throw-away linear head (150 steps); stage 2 = the
whole model on questions, 16 questions per image packed into one masked sequence (`--pack`, ~10x cheaper
per answer), 256 questions per step, AdamW lr 1e-3, the loss on each answer token only; a curriculum over
the *questioned* region (2x2 -> 4x4 -> 6x6 -> 8x8 cells, every cell always filled; advance when the running
training accuracy reaches 0.8) on the two lookup types first (`--first-qtypes`), then all four types.
Training data are generated fresh every step from (seed, step), so a resumed run sees exactly the batches
an uninterrupted one would.

Optional ``--focus-cells F`` (the recipe's continuation uses 0.5): a share F of each type's questions name their cell
in proportion to that cell's recent training error rather than uniformly. The relation types are learned cell
by cell, and a cell whose routing went to the wrong neighbour stays wrong under uniform sampling.

Optional ``--early-block-prob p``: with probability p a training batch hides the image tokens from decoder
layers < ``--early-block-layers`` so the model must be able to read the image in later layers.

The learning curve (per-type held-out accuracy, and the accuracy with the image hidden from decoder
layers >= 3) is written to ``<out>/train_log.csv``; the HF checkpoint with the best logged accuracy is
saved to ``<out>`` after each evaluation, and once more (final evaluation on the 2,000-question held-out set)
at the end into ``<out>/eval.json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn.functional as F

from experiments.tasks import synthetic_vqa as task
from models import toy

EVAL_SEED_LOG = 777  # small held-out set for the learning curve
EVAL_SEED_FINAL = 12345  # the fixed 2,000-question held-out set (task.heldout)
EVAL_SEED_VALIDATION = 2468  # toy_recipe picks among its continuation tries on these, never on the test set
CELL_ERROR_DECAY = 0.98  # per step: --focus-cells weighs the errors of about the last 50 steps


# ----------------------------------------------------------------------------------------------- evaluation
def to_device(batch: dict, device) -> dict:
    """Batches are built on the CPU (numpy scenes, tokenizer); the model may sit on a GPU."""
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, tokenizer, samples, batch_size: int = 250, block_layers=None, keep_frac: float | None = None,
             keep_seed: int = 0) -> dict:
    """Accuracy (argmax over the whole vocabulary at the last prompt position), overall and per type.

    ``block_layers``: decoder layers that see no image tokens (e.g. range(3, L) = drop all after layer 2).
    ``keep_frac``: keep a random fraction of the image tokens (the rest are hidden from ``block_layers``,
    or from every layer when ``block_layers`` is None)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(keep_seed)
    n_img = task.GRID ** 2
    correct, kinds = [], []
    n_layers = len(model.model.language_model.layers)
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        b = toy.encode_batch(chunk, tokenizer, with_labels=True)
        ans = b.pop("answer_ids")
        keep = None
        if keep_frac is not None:  # drawn on the CPU, so the kept tokens do not depend on the device
            n_keep = max(0, round(keep_frac * n_img))
            image = b["input_ids"] == model.config.image_token_id
            keep = torch.zeros_like(image)
            for j in range(len(chunk)):
                pos = image[j].nonzero().squeeze(1)
                keep[j, pos[torch.randperm(len(pos), generator=gen)[:n_keep]]] = True
            keep = keep.to(device)
        b = to_device(b, device)
        if block_layers is None and keep_frac is None:
            logits = model(**b, logits_to_keep=1).logits[:, -1]
        else:
            layers = range(n_layers) if block_layers is None else block_layers
            with toy.block_image_keys(model, b["input_ids"], b["attention_mask"], layers=layers, keep=keep):
                logits = model(**b, logits_to_keep=1).logits[:, -1]
        correct.append((logits.argmax(-1).cpu() == ans).numpy())
        kinds += [s.qtype for s in chunk]
    correct = np.concatenate(correct)
    kinds = np.array(kinds)
    out = {"overall": float(correct.mean()), "n": int(len(correct))}
    for k in task.QTYPES:
        sel = kinds == k
        if sel.any():
            out[k] = float(correct[sel].mean())
    return out


def full_report(model, tokenizer, n: int = 2000, block_after: int = 2) -> dict:
    samples = task.heldout(n, EVAL_SEED_FINAL)
    L = len(model.model.language_model.layers)
    t0 = time.time()
    clean = evaluate(model, tokenizer, samples)
    t_clean = time.time() - t0
    rep = {
        "clean": clean,
        "eval_seconds_clean": t_clean,
        f"image_blocked_after_layer_{block_after}": evaluate(model, tokenizer, samples, block_layers=range(block_after + 1, L)),
        "keep_1_9_random_all_layers": evaluate(model, tokenizer, samples, keep_frac=1 / 9),
        f"keep_1_9_random_after_layer_{block_after}": evaluate(model, tokenizer, samples, keep_frac=1 / 9,
                                                               block_layers=range(block_after + 1, L)),
        "no_image_at_all": evaluate(model, tokenizer, samples, keep_frac=0.0),
        "chance": dict(task.CHANCE, overall=float(np.mean(list(task.CHANCE.values())))),
    }
    return rep


# ------------------------------------------------------------------------------------------------ training
def region_at(step: int, vis_steps: int, c4: int, c6: int) -> int:
    s = step - vis_steps
    return 4 if s < c4 else 6 if s < c4 + c6 else 8


def _weights(spec: str | None, qtypes: list[str]) -> list[float] | None:
    """``"left_of=2,above=2"`` -> one weight per type of ``qtypes`` (unnamed types weigh 1)."""
    if not spec:
        return None
    named = {}
    for item in str(spec).split(","):
        k, _, v = item.partition("=")
        try:
            named[k] = float(v)
        except ValueError:
            named[k] = -1.0
        if k not in qtypes or named[k] < 0:
            raise SystemExit(f"--qtype-weights item {item!r}: expected TYPE=WEIGHT, a weight >= 0 and TYPE one "
                             f"of {qtypes}")
    weights = [named.get(k, 1.0) for k in qtypes]
    try:
        task.type_probabilities(qtypes, weights)
    except ValueError as e:
        raise SystemExit(f"--qtype-weights {spec!r}: {e}") from None
    return weights


def focus_cell_weights(miss: np.ndarray, count: np.ndarray, qtypes, region: int, share: float) -> dict:
    """--focus-cells: per question type, (grid, grid) weights of naming each cell = (1 - share) * uniform over the
    askable cells + share * the cell's part of the type's training error ((misses + 1) / (count + 2), so an
    unasked cell counts as 0.5); ``miss`` and ``count`` are (len(task.QTYPES), grid, grid)."""
    out = {}
    for k in qtypes:
        i = task.QTYPES.index(k)
        ok = task.askable_cells(k, region)
        err = np.where(ok, (miss[i] + 1) / (count[i] + 2), 0.0)
        out[k] = (1 - share) * ok / ok.sum() + share * err / err.sum()
    return out


def build_lightning_module(args):
    import pytorch_lightning as pl

    class ToyLlavaModule(pl.LightningModule):
        def __init__(self, hparams: dict):
            super().__init__()
            self.save_hyperparameters(hparams)
            h = self.hparams
            model_cfg = dict(text_layers=h.layers, text_hidden=h.hidden, text_intermediate=h.get("mlp_ratio", 4) * h.hidden,
                             vision_hidden=h.vision_hidden, vision_intermediate=h.get("mlp_ratio", 4) * h.vision_hidden,
                             vision_layers=h.vision_layers, attn_implementation="sdpa", seed=h.seed,
                             init_std=h.get("init_std", 0.02))
            self.model, self.tokenizer = toy.build_toy_model(model_cfg)
            g = task.GRID
            # throw-away per-patch head for stage 1 (colour, shape, row, column)
            self.aux_head = torch.nn.Linear(h.hidden, len(task.COLOURS) + len(task.SHAPES) + 2 * g)
            self.log_rows: list[dict] = []
            self._loss_acc: list[float] = []
            self._acc_acc: list[float] = []
            first = int(str(self.hparams.get("regions", "4")).split(",")[0]) if self.hparams.get("curriculum") == "adaptive" else 4
            self._cur = {"region": first, "since": self.hparams.vis_steps}
            self._t0 = time.time()
            self._best = -1.0
            # decayed per (question type, named cell) training misses and counts, for --focus-cells
            self._cell_miss = np.zeros((len(task.QTYPES), task.GRID, task.GRID))
            self._cell_n = np.zeros_like(self._cell_miss)
            self.eval_samples = task.generate(EVAL_SEED_LOG, h.eval_n)

        # ---- data: generated from (seed, step) so resuming is exact
        def _rng(self, step):
            return np.random.default_rng([self.hparams.seed, 1, step])

        def _vision_loss(self, step):
            rng = self._rng(step)
            scenes = [task._random_scene(rng, task.GRID, task.CELL) for _ in range(self.hparams.batch_size)]
            px = toy.image_to_tensor([s.render() for s in scenes]).to(self.device)
            m = self.model.model
            hs = m.vision_tower(px, output_hidden_states=True).hidden_states[self.model.config.vision_feature_layer]
            feats = m.multi_modal_projector(hs[:, 1:])  # (B, 64, d)
            # RMS-normalise before the throw-away head: otherwise driving this loss to zero blows the projector
            # outputs up (~100x the text-embedding norm), which swamps the question tokens in the decoder
            logits = self.aux_head(feats * torch.rsqrt(feats.pow(2).mean(-1, keepdim=True) + 1e-6))
            self._feat_norm = float(feats.detach().norm(dim=-1).mean())
            g = task.GRID
            col = torch.from_numpy(np.stack([s.colours for s in scenes]).reshape(len(scenes), -1)).to(self.device)
            shp = torch.from_numpy(np.stack([s.shapes for s in scenes]).reshape(len(scenes), -1)).to(self.device)
            rows = torch.arange(g, device=self.device).repeat_interleave(g).expand_as(col)
            cols = torch.arange(g, device=self.device).repeat(g).expand_as(col)
            nc, ns = len(task.COLOURS), len(task.SHAPES)
            parts = torch.split(logits, [nc, ns, g, g], dim=-1)
            loss = sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), t.reshape(-1))
                       for p, t in zip(parts, [col, shp, rows, cols]))
            return loss

        def _qa_loss(self, step):
            h = self.hparams
            region = self._current_region(step)
            rng = self._rng(step)
            seed = int(rng.integers(2**31))
            qtypes, weights = self._current_qtypes()
            pack = int(h.get("pack", 1))
            if pack > 1:  # several questions per image in one masked sequence (~10x cheaper per answer)
                groups = task.generate_packed(seed, max(1, h.batch_size // pack), pack, region=region, qtypes=qtypes,
                                              weights=weights, cell_weights=self._focus_weights(qtypes, region))
                b = to_device(toy.encode_packed(groups, self.tokenizer), self.device)
                with toy.override_attention_mask(self.model, b["allowed"]):
                    hs = self.model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                    position_ids=b["position_ids"]).logits
                logits, ans = hs[b["answer_row"], b["answer_pos"]], b["answer_ids"]
                self._count_cell_errors([s for g in groups for s in g], (logits.argmax(-1) != ans).cpu().numpy())
            else:
                samples = task.generate(seed, h.batch_size, region=region, qtypes=qtypes, weights=weights)
                b = to_device(toy.encode_batch(samples, self.tokenizer, with_labels=True), self.device)
                ans = b.pop("answer_ids")
                if h.early_block_prob > 0 and rng.random() < h.early_block_prob:
                    with toy.block_image_keys(self.model, b["input_ids"], b["attention_mask"],
                                              layers=range(h.early_block_layers)):
                        logits = self.model(**b, logits_to_keep=1).logits[:, -1]
                else:
                    logits = self.model(**b, logits_to_keep=1).logits[:, -1]
            self._acc_acc.append(float((logits.argmax(-1) == ans).float().mean()))
            return F.cross_entropy(logits, ans), region

        def _focus_weights(self, qtypes, region) -> dict | None:
            """Only once every type is asked: the --first-qtypes phase keeps its uniform region curriculum."""
            f = self.hparams.get("focus_cells", 0.0)
            if not f or self._in_first_phase():
                return None
            return focus_cell_weights(self._cell_miss, self._cell_n, qtypes, region, f)

        def _in_first_phase(self) -> bool:
            return bool(self.hparams.get("first_qtypes")) and self._cur.get("phase", 0) == 0

        def _count_cell_errors(self, samples, missed) -> None:
            self._cell_miss *= CELL_ERROR_DECAY
            self._cell_n *= CELL_ERROR_DECAY
            for s, m in zip(samples, missed):
                i, (r, c) = task.QTYPES.index(s.qtype), task.named_cell(s)
                self._cell_miss[i, r, c] += m
                self._cell_n[i, r, c] += 1

        def _current_region(self, step):
            h = self.hparams
            if h.get("curriculum", "fixed") == "fixed":
                r = region_at(step, h.vis_steps, h.c4, h.c6)
                if r != self._cur["region"]:
                    self._cur = {"region": r, "since": step}
                return r
            # adaptive: advance 4 -> 6 -> 8 when the running training accuracy on the current region reaches
            # --advance-acc (after at least --min-region-steps), or after --c4 / --c6 steps at most
            st = self._cur
            regions = [int(x) for x in str(h.regions).split(",")]
            if st["region"] not in regions:
                st["region"] = min([r for r in regions if r >= st["region"]] or [regions[-1]])
            i = regions.index(st["region"])
            if i + 1 < len(regions):
                if self._stage_done(step):
                    st["region"] = regions[i + 1]
                    st["since"] = step
                    self._acc_acc = []
                    print(f"curriculum: region {st['region']} from step {step}", flush=True)
            elif self._in_first_phase():
                # the last region of the first question types: move on to all types when learned
                if self._stage_done(step):
                    st["phase"] = 1
                    st["since"] = step
                    self._acc_acc = []
                    if h.get("regrow_regions"):  # the relation types get the curriculum that taught the lookups
                        st["region"] = regions[0]
                    print(f"curriculum: all question types from step {step} (region {st['region']})", flush=True)
            return st["region"]

        def _stage_done(self, step) -> bool:
            """The current curriculum stage is learned (running training accuracy over the last 50 steps >=
            --advance-acc, after at least --min-region-steps) or has run --region-max-steps."""
            h = self.hparams
            n = step - self._cur["since"]
            win = self._acc_acc[-50:]
            ready = n >= h.min_region_steps and len(win) >= 50 and np.mean(win) >= h.advance_acc
            return ready or n >= h.region_max_steps

        def _current_qtypes(self) -> tuple[list[str], list[float] | None]:
            """The question types of the current phase, and their sampling weights (None: uniform)."""
            h = self.hparams
            if self._in_first_phase():
                return str(h.first_qtypes).split(","), None
            qtypes = str(h.get("qtypes") or ",".join(task.QTYPES)).split(",")
            return qtypes, _weights(h.get("qtype_weights"), qtypes)

        def training_step(self, batch, batch_idx):
            step = self.global_step
            if step < self.hparams.vis_steps:
                loss, stage, region = self._vision_loss(step), "vision", 0
            else:
                (loss, region), stage = self._qa_loss(step), "qa"
            self._loss_acc.append(float(loss.detach()))
            self.log("train_loss", loss, prog_bar=True)
            self._stage, self._region = stage, region
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = self.global_step  # already incremented
            h = self.hparams
            last = h.max_steps_hint is not None and step >= h.max_steps_hint
            if step % h.eval_every == 0 or last or step == h.vis_steps:
                self._evaluate_and_log(step)

        def _evaluate_and_log(self, step):
            h = self.hparams
            t = time.time()
            L = len(self.model.model.language_model.layers)
            acc = evaluate(self.model, self.tokenizer, self.eval_samples)
            blk = evaluate(self.model, self.tokenizer, self.eval_samples, block_layers=range(3, L))
            self.model.train()
            row = {"step": step, "minutes": round((time.time() - self._t0) / 60 + h.minutes_offset, 2),
                   "stage": self._stage, "region": self._region,
                   "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                   "train_loss": round(float(np.mean(self._loss_acc)) if self._loss_acc else float("nan"), 4),
                   "train_acc": round(float(np.mean(self._acc_acc[-h.eval_every:])) if self._acc_acc else float("nan"), 4),
                   "acc": round(acc["overall"], 4)}
            for k in task.QTYPES:
                row[f"acc_{k}"] = round(acc.get(k, float("nan")), 4)
            row["acc_block_after_l2"] = round(blk["overall"], 4)
            if self._stage == "vision":
                print(f"image feature norm {getattr(self, '_feat_norm', float('nan')):.3f}", flush=True)
            self._loss_acc = []
            path = Path(h.out) / "train_log.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = list(csv.DictReader(open(path))) if path.exists() else []
            rows = [r for r in rows if int(r["step"]) < step] + [row]  # a resumed run rewrites its tail
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row), restval="")
                w.writeheader()
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in row})
            print(json.dumps(row), f"(eval {time.time() - t:.1f}s)", flush=True)
            self.log("val_acc", acc["overall"])
            if self._stage == "qa" and acc["overall"] >= self._best:
                self._best = acc["overall"]
                toy.save_toy(self.model, self.tokenizer, h.out)

        def configure_optimizers(self):
            h = self.hparams
            decay, no_decay = [], []
            for n, p in self.named_parameters():
                (no_decay if p.ndim < 2 or "embed" in n else decay).append(p)
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=h.lr, betas=(0.9, 0.98))

            def factor(step):
                if step < h.vis_steps:
                    return min(1.0, (step + 1) / 20)
                s = step - h.vis_steps
                f = min(1.0, (s + 1) / h.warmup)
                if h.max_steps_hint:
                    start = h.max_steps_hint * (1 - h.decay_frac)
                    if step > start:
                        f *= max(0.05, 1 - (step - start) / (h.max_steps_hint - start))
                return f

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint):
            checkpoint["toy_best"] = self._best
            checkpoint["toy_curriculum"] = dict(self._cur)
            # the curriculum reads the last 50 steps, the log the steps since the last row: a resumed run logs
            # exactly what an uninterrupted one would
            checkpoint["toy_train_acc_window"] = list(self._acc_acc[-max(50, self.hparams.eval_every):])
            checkpoint["toy_train_loss_window"] = list(self._loss_acc)
            checkpoint["toy_cell_errors"] = np.stack([self._cell_miss, self._cell_n]).tolist()

        def on_load_checkpoint(self, checkpoint):
            self._best = checkpoint.get("toy_best", -1.0)
            self._loss_acc = list(checkpoint.get("toy_train_loss_window", []))
            if "toy_cell_errors" in checkpoint:
                self._cell_miss, self._cell_n = np.array(checkpoint["toy_cell_errors"], dtype=float)
            if self.hparams.get("restart_curriculum"):
                step = checkpoint.get("global_step", 0)
                first = int(str(self.hparams.regions).split(",")[0])
                self._cur = {"region": first, "since": step}
                self._acc_acc = []
            elif "toy_curriculum" in checkpoint:
                self._cur = dict(checkpoint["toy_curriculum"])
                self._acc_acc = list(checkpoint.get("toy_train_acc_window", []))
            elif self.hparams.get("curriculum", "fixed") == "adaptive":  # resumed from a fixed-schedule run
                step = checkpoint.get("global_step", 0)
                h = self.hparams
                self._cur = {"region": region_at(step, h.vis_steps, h.c4, h.c6), "since": step}

    return ToyLlavaModule


def export_lightning_ckpt(ckpt_path: str, out: str) -> None:
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = dict(ck["hyper_parameters"])
    h = argparse.Namespace(**hp)
    model_cfg = dict(text_layers=h.layers, text_hidden=h.hidden, text_intermediate=hp.get("mlp_ratio", 4) * h.hidden,
                     vision_hidden=h.vision_hidden, vision_intermediate=hp.get("mlp_ratio", 4) * h.vision_hidden,
                     vision_layers=h.vision_layers, seed=h.seed, init_std=hp.get("init_std", 0.02))
    model, tok = toy.build_toy_model(model_cfg)
    sd = {k[len("model."):]: v for k, v in ck["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or "lm_head.weight" in sd]
    if missing or unexpected:
        raise RuntimeError(f"export: missing {missing} unexpected {unexpected}")
    toy.save_toy(model, tok, out)
    print(f"exported {ckpt_path} (step {ck.get('global_step')}) to {out}", flush=True)


class _Steps(torch.utils.data.IterableDataset):
    """Infinite stream of placeholders; the real batch is generated in training_step from (seed, step)."""

    def __iter__(self):
        i = 0
        while True:
            yield i
            i += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/toy_llava")
    p.add_argument("--ckpt-dir", default=None, help="Lightning checkpoints (default runs/train_toy/<out name>)")
    p.add_argument("--resume", nargs="?", const="last", default=None, help="resume from 'last' or a ckpt path")
    p.add_argument("--init-from", default=None, metavar="TOY",
                   help="start from the weights of a saved toy checkpoint (name or path; fresh optimizer), e.g. to "
                        "continue training: --init-from models/toy_llava --vis-steps 0 --regions 8 --first-qtypes ''")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=7500, help="total optimizer steps (incl. vision stage)")
    p.add_argument("--max-minutes", type=float, default=150.0)
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop at step N of the --steps schedule, unchanged (resumable; no final evaluation): "
                        "to check that a run retraces a learning curve, or to split a run over sessions")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--decay-frac", type=float, default=0.15)
    p.add_argument("--vis-steps", type=int, default=150)
    p.add_argument("--c4", type=int, default=900, help="(max) question steps on the 4x4 region")
    p.add_argument("--c6", type=int, default=900, help="(max) question steps on the 6x6 region")
    p.add_argument("--curriculum", choices=["fixed", "adaptive"], default="adaptive",
                   help="fixed: --c4/--c6 steps per region; adaptive: advance when the running training "
                        "accuracy reaches --advance-acc (--c4/--c6 are then the maximum steps per region)")
    p.add_argument("--advance-acc", type=float, default=0.8)
    p.add_argument("--regions", default="2,4,6,8", help="adaptive curriculum: questioned-region sizes in order")
    p.add_argument("--region-max-steps", type=int, default=800, help="adaptive: most steps spent on one region")
    p.add_argument("--restart-curriculum", action="store_true", help="on --resume, restart at the first region")
    p.add_argument("--min-region-steps", type=int, default=100)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--qtypes", default=None, help="comma-separated question types to train on (default: all)")
    p.add_argument("--qtype-weights", default=None,
                   help="sampling weights of the --qtypes types after the first phase, e.g. left_of=2,above=2 "
                        "(unnamed types weigh 1; default uniform)")
    p.add_argument("--first-qtypes", default="colour_at,shape_at",
                   help="adaptive curriculum: train only these types through the regions, then (once learned on "
                        "the last region) switch to --qtypes; e.g. colour_at,shape_at (lookups teach the routing)")
    p.add_argument("--regrow-regions", action="store_true",
                   help="adaptive curriculum: when the --first-qtypes are learned, grow the questioned region again "
                        "from the first size (--regions) for all types, instead of asking them on the full grid")
    p.add_argument("--focus-cells", type=float, default=0.0, metavar="F",
                   help="share (0-1) of each type's questions whose named cell is drawn in proportion to that cell's "
                        "recent training error instead of uniformly, once all types are asked (0 = uniform; "
                        "needs --pack > 1)")
    p.add_argument("--init-std", type=float, default=0.1,
                   help="weight init std; ~1/sqrt(hidden) lets the image signal reach the answer early")
    p.add_argument("--mlp-ratio", type=int, default=4, help="MLP width / hidden (text and vision)")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--pack", type=int, default=16,
                   help="questions per image packed into one sequence (each sees only the image and itself); "
                        "--batch-size counts questions, so a step has batch-size/pack images. 1 = one per image")
    p.add_argument("--early-block-prob", type=float, default=0.0, help="(only with --pack 1)")
    p.add_argument("--early-block-layers", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--final-eval-n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda", "mps"],
                   help="Lightning accelerator: auto (a GPU when there is one), cpu, gpu; CPU runs are "
                        "deterministic per seed, a GPU run differs in the last bits and so follows its own path")
    p.add_argument("--eval-only", action="store_true", help="only write <out>/eval.json for the saved checkpoint")
    p.add_argument("--export", default=None, metavar="CKPT",
                   help="export the weights of a Lightning checkpoint (e.g. runs/train_toy/<name>/last.ckpt) "
                        "as the HF toy checkpoint in --out, then evaluate it (--eval-only)")
    a = p.parse_args(argv)
    _weights(a.qtype_weights, (a.qtypes or ",".join(task.QTYPES)).split(","))  # bad weights fail now, not at phase 2
    if not 0.0 <= a.focus_cells <= 1.0 or (a.focus_cells and a.pack < 2):
        raise SystemExit(f"--focus-cells {a.focus_cells}: expected a share between 0 and 1, used with --pack > 1 "
                         f"(got --pack {a.pack})")

    if a.stop_after is not None and not 0 < a.stop_after <= a.steps:
        raise SystemExit(f"--stop-after {a.stop_after}: expected a step between 1 and --steps ({a.steps})")

    torch.set_num_threads(a.threads)
    if a.export:
        export_lightning_ckpt(a.export, a.out)
        a.eval_only = True
    if a.eval_only:
        t0 = time.time()
        model, tok = toy.load_toy(a.out)
        rep = full_report(model, tok, n=a.final_eval_n)
        rep["load_and_all_evals_seconds"] = time.time() - t0
        old = Path(a.out) / "eval.json"
        if old.exists():
            prev = json.loads(old.read_text())
            for k in ("train_wall_minutes_this_process", "global_step"):
                if k in prev:
                    rep[k] = prev[k]
        old.write_text(json.dumps(rep, indent=2))
        print(json.dumps(rep, indent=2))
        return
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(a.seed, workers=True)
    out = Path(a.out)
    ckpt_dir = Path(a.ckpt_dir or Path("runs/train_toy") / out.name)
    ckpt_path = None
    if a.resume:
        ckpt_path = str(ckpt_dir / "last.ckpt") if a.resume == "last" else a.resume
        if not Path(ckpt_path).exists():
            print(f"no checkpoint at {ckpt_path}; starting fresh")
            ckpt_path = None
    log = out / "train_log.csv"
    if ckpt_path is None and log.exists():
        log.unlink()  # fresh run: fresh learning curve
    hp = dict(vars(a))
    hp["max_steps_hint"] = a.steps
    hp["minutes_offset"] = 0.0
    Module = build_lightning_module(a)
    module = Module(hp)
    if ckpt_path is None and a.init_from:  # continue training a saved toy checkpoint (fresh optimizer and schedule)
        init, _ = toy.load_toy(a.init_from)
        module.model.load_state_dict(init.state_dict())
        print(f"initialised from {a.init_from}", flush=True)
    if ckpt_path is not None and log.exists():
        rows = list(csv.DictReader(open(log)))
        if rows:
            module.hparams.minutes_offset = float(rows[-1]["minutes"])
    trainer = pl.Trainer(
        max_steps=a.stop_after or a.steps,  # the schedule still spans --steps (max_steps_hint)
        max_time={"minutes": a.max_minutes},
        accelerator=a.accelerator,
        devices=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=100, save_top_k=0)],
        num_sanity_val_steps=0,
        deterministic=False,
    )
    loader = torch.utils.data.DataLoader(_Steps(), batch_size=None, num_workers=0)
    t0 = time.time()
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    wall = time.time() - t0
    print(f"training wall time {wall / 60:.1f} min, steps {trainer.global_step}", flush=True)
    if module._best < 0:  # never reached the QA stage with an evaluation
        toy.save_toy(module.model, module.tokenizer, out)
    if trainer.global_step < a.steps and a.stop_after:
        print(f"stopped after step {trainer.global_step} of {a.steps}; --resume goes on", flush=True)
        return
    # final report on the saved (best) checkpoint, on the device it was trained on
    model, tok = toy.load_toy(out)
    model.to(trainer.strategy.root_device)
    rep = full_report(model, tok, n=a.final_eval_n)
    rep["train_wall_minutes_this_process"] = wall / 60
    rep["global_step"] = trainer.global_step
    (out / "eval.json").write_text(json.dumps(rep, indent=2))
    print(json.dumps(rep, indent=2), flush=True)


if __name__ == "__main__":
    main()
