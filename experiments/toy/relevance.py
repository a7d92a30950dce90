"""Does the toy's attention find what the question asks about? Per decoder layer and per query source:

* recall of the question's relevant patches among the top 1/9 and top 1/3 of the visual tokens, ranked by
  the head-mean attention they receive;
* how often a relevant object out-scores another object of the scene (mean attention over its patches;
  all (relevant, other) pairs; chance 0.5);

for the sources ``last`` (the last prompt token: FastV), ``content`` (the question's words that name a colour
or a shape; the position control names a place and has none), ``question`` (every question token) and
``raters`` (SparseVLM's selected raters). It also prunes at the language model's input and reports accuracy
as % of all tokens: random, the oracle (relevant patches first, random others up to the budget) with
positions kept and re-packed, and the content words' top tokens at the layer where they pick best (no later
than the first pruning layer of SparseVLM's depth-scaled schedule; over the questions that have content
words).

    python -m experiments.toy.relevance [toy-llava | path] [--n 600] [--out outputs/relevance]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from experiments.toy import model as toy
from experiments.toy import task

SOURCES = ("last", "content", "question", "raters")
FRACTIONS = {"1/9": 1 / 9, "1/3": 1 / 3}
CONTENT_WORDS = set(task.COLOURS) | set(task.SHAPES)  # the words that name content (places are not content)


def first_prune_layer(n_layers: int) -> int:
    """SparseVLM's first pruning layer (2 of 32) scaled to this depth: its attention decides the first cut."""
    from strategies.sparsevlm import FIXED_LAYERS, scale_layers

    return scale_layers(list(FIXED_LAYERS), n_layers)[0]


def _query_rows(tokenizer, ids: torch.Tensor, visual: torch.Tensor, embeds: torch.Tensor) -> dict:
    """Sequence indices of each source's query rows for one sample (``visual``: indices of its image tokens)."""
    from strategies.sparsevlm import select_raters

    text = torch.arange(int(visual[-1]) + 1, len(ids))
    words = tokenizer.convert_ids_to_tokens(ids[text].tolist())
    n_q = len(words) - len(toy.ANSWER_PROMPT.split())
    content = text[[i for i, w in enumerate(words[:n_q]) if w in CONTENT_WORDS]]
    return {
        "last": text[-1:],
        "content": content,
        "question": text[:n_q],
        "raters": text[select_raters(embeds[visual], embeds[text])],
    }


def _objects(scene: task.Scene) -> list[list[int]]:
    return [scene.patches(i) for i in range(len(scene.blocks))]


@torch.no_grad()
def attention_scores(model, tokenizer, samples, batch_size: int = 50) -> dict[str, np.ndarray]:
    """{source: (n_samples, n_layers, 144)} head-mean attention that each visual token receives from the
    source's rows (mean over rows). Runs the model once with eager attention maps."""
    n_layers = model.config.text_config.num_hidden_layers
    out = {k: np.zeros((len(samples), n_layers, toy.N_VISUAL), np.float32) for k in SOURCES}
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            b = toy.encode_batch(chunk, tokenizer)
            embeds = model.get_input_embeddings()(b["input_ids"])
            maps = model(**b, output_attentions=True).attentions  # per layer (B, H, L, L)
            image = b["input_ids"] == model.config.image_token_id
            for j in range(len(chunk)):
                visual = image[j].nonzero().flatten()
                rows = _query_rows(tokenizer, b["input_ids"][j], visual, embeds[j])
                for layer, a in enumerate(maps):
                    probs = a[j].float().mean(0)
                    for k, q in rows.items():
                        out[k][i + j, layer] = probs[q][:, visual].mean(0).numpy()
    finally:
        model.set_attn_implementation(impl)
    return out


def selection_stats(scores: np.ndarray, samples) -> dict[str, np.ndarray]:
    """(n_layers,) recall of the relevant patches in the top 1/9 and 1/3, and relevant-vs-other object wins."""
    n, n_layers, nv = scores.shape
    stats = {f"recall {f}": np.zeros(n_layers) for f in FRACTIONS} | {"asked>other": np.zeros(n_layers)}
    counted = np.zeros(n_layers)
    used = 0
    for s, sc in zip(samples, scores):
        if np.isnan(sc).any():  # the source has no rows in this question (no content words)
            continue
        used += 1
        rel = np.asarray(s.relevant)
        objs = _objects(s.scene)
        rel_objs = [o for o in objs if set(o) <= set(s.relevant)]
        other = [o for o in objs if not set(o) & set(s.relevant)]
        for name, f in FRACTIONS.items():
            k = round(f * nv)
            top = np.argsort(-sc, axis=1)[:, :k]
            stats[f"recall {name}"] += np.isin(top, rel).sum(1) / min(len(rel), k)
        if rel_objs and other:
            a = np.stack([sc[:, o].mean(1) for o in rel_objs], 1)  # (layers, n_rel)
            b = np.stack([sc[:, o].mean(1) for o in other], 1)
            stats["asked>other"] += (a[:, :, None] > b[:, None, :]).mean((1, 2))
            counted += 1
    out = {k: v / used if used else v * np.nan for k, v in stats.items() if k != "asked>other"}
    out["asked>other"] = stats["asked>other"] / np.maximum(counted, 1) if used else counted * np.nan
    return out


# ------------------------------------------------------------------------------------------ pruning at the input
def accuracy_with_keep(model, tokenizer, samples, keep: np.ndarray, repack: bool, batch_size: int = 100) -> float:
    """Accuracy when only the visual tokens in ``keep`` (n, 144) bool reach the language model (no token sees
    the others), with original or re-packed positions."""
    return float(np.mean(hits_with_keep(model, tokenizer, samples, keep, repack, batch_size)))


@torch.no_grad()
def hits_with_keep(model, tokenizer, samples, keep: np.ndarray, repack: bool, batch_size: int = 100) -> np.ndarray:
    """Per sample: is the answer right when only the visual tokens in ``keep`` reach the language model?"""
    hits = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        b = toy.encode_batch(chunk, tokenizer, with_labels=True)
        ids, am = b["input_ids"], b["attention_mask"].bool()
        image = ids == model.config.image_token_id
        visible = am.clone()
        visible[image] = torch.from_numpy(keep[i : i + len(chunk)]).reshape(-1)
        position_ids = (visible.long().cumsum(1) - 1).clamp(min=0) if repack else (am.long().cumsum(1) - 1).clamp(min=0)
        L = ids.shape[1]
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & visible[:, None, None, :]
        allowed = allowed | torch.eye(L, dtype=torch.bool)[None, None]
        with toy.override_attention_mask(model, allowed):
            logits = model(
                input_ids=ids, pixel_values=b["pixel_values"], position_ids=position_ids, logits_to_keep=1
            ).logits[:, -1]
        hits += (logits.argmax(-1) == b["answer_ids"]).tolist()
    return np.asarray(hits, bool)


def oracle_keep(rng, samples, k: int) -> np.ndarray:
    keep = np.zeros((len(samples), toy.N_VISUAL), bool)
    for i, s in enumerate(samples):
        rel = list(s.relevant)[:k]
        others = np.setdiff1d(np.arange(toy.N_VISUAL), rel)
        keep[i, rel] = True
        keep[i, rng.choice(others, k - len(rel), replace=False)] = True
    return keep


def random_keep(rng, n: int, k: int) -> np.ndarray:
    keep = np.zeros((n, toy.N_VISUAL), bool)
    for i in range(n):
        keep[i, rng.choice(toy.N_VISUAL, k, replace=False)] = True
    return keep


def top_keep(scores: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(scores.shape, bool)
    np.put_along_axis(keep, np.argsort(-scores, axis=1)[:, :k], True, axis=1)
    return keep


def pruning_table(model, tokenizer, samples, scores: dict, stats: dict, seed: int = 0) -> dict:
    """Accuracy (% of all tokens) after pruning at the input: random, oracle (kept / re-packed positions),
    and the content words' top tokens at their best layer up to the first pruning layer; overall and per
    question type (``by_type``)."""
    rng = np.random.default_rng(seed)
    types = np.array([s.qtype for s in samples])
    full = hits_with_keep(model, tokenizer, samples, np.ones((len(samples), toy.N_VISUAL), bool), False)
    upto = first_prune_layer(model.config.text_config.num_hidden_layers)
    best = int(np.argmax(stats["content"]["asked>other"][: upto + 1]))
    rows = {
        "full accuracy": float(full.mean()),
        "content layer": best,
        "first pruning layer": upto,
        "by_type": {t: {"full accuracy": float(full[types == t].mean())} for t in sorted(set(types))},
    }

    named = ~np.isnan(scores["content"][:, 0, 0])  # questions with content words

    def share(hits, mask):
        f = full[mask].mean() if mask.any() else 0.0
        return 100 * hits[mask].mean() / f if f else float("nan")

    for name, f in FRACTIONS.items():
        k = round(f * toy.N_VISUAL)
        oracle = oracle_keep(rng, samples, k)
        for label, keep, repack in [
            ("random", random_keep(rng, len(samples), k), False),
            ("oracle, positions kept", oracle, False),
            ("oracle, positions re-packed", oracle, True),
            ("content words' top tokens", top_keep(np.nan_to_num(scores["content"][:, best], nan=0.0), k), False),
        ]:
            hits = hits_with_keep(model, tokenizer, samples, keep, repack)
            among = named if label.startswith("content") else np.ones(len(samples), bool)
            rows[f"{label} @ {name}"] = share(hits, among)
            for t, r in rows["by_type"].items():
                r[f"{label} @ {name}"] = share(hits, among & (types == t))
    return rows


def type_stats(scores: dict, samples, upto: int) -> dict:
    """Per question type and source: the best relevant-vs-other rate at layers 0..upto, and at which layer."""
    types = np.array([s.qtype for s in samples])
    out = {}
    for t in sorted(set(types)):
        idx = np.flatnonzero(types == t)
        sub = [samples[i] for i in idx]
        out[t] = {}
        for src, sc in scores.items():
            wins = selection_stats(sc[idx], sub)["asked>other"][: upto + 1]
            out[t][src] = (float(wins.max()), int(wins.argmax())) if not np.isnan(wins).all() else (np.nan, -1)
    return out


def format_tables(stats: dict, pruning: dict, by_type: dict | None = None) -> str:
    n_layers = len(stats["last"]["asked>other"])
    head = " | ".join(SOURCES)
    lines = [
        "Recall of the relevant patches in the top 1/9 (top 1/3) of visual tokens, and how often a relevant "
        "object out-scores another one (chance 0.5):",
        "",
        f"| layer | {head} | asked > other: {head} |",
        "|---" * (2 + len(SOURCES)) + "|",
    ]
    for layer in range(n_layers):
        rec = " | ".join(f"{stats[s]['recall 1/9'][layer]:.2f} ({stats[s]['recall 1/3'][layer]:.2f})" for s in SOURCES)
        win = " / ".join(f"{stats[s]['asked>other'][layer]:.2f}" for s in SOURCES)
        lines.append(f"| {layer} | {rec} | {win} |")
    lines += [
        "",
        f"chance recall: 0.11 (0.33). Pruned at the LM input, % of all tokens "
        f"({100 * pruning['full accuracy']:.1f} % accuracy); content words at layer {pruning['content layer']} "
        f"(first pruning layer of the scaled schedule: {pruning['first pruning layer']}):",
        "",
        "| keep | " + " | ".join(FRACTIONS) + " |",
        "|---" * (1 + len(FRACTIONS)) + "|",
    ]
    for label in ("random", "oracle, positions kept", "oracle, positions re-packed", "content words' top tokens"):
        # the content words' row covers the questions that have content words (not the position control)
        lines.append(f"| {label} | " + " | ".join(f"{pruning[f'{label} @ {f}']:.1f}" for f in FRACTIONS) + " |")
    if by_type:
        upto = pruning["first pruning layer"]
        lines += [
            "",
            f"Per question type: the best relevant-vs-other rate at layers 0-{upto} (layer), and pruning at "
            "1/9 at the input (% of all tokens):",
            "",
            "| type | full % | " + " | ".join(SOURCES) + " | random | oracle re-packed | content words' top |",
            "|---" * (5 + len(SOURCES)) + "|",
        ]
        for t, st in by_type.items():
            p = pruning["by_type"][t]
            wins = " | ".join("-" if np.isnan(st[s][0]) else f"{st[s][0]:.2f} ({st[s][1]})" for s in SOURCES)
            cells = [
                p[f"{label} @ 1/9"] for label in ("random", "oracle, positions re-packed", "content words' top tokens")
            ]
            shown = " | ".join("-" if np.isnan(c) else f"{c:.1f}" for c in cells)
            lines.append(f"| {t} | {100 * p['full accuracy']:.1f} | {wins} | {shown} |")
    return "\n".join(lines)


def plot(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for s in SOURCES:
        axes[0].plot(stats[s]["recall 1/9"], marker="o", label=s)
        axes[1].plot(stats[s]["asked>other"], marker="o", label=s)
    axes[0].axhline(1 / 9, ls=":", c="grey")
    axes[1].axhline(0.5, ls=":", c="grey")
    axes[0].set(title="recall of relevant patches in the top 1/9", xlabel="decoder layer")
    axes[1].set(title="relevant object out-scores another", xlabel="decoder layer")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(model, tokenizer, samples, seed: int = 0) -> dict:
    scores = attention_scores(model, tokenizer, samples)
    stats = {k: selection_stats(v, samples) for k, v in scores.items()}
    pruning = pruning_table(model, tokenizer, samples, scores, stats, seed)
    return {"stats": stats, "pruning": pruning, "by_type": type_stats(scores, samples, pruning["first pruning layer"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=toy.TOY_NAME, help="toy checkpoint name or folder")
    p.add_argument("--n", type=int, default=600, help="questions, shared among the question types")
    p.add_argument("--seed", type=int, default=4242, help="seed of the generated questions")
    p.add_argument("--qtypes", default=",".join(task.QTYPES), help=f"comma-separated of {task.QTYPES}")
    p.add_argument("--out", default="outputs/relevance", help="folder for the per-layer table and plot")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok = toy.load_toy(a.model)
    samples = task.generate(a.seed, a.n, [t for t in a.qtypes.split(",") if t])
    result = run(model, tok, samples)
    text = format_tables(result["stats"], result["pruning"], result["by_type"])
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "relevance.md").write_text(text + "\n")
    as_lists = {s: {k: v.tolist() for k, v in d.items()} for s, d in result["stats"].items()}
    (out / "relevance.json").write_text(
        json.dumps({"stats": as_lists, "pruning": result["pruning"], "by_type": result["by_type"]}, indent=1)
    )
    plot(result["stats"], out / "relevance.png")
    return result


if __name__ == "__main__":
    main()
