"""The toy model's whole recipe from scratch, as one command: run 1, then the continuation (retried when it sticks).

    python -m experiments.toy_recipe --seed 1 --out runs/toy_seed1   # ~3 h on one CPU core, ~15 min on one H200

Run 1 is ``train_toy`` with its defaults (lookups first, the questioned region grown 2x2 -> 8x8, then all four
types; 7,500 steps) into ``<out>_run1``. The continuation trains those weights further on the full grid and
all four types, the relation types sampled twice as often and half of each type's questions naming the cells
it currently gets wrong (``--focus-cells 0.5``), with a fresh AdamW (lr 1e-3, decay over the last 30 %;
5,500 steps), on data seed ``seed + 10``, into ``<out>_try1``.

Whether a continuation finishes the relation types depends on its path: some (type, cell) routes stay wrong
in some runs and not in others from the same run-1 weights (models/toy_llava/README.md has every run). So a
continuation whose accuracy on a validation set (``VALIDATION_N`` questions of seed
``train_toy.EVAL_SEED_VALIDATION``, not the held-out test set) is below ``--target`` is tried again from run 1's
weights with the next data seed (``seed + 11``, ...), at most ``--tries`` times (default 1: seed 0's three tries
on the CPU all ended at 94-95 %). The first try that reaches the target, else the best on validation, is copied
to ``<out>``; ``<out>/recipe.json`` lists every try.

Finished stages (their ``eval.json`` exists) are not redone, so a second call after an interruption goes on
where the first stopped; an unfinished stage resumes from its Lightning checkpoint (``--ckpt-dir``, default
``runs/train_toy/<name>``).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CONTINUATION = ["--vis-steps", "0", "--regions", "8", "--first-qtypes", "", "--lr", "1e-3", "--warmup", "100",
                "--steps", "5500", "--decay-frac", "0.3", "--qtype-weights", "left_of=2,above=2", "--focus-cells", "0.5"]
CONTINUATION_SEED_OFFSET = 10  # the continuation draws other batches than run 1 did
VALIDATION_N = 1000  # questions that pick among the tries


def data_seed(seed: int, k: int) -> int:
    """Data seed of continuation try ``k`` (1-based) after run 1 of ``seed``."""
    return seed + CONTINUATION_SEED_OFFSET + k - 1


def run1_argv(seed: int, run1: str, ckpt_dir: str | None = None) -> list[str]:
    argv = ["--out", run1, "--seed", str(seed)]
    return argv + (["--ckpt-dir", str(Path(ckpt_dir) / "run1")] if ckpt_dir else [])


def try_argv(seed: int, k: int, out: str, run1: str, ckpt_dir: str | None = None) -> list[str]:
    """``train_toy`` arguments of continuation try ``k`` (1-based) into ``<out>_try<k>``."""
    argv = ["--out", f"{out}_try{k}", "--init-from", run1, "--seed", str(data_seed(seed, k)), *CONTINUATION]
    return argv + (["--ckpt-dir", str(Path(ckpt_dir) / f"try{k}")] if ckpt_dir else [])


def validation_accuracy(path: str | Path) -> float:
    from experiments import train_toy
    from experiments.tasks import synthetic_vqa as task
    from models import toy

    model, tokenizer = toy.load_toy(path, attn_implementation="sdpa")
    return train_toy.evaluate(model, tokenizer, task.generate(train_toy.EVAL_SEED_VALIDATION, VALIDATION_N))["overall"]


def _train(argv: list[str]) -> Path:
    from experiments import train_toy

    out = Path(argv[1])
    if (out / "eval.json").exists():
        print(f"{out} already finished", flush=True)
    else:
        train_toy.main(argv + ["--resume"])  # train_toy starts fresh when there is no checkpoint to resume
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="seed of run 1 (continuation try k uses seed + 9 + k)")
    p.add_argument("--out", required=True, help="where the chosen checkpoint, its eval.json and recipe.json go")
    p.add_argument("--run1-dir", default=None, help="where run 1's checkpoint goes (default <out>_run1)")
    p.add_argument("--ckpt-dir", default=None,
                   help="Lightning checkpoints of the stages go to <ckpt-dir>/run1 and <ckpt-dir>/try<k> "
                        "(default: train_toy's, runs/train_toy/<name of each stage's out>)")
    p.add_argument("--tries", type=int, default=1,
                   help="most continuation tries (default 1; on the CPU, seed 0's three tries all ended at 94-95 %%)")
    p.add_argument("--target", type=float, default=0.98,
                   help="validation accuracy that ends the tries (default 0.98)")
    a = p.parse_args(argv)
    if a.tries < 1 or not 0.0 < a.target <= 1.0:
        raise SystemExit(f"--tries {a.tries} / --target {a.target}: expected at least 1 try and a target in (0, 1]")

    run1 = str(_train(run1_argv(a.seed, a.run1_dir or f"{a.out}_run1", a.ckpt_dir)))
    tries = []
    for k in range(1, a.tries + 1):
        done = _train(try_argv(a.seed, k, a.out, run1, a.ckpt_dir))
        tries.append({"try": k, "dir": str(done), "data_seed": data_seed(a.seed, k),
                      "validation": validation_accuracy(done)})
        print(f"continuation try {k}: validation accuracy {tries[-1]['validation']:.3f} (target {a.target})",
              flush=True)
        if tries[-1]["validation"] >= a.target:
            break
    chosen = max(tries, key=lambda t: t["validation"])  # only the last try can have reached the target
    out = Path(a.out)
    shutil.copytree(chosen["dir"], out, dirs_exist_ok=True)  # over, never instead of, what is in <out>
    (out / "recipe.json").write_text(json.dumps({"seed": a.seed, "target": a.target, "run1": run1,
                                                 "tries": tries, "chosen": chosen["try"]}, indent=2))
    print(f"chose try {chosen['try']} ({chosen['dir']} -> {out})", flush=True)


if __name__ == "__main__":
    main()
