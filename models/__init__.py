"""Backbone adapters, resolved by model class (for a loaded model) or by family name (for configs)."""
from __future__ import annotations

import importlib

from framework.errors import ConfigError

from .base import BackboneAdapter

# family -> (module, adapter class, one-line description)
_ADAPTERS = {
    "llava": ("models.llava", "LlavaAdapter", "LLaVA-1.5 (LlavaForConditionalGeneration)"),
    "llava_next": ("models.llava_next", "LlavaNextAdapter", "LLaVA-NeXT AnyRes (LlavaNextForConditionalGeneration)"),
    "qwen2_vl": ("models.qwen2_vl", "Qwen2VLAdapter", "Qwen2-VL (M-RoPE)"),
    "qwen2_5_vl": ("models.qwen2_vl", "Qwen25VLAdapter", "Qwen2.5-VL (M-RoPE)"),
}


def _adapter_classes() -> dict[str, type]:
    return {family: getattr(importlib.import_module(mod), cls) for family, (mod, cls, _) in _ADAPTERS.items()}


def available_backbones() -> dict[str, type]:
    return _adapter_classes()


def describe_backbone(family: str) -> str:
    return _ADAPTERS[family][2]


def adapter_class(family: str) -> type:
    classes = _adapter_classes()
    if family not in classes:
        raise ConfigError(f"unknown backbone {family!r}; available: {', '.join(sorted(classes))}")
    return classes[family]


def adapter_options(cls: type) -> list[str]:
    """The keyword options an adapter class takes (e.g. LLaVA-NeXT `newline`, Qwen `video_span`)."""
    import inspect

    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]


def adapter_for(model, **options) -> BackboneAdapter:
    """The adapter for a loaded model; `options` go to the adapter (unknown ones are refused)."""
    name = type(model).__name__
    for cls in _adapter_classes().values():
        if name in cls.model_classes:
            unknown = sorted(set(options) - set(adapter_options(cls)))
            if unknown:
                raise ConfigError(f"{cls.family} adapter: unknown option(s) {unknown}; allowed: "
                                  f"{adapter_options(cls) or 'none'}")
            return cls(model, **options)
    supported = sorted(c for cls in _adapter_classes().values() for c in cls.model_classes)
    raise ConfigError(f"no adapter for model class {name}; supported: {', '.join(supported)}")
