"""A CUDA device simulated on the CPU, to test device handling on machines without a GPU.

Inside ``with SimulatedCuda() as gpu:`` torch reports one CUDA device, and tensors put on it
are CPU tensors whose storage is registered as device memory. Every torch call of the
thread is then checked the way a GPU would: mixing device and host tensors in one operation
raises (as CUDA does), so does ``.numpy()`` of a device tensor; and the simulation counts

- host synchronisations: reading device values into Python (``item``, ``bool``, ``tolist``),
  operations whose output size depends on the data (``nonzero``, boolean-mask indexing),
  blocking copies between host and device, ``torch.cuda.synchronize`` and event waits;
- copies between host and device with their bytes; an asynchronous host-to-device copy
  must start from pinned memory (``pin_memory``), else it is a blocking one;
- float accumulations whose result depends on the order of a GPU's atomics (``index_add_``,
  float ``scatter_add_``, ...), and float32 products or convolutions run while TF32 is on;
- device memory: live bytes (``torch.cuda.mem_get_info`` reports the rest of ``memory`` as
  free), the peak and the largest single allocation.

What it cannot show: kernel speed, the numerics of real GPU kernels or of autocast.
"""

from __future__ import annotations

import collections
import threading
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import ratta

RATTA_SRC = str(Path(ratta.__file__).parent)

# Python-visible reads of device values: each waits for the device.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__"}
# Outputs whose size depends on the values: the host waits to allocate them.
_DATA_SIZED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
# Accumulations whose float result depends on the order of atomic additions on a GPU.
_ATOMIC = {
    "index_add_",
    "index_add",
    "scatter_add_",
    "scatter_add",
    "scatter_reduce_",
    "scatter_reduce",
    "index_reduce_",
    "index_reduce",
    "histc",
    "embedding_bag",
}
_MATMUL = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "linear",
    "einsum",
    "addmv",
    "mv",
    "scaled_dot_product_attention",
    "multi_head_attention_forward",
}
_CONV = {"conv1d", "conv2d", "conv3d", "_convolution", "convolution"}
# Calls that may see host and device tensors together without computing on both.
_BOOKKEEPING = {
    "copy_",
    "to",
    "cpu",
    "cuda",
    "__get__",
    "__set__",
    "__repr__",
    "data_ptr",
    "untyped_storage",
    "numel",
    "dim",
    "size",
    "element_size",
    "is_floating_point",
    "__setstate__",
    "__reduce_ex__",
    "detach",
    "requires_grad_",
    "_make_subclass",
    "__deepcopy__",
    "contiguous",
    "_has_compatible_shallow_copy_type",
    "is_pinned",
    "pin_memory",
    "__getitem__",
    "__setitem__",
    "get_device",
}


class DeviceMixError(RuntimeError):
    """What CUDA raises when one operation gets tensors of two devices."""


@dataclass
class Event:
    """One counted event: where in ratta it happened and what it was."""

    site: str
    what: str
    nbytes: int = 0


@dataclass
class Counts:
    """What a simulated run did (see the module docstring)."""

    syncs: list[Event] = field(default_factory=list)
    h2d: list[Event] = field(default_factory=list)
    d2h: list[Event] = field(default_factory=list)
    atomics: list[Event] = field(default_factory=list)
    tf32: list[Event] = field(default_factory=list)
    mixing: list[Event] = field(default_factory=list)
    device_matmuls: int = 0

    @property
    def h2d_bytes(self) -> int:
        return sum(e.nbytes for e in self.h2d)

    @property
    def d2h_bytes(self) -> int:
        return sum(e.nbytes for e in self.d2h)

    def by_site(self, events: list[Event]) -> dict[str, int]:
        return dict(collections.Counter(f"{e.site} {e.what}" for e in events))


def _site() -> str:
    """The innermost frame of the ratta package on the stack."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(RATTA_SRC):
            return f"{frame.filename[len(RATTA_SRC) + 1 :]}:{frame.lineno}"
    return "?"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _cuda(device: Any) -> bool | None:
    """Whether a device argument names CUDA (None: not a device argument)."""
    if device is None:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return None


class SimulatedCuda(TorchFunctionMode):
    """``with SimulatedCuda(memory=..., devices=1) as gpu:``; counts in ``gpu.counts``."""

    def __init__(self, memory: int = 80 << 30, devices: int = 1) -> None:
        super().__init__()
        self.memory, self.devices = memory, devices
        self.counts = Counts()
        self.live: dict[int, int] = {}  # storage pointer -> bytes, device memory
        self.pinned: set[int] = set()
        self.peak = 0
        self.largest = 0  # the largest single device allocation
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ registries

    @staticmethod
    def _ptr(t: torch.Tensor) -> int:
        with torch._C.DisableTorchFunction():
            return t.untyped_storage().data_ptr()

    def on_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        with torch._C.DisableTorchFunction():
            if t.device.type != "cpu":
                return False
        return self._ptr(t) in self.live

    def _register(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        with torch._C.DisableTorchFunction():
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self.live:
            return t
        with self._lock:
            self.live[ptr] = size
            self.peak = max(self.peak, sum(self.live.values()))
            self.largest = max(self.largest, size)
        weakref.finalize(storage, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        with self._lock:
            self.live.pop(ptr, None)
            self.pinned.discard(ptr)

    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunction():
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        if ptr:
            with self._lock:
                self.pinned.add(ptr)
            weakref.finalize(storage, self._release, ptr)
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        return self._ptr(t) in self.pinned

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    # ------------------------------------------------------------------ torch.cuda

    def __enter__(self) -> SimulatedCuda:
        sim = self
        real_empty = torch.empty

        def empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
            t = real_empty(*args, **kwargs)
            return sim._pin(t) if pin_memory else t

        class SimEvent:
            def __init__(self, *_: Any, **__: Any) -> None:
                pass

            def record(self, *_: Any) -> None:
                pass

            def query(self) -> bool:
                return True

            def synchronize(self) -> None:
                sim.counts.syncs.append(Event(_site(), "Event.synchronize"))

        def synchronize(*_: Any) -> None:
            sim.counts.syncs.append(Event(_site(), "torch.cuda.synchronize"))

        patches = {
            (torch.cuda, "is_available"): lambda: True,
            (torch.cuda, "device_count"): lambda: self.devices,
            (torch.cuda, "current_device"): lambda: 0,
            (torch.cuda, "get_device_name"): lambda *_: "Simulated GPU",
            (torch.cuda, "mem_get_info"): lambda *_: (self.memory - self.live_bytes, self.memory),
            (torch.cuda, "synchronize"): synchronize,
            (torch.cuda, "Event"): SimEvent,
            (torch, "empty"): empty,
            (torch.Tensor, "pin_memory"): lambda t, *_: sim._pin(t.clone()),
            (torch.Tensor, "is_pinned"): lambda t, *_: sim.is_pinned(t),
        }
        for (obj, name), value in patches.items():
            self._saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()

    # ------------------------------------------------------------------ every torch call

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "_parse_to":  # parsing a device argument is not using it
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        dev_in = [t for t in tensors if self.on_device(t)]

        if name == "__get__":
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            if prop == "device" and self.on_device(args[0]):
                return torch.device("cuda", 0)
            if prop == "is_cuda":
                return self.on_device(args[0])
            return func(*args, **kwargs)
        if name == "get_device":
            return 0 if self.on_device(args[0]) else -1
        if name == "is_pinned":
            return self.is_pinned(args[0])
        if name in ("numpy", "__array__") and dev_in:
            raise TypeError("can't convert cuda:0 device type tensor to numpy (simulated)")
        if name in ("to", "cuda", "cpu") and args and isinstance(args[0], torch.Tensor):
            return self._move(name, args, kwargs)
        if name == "copy_":
            self._copy(args[0], args[1], bool(kwargs.get("non_blocking", args[2:3] == (True,))))
            return func(*args, **kwargs)

        if dev_in and name in _READS:
            self.counts.syncs.append(Event(_site(), name))
        if dev_in and name in _DATA_SIZED:
            self.counts.syncs.append(Event(_site(), name))
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            self._index(name, args)
        if dev_in and name in _ATOMIC and any(t.is_floating_point() for t in dev_in):
            self.counts.atomics.append(Event(_site(), name))
        if dev_in and name in ("index_put_", "index_put", "put_") and kwargs.get("accumulate"):
            self.counts.atomics.append(Event(_site(), f"{name}(accumulate)"))
        if dev_in and (name in _MATMUL or name in _CONV):
            self._precision(name, dev_in)

        target: bool | None = None
        if "device" in kwargs:
            target = _cuda(kwargs["device"])
            if target:
                kwargs["device"] = "cpu"
                if name in ("tensor", "as_tensor"):
                    self._transfer("h2d", "tensor(data)", 0, blocking=True)
        if name not in _BOOKKEEPING and dev_in:
            host = [t for t in tensors if not self.on_device(t) and t.dim() > 0 and t.numel() > 0]
            if host:
                self._mix(name, tensors)
        out = func(*args, **kwargs)
        if target or (target is None and dev_in and name not in _READS):
            tree_map(self._register, out)
        return out

    # ------------------------------------------------------------------ helpers

    def _mix(self, name: str, tensors: list[torch.Tensor]) -> None:
        shapes = [(tuple(t.shape), "cuda" if self.on_device(t) else "cpu") for t in tensors]
        self.counts.mixing.append(Event(_site(), name))
        raise DeviceMixError(
            f"Expected all tensors to be on the same device (simulated): {name} got {shapes}"
        )

    def _transfer(self, kind: str, what: str, nbytes: int, blocking: bool) -> None:
        event = Event(_site(), what, nbytes)
        (self.counts.h2d if kind == "h2d" else self.counts.d2h).append(event)
        if blocking:
            self.counts.syncs.append(Event(event.site, f"blocking {kind} {what}"))

    def _move(self, name: str, args: Any, kwargs: dict[str, Any]) -> Any:
        """``to``, ``cuda``, ``cpu``: a copy between host and device, or a local one."""
        src = args[0]
        on_dev = self.on_device(src)
        dtype, non_blocking = src.dtype, bool(kwargs.get("non_blocking"))
        if name == "cuda":
            to_dev = True
        elif name == "cpu":
            to_dev = False
        elif len(args) > 1 and isinstance(args[1], torch.Tensor):
            to_dev, dtype = self.on_device(args[1]), args[1].dtype
        else:
            device, parsed, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            to_dev = on_dev if device is None else device.type == "cuda"
            dtype = parsed or dtype
        out = src.to(dtype=dtype)
        if to_dev == on_dev:
            return self._register(out) if on_dev else out
        if out is src:
            out = src.clone()
        # torch converts dtypes on the GPU for asynchronous copies, on the CPU for blocking ones
        moved = _nbytes(src) if non_blocking == to_dev else _nbytes(out)
        if to_dev:
            pinned = self.is_pinned(src)
            self._transfer("h2d", name, moved, blocking=not (non_blocking and pinned))
            return self._register(out)
        self._transfer("d2h", name, moved, blocking=not non_blocking)
        return out

    def _copy(self, dst: torch.Tensor, src: Any, non_blocking: bool) -> None:
        if not isinstance(src, torch.Tensor):
            return
        dst_dev, src_dev = self.on_device(dst), self.on_device(src)
        if dst_dev and not src_dev and src.dim() > 0:
            pinned = self.is_pinned(src)
            moved = _nbytes(src) if non_blocking else dst.numel() * dst.element_size()
            self._transfer("h2d", "copy_", moved, blocking=not (non_blocking and pinned))
        elif src_dev and not dst_dev:
            pinned = self.is_pinned(dst)
            moved = dst.numel() * dst.element_size() if non_blocking else _nbytes(src)
            self._transfer("d2h", "copy_", moved, blocking=not (non_blocking and pinned))

    def _index(self, name: str, args: Any) -> None:
        base, index = args[0], args[1]
        parts = index if isinstance(index, tuple) else (index,)
        idx = [i for i in parts if isinstance(i, torch.Tensor) and i.numel() > 0]
        base_dev = self.on_device(base)
        if any(self.on_device(i) for i in idx) and not base_dev:
            self._mix(f"host tensor {name} with device indices", [base, *idx])
        if base_dev and any(i.dtype == torch.bool for i in idx):
            self.counts.syncs.append(Event(_site(), f"{name}[bool mask]"))
        if base_dev:
            for i in idx:
                if not self.on_device(i) and i.dim() > 0:
                    self._transfer("h2d", f"{name} host index", _nbytes(i), blocking=True)
        value = args[2] if name == "__setitem__" else None
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.numel() == 0:
            return
        if base_dev != self.on_device(value):
            if idx:
                self._mix(f"{name} of another device's values", [base, value])
            kind = "h2d" if base_dev else "d2h"
            self._transfer(kind, f"{name} copy", _nbytes(value), blocking=True)

    def _precision(self, name: str, dev_in: list[torch.Tensor]) -> None:
        if not any(t.dtype == torch.float32 for t in dev_in):
            return
        self.counts.device_matmuls += 1
        if _tf32_on(conv=name in _CONV):
            self.counts.tf32.append(Event(_site(), name))


def _tf32_on(conv: bool) -> bool:
    """Whether CUDA would round this float32 product (or convolution) to TF32 now."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        if conv:
            value = backends.cudnn.conv.fp32_precision
            parent = backends.cudnn.fp32_precision
            return value == "tf32" or (value == "none" and parent == "tf32")
        value = backends.cuda.matmul.fp32_precision
        return value == "tf32" or (
            value == "none" and torch.get_float32_matmul_precision() != "highest"
        )
    return bool(backends.cudnn.allow_tf32 if conv else backends.cuda.matmul.allow_tf32)
