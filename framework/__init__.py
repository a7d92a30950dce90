"""The engine: TokenReducer contract, registry, hooks, rows-only attention and accounting.

Names are imported on first use (PEP 562), so `framework.errors` and the CLI's help start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "ReductionEngine": "engine",
    "attach": "engine",
    "ConfigError": "errors",
    "Decision": "reducer",
    "ScoringReducer": "reducer",
    "TokenReducer": "reducer",
    "resolve_count": "reducer",
    "topk_indices": "reducer",
    "available": "registry",
    "build": "registry",
    "describe": "registry",
    "register": "registry",
}
__all__ = [
    "ReductionEngine",
    "attach",
    "ConfigError",
    "Decision",
    "ScoringReducer",
    "TokenReducer",
    "resolve_count",
    "topk_indices",
    "available",
    "build",
    "describe",
    "register",
]

if TYPE_CHECKING:  # pragma: no cover
    from .engine import ReductionEngine, attach
    from .errors import ConfigError
    from .reducer import Decision, ScoringReducer, TokenReducer, resolve_count, topk_indices
    from .registry import available, build, describe, register


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
