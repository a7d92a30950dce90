"""`sparsevlm report`: paper-style tables, plots and token overlays from a results JSONL file.

Table: one row per run in the results (by run key), the unreduced baseline first; columns: the budget asked
for, accuracy per question type (%), average accuracy (%), average as % of unreduced, the equivalent tokens
actually kept, prefill TFLOPs (and % of unreduced), prefill latency ms and decode ms/token (and % of one
no-reduction reference per backbone and sweep: the median of its timings interleaved with the runs),
KV-cache MB, peak MB. Lines of the results file that are not rows are reported with their numbers.
Files written to the output folder: `table.md`, `table.csv`, `acc_vs_tokens.png`, `acc_vs_latency.png` (one
line per strategy and combination of the ablation fields that vary, legend outside the axes), and
`overlays.png`, `overlays-2.png`, ... (at most 8 runs a page: each sample's question above its column, the
cells it asks about outlined, kept tokens outlined, dropped cells dimmed, merged groups in one colour each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from framework.errors import ConfigError

from .logging_utils import ResultsFile, write_csv


def load_rows(results: str | Path, sweep: str | None = None, bad_lines: list[int] | None = None) -> list[dict]:
    """The result rows (one per run key); the numbers of lines that are not rows are reported on stderr and
    added to ``bad_lines``."""
    path = Path(results)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise ConfigError(f"no results file at {path}; run `sparsevlm run` or `sparsevlm sweep` first")
    results = ResultsFile(path)
    rows = results.rows()
    results.warn_bad_lines()
    if bad_lines is not None:
        bad_lines.extend(results.bad_lines)
    if sweep:
        rows = [r for r in rows if r.get("sweep") == sweep]
    if not rows:
        raise ConfigError(f"no result rows in {path}" + (f" for sweep {sweep!r}" if sweep else ""))
    latest = {r["run_key"]: r for r in rows}  # one row per run (a run logged twice: its last row)
    return order_rows([r for r in rows if latest[r["run_key"]] is r])


def order_rows(rows: list[dict]) -> list[dict]:
    """Baseline(s) first, then strategies in first-seen order, budgets descending, ablations as seen."""
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r["strategy"], len(seen))
    idx = {id(r): i for i, r in enumerate(rows)}
    return sorted(
        rows, key=lambda r: (r["strategy"] != "none", seen[r["strategy"]], -(r.get("budget") or 10**9), idx[id(r)])
    )


def qtypes_of(rows: list[dict]) -> list[str]:
    out: list[str] = list(((rows[0].get("config") or {}).get("task") or {}).get("qtypes") or [])
    for r in rows:
        for k in r.get("acc_by_type", {}):
            if k not in out:
                out.append(k)
    return out


def table_rows(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Columns and one dict per row, numbers in display units (the values of the results, scaled)."""
    qt = qtypes_of(rows)
    cols = (
        ["method", "budget"]
        + [f"{q} %" for q in qt]
        + [
            "avg %",
            "% of none",
            "eq. tokens kept",
            "TFLOPs",
            "FLOPs %",
            "prefill ms",
            "prefill %",
            "decode ms/tok",
            "decode %",
            "KV MB",
            "peak MB",
        ]
    )
    refs = baseline_reference(rows)
    out = []
    for r in rows:
        ref = refs.get((r.get("backbone"), r.get("sweep")), {})
        base = r["strategy"] == "none"
        budget = r.get("n_visual") if base else r.get("budget")
        d = {"method": r["name"], "budget": budget if budget is not None else "own"}
        for q in qt:
            v = r.get("acc_by_type", {}).get(q)
            d[f"{q} %"] = None if v is None else 100 * v
        d["avg %"] = 100 * r["accuracy"]
        d["% of none"] = _pct(r.get("accuracy_ratio"))
        d["eq. tokens kept"] = r.get("equivalent_tokens")
        d["TFLOPs"] = r.get("tflops")
        d["FLOPs %"] = _pct(r.get("flops_ratio"))
        d["prefill ms"] = ref.get("prefill_ms") if base else r.get("prefill_ms")
        d["prefill %"] = _pct(ratio(d["prefill ms"], ref.get("prefill_ms")))
        d["decode ms/tok"] = ref.get("decode_ms") if base else r.get("decode_ms")
        d["decode %"] = _pct(ratio(d["decode ms/tok"], ref.get("decode_ms")))
        d["KV MB"] = r.get("kv_cache_mb")
        d["peak MB"] = r.get("peak_mb")
        out.append(d)
    return cols, out


def baseline_reference(rows: list[dict]) -> dict[tuple, dict]:
    """One no-reduction reference per (backbone, sweep): the median of every timing of the stock model in
    that sweep (each run times it interleaved with itself: `base_prefill_ms`, `base_decode_ms`), so every
    ratio of a table refers to the same number, and the baseline row shows that number."""
    import statistics

    groups: dict[tuple, dict[str, list]] = {}
    for r in rows:
        g = groups.setdefault((r.get("backbone"), r.get("sweep")), {"prefill_ms": [], "decode_ms": [], "n": []})
        for k in ("prefill_ms", "decode_ms"):
            v = r.get(f"base_{k}")
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                g[k].append(v)
    return {
        key: {k: (statistics.median(v) if v else None) for k, v in g.items() if k != "n"}
        | {"timings": len(g["prefill_ms"])}
        for key, g in groups.items()
    }


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _pct(x):
    return None if x is None else 100 * x


def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, str):
        return v
    if col == "TFLOPs":
        return f"{v:.2e}" if v < 0.01 else f"{v:.3f}"
    if col in ("KV MB", "peak MB"):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if col == "budget":
        return str(v)
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def format_table(cols: list[str], rows: list[dict]) -> str:
    cells = [[_fmt(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(xs):
        return "| " + " | ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(xs, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(r) for r in cells])


# ---------------------------------------------------------------------------------------- plots
def varying(rows: list[dict]) -> list[str]:
    """The ablation fields that take more than one value among the rows (they name series and overlay rows)."""
    values: dict[str, set] = {}
    for r in rows:
        for k, v in (r.get("ablation") or {}).items():
            values.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
    return [k for k, v in values.items() if len(v) > 1]


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Reduced runs grouped into plot lines: one per strategy and combination of the varying ablation fields
    (the points of a line are its budgets). Every reduced row is a point of exactly one line."""
    keys = varying(rows)
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["strategy"] == "none":
            continue
        ab = r.get("ablation") or {}
        label = " ".join([r["strategy"]] + [f"{k}={_short(ab[k])}" for k in keys if k in ab])
        out.setdefault(label, []).append(r)
    return out


def _short(v) -> str:
    return {True: "on", False: "off"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def chance(rows: list[dict]) -> float | None:
    """Accuracy of the best image-free guess, averaged over the question types (toy task only)."""
    samples = _task_samples(rows[0])
    if not samples:
        return None
    from experiments.toy import task as toy_task

    return toy_task.chance(samples)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy against equivalent tokens and against prefill latency: one line per `series`, markers and
    colours cycled so that 40 lines stay apart, the legend outside the axes."""
    plt = _pyplot()
    base = [r for r in rows if r["strategy"] == "none"]
    lines = series(rows)
    colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
    markers = "osD^v<>pP*Xh"
    ref = baseline_reference(rows)
    files = []
    for fname, xkey, xlabel in (
        ("acc_vs_tokens.png", "equivalent_tokens", "equivalent visual tokens kept"),
        ("acc_vs_latency.png", "prefill_ms", "prefill latency (ms, batch 1)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, (label, rs) in enumerate(lines.items()):
            rs = sorted(rs, key=lambda r: r.get(xkey) or 0)
            ax.plot(
                [r.get(xkey) for r in rs],
                [100 * r["accuracy"] for r in rs],
                marker=markers[i % len(markers)],
                color=colours(i % colours.N),
                lw=1.2,
                ms=5,
                label=label,
            )
        for b in base[:1]:
            acc = 100 * b["accuracy"]
            ax.axhline(acc, color="k", ls="--", lw=1, label=f"no reduction ({acc:.1f} %)")
            x = ref.get((b.get("backbone"), b.get("sweep")), {}).get("prefill_ms") if xkey == "prefill_ms" else b[xkey]
            if x is not None:
                ax.plot([x], [100 * b["accuracy"]], "k*", ms=10)
        c = chance(rows)
        if c is not None:
            ax.axhline(100 * c, color="gray", ls=":", lw=1, label=f"chance ({100 * c:.1f} %)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{rows[0].get('backbone', '')} on {rows[0].get('task', '')}")
        ax.grid(alpha=0.3)
        n = len(lines) + 2
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False, ncol=1 + n // 24)
        fig.savefig(out / fname, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(out / fname)
    return files


def _task_samples(row: dict) -> list:
    """The evaluated questions of a toy-task run, regenerated from its config (seeded); [] for other tasks."""
    task = (row.get("config") or {}).get("task") or {}
    if task.get("name") != "toy_vqa":
        return []
    from experiments.toy import task as toy_task

    return toy_task.generate(int(task.get("seed", 0)), int(task["n"]), list(task.get("qtypes") or toy_task.QTYPES))


def _task_images(row: dict, indices: list[int]) -> dict[int, object]:
    samples = _task_samples(row)
    return {i: samples[i] for i in indices if i < len(samples)}


ROWS_PER_PAGE = 8


def plot_overlays(rows: list[dict], out: Path, max_samples: int = 4, per_page: int = ROWS_PER_PAGE) -> list[Path]:
    """Pages of at most `per_page` reduced runs (`overlays.png`, `overlays-2.png`, ...), one panel per sample:
    the question above its column, the cells the question is about outlined in yellow, dropped cells dimmed,
    kept cells outlined white, each merged group in its own colour (dashed)."""
    runs = [r for r in rows if r.get("overlays") and r["strategy"] != "none"]
    if not runs:
        return []
    indices = sorted({o["index"] for r in runs for o in r["overlays"]})[:max_samples]
    samples = _task_images(runs[0], indices)
    pages = [runs[i : i + per_page] for i in range(0, len(runs), per_page)]
    files = []
    for p, page in enumerate(pages, 1):
        path = out / ("overlays.png" if p == 1 else f"overlays-{p}.png")
        _overlay_page(page, indices, samples, path, f"page {p} of {len(pages)}: " if len(pages) > 1 else "")
        files.append(path)
    return files


def _overlay_page(runs: list[dict], indices: list[int], samples: dict, path: Path, page: str) -> None:
    import textwrap

    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    ncol = len(indices)
    fig, axes = plt.subplots(len(runs), ncol, figsize=(2.2 * ncol + 2.2, 2.3 * len(runs) + 0.9), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, idx in enumerate(indices):
        s = samples.get(idx)
        head = f"#{idx}: {s.question}" if s is not None else f"#{idx}"
        axes[0][j].set_title("\n".join(textwrap.wrap(head, 30)), fontsize=7)
    for i, r in enumerate(runs):
        ov = {o["index"]: o for o in r["overlays"]}
        n_vis = int(r.get("n_visual") or 144)
        grid = int(round(math.sqrt(n_vis)))
        for j, idx in enumerate(indices):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            s = samples.get(idx)
            img = np.full((grid * 8, grid * 8, 3), 0.8) if s is None else np.asarray(s.image, dtype=np.float32) / 255
            cell = img.shape[0] / grid
            o = ov.get(idx)

            def box(t, **kw):
                rr, cc = divmod(int(t), grid)
                ax.add_patch(Rectangle((cc * cell - 0.5, rr * cell - 0.5), cell, cell, fill=False, **kw))

            if o is None:
                ax.imshow(img)
            else:
                alive = np.zeros(n_vis, bool)
                for g in o["groups"]:
                    alive[g] = True
                shade = np.repeat(np.repeat(alive.reshape(grid, grid), int(cell), 0), int(cell), 1)[..., None]
                ax.imshow(np.where(shade, img, 0.15 + 0.25 * img))
                merged = [g for g in o["groups"] if len(g) > 1]
                for g in o["groups"]:
                    if len(g) == 1:
                        box(g[0], ec="white", lw=1.0)
                for k, g in enumerate(merged):
                    for t in g:
                        box(t, ec=cmap(k % 10), lw=1.4, ls="--")
                relevant = list(s.relevant) if s is not None else []
                kept = sum(bool(alive[t]) for t in relevant)
                mark = "right" if o.get("correct") else "wrong"
                ax.set_xlabel(
                    f"{mark}; {len(o['groups'])} tok ({len(merged)} merged)"
                    + (f"; {kept}/{len(relevant)} asked-about kept" if relevant else ""),
                    fontsize=6,
                )
            for t in s.relevant if s is not None else []:
                box(t, ec="yellow", lw=1.6, ls=":")
            if j == 0:
                label = "\n".join(textwrap.wrap(r["name"].replace("-", " "), 18))
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
    fig.suptitle(
        f"{page}asked-about cells (yellow dotted), kept (white), dropped (dim), merged groups (dashed colours)",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title above the questions
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _repeats(rows: list[dict]) -> object:
    return (((rows[0].get("config") or {}).get("run") or {}).get("latency") or {}).get("repeats", "?")


def make_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    sweep: str | None = None,
    plots: bool = True,
    echo: bool = True,
    keys: list[str] | None = None,
) -> dict:
    """Table (printed + table.md + table.csv) and plots. Returns {"columns", "rows", "text", "files"}.
    `keys`: only these run keys (e.g. the runs of the sweep just finished, not older configs' rows)."""
    bad_lines: list[int] = []
    rows = load_rows(results, sweep, bad_lines)
    if keys is not None:
        rows = [r for r in rows if r["run_key"] in set(keys)]
    out = Path(out_dir) if out_dir else (Path(results) if Path(results).is_dir() else Path(results).parent)
    out.mkdir(parents=True, exist_ok=True)
    cols, trows = table_rows(rows)
    text = format_table(cols, trows)
    timings = max((v["timings"] for v in baseline_reference(rows).values()), default=0)
    title = (
        f"{rows[0].get('backbone')} on {rows[0].get('task')} ({rows[0].get('n')} questions/run); "
        f"{len(rows)} runs; budget: the visual tokens asked for ('own': the strategy sets its count), "
        f"eq. tokens kept: what it kept (layer mean); prefill % and decode %: of one no-reduction reference "
        f"per backbone, the median of its {timings} timings interleaved with the runs "
        f"(each a median of {_repeats(rows)} repeats), shown in the none row"
    )
    c = chance(rows)
    if c is not None:
        title += f"; chance {100 * c:.1f} %"
    (out / "table.md").write_text(f"{title}\n\n{text}\n")
    write_csv(out / "table.csv", trows, cols)
    files = [out / "table.md", out / "table.csv"]
    if plots:
        files += plot_accuracy(rows, out)
        files += plot_overlays(rows, out)
    if echo:
        print(title)
        print(text)
        print("wrote: " + ", ".join(str(f) for f in files))
    return {"columns": cols, "rows": trows, "text": text, "files": files, "results": rows, "bad_lines": bad_lines}
