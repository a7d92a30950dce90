"""Load a real checkpoint (hub name or local path) with its adapter and processor.

`load("llava-hf/llava-v1.6-mistral-7b-hf")` -> (model, adapter, processor). The family is resolved,
in order, from an explicit `family=`, from the checkpoint's `config.json` (`model_type`, read with
AutoConfig: a local folder or the hub cache), or from the name itself (`resolve_family_from_name`).
Model and processor classes come from the family (`FAMILIES`), so no Auto* guessing picks a text-only
class for a VLM.

Notes: the Qwen2-VL / Qwen2.5-VL processors need torchvision (their video processor); without it,
`load(..., processor="optional")` returns processor=None and you build inputs from the image processor
(see tests/tiny_backbones.py for the tensor layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from framework.errors import ConfigError


@dataclass(frozen=True)
class Family:
    model_class: str
    processor_class: str
    model_types: tuple[str, ...]
    name_patterns: tuple[str, ...]  # regexes on the lower-cased hub name / path


FAMILIES: dict[str, Family] = {
    "llava": Family(
        "LlavaForConditionalGeneration",
        "LlavaProcessor",
        ("llava",),
        (r"llava[-_]?1\.5", r"llava[-_]v?1\.5", r"llava-interleave", r"bakllava"),
    ),
    "llava_next": Family(
        "LlavaNextForConditionalGeneration",
        "LlavaNextProcessor",
        ("llava_next",),
        (r"llava[-_]v?1\.6", r"llava[-_]next", r"llava-v1\.6"),
    ),
    "qwen2_vl": Family("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", ("qwen2_vl",), (r"qwen2[-_]vl",)),
    "qwen2_5_vl": Family(
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        ("qwen2_5_vl",),
        (r"qwen2\.5[-_]vl", r"qwen2_5[-_]vl"),
    ),
}


def family_for_model_type(model_type: str) -> str:
    for fam, spec in FAMILIES.items():
        if model_type in spec.model_types:
            return fam
    raise ConfigError(
        f"model_type {model_type!r} has no backbone adapter; supported model types: "
        f"{sorted(t for s in FAMILIES.values() for t in s.model_types)}"
    )


def resolve_family_from_name(name: str) -> str | None:
    """Best guess from a hub name or path ('llava-hf/llava-v1.6-vicuna-7b-hf' -> 'llava_next')."""
    low = name.lower()
    for fam in ("qwen2_5_vl", "qwen2_vl", "llava_next", "llava"):  # most specific first
        if any(re.search(p, low) for p in FAMILIES[fam].name_patterns):
            return fam
    return None


def resolve_family(
    name_or_path: str | None = None, family: str | None = None, config=None, read_config: bool = True
) -> str:
    """The backbone family: explicit > config.model_type > config.json of the checkpoint > name."""
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"unknown backbone family {family!r}; available: {sorted(FAMILIES)}")
        return family
    if config is not None:
        return family_for_model_type(config.model_type)
    if name_or_path is None:
        raise ConfigError("give a checkpoint name/path, a config or family=")
    if read_config:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError):
            cfg = None  # offline and not cached, or no config.json: fall back to the name
        if cfg is not None:
            return family_for_model_type(cfg.model_type)
    fam = resolve_family_from_name(name_or_path)
    if fam is None:
        raise ConfigError(
            f"cannot tell the backbone family of {name_or_path!r}; pass family= one of {sorted(FAMILIES)}"
        )
    return fam


def model_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[resolve_family(family=family)].model_class)


def processor_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[resolve_family(family=family)].processor_class)


def load(
    name_or_path: str,
    family: str | None = None,
    dtype="auto",
    attn_implementation: str = "sdpa",
    device: str | None = None,
    processor: bool | str = True,
    adapter_kwargs: dict | None = None,
    **model_kwargs,
):
    """(model, adapter, processor) for a checkpoint; processor: True, False or "optional"."""
    from . import adapter_class

    fam = resolve_family(name_or_path, family)
    model = (
        model_class(fam)
        .from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation, **model_kwargs)
        .eval()
    )
    if device is not None:
        model = model.to(device)
    adapter = adapter_class(fam)(model, **(adapter_kwargs or {}))
    proc = None
    if processor:
        try:
            proc = processor_class(fam).from_pretrained(name_or_path)
        except Exception as err:  # e.g. Qwen processors without torchvision
            if processor != "optional":
                raise ConfigError(
                    f"could not load the {fam} processor for {name_or_path!r}: {err}; "
                    "pass processor='optional' to get processor=None"
                ) from err
    return model, adapter, proc
