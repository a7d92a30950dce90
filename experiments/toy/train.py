"""Train the toy LLaVA the LLaVA way, with PyTorch Lightning, in one command::

    python -m experiments.toy.train --seed 2 --out runs/toy     # the shipped checkpoint; 1 CPU thread, about 56 minutes

1. **Vision alignment** (``--vision-steps``): the CLIP tower and projector alone, with a throw-away linear head
   on every visual token predicting its object's colour and shape (or background) and the patch's row and
   column. This puts content *and position* into the visual features, as CLIP's position embeddings do in
   LLaVA, so a reducer that re-packs positions does not erase where a token came from.
2. **Captions + questions, mixed** (``--steps``), with a curriculum on the number of objects per scene (3-6,
   growing to the task's 11-15 after ``--few-steps``): every step packs ``--images`` scenes; a full scene carries
   ``--questions`` questions (types drawn uniformly among those the scene offers) and a caption naming every
   object, colour, shape and place ("red circle b 3 , ..."; loss weight ``--caption-weight``). A share
   ``--drop`` of the scenes instead loses a random part of their non-relevant visual tokens (kept: 10-70 %),
   half of them with positions kept and half re-packed, and carries ``--drop-questions`` questions: the model
   learns to answer from what reducers leave. The per-token vision loss stays on with weight ``--aux-weight``.

The data of step ``k`` depend only on (seed, k), so a run is deterministic per seed on the CPU and resumes
exactly from its Lightning checkpoint (``--ckpt-dir``, every 250 steps). The run ends by saving the stock
checkpoint (model, tokenizer, processor) in ``--out`` with ``train_log.csv`` and ``eval.json`` (the 2,000
held-out questions).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.toy import model as toy
from experiments.toy import task

LOG_SEED, HELDOUT_SEED = 777, 12345


def objects_at(qa_step: int, h) -> tuple[int, int]:
    """The curriculum: scenes hold 3-6 objects for ``--few-steps`` caption + question steps, then the range
    grows linearly to the task's 11-15 over ``--grow-steps`` (retrieval among many candidates is learned
    far faster once it has been learned among few)."""
    lo, hi = task.N_OBJECTS
    t = min(1.0, max(0.0, (qa_step - h.few_steps) / max(1, h.grow_steps)))
    return round(3 + t * (lo - 3)), round(6 + t * (hi - 6))


def make_images(rng: np.random.Generator, h, qa_step: int) -> list[dict]:
    """One step's training scenes (see the module docstring)."""
    images = []
    for _ in range(h.images):
        scene = task.random_scene(rng, objects_at(qa_step, h))
        drop = rng.random() < h.drop
        n_q = h.drop_questions if drop else h.questions
        questions, seen, relevant = [], set(), set()
        for t in rng.choice(h.qtypes, n_q * 2):
            q = task.pick(rng, scene, str(t))
            if q is None or q[0] in seen:
                continue
            seen.add(q[0])
            questions.append(q[:2])
            relevant.update(q[2])
            if len(questions) == n_q:
                break
        im = {"image": scene.render(), "questions": questions, "scene": scene}
        if drop:
            keep = np.zeros(toy.N_VISUAL, bool)
            keep[list(relevant)] = True
            n_keep = int(rng.uniform(0.1, 0.7) * toy.N_VISUAL)
            others = np.flatnonzero(~keep)
            extra = max(0, n_keep - int(keep.sum()))
            keep[rng.choice(others, min(extra, len(others)), replace=False)] = True
            im.update(keep=keep, repack=bool(rng.random() < 0.5))
        else:
            im["caption"] = task.caption(scene)
        images.append(im)
    return images


def patch_targets(scenes) -> torch.Tensor:
    """(B, 144, 4) per-patch targets: colour (or len(COLOURS) for background), shape (or background), row, col."""
    out = np.zeros((len(scenes), toy.N_VISUAL, 4), np.int64)
    out[:, :, 0], out[:, :, 1] = len(task.COLOURS), len(task.SHAPES)
    out[:, :, 2] = np.arange(toy.N_VISUAL) // task.GRID
    out[:, :, 3] = np.arange(toy.N_VISUAL) % task.GRID
    for b, s in enumerate(scenes):
        for i in range(len(s.blocks)):
            p = s.patches(i)
            out[b, p, 0], out[b, p, 1] = s.colours[i], s.shapes[i]
    return torch.from_numpy(out)


@torch.no_grad()
def evaluate(model, tokenizer, samples, batch_size: int = 100) -> dict:
    """Accuracy with all visual tokens: overall and per question type."""
    model.eval()
    hits = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        b = toy.encode_batch(chunk, tokenizer, with_labels=True)
        ans = b.pop("answer_ids")
        dev = next(model.parameters()).device
        pred = model(**{k: v.to(dev) for k, v in b.items()}, logits_to_keep=1).logits[:, -1].argmax(-1).cpu()
        hits += (pred == ans).tolist()
    by_type: dict[str, list] = {}
    for s, h in zip(samples, hits):
        by_type.setdefault(s.qtype, []).append(h)
    return {
        "accuracy": float(np.mean(hits)),
        "n": len(hits),
        "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
    }


def build_module(h):
    import pytorch_lightning as pl

    class ToyTraining(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer = toy.build_toy_model({"seed": h.seed, "init_std": h.init_std})
            d = self.model.config.text_config.hidden_size
            self.aux_head = torch.nn.Linear(d, len(task.COLOURS) + 1 + len(task.SHAPES) + 1 + 2 * task.GRID)
            self.log_samples = task.generate(LOG_SEED, h.log_n, h.qtypes)
            self.rows: list[dict] = []
            self._losses: list[float] = []
            self._t0 = time.time()
            self._features = None
            self.model.model.multi_modal_projector.register_forward_hook(self._keep_features)

        def _keep_features(self, module, args, out):
            self._features = out

        def _aux_loss(self, scenes) -> torch.Tensor:
            f = self._features  # (B, 144, d): the projector's output for these scenes
            # RMS-normalised first: otherwise driving this loss down inflates the visual features' norm
            logits = self.aux_head(f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6))
            sizes = [len(task.COLOURS) + 1, len(task.SHAPES) + 1, task.GRID, task.GRID]
            t = patch_targets(scenes).to(f.device)
            return sum(
                F.cross_entropy(p.reshape(-1, p.shape[-1]), t[..., k].reshape(-1))
                for k, p in enumerate(logits.split(sizes, -1))
            )

        def training_step(self, batch, batch_idx):
            step = self.global_step
            rng = np.random.default_rng([h.seed, step])
            if step < h.vision_steps:
                scenes = [task.random_scene(rng) for _ in range(h.vision_batch)]
                self.model.model.get_image_features(pixel_values=toy.image_to_tensor([s.render() for s in scenes]))
                loss = self._aux_loss(scenes)
            else:
                images = make_images(rng, h, step - h.vision_steps)
                b = toy.encode_packed(images, self.tokenizer)
                with toy.override_attention_mask(self.model, b["allowed"]):
                    logits = self.model(
                        input_ids=b["input_ids"], pixel_values=b["pixel_values"], position_ids=b["position_ids"]
                    ).logits
                per = F.cross_entropy(logits[b["target_row"], b["target_pos"]], b["target_ids"], reduction="none")
                w = torch.where(b["target_is_answer"], 1.0, h.caption_weight)
                loss = (per * w).sum() / w.sum() + h.aux_weight * self._aux_loss([im["scene"] for im in images])
            self._losses.append(float(loss.detach()))
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            step = self.global_step  # already advanced
            if step % h.log_every == 0 or step == h.total_steps:
                r = evaluate(self.model, self.tokenizer, self.log_samples)
                self.model.train()
                row = {
                    "step": step,
                    "minutes": round((time.time() - self._t0) / 60, 2),
                    "loss": round(float(np.mean(self._losses[-h.log_every :])), 4),
                    "accuracy": round(r["accuracy"], 4),
                    **{k: round(v, 3) for k, v in r["by_type"].items()},
                }
                self.rows.append(row)
                print(json.dumps(row), flush=True)
                with open(Path(h.out) / "train_log.csv", "a", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=list(row))
                    if fh.tell() == 0:
                        writer.writeheader()
                    writer.writerow(row)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=0.01, betas=(0.9, 0.98))

            def lr_at(step: int) -> float:
                if step < h.vision_steps:
                    return 1.0
                s = step - h.vision_steps
                warm = min(1.0, (s + 1) / h.warmup)
                decay_from = int(h.steps * 0.8)
                tail = (
                    1.0 if s < decay_from else 0.5 * (1 + math.cos(math.pi * (s - decay_from) / (h.steps - decay_from)))
                )
                return warm * max(tail, 0.02)

            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_at), "interval": "step"},
            }

    return ToyTraining()


class _Steps(torch.utils.data.IterableDataset):
    """Step indices only: each training step builds its own data from (seed, step)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=2, help="2: the shipped checkpoint")
    p.add_argument("--out", default="runs/toy")
    p.add_argument("--ckpt-dir", default=None, help="Lightning checkpoints (default <out>/ckpt)")
    p.add_argument("--vision-steps", type=int, default=150)
    p.add_argument("--vision-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3500, help="caption + question steps after the vision stage")
    p.add_argument("--images", type=int, default=8, help="scenes per step")
    p.add_argument("--questions", type=int, default=10, help="questions per full scene")
    p.add_argument("--drop", type=float, default=0.4, help="share of scenes with dropped visual tokens")
    p.add_argument("--drop-questions", type=int, default=4)
    p.add_argument("--qtypes", default=",".join(task.QTYPES))
    p.add_argument("--caption-weight", type=float, default=0.5)
    p.add_argument("--aux-weight", type=float, default=0.2)
    p.add_argument("--few-steps", type=int, default=500, help="curriculum: steps with 3-6 objects per scene")
    p.add_argument("--grow-steps", type=int, default=700, help="curriculum: steps growing to 11-15 objects")
    p.add_argument("--init-std", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--log-n", type=int, default=600, help="questions in the learning-curve set")
    p.add_argument("--heldout-n", type=int, default=2000)
    p.add_argument("--accelerator", default="cpu")
    h = p.parse_args(argv)
    h.qtypes = [t for t in h.qtypes.split(",") if t]
    bad = sorted(set(h.qtypes) - set(task.QTYPES))
    if bad or not h.qtypes:
        p.error(f"--qtypes: unknown {bad or 'empty'}; allowed: {','.join(task.QTYPES)}")
    h.total_steps = h.vision_steps + h.steps
    return h


def main(argv=None) -> dict:
    import pytorch_lightning as pl

    h = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(h.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(h.ckpt_dir or out / "ckpt")
    last = ckpt_dir / "last.ckpt"
    if not last.exists() and (out / "train_log.csv").exists():
        (out / "train_log.csv").unlink()  # a fresh run starts a fresh log
    pl.seed_everything(h.seed, workers=True, verbose=False)
    module = build_module(h)
    trainer = pl.Trainer(
        accelerator=h.accelerator,
        devices=1,
        max_steps=h.total_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        deterministic=True,
        num_sanity_val_steps=0,
        callbacks=[
            pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=250, save_top_k=0)
        ],
    )
    loader = torch.utils.data.DataLoader(_Steps(h.total_steps), batch_size=None)
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    model = module.model.cpu().eval()
    toy.save_toy(model, module.tokenizer, out)
    result = evaluate(model, module.tokenizer, task.heldout(h.heldout_n, HELDOUT_SEED, h.qtypes))
    result["recipe"] = {k: v for k, v in vars(h).items() if k not in ("out", "ckpt_dir", "accelerator")}
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"heldout": result["accuracy"], **result["by_type"]}), flush=True)
    return result


if __name__ == "__main__":
    main()
