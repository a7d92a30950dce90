"""Backbone adapters, one module per family; each registers into `framework.backbones`.

The framework finds this package through the `sparsevlm.adapters` entry point (pyproject.toml);
the lookups below are re-exported from the framework's registry for convenience.
"""

from framework.backbones import (
    adapter_class,
    adapter_for,
    adapter_options,
    available_backbones,
    describe_backbone,
)

from . import llava, llava_next, qwen2_vl  # noqa: F401  (register the adapters)
from .base import BackboneAdapter

__all__ = [
    "BackboneAdapter",
    "adapter_class",
    "adapter_for",
    "adapter_options",
    "available_backbones",
    "describe_backbone",
]
