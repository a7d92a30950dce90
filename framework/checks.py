"""Checks of device values that do not make the host wait.

Reading a device value on the host (`bool(t)`, `.tolist()`) stops a GPU's queue until everything before it
has run; one such read per decision costs a stall per decision. A prefill instead collects its checks
(device tensors, and how to word an error from their host values) and reads them together with its records
in one copy when its last decoder layer starts (`finish_records`). A failed check raises its error then;
until then the engine runs on repaired values (kept and source indices clamped into range, repeated keeps
made distinct), so nothing crashes first. Outside a prefill (a direct `apply_decisions` call) the checks
are verified at once.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from .errors import ConfigError


def fetch(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors (of one device) -> host arrays of the same shapes and dtypes (bfloat16 as float32), in one
    device -> host copy: their bytes travel together."""
    if not tensors:
        return []
    ts = [t.float() if t.dtype == torch.bfloat16 else t for t in tensors]
    flat = [t.detach().reshape(-1) if t.requires_grad else t.reshape(-1) for t in ts]
    # a byte view needs unit stride (a one-element column of a wider tensor can have another)
    flat = [f if f.stride(0) == 1 else f.clone(memory_format=torch.contiguous_format) for f in flat]
    flat = [f if f.element_size() == 1 else f.view(torch.uint8) for f in flat]
    data = _cat_bytes(flat).cpu().numpy()
    parts = np.split(data, np.cumsum([t.numel() * t.element_size() for t in ts])[:-1])
    return [p.view(_numpy_dtype(t.dtype)).reshape(tuple(t.shape)) for p, t in zip(parts, ts)]


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _cat_bytes(flat: list[torch.Tensor]) -> torch.Tensor:
    """One-byte tensors (bool, uint8, int8) as one uint8 tensor."""
    if len(flat) == 1:
        return flat[0]
    if len({f.dtype for f in flat}) > 1:
        flat = [f.view(torch.uint8) for f in flat]
    return torch.cat(flat)


class DeferredChecks:
    """Pending checks: `add(values, message)` with `values` a device tensor and `message(values_on_host)` the
    error's wording, or None when all is well; `verify` raises the first failure's `error` class.
    `add_flag(ok, message)`: the same for a bool tensor that must be all True and a fixed message."""

    def __init__(self) -> None:
        self._checks: list[tuple[torch.Tensor, Callable[[np.ndarray], str | None], type[Exception]]] = []

    def __len__(self) -> int:
        return len(self._checks)

    def add(self, values: torch.Tensor, message: Callable[[np.ndarray], str | None], error=ConfigError) -> None:
        self._checks.append((values, message, error))

    def add_flag(self, ok: torch.Tensor, message: str, error=ConfigError) -> None:
        self.add(ok, lambda host: None if host.all() else message, error)

    @property
    def values(self) -> list[torch.Tensor]:
        return [v for v, _, _ in self._checks]

    def raise_failures(self, host: list[np.ndarray]) -> None:
        """Raise the first failed check, given its values on the host (as `fetch` returns them)."""
        checks, self._checks = self._checks, []
        for (_, message, error), values in zip(checks, host):
            wording = message(values)
            if wording is not None:
                raise error(wording)

    def verify(self) -> None:
        """Read every pending check (one copy) and raise the first failure."""
        self.raise_failures(fetch(self.values))
