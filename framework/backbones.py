"""Backbone adapters, registered by family and resolved by model class (a loaded model) or by name.

Adapter classes register themselves with `@register_adapter("llava", "LLaVA-1.5 (...)")`; the framework
finds the modules that hold them through the entry-point group `sparsevlm.adapters` (this project
declares its `models` package there), so the framework never imports a backbone module by name.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from .errors import ConfigError
from .plugins import group_entry_points, load_group

ENTRY_POINT_GROUP = "sparsevlm.adapters"

_ADAPTERS: dict[str, type] = {}
_DESCRIPTIONS: dict[str, str] = {}


def _entry_points():
    return group_entry_points(ENTRY_POINT_GROUP, "adapters")


def _load_plugins() -> None:
    load_group(ENTRY_POINT_GROUP, "adapters")


def backbone_catalogue() -> dict[str, tuple[tuple[str, ...], str, list[str]]]:
    """family -> (stages, description, adapter options) of every adapter, for listing without importing
    one: as the entry points' source declares them (`framework.manifest`), and the adapters this process
    has registered from their classes."""
    from .manifest import scan

    _entry_points()
    out = {}
    for e in scan(ENTRY_POINT_GROUP, "register_adapter"):
        try:
            stages = e.attr("stages")
        except ValueError:  # not a literal in the source: import the class (it registers, read below)
            importlib.import_module(e.module)
            continue
        options = [p for p in e.init_params() if p not in ("self", "model")]
        out[e.name] = (tuple(stages[1]) if stages else (), e.args[1] if len(e.args) > 1 else "", options)
    for family, cls in _ADAPTERS.items():
        out[family] = (tuple(cls.stages), _DESCRIPTIONS[family], adapter_options(cls))
    return out


def register_adapter(family: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: the adapter for one backbone family (its `model_classes` name the model classes)."""

    def deco(cls: type) -> type:
        _ADAPTERS[family] = cls
        _DESCRIPTIONS[family] = description
        cls.family = family
        return cls

    return deco


def available_backbones() -> dict[str, type]:
    _load_plugins()
    return dict(_ADAPTERS)


def describe_backbone(family: str) -> str:
    adapter_class(family)
    return _DESCRIPTIONS[family]


def adapter_class(family: str) -> type:
    classes = available_backbones()
    if family not in classes:
        raise ConfigError(f"unknown backbone {family!r}; available: {', '.join(classes)}")
    return classes[family]


def adapter_options(cls: type) -> list[str]:
    """The keyword options an adapter class takes (e.g. LLaVA-NeXT `newline`, Qwen `video_span`)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]


def adapter_for(model, **options):
    """The adapter for a loaded model; `options` go to the adapter (unknown ones are refused)."""
    name = type(model).__name__
    classes = available_backbones()
    for cls in classes.values():
        if name in cls.model_classes:
            unknown = sorted(set(options) - set(adapter_options(cls)))
            if unknown:
                raise ConfigError(
                    f"{cls.family} adapter: unknown option(s) {unknown}; allowed: {adapter_options(cls) or 'none'}"
                )
            return cls(model, **options)
    supported = sorted(c for cls in classes.values() for c in cls.model_classes)
    raise ConfigError(f"no adapter for model class {name}; supported: {', '.join(supported)}")
