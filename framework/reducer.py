"""The `TokenReducer` contract every strategy implements.

A reducer is a small dataclass of hyper-parameters. It declares where it acts (`stage`) and, for the
`llm` stage, before which decoder layers it decides (`decision_layers`). At each of those points the
engine hands it a `StageContext` (hidden states, which slots are visual / text, lazily computed
attention rows) and the reducer returns one `Decision` per sample: which of the current visual tokens
survive and which merged tokens are added. It never touches masks, caches or positions: the engine
applies decisions (see `framework/engine.py`).

Writing a new strategy (one file)::

    @register("l2norm")
    @dataclass
    class L2Norm(ScoringReducer):
        '''Keep the visual tokens with the largest hidden-state norm before layer `layer`.'''
        layer: int = 2
        def score(self, ctx, b):
            return ctx.hidden[b, ctx.visual[b]].norm(dim=-1)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from .errors import ConfigError
from .fields import field_types
from .merging import scaled

if TYPE_CHECKING:  # pragma: no cover
    from .context import StageContext

STAGES = ("vision", "projector", "llm")
POSITION_MODES = ("keep", "repack")
BUDGET_SCOPES = ("global", "per_span")


@dataclass
class SourceGroups:
    """Every merged token's sources at once, as a device-side clustering gives them: `index` (n,) current
    visual tokens (0..n_visual-1), `group` (n,) the merged token (0..m-1) each one goes into; for kept tokens
    that absorb others in place (`values`, no `merged`), the kept token (0..len(keep)-1, in ascending keep
    order). Unlike one tensor per group, nothing about the groups' sizes has to reach the host; the ranges
    are checked at the end of the prefill."""

    index: torch.Tensor
    group: torch.Tensor


@dataclass
class Decision:
    """What survives of one sample's current visual tokens at one decision point.

    All indices are into the sample's *current* visual tokens (0..n_visual-1, in sequence order).
    `keep` holds distinct indices in any order: the engine keeps surviving tokens in their original order.
    `merged` (m, D) are new tokens placed right after the kept visual tokens; `sources[i]` lists the
    current visual tokens merged into token i (for provenance and overlays), or `sources` is one
    `SourceGroups` for all of them; `anchors[i]` is the current visual token whose RoPE position merged
    token i takes in `keep` position mode (default: its first source; a source list left empty needs its
    anchor given, and so does a `SourceGroups` group left empty: the engine refuses either). `record` is
    stored in the engine's per-sample record (tensors in it reach the host as lists at the end of the prefill).
    `values` (len(keep), D), optional: new hidden states for the kept tokens, in ascending keep order
    (like `sources` when kept tokens absorb others in place): a pooled / merged token then stays at
    its representative's slot and position.
    Index checks (range, repeats) read device values, so the engine runs them at the end of the prefill.
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    sources: Sequence[torch.Tensor] | SourceGroups = ()
    anchors: torch.Tensor | None = None
    record: dict[str, Any] = field(default_factory=dict)
    values: torch.Tensor | None = None

    @property
    def n_merged(self) -> int:
        return 0 if self.merged is None else int(self.merged.shape[0])


def resolve_count(keep: int | float, n_visual: int, what: str = "keep") -> int:
    """A budget given as a count (int >= 1) or a ratio (float in (0, 1]) -> a count in [1, n_visual]."""
    if isinstance(keep, bool):
        raise ConfigError(f"{what} must be a count (int >= 1) or a ratio (float in (0, 1]), got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"{what} ratio must be in (0, 1], got {keep}")
        return max(1, round(keep * n_visual))
    if isinstance(keep, int):
        if keep < 1 or keep > n_visual:
            raise ConfigError(
                f"{what}={keep} is not allowed for an input with {n_visual} visual tokens; "
                f"allowed: 1..{n_visual} (or a ratio in (0, 1])"
            )
        return keep
    raise ConfigError(f"{what} must be an int count or a float ratio, got {type(keep).__name__}")


@dataclass
class TokenReducer(ABC):
    """Base class: a strategy that decides, per sample, which visual tokens survive.

    Fields common to every strategy:
      positions: `keep` (survivors keep their original RoPE positions) or `repack` (0..L'-1 after
        each reduction, as the official SparseVLM v1/v1.5 code does).
    """

    positions: str = "keep"

    # Where the class can act. One stage: every instance acts there (a subclass may write
    # `stage = "projector"` for short); several: `choose_stage()` picks one from the instance's fields.
    stages: ClassVar[tuple[str, ...]] = ("llm",)
    registry_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("stage")
        if isinstance(own, str):
            cls.stages = (own,)
            delattr(cls, "stage")  # the base class's `stage` property reads `stages`
        bad = [s for s in cls.stages if s not in STAGES]
        if bad:
            raise TypeError(f"{cls.__name__}: stages {bad} unknown; allowed: {list(STAGES)}")

    @property
    def stage(self) -> str:
        """Where this instance acts: `vision`, `projector` or `llm`."""
        return self.stages[0] if len(self.stages) == 1 else self.choose_stage()

    def choose_stage(self) -> str:
        """For classes with several `stages`: the one this instance acts at, from its fields."""
        raise NotImplementedError(f"{type(self).__name__} lists stages {self.stages}: implement choose_stage()")

    @classmethod
    def for_budget(cls, fields: dict[str, Any], budget: int, n_visual: int) -> dict[str, Any] | None:
        """This strategy's fields for a sweep budget of `budget` visual tokens out of `n_visual`.

        Default: a `keep` field receives the count. Return None when the config sets its own count
        whatever the budget (then a sweep runs it once, not once per budget)."""
        if "keep" in field_types(cls):
            return {**fields, "keep": budget}
        raise ConfigError(
            f"strategy {cls.registry_name or cls.__name__!r} takes no budget: it has no `keep` field "
            f"and does not define for_budget(); its fields: {sorted(field_types(cls))}"
        )

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"positions={self.positions!r}; allowed: {list(POSITION_MODES)}")
        if getattr(self, "budget_scope", "global") not in BUDGET_SCOPES:
            raise ConfigError(f"budget_scope={self.budget_scope!r}; allowed: {list(BUDGET_SCOPES)}")

    # --- where it acts -------------------------------------------------------------------------
    def decision_layers(self) -> list[int]:
        """For `llm` reducers: decoder layer indices before which `decide` is called (each >= 1)."""
        return []

    def setup(self, adapter) -> None:
        """Called once when attached: check the model can host this reducer (layers, stages)."""
        if self.stage not in adapter.stages:
            note = adapter.stage_notes.get(self.stage)
            hint = self.refusal_hint(adapter)
            raise ConfigError(
                f"{type(self).__name__} acts at stage {self.stage!r} but backbone {adapter.family!r} "
                f"supports only {list(adapter.stages)}" + (f" ({note})" if note else "") + (f"; {hint}" if hint else "")
            )
        self.check_positions(adapter)
        n = adapter.num_layers
        for k in self.decision_layers():
            if not 1 <= k < n:
                raise ConfigError(
                    f"{type(self).__name__}: decision before decoder layer {k} is outside the model; "
                    f"allowed: 1..{n - 1} for a {n}-layer decoder"
                )

    def check_positions(self, adapter) -> None:
        if self.positions == "repack" and not adapter.supports_repack:
            raise ConfigError(
                f"{type(self).__name__}: positions='repack' is not supported on backbone {adapter.family!r} "
                f"({adapter.repack_note}); allowed: positions='keep'"
            )

    def refusal_hint(self, adapter) -> str:
        """What to use instead when this backbone refuses the reducer's stage (appended to the error)."""
        return ""

    def hooks(self, adapter, state: dict[str, Any]) -> list:
        """Extra forward hooks this reducer needs (e.g. inside the vision encoder), as handles with
        `.remove()`; the engine removes them on detach. Default: none. `state` is the engine's
        per-forward scratch space: what a hook learns goes there (it reaches `decide` as `ctx.state`),
        never onto the reducer, so one reducer can be attached again, or to another model."""
        return []

    # --- what it does --------------------------------------------------------------------------
    def begin(self, ctx: "StageContext") -> None:
        """Called once per prefill, before any decision, with the language model's input embeddings."""

    @abstractmethod
    def decide(self, ctx: "StageContext") -> list[Decision]:
        """One `Decision` per sample at the current decision point."""

    # --- helpers -------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"name": self.registry_name, **dataclasses.asdict(self)}


@dataclass
class ScoringReducer(TokenReducer):
    """Keep the top-`keep` visual tokens by a per-token score, before decoder layer `layer`.

    Subclasses implement `score(ctx, b) -> Tensor[n_visual]` (higher = keep), or `scores(ctx)` for
    all samples at once when batching helps; ties break by the lower index.
    `keep`: a count (int) or a ratio of the visual tokens entering the decision (float).
    `budget_scope`: `global` (one top-k over all of a sample's visual tokens) or `per_span` (the
      budget applies to each image / video frame separately, see `StageContext.spans`).
    """

    layer: int = 2
    keep: int | float = 0.5
    budget_scope: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool):
            if isinstance(self.keep, int) and self.keep < 1:
                raise ConfigError(f"keep={self.keep}; allowed: a count >= 1 or a ratio in (0, 1]")
            if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
                raise ConfigError(f"keep={self.keep}; allowed: a count >= 1 or a ratio in (0, 1]")
        else:
            raise ConfigError(f"keep={self.keep!r}; allowed: a count >= 1 or a ratio in (0, 1]")

    def decision_layers(self) -> list[int]:
        return [self.layer] if self.stage == "llm" else []

    def score(self, ctx: "StageContext", b: int) -> torch.Tensor:
        """Scores of sample b's current visual tokens, shape (n_visual,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score() or scores()")

    def scores(self, ctx: "StageContext") -> list[torch.Tensor]:
        return [self.score(ctx, b) for b in range(ctx.batch_size)]

    def decide(self, ctx: "StageContext") -> list[Decision]:
        return [Decision(keep=self.select(ctx, b, s)) for b, s in enumerate(self.scores(ctx))]

    def select(self, ctx: "StageContext", b: int, scores: torch.Tensor) -> torch.Tensor:
        """Top-`keep` of sample b's visual tokens, over all of them or per span (`budget_scope`)."""
        if getattr(self, "budget_scope", "global") != "per_span":
            return topk_indices(scores, resolve_count(self.keep, ctx.n_visual(b)))
        ids = ctx.span_ids(b)
        out = []
        for s in ids.unique():
            sel = torch.nonzero(ids == s).flatten()
            out.append(sel[topk_indices(scores[sel], resolve_count(self.keep, int(sel.numel()), "keep (per span)"))])
        return torch.cat(out).sort().values


COUNT_PRESETS = (192, 128, 64)


class CountBudget:
    """Mixin for reducers whose budget is one visual-token count: `keep` (a count or a ratio) or `preset`
    (192 / 128 / 64, the LLaVA-1.5 settings quoted for 576 tokens, scaled by n/576). The class declares
    the `keep` and `preset` fields itself."""

    keep: int | float
    preset: int | None

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        if self.preset is not None and self.preset not in COUNT_PRESETS:
            raise ConfigError(
                f"{self.registry_name or type(self).__name__} preset={self.preset}; "
                f"allowed: {list(COUNT_PRESETS)} or None (then `keep` is used)"
            )

    def target(self, n: int) -> int:
        """Visual tokens to keep out of n."""
        if self.preset is not None:
            return scaled(self.preset, n)
        return resolve_count(self.keep, n)


def grouped_decision(
    reps: torch.Tensor, index: torch.Tensor, label, values: torch.Tensor, dtype=None, sizes=None
) -> Decision:
    """A decision that keeps one representative per group, in sequence order, with a new value each (pooled /
    merged in place): group g (values[g], representative reps[g]) stands for the visual tokens
    index[label == g]; `label` a host array or a device tensor (then `sizes`, each group's size on the
    device, if the caller has them). Nothing is read on the host: the groups travel as one `SourceGroups`,
    relabelled to sequence order on the device, and the record's group sizes (in that order) reach the host
    with the prefill's records."""
    order = reps.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    if torch.is_tensor(label):
        label_t, sizes_t = label, sizes
        if sizes_t is None:
            sizes_t = torch.zeros(order.numel(), dtype=torch.long, device=label.device)
            sizes_t.index_add_(0, label_t, torch.ones_like(label_t))
    else:
        label = np.asarray(label, dtype=np.int64)
        host = torch.from_numpy(np.concatenate([label, np.bincount(label, minlength=order.numel())]))
        label_t, sizes_t = host.to(order.device, non_blocking=True).split([label.size, order.numel()])  # one copy
    vals = values[order]
    return Decision(
        keep=reps[order],
        sources=SourceGroups(index=index, group=rank[label_t]),
        values=vals if dtype is None else vals.to(dtype),
        record={"sizes": sizes_t[order]},
    )


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties broken by the lower index (deterministic), sorted."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values
