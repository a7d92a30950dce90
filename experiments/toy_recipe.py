"""The toy model's whole recipe from scratch, as one command: run 1, then the continuation.

    python -m experiments.toy_recipe --seed 1 --out runs/toy_seed1   # ~3 h on one CPU core, ~15 min on one H200

Run 1 is ``train_toy`` with its defaults (lookups first, the questioned region grown 2x2 -> 8x8, then all four
types; 7,500 steps) into ``<out>_run1``. The continuation trains those weights further on the full grid and
all four types, the relation types sampled twice as often and half of each type's questions naming the cells
it currently gets wrong (``--focus-cells 0.5``), with a fresh AdamW (lr 1e-3, decay over the last 30 %;
5,500 steps) into ``<out>``, on data seed ``seed + 10``. Run 1 alone ends anywhere between 80 and 100 % (the
relation types are learned cell by cell, and some cells stick); the continuation is there to finish them.
models/toy_llava/README.md has every run.

A finished run 1 (its ``eval.json`` exists) is not redone, so a second call after an interruption goes on
with the continuation; an unfinished stage resumes from its Lightning checkpoint (``--ckpt-dir``, default
``runs/train_toy/<name>``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

CONTINUATION = ["--vis-steps", "0", "--regions", "8", "--first-qtypes", "", "--lr", "1e-3", "--warmup", "100",
                "--steps", "5500", "--decay-frac", "0.3", "--qtype-weights", "left_of=2,above=2", "--focus-cells", "0.5"]
CONTINUATION_SEED_OFFSET = 10  # the continuation draws other batches than run 1 did


def stage_argvs(seed: int, out: str, run1_dir: str | None = None,
                ckpt_dir: str | None = None) -> tuple[list[str], list[str]]:
    """``train_toy`` argument lists of run 1 and of the continuation."""
    run1 = run1_dir or f"{out}_run1"
    first = ["--out", run1, "--seed", str(seed)]
    second = ["--out", out, "--init-from", run1, "--seed", str(seed + CONTINUATION_SEED_OFFSET), *CONTINUATION]
    if ckpt_dir:
        first += ["--ckpt-dir", str(Path(ckpt_dir) / "run1")]
        second += ["--ckpt-dir", str(Path(ckpt_dir) / "continuation")]
    return first, second


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="seed of run 1 (the continuation uses seed + 10)")
    p.add_argument("--out", required=True, help="where the final checkpoint and its eval.json go")
    p.add_argument("--run1-dir", default=None, help="where run 1's checkpoint goes (default <out>_run1)")
    p.add_argument("--ckpt-dir", default=None,
                   help="Lightning checkpoints of the two stages go to <ckpt-dir>/run1 and <ckpt-dir>/continuation "
                        "(default: train_toy's, runs/train_toy/<name of each stage's out>)")
    a = p.parse_args(argv)
    from experiments import train_toy

    first, second = stage_argvs(a.seed, a.out, a.run1_dir, a.ckpt_dir)
    run1 = Path(first[1])
    if (run1 / "eval.json").exists():
        print(f"run 1 already finished in {run1}; going on with the continuation", flush=True)
    else:
        train_toy.main(first + ["--resume"])  # train_toy starts fresh when there is no checkpoint to resume
    train_toy.main(second + ["--resume"])


if __name__ == "__main__":
    main()
