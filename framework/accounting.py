"""Token, FLOPs and KV-cache accounting, with the conventions of the SparseVLM paper and code.

* tokens entering each decoder layer (all tokens: visual + text), prefill only;
* equivalent tokens: the mean over decoder layers of the visual tokens present *after* each layer
  (the official code's "equal token num": a pruning layer counts with its reduced count; this is what
  the paper reports as "192/128/64");
* FLOPs: sum over layers of 4 n d^2 + 2 n^2 d + 3 n d m (n tokens entering the layer, d hidden,
  m FFN width): multiply-accumulates of the decoder layers at prefill, no vision tower, no lm_head;
* KV-cache bytes: 2 (K and V) x kv_heads x head_dim x bytes per element, summed over layers of the
  tokens each layer holds.

Per-sample records of a prefill (the engine keeps one list per prefill): `new_records` at its start,
`record_stage` at each decision (tokens before / after, kept indices, merged groups, the decision's
own record), `finish_records` at its end (what needs device values, in one copy; visual and all tokens
entering each decoder layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def layer_flops(n: int, d: int, m: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: list[int], d: int, m: int) -> int:
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


def equivalent_tokens(visual_per_layer: list[int], final_visual: int | None = None) -> float:
    """Mean over layers of the visual tokens after each layer (= entering the next; the last layer
    counts the final number)."""
    after = list(visual_per_layer[1:]) + [visual_per_layer[-1] if final_visual is None else final_visual]
    return sum(after) / len(after)


def kv_cache_bytes(tokens_per_layer: list[int], kv_heads: int, head_dim: int, bytes_per_elem: int = 2) -> int:
    return sum(2 * kv_heads * head_dim * bytes_per_elem * n for n in tokens_per_layer)


def parse_schedule(spec: str, layers: int, visual: int) -> list[int]:
    """`"2:309,6:204,15:113"` -> visual tokens entering each layer: 576 enter 0-2, 309 enter 3-6, ...

    Each `l:k` means k visual tokens remain after layer l. Layers must increase and lie in 0..layers-2.
    """
    from .errors import ConfigError

    counts = [visual] * layers
    last_layer, last_k = -1, visual
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            layer_s, k_s = item.split(":")
            layer, k = int(layer_s), int(k_s)
        except ValueError:
            raise ConfigError(f"bad schedule item {item!r}; expected LAYER:KEPT, e.g. 2:309") from None
        if not last_layer < layer <= layers - 2:
            raise ConfigError(f"schedule layer {layer} must increase and lie in 0..{layers - 2}")
        if not 1 <= k <= last_k:
            raise ConfigError(f"schedule keeps {k} after layer {layer}; allowed 1..{last_k}")
        for i in range(layer + 1, layers):
            counts[i] = k
        last_layer, last_k = layer, k
    return counts


@dataclass
class Accounting:
    """Per-sample figures for one prefill (from the engine's record and the decoder shape)."""

    visual_per_layer: list[int]
    tokens_per_layer: list[int]
    equivalent_tokens: float
    flops: int
    kv_bytes: int

    @classmethod
    def from_counts(cls, visual_per_layer, tokens_per_layer, shape: dict, bytes_per_elem: int = 2):
        return cls(
            visual_per_layer=list(visual_per_layer),
            tokens_per_layer=list(tokens_per_layer),
            equivalent_tokens=equivalent_tokens(visual_per_layer),
            flops=prefill_flops(tokens_per_layer, shape["hidden"], shape["ffn"]),
            kv_bytes=kv_cache_bytes(tokens_per_layer, shape["kv_heads"], shape["head_dim"], bytes_per_elem),
        )

    def to_dict(self) -> dict:
        return {
            "visual_per_layer": self.visual_per_layer,
            "tokens_per_layer": self.tokens_per_layer,
            "equivalent_tokens": self.equivalent_tokens,
            "tflops": self.flops * 1e-12,
            "kv_cache_mb": self.kv_bytes / 2**20,
        }


def account(engine, bytes_per_elem: int | None = None) -> list[Accounting]:
    """Accounting for each sample of the engine's last prefill."""
    shape = engine.adapter.shape()
    if bytes_per_elem is None:
        bytes_per_elem = next(engine.model.parameters()).element_size()
    return [
        Accounting.from_counts(s["visual_per_layer"], s["tokens_per_layer"], shape, bytes_per_elem)
        for s in engine.last_record
    ]


# ---------------------------------------------------------------------------------------- per-layer records
def new_records(n_visual: list[int], n_tokens: list[int]) -> list[dict]:
    """One record per sample at the start of a prefill: its visual and all tokens at the input."""
    return [{"n_visual_input": int(n), "stages": [], "tokens_in": int(v)} for n, v in zip(n_visual, n_tokens)]


_MEMBERS = "_members"  # a stage's members on the device, until `finish_records` reads them


def record_stage(records: list[dict], layer: int, stage: str, before, after, decisions) -> None:
    """Append one decision point to each sample's record; `before` / `after` are the Slots around it. What
    needs the device's values (kept indices, merged groups, tensors in the decision's record) waits for
    `finish_records`, so that a decision never makes the host wait for the device."""
    for rec, d, m_before, m_after in zip(records, decisions, before.members, after.members):
        rec["stages"].append(
            {
                "stage": stage,
                "layer": layer,
                "visual_before": int(m_before.shape[0]),
                "visual_after": int(m_after.shape[0]),
                "kept": None,
                "groups": None,
                "n_merged": d.n_merged,
                **d.record,
                _MEMBERS: m_after,
            }
        )


def finish_records(records: list[dict], n_layers: int, checks=None) -> None:
    """Complete a prefill's records: every pending check (`DeferredChecks`), every stage's members and the
    tensors in the decisions' records reach the host in one copy; kept indices and merged groups come from
    the members, the tensors become lists, the tokens entering each layer are counted; then the first failed
    check raises."""
    import torch

    from .checks import fetch

    pending = [st for rec in records for st in rec["stages"] if _MEMBERS in st]
    flags = checks.values if checks is not None else []
    values = [(st, k) for st in pending for k, v in st.items() if isinstance(v, torch.Tensor) and k != _MEMBERS]
    host = fetch([*flags, *(st[_MEMBERS] for st in pending), *(st[k] for st, k in values)])
    for st, m in zip(pending, host[len(flags) :]):
        del st[_MEMBERS]
        groups = member_groups(m)
        n_kept = len(groups) - st["n_merged"]  # kept tokens come first, merged ones after
        st["kept"] = sorted(g[0] for g in groups[:n_kept] if len(g) == 1)
        st["groups"] = groups
    for (st, key), value in zip(values, host[len(flags) + len(pending) :]):
        st[key] = value.tolist()
    count_per_layer(records, n_layers)
    if checks is not None:  # the records are complete (for a look at what went wrong) before a failure raises
        checks.raise_failures(host[: len(flags)])


def member_groups(members) -> list[list[int]]:
    """Per row of a (n, n_in) bool matrix (a tensor, or an array already on the host), its True columns in
    ascending order, from one copy to the host (a nonzero per row would synchronise a GPU once per visual
    token)."""
    m = members if isinstance(members, np.ndarray) else members.cpu().numpy()
    n, width = m.shape
    at = np.flatnonzero(m)  # row-major: rows ascending, columns ascending within a row
    cols, ends = (at % width).tolist(), np.searchsorted(at, np.arange(1, n + 1) * width).tolist()
    return [cols[i:j] for i, j in zip([0, *ends[:-1]], ends)]


def count_per_layer(records: list[dict], n_layers: int) -> None:
    """Fill `visual_per_layer` / `tokens_per_layer` (tokens entering each decoder layer) of each record."""
    for rec in records:
        vis_in, tok_in = [], []
        stages = rec["stages"]
        n_vis = stages[0]["visual_after"] if stages and stages[0]["stage"] == "projector" else rec["n_visual_input"]
        n_tok = rec["tokens_lm_input"]
        llm = {st["layer"]: st for st in stages if st["stage"] == "llm"}
        for i in range(n_layers):
            if i in llm:
                n_tok -= llm[i]["visual_before"] - llm[i]["visual_after"]
                n_vis = llm[i]["visual_after"]
            vis_in.append(n_vis)
            tok_in.append(n_tok)
        rec["visual_per_layer"] = vis_in
        rec["tokens_per_layer"] = tok_in
