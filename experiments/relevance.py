"""Where does the toy model look? Per decoder layer, how often the question's relevant cell is among the
top-k image tokens by the attention that FastV (the last prompt token) and SparseVLM (its text raters) score
with. Layers whose attention ranks the relevant cell at chance (k/64) cannot guide pruning.

    python -m experiments.relevance [toy-llava | path] [--n 300]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.tasks import synthetic_vqa as task  # noqa: E402
from models import toy  # noqa: E402
from strategies.sparsevlm import select_raters  # noqa: E402

TOP_K = (1, 7, 21)


@torch.no_grad()
def relevance_by_layer(model, tokenizer, samples, batch_size: int = 50) -> dict[str, np.ndarray]:
    """{"last_token" | "raters": (layers, len(TOP_K)) recall of the relevant cells in the top k}. Needs eager
    attention (output_attentions)."""
    n_layers = model.config.text_config.num_hidden_layers
    hits = {key: np.zeros((n_layers, len(TOP_K))) for key in ("last_token", "raters")}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        b = toy.encode_batch(chunk, tokenizer)
        emb = model.get_input_embeddings()(b["input_ids"])
        maps = model(**b, output_attentions=True).attentions  # per layer (B, H, L, L)
        image = b["input_ids"] == model.config.image_token_id
        for j, s in enumerate(chunk):
            pos = image[j].nonzero().flatten()
            text = torch.arange(int(pos[-1]) + 1, b["input_ids"].shape[1])
            rows = {"last_token": text[-1:], "raters": text[select_raters(emb[j, pos], emb[j, text])]}
            relevant = torch.tensor([r * task.GRID + c for r, c in s.relevant])
            for layer, a in enumerate(maps):
                probs = a[j].mean(0)  # head mean, as both methods score
                for key, q in rows.items():
                    order = torch.argsort(probs[q][:, pos].mean(0), descending=True)
                    rank = torch.argsort(order)[relevant]  # rank of each relevant cell
                    hits[key][layer] += [float((rank < k).float().mean()) for k in TOP_K]
    return {key: h / len(samples) for key, h in hits.items()}


def format_relevance(rel: dict[str, np.ndarray], n_image: int = task.GRID ** 2) -> str:
    head = "top " + " / ".join(str(k) for k in TOP_K)
    lines = [f"| layer | last token, {head} | raters, {head} |", "|---|---|---|"]
    for layer in range(len(rel["last_token"])):
        cells = [" / ".join(f"{v:.2f}" for v in rel[key][layer]) for key in ("last_token", "raters")]
        lines.append(f"| {layer} | {cells[0]} | {cells[1]} |")
    lines.append("chance: " + " / ".join(f"{k / n_image:.2f}" for k in TOP_K))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=toy.TOY_NAME)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=4242)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = toy.load_toy(a.model, attn_implementation="eager")
    print(format_relevance(relevance_by_layer(model, tok, task.generate(a.seed, a.n))))


if __name__ == "__main__":
    main()
