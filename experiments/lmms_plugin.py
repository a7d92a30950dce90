"""lmms-eval model plugin: any backbone we support, with a token-reduction strategy attached.

    python -m lmms_eval --model sparsevlm \
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,strategy=sparsevlm,budget=64 --tasks mme

Declared as the `lmms_eval` entry point `sparsevlm` in pyproject.toml. lmms-eval is optional: without
it the class still imports (on a small stand-in base) so it can be registered, inspected and tested.

Keyword arguments mirror the CLI (`--model_args`) and leftovers are refused with a ConfigError:
  pretrained: hub name / local path, or `toy-llava` (the shipped toy checkpoint);
  strategy, budget: a registered strategy and its visual-token budget (see `sparsevlm list`); on backbones
    whose images have no fixed token count (LLaVA-NeXT AnyRes, Qwen2-VL) budgets are read against LLaVA-1.5's
    576, the scale the papers' presets are quoted in (a count such as FastV's `keep` stays a count);
  strategy_args: extra strategy fields, "k1=v1;k2=v2" (e.g. "recycling=false;raters=all_text");
  adapter_args: backbone adapter options, same form (e.g. "newline=keep" for LLaVA-NeXT, "video_span=video"
    for Qwen2-VL; see `sparsevlm list`);
  device, dtype, attn_implementation, max_new_tokens, batch_size (prompts per left-padded prefill; samples
    keep their own token counts, see the engine).
Real checkpoints are prompted through their processor's chat template (`_prompt`).
`generate_until` runs greedy generation with the reducer attached; `loglikelihood` and multi-round are
not implemented (NotImplementedError naming the class). Accounting of every request is kept in
`self.records` (visual tokens per layer, equivalent tokens, FLOPs).
"""

from __future__ import annotations

from typing import Any

import torch

from framework.cache import GrowingCache
from framework.errors import ConfigError

try:  # optional dependency
    from lmms_eval.api.model import lmms as _LmmsBase  # type: ignore
    from lmms_eval.api.registry import register_model as _register_model  # type: ignore

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent (our CI)
    HAVE_LMMS_EVAL = False

    class _LmmsBase:  # minimal stand-in for lmms_eval.api.model.lmms
        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.task_dict: dict = {}

    def _register_model(*names):
        def deco(cls):
            return cls

        return deco


def _parse_value(v: Any) -> Any:
    if not isinstance(v, str):
        return v
    low = v.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


@_register_model("sparsevlm")
class SparseVLMLmms(_LmmsBase):
    """lmms-eval `simple` model: a supported VLM + a token-reduction strategy (see module docstring)."""

    def __init__(
        self,
        pretrained: str = "toy-llava",
        strategy: str = "none",
        budget: int | str | None = None,
        strategy_args: str | dict | None = None,
        adapter_args: str | dict | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        max_new_tokens: int = 16,
        batch_size: int | str = 1,
        model=None,
        processor=None,
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("device_map",)}  # harmless lmms-eval extras
        if kwargs:
            raise ConfigError(
                f"SparseVLMLmms: unknown argument(s) {sorted(kwargs)}; allowed: pretrained, strategy, "
                "budget, strategy_args, adapter_args, device, dtype, attn_implementation, "
                "max_new_tokens, batch_size"
            )
        if int(batch_size) < 1:
            raise ConfigError(f"SparseVLMLmms: batch_size={batch_size}; allowed: an int >= 1")
        self.batch_size = int(batch_size)
        from . import runner

        self._device = torch.device(device)
        self.max_new_tokens = int(max_new_tokens)
        if model is None:
            model, processor = self._load(pretrained, dtype, attn_implementation)
        self._model = model.to(self._device).eval()
        self._processor = processor
        self.tokenizer.padding_side = "left"  # batched prompts end together, generation continues after them
        from framework.budget import REFERENCE_VISUAL_TOKENS, apply_budget
        from models import adapter_for

        self.adapter = adapter_for(self._model, **self._key_values(adapter_args, "adapter_args"))
        extra = self._key_values(strategy_args, "strategy_args")
        budget = _parse_value(budget)
        # a count budget is read against the backbone's tokens per image, or (AnyRes, dynamic resolution) against
        # the papers' 576 of LLaVA-1.5, the scale their presets are quoted in
        n_visual = self.adapter.fixed_tokens_per_image() or REFERENCE_VISUAL_TOKENS
        fields, _ = apply_budget({**runner.strategy_node(strategy), **extra}, budget, n_visual)
        self.reducer = runner.build_reducer(fields)
        self.strategy_fields = fields
        self.records: list[dict] = []

    # ------------------------------------------------------------------ properties (lmms-eval shape)
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return getattr(self._processor, "tokenizer", self._processor)

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return getattr(self, "_rank", 0)

    @property
    def world_size(self) -> int:
        return getattr(self, "_world_size", 1)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _key_values(spec, what: str = "strategy_args") -> dict:
        if spec is None or spec == "":
            return {}
        if isinstance(spec, dict):
            return dict(spec)
        out = {}
        for item in str(spec).split(";"):
            if not item.strip():
                continue
            k, sep, v = item.partition("=")
            if not sep:
                raise ConfigError(f"{what} item {item!r}; expected key=value")
            out[k.strip()] = _parse_value(v.strip())
        return out

    @staticmethod
    def _load(pretrained: str, dtype: str, attn: str):
        from . import runner

        if str(pretrained).startswith("toy"):  # the shipped toy: a stock checkpoint with its own processor
            from transformers import AutoProcessor

            from experiments.toy.model import load_toy, resolve_toy_path

            model, _ = load_toy(pretrained, attn_implementation=attn, dtype=runner._dtype(dtype))
            return model, AutoProcessor.from_pretrained(resolve_toy_path(pretrained), local_files_only=True)
        from models.loading import load

        model, _adapter, processor = load(pretrained, dtype=runner._dtype(dtype), attn_implementation=attn)
        return model, processor

    # ------------------------------------------------------------------ inputs
    def _encode(self, contexts: list[str], visuals: list[list]) -> dict:
        """One left-padded batch of prompts, each with its own images (all prompts have images, or none)."""
        flat = [v for vs in visuals for v in vs]
        texts = [self._prompt(c, len(vs)) for c, vs in zip(contexts, visuals)]
        out = dict(self._processor(text=texts, images=flat or None, padding=True, return_tensors="pt"))
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self._model.dtype)
        return {k: (v.to(self._device) if torch.is_tensor(v) else v) for k, v in out.items()}

    def _prompt(self, context: str, n_images: int) -> str:
        """The model's own chat template (one user turn: the images, then the question; generation prompt
        added), as lmms-eval's HF models do; a processor without a template gets "<image> ... question"."""
        proc = self._processor
        if getattr(proc, "chat_template", None):
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
            return proc.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        image_tok = getattr(proc, "image_token", "<image>")
        return context if image_tok in context else " ".join([image_tok] * n_images + [context])

    # ------------------------------------------------------------------ lmms API
    def _chunks(self, requests) -> list[list[int]]:
        """Request indices in order, cut into batches of at most `batch_size` that never mix prompts with and
        without images (a prefill either has visual tokens in every sample or none)."""
        chunks: list[list[int]] = []
        last = None
        for i, req in enumerate(requests):
            has = req.args[2] is not None
            if not chunks or len(chunks[-1]) == self.batch_size or has != last:
                chunks.append([])
            chunks[-1].append(i)
            last = has
        return chunks

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        from framework import attach
        from framework.accounting import account

        out: list[str] = [""] * len(requests)
        for chunk in tqdm(
            self._chunks(requests), desc="sparsevlm generate", disable=self.rank != 0 or len(requests) < 8
        ):
            contexts, visuals, untils, max_new = [], [], [], 1
            for i in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                untils.append([until] if isinstance(until, str) else list(until))
                max_new = max(max_new, int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens)))
                vs = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
                contexts.append(context)
                visuals.append([v for v in (vs or []) if v is not None])
            inputs = self._encode(contexts, visuals)
            with attach(self._model, self.reducer, adapter=self.adapter) as engine:
                ids = self._model.generate(
                    **inputs,
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    cache=GrowingCache(),
                )
                acc = account(engine) if engine.last_record else []
            prompt_len = inputs["input_ids"].shape[1]
            for b, i in enumerate(chunk):
                text = self.tokenizer.decode(ids[b, prompt_len:], skip_special_tokens=True)
                for stop in untils[b]:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                _, _, _, doc_id, task, _ = requests[i].args
                self.records.append(
                    {"doc_id": doc_id, "task": task, **({"accounting": acc[b].to_dict()} if acc else {})}
                )
                out[i] = text.strip()
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{type(self).__name__} does not implement loglikelihood (generation tasks only)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} does not implement generate_until_multi_round")
