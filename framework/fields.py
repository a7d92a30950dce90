"""A strategy's config fields: defaults from its dataclass, and values checked against the field types.

`field_defaults(cls)` is the config of a strategy that ships no YAML; `check_fields(cls, values, label)`
refuses a value whose type does not fit the field's annotation (a bool field refuses "maybe", a list
field refuses a scalar) with one error naming the field, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """Init fields of a dataclass -> their resolved annotations (`from __future__ import annotations` safe)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def field_defaults(cls: type) -> dict[str, Any]:
    """The dataclass's defaulted init fields (factories called), for a config node."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (YAML / CLI scalar, list or mapping) fits a type annotation."""
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else Any
        return isinstance(value, (list, tuple)) and all(fits(v, item) for v in value)
    if origin in (dict, typing.Mapping) or hint is dict:
        return isinstance(value, Mapping)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:  # numeric preset names ("192") arrive as ints from YAML and the command line
        return isinstance(value, (str, int)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation we cannot check (a protocol, a string forward ref): the class decides


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def check_fields(cls: type, values: Mapping[str, Any], label: str) -> None:
    """Refuse unknown keys (listing the allowed ones) and values whose type does not fit the field."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown} for {label}; allowed: {sorted(types_)}")
    for name, value in values.items():
        if value is not None and not fits(value, types_[name]):
            raise ConfigError(
                f"{label}: field {name!r} got {value!r} ({type(value).__name__}); expected {type_name(types_[name])}"
            )
