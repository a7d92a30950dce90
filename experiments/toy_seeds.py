"""Train the toy model with several seeds at once and tabulate their held-out accuracy (does the recipe reproduce?).

    python -m experiments.toy_seeds --seeds 0,1,2 --out runs/seeds                       # train_toy's defaults
    python -m experiments.toy_seeds --seeds 0,1,2 --out runs/seeds -- --steps 3000 ...   # extra train_toy arguments
    python -m experiments.toy_seeds --seeds 0,1,2 --out runs/recipe --recipe             # the shipped recipe

Each seed is one ``python -m experiments.train_toy --seed S --out <out>/seed<S>`` process (stdout in
``<out>/seed<S>.log``; Lightning checkpoints in ``<out>/ckpt/seed<S>``, so a second call resumes them), run
``--parallel`` at a time: one CPU thread each, or all sharing one GPU. With ``--recipe`` each seed runs the
shipped model's whole recipe instead (``python -m experiments.toy_recipe``: run 1 into ``<out>/seed<S>_run1``,
then continuation tries into ``<out>/seed<S>_try<k>``, the chosen one copied to ``<out>/seed<S>``). When they are
done the table of their ``eval.json`` (overall and per question type, on the fixed 2,000-question held-out set)
is printed and written to ``<out>/summary.json`` with the spread (max - min) of the overall accuracy. A seed
whose run failed is reported as failed (exit status 1) without losing the others.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from experiments import report
from experiments.tasks import synthetic_vqa as task


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {spec!r}: expected distinct integers separated by commas, e.g. 0,1,2")
    return seeds


def seed_command(seed: int, out: Path, extra: list[str], recipe: bool = False) -> list[str]:
    where = ["--seed", str(seed), "--out", str(out / f"seed{seed}"), "--ckpt-dir", str(out / "ckpt" / f"seed{seed}")]
    if recipe:  # toy_recipe resumes on its own
        return [sys.executable, "-m", "experiments.toy_recipe", *where]
    return [sys.executable, "-m", "experiments.train_toy", *where, "--resume", *extra]


def summarise(out: Path, seeds: list[int], failed: dict[int, int]) -> dict:
    rows = {}
    for s in seeds:
        path = out / f"seed{s}" / "eval.json"
        if s in failed or not path.exists():
            rows[s] = None
            continue
        clean = json.loads(path.read_text())["clean"]
        rows[s] = {k: clean[k] for k in ["overall", *task.QTYPES] if k in clean}
    done = [r["overall"] for r in rows.values() if r]
    summary = {"seeds": {str(s): r for s, r in rows.items()}, "failed": sorted(failed)}
    if done:
        summary.update(mean=sum(done) / len(done), min=min(done), max=max(done), spread=max(done) - min(done))
    return summary


def format_table(summary: dict) -> str:
    cols = ["seed", "overall", *task.QTYPES]
    rows = [{"seed": s, **({c: 100 * r[c] for c in cols[1:] if c in r} if r else dict.fromkeys(cols[1:], "failed"))}
            for s, r in summary["seeds"].items()]
    text = report.format_table(cols, rows)
    if "spread" in summary:
        text += (f"\n\nmean {100 * summary['mean']:.1f}, min {100 * summary['min']:.1f}, "
                 f"max {100 * summary['max']:.1f}, spread {100 * summary['spread']:.1f} points")
    return text


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out", required=True, help="one folder per seed goes here")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (default: all seeds at once)")
    p.add_argument("--recipe", action="store_true",
                   help="run the shipped model's recipe (experiments.toy_recipe: run 1 + continuation tries) per seed")
    a = p.parse_args(argv)
    seeds = parse_seeds(a.seeds)
    if a.recipe and extra:
        raise SystemExit(f"--recipe runs the fixed recipe of experiments.toy_recipe; extra train_toy arguments "
                         f"{extra} are not allowed with it")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    width = a.parallel if a.parallel > 0 else len(seeds)
    pending, running, failed = list(seeds), {}, {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < width:
            s = pending.pop(0)
            log = open(out / f"seed{s}.log", "a")  # a resumed call keeps the earlier output
            running[s] = (subprocess.Popen(seed_command(s, out, extra, a.recipe), stdout=log, stderr=subprocess.STDOUT), log)
        for s, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[s]
                if proc.returncode:
                    failed[s] = proc.returncode
                print(f"seed {s}: exit {proc.returncode} after {(time.time() - t0) / 60:.1f} min", flush=True)
        time.sleep(1)
    summary = summarise(out, seeds, failed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary), flush=True)
    if failed:
        print(f"failed seeds (exit status): {failed}; their logs: {out}/seed<S>.log", flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
