"""Name -> class registry of reducers (strategies), and how strategies are found.

`@register("fastv")` on a reducer class; `build({"name": "fastv", "keep": 192})` from a dict or an
OmegaConf node; `available()` for the CLI and for error messages. Unknown names, unknown keys and
values of the wrong type fail with one message that lists what is allowed, so a typo in a sweep config
fails before any run starts.

Strategies are found, on the first lookup, through the entry-point group `sparsevlm.strategies`: this
project declares its `strategies` package there (which imports every module in its folder), and an
installed package adds its own the same way. `import_strategies("my_strategy")` (`sparsevlm run
--import ...`) imports a module by name (the working directory is searched first) or a `.py` file.
`catalogue()` lists them without importing any (from their source), for `sparsevlm list`.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .fields import check_fields
from .plugins import group_entry_points, load_group

ENTRY_POINT_GROUP = "sparsevlm.strategies"

_REDUCERS: dict[str, type] = {}


def _entry_points():
    return group_entry_points(ENTRY_POINT_GROUP, "strategies")


def _load_plugins() -> None:
    load_group(ENTRY_POINT_GROUP, "strategies")


def _first_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def catalogue() -> dict[str, tuple[tuple[str, ...], str]]:
    """name -> (stages, one-line description) of every strategy, for listing without importing one: the
    entry points' strategies as their source declares them (`framework.manifest`), and the ones this
    process has registered (`--import`, or already imported) from their classes."""
    from .manifest import scan

    _entry_points()
    out = {}
    for e in scan(ENTRY_POINT_GROUP, "register"):
        try:
            found = e.attr("stage", "stages")  # `stage = "x"` is short for `stages = ("x",)` (TokenReducer)
        except ValueError:  # not a literal in the source: import the class (it registers, read below)
            importlib.import_module(e.module)
            continue
        out[e.name] = ((found[1],) if found and found[0] == "stage" else tuple(found[1]) if found else (), e.doc)
    for name, cls in _REDUCERS.items():
        out[name] = (tuple(cls.stages), _first_line(cls))
    return dict(sorted(out.items()))


def import_strategies(spec: str) -> None:
    """Import a module that registers strategies: a dotted module name (searched in the working
    directory first, then on sys.path) or a path to a `.py` file."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[path.stem] = module
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as err:  # an import error names the module; the user's traceback is not our API
        raise ConfigError(f"--import {spec}: {type(err).__name__}: {err}") from err


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a `TokenReducer` subclass buildable by `name`."""

    def deco(cls: type) -> type:
        old = _REDUCERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"reducer name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REDUCERS[name] = cls  # the same class re-imported (a file imported twice) replaces itself
        cls.registry_name = name
        return cls

    return deco


def unregister(name: str) -> None:
    """Forget a registered strategy (tests and interactive sessions that define throwaway ones)."""
    _REDUCERS.pop(name, None)


def available(pattern: str = "*") -> list[str]:
    _load_plugins()
    return sorted(n for n in _REDUCERS if fnmatch.fnmatch(n, pattern))


def get(name: str) -> type:
    _load_plugins()
    if name not in _REDUCERS:
        raise ConfigError(
            f"unknown strategy {name!r}; available: {', '.join(available())} "
            "(a strategy of your own: sparsevlm run --import MODULE_OR_FILE ...)"
        )
    return _REDUCERS[name]


def describe(name: str) -> str:
    """First line of the class docstring: the one-line description `sparsevlm list` prints."""
    return _first_line(get(name))


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
    """Instantiate a dataclass: unknown keys and values of the wrong type are refused; None values dropped."""
    check_fields(cls, kwargs, label)
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def strategy_fields(cfg: Any) -> tuple[type, dict]:
    """`"name"`, `{"name": ..., **fields}` or an OmegaConf node -> (class, fields without 'name')."""
    d = _to_dict(cfg)
    if "name" not in d:
        raise ConfigError(f"strategy config needs a 'name' key; available: {', '.join(available())}")
    name = d.pop("name")
    return get(name), d


def build(cfg: Any):
    """Build a reducer from `"name"`, `{"name": ..., **fields}` or an OmegaConf node."""
    cls, fields = strategy_fields(cfg)
    return build_from_class(cls, fields, f"strategy {cls.registry_name!r}")
