"""Name -> class registries for reducers (strategies) and backbone adapters.

`@register("fastv")` on a reducer class; `build({"name": "fastv", "keep": 192})` from a dict or an
OmegaConf node; `available()` for the CLI and for error messages. Unknown names and unknown keys fail
with one message that lists what is allowed, so a typo in a sweep config fails before any run starts.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from typing import Any, Callable, Mapping

from .errors import ConfigError

_REDUCERS: dict[str, type] = {}
# Strategy modules imported on first lookup, so `available()` lists every built-in strategy.
_BUILTIN_MODULES = (
    "strategies.identity", "strategies.random_drop", "strategies.fastv", "strategies.sparsevlm",
    "strategies.tome", "strategies.pdrop", "strategies.visionzip", "strategies.dart",
    "strategies.divprune", "strategies.pooling", "strategies.chain", "strategies.cdpruner",
)
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a `TokenReducer` subclass buildable by `name`."""

    def deco(cls: type) -> type:
        if name in _REDUCERS and _REDUCERS[name] is not cls:
            raise ConfigError(f"reducer name {name!r} is already registered by {_REDUCERS[name].__qualname__}")
        _REDUCERS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def available(pattern: str = "*") -> list[str]:
    _load_builtins()
    return sorted(n for n in _REDUCERS if fnmatch.fnmatch(n, pattern))


def get(name: str) -> type:
    _load_builtins()
    if name not in _REDUCERS:
        raise ConfigError(f"unknown strategy {name!r}; available: {', '.join(available())}")
    return _REDUCERS[name]


def describe(name: str) -> str:
    """First line of the class docstring: the one-line description `sparsevlm list` prints."""
    doc = (get(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def _to_dict(cfg: Any) -> dict:
    if isinstance(cfg, str):
        return {"name": cfg}
    try:  # OmegaConf node
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"a strategy config must be a name or a mapping with 'name', got {type(cfg).__name__}")


def build_from_class(cls: type, kwargs: Mapping[str, Any], label: str):
    """Instantiate a dataclass, refusing unknown keys with the list of allowed ones; drops None values."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for {label}; allowed: {sorted(fields)}")
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def build(cfg: Any):
    """Build a reducer from `"name"`, `{"name": ..., **fields}` or an OmegaConf node."""
    d = _to_dict(cfg)
    if "name" not in d:
        raise ConfigError(f"strategy config needs a 'name' key; available: {', '.join(available())}")
    name = d.pop("name")
    cls = get(name)
    return build_from_class(cls, d, f"strategy {name!r}")
