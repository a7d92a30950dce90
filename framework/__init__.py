"""The engine: TokenReducer contract, registry, hooks, rows-only attention and accounting."""
from .engine import ReductionEngine, attach
from .errors import ConfigError
from .reducer import Decision, ScoringReducer, TokenReducer, resolve_count, topk_indices
from .registry import available, build, describe, register

__all__ = ["ReductionEngine", "attach", "ConfigError", "Decision", "ScoringReducer", "TokenReducer",
           "resolve_count", "topk_indices", "available", "build", "describe", "register"]
