"""Count host-device synchronisations, so per-sample or per-token round trips show up on any machine.

On a GPU every value the host reads from a device tensor (`int(t)`, `bool(t)`, `.item()`, `.tolist()`,
`.cpu()`), every blocking copy from the host (`t.to(device)`, `copy_`) and every op whose output
size depends on the data (`nonzero`, `unique`, `bincount`, `masked_select`, boolean-mask indexing,
`repeat_interleave` without `output_size`) waits for the queue to drain: the host stops running ahead, and
every small op after it costs its full launch time. A reduction that reads once per token or per sample
pays this many times per prefill. `SyncCounter` counts these calls on whatever device the model runs, CPU
included (where they cost nothing), so a test or a benchmark can check that the count does not grow with
the batch or the token count. Copies between host and device show up only when a device is used: `.to` /
`copy_`, and the copies hidden in a factory (`torch.tensor(values, device=...)`, `torch.as_tensor` of host
data, `t.new_tensor(values)` for a device tensor `t`) or in indexing a device tensor with a Python list or
a host tensor (`t[[0, 2]]`), each a blocking host -> device copy. The meta device stands in for a GPU in
tests, so these are counted there without one.

    with SyncCounter(sites=True) as syncs:
        model(**inputs)
    print(syncs.count, syncs.sites.most_common(5), syncs.ops)

`ops` counts the dispatched ops that are not views: on a GPU each launches at most one kernel, so where a
prefill is launch-bound (small layers after a reduction) their number, not their FLOPs, sets its time.

Host-side work on an array already copied (numpy, Python lists) is not counted: copy once, then work there.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output size depends on the data, or that return a host scalar
_DATA_DEPENDENT = {
    "_local_scalar_dense",
    "nonzero",
    "unique_consecutive",
    "_unique",
    "_unique2",
    "unique_dim",
    "bincount",
    "masked_select",
}
# Tensor methods that bring values to the host (`.numpy()` needs a host tensor already: its `.cpu()` counts)
_HOST_COPIES = {"tolist", "cpu", "item"}
# factories that copy host data to their device (blocking: the copy waits for the queue)
_FACTORIES = {"tensor", "as_tensor", "new_tensor"}
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


class SyncCounter:
    """Context manager counting host-device synchronisation points (see the module docstring).
    count: the number; sites (with sites=True): a Counter of "file:line" of the calling code; ops: the
    dispatched ops that are not views (kernel launches on a GPU, at most)."""

    def __init__(self, sites: bool = False):
        self.count = 0
        self.ops = 0
        self.sites: collections.Counter = collections.Counter()
        self._trace = sites
        self._depth = 0  # inside a counted host copy: its own dispatcher-level ops are not counted again
        self._modes = (_FunctionLevel(self), _DispatchLevel(self))

    def __enter__(self) -> "SyncCounter":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def _hit(self) -> None:
        self.count += 1
        if self._trace:
            frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
            if frames:
                f = frames[-1]
                self.sites[f"{f.filename}:{f.lineno}"] += 1


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if name in _INDEXING and _host_index(args):  # the index's copy happens below the dispatcher
            self.counter._hit()
        elif (
            name in _FACTORIES
            and _factory_copies(name, args, kwargs)
            or (name in _HOST_COPIES and args and isinstance(args[0], torch.Tensor))
        ):
            self.counter._hit()
            self.counter._depth += 1  # the copy's own dispatched ops are this one sync
            try:
                return func(*args, **kwargs)
            finally:
                self.counter._depth -= 1
        return func(*args, **kwargs)


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter._depth == 0:
            self.counter.ops += not func.is_view
            if _synchronises(func, args, kwargs):
                self.counter._hit()
        return func(*args, **kwargs)


def _synchronises(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":  # tensor repeats: the output size must be read unless it is given
        return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_"):  # across devices: waits for the queue unless host -> device non-blocking
        return _cross_device_wait(name, args, kwargs)
    if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing runs a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)
    return False


def _cross_device_wait(name: str, args, kwargs) -> bool:
    """A copy between the host and a device that makes the host wait: device -> host always (the host reads
    the values), host -> device unless `non_blocking` (a blocking copy waits for every queued kernel)."""
    if name == "_to_copy":
        src, dst = args[0].device, kwargs.get("device") or args[0].device
    else:  # copy_(dst, src, non_blocking)
        src, dst = args[1].device, args[0].device
    non_blocking = kwargs.get("non_blocking", args[2] if name == "copy_" and len(args) > 2 else False)
    if (src.type == "cpu") == (dst.type == "cpu"):
        return False
    return dst.type == "cpu" or not non_blocking


def _factory_copies(name: str, args, kwargs) -> bool:
    """`torch.tensor` / `torch.as_tensor` / `Tensor.new_tensor` that copies host data to a device."""
    if name == "new_tensor":
        data = args[1] if len(args) > 1 else kwargs.get("data")
        device = kwargs.get("device") or args[0].device
    else:
        data = args[0] if args else kwargs.get("data")
        device = kwargs.get("device")
    if device is None:  # a tensor keeps its device; other data goes to the default one (`with torch.device`)
        device = torch.get_default_device() if not isinstance(data, torch.Tensor) else data.device
    if torch.device(device).type == "cpu" or isinstance(data, torch.Tensor) and data.device.type != "cpu":
        return False
    return _size(data) > 0  # nothing to copy, nothing to wait for (as a cache's empty start)


def _size(data) -> int:
    if isinstance(data, (list, tuple)):
        return sum(_size(x) for x in data) if data and isinstance(data[0], (list, tuple)) else len(data)
    return int(getattr(data, "size", 1)) if not isinstance(data, torch.Tensor) else data.numel()


def _host_index(args) -> bool:
    """Indexing a device tensor with an index the host builds and copies to it: a Python list of ints, or a
    host integer tensor that is not 0-d. Host bool masks are not counted: the device gets their nonzero by
    a non-blocking copy from pinned memory; a list of device tensors is a tuple of device indices."""
    if len(args) < 2 or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(_copied(i) if isinstance(i, torch.Tensor) else isinstance(i, list) and _list_copies(i) for i in index)


def _copied(i: torch.Tensor) -> bool:
    return i.device.type == "cpu" and i.dim() > 0 and i.dtype != torch.bool


def _list_copies(items: list) -> bool:
    """A list index holds host integers (ints at any depth, or host integer tensors)."""
    return any(
        _copied(x)
        if isinstance(x, torch.Tensor)
        else _list_copies(list(x))
        if isinstance(x, (list, tuple))
        else isinstance(x, int) and not isinstance(x, bool)
        for x in items
    )
