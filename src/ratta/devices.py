"""Devices, at the edges of the pipeline: validated device strings, the numerics of CUDA runs,
stage timers, pinned host buffers and read-ahead.

Nothing here changes a result on the CPU. On CUDA, :func:`numerics` pins what makes outputs
reproducible: no TF32 (unless asked for), deterministic cuDNN without autotuning.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ratta.errors import RattaInputError

T = TypeVar("T")
R = TypeVar("R")


class DeviceFallbackWarning(UserWarning):
    """Work asked for on a device runs elsewhere (e.g. FAISS without GPU support)."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device this machine has, else one ``RattaInputError`` line.

    Accepts ``cpu``, ``cuda`` and ``cuda:N``; ``cuda:N`` must be one of the visible devices.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RattaInputError(
            f"--device: unknown device '{name}' (use cpu, cuda or cuda:N)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise RattaInputError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RattaInputError(f"--device {name}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            have = ", ".join(f"cuda:{i}" for i in range(count))
            raise RattaInputError(
                f"--device {name}: this machine has {count} CUDA device{'s' * (count != 1)} "
                f"({have})"
            )
    return device


def compute_info(
    device: torch.device, precision: str = "fp32", tf32: bool = False
) -> dict[str, Any]:
    """What produced a tensor's bits: device, its model (``None`` for a GPU this process does
    not see, e.g. a Ray worker's), the precision actually used, and TF32."""
    name: str | None = "cpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    return {
        "device": str(device),
        "device_name": name,
        "precision": precision,
        "tf32": bool(tf32 and device.type == "cuda"),
    }


def _precision_flags() -> list[tuple[Any, str]]:
    """(object, attribute) of the float32 precision switches of this torch version."""
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cuda.matmul, "fp32_precision"):
        return [
            (backends.cuda.matmul, "fp32_precision"),
            (backends.cudnn.conv, "fp32_precision"),
            (backends.cudnn.rnn, "fp32_precision"),
        ]
    return [(backends.cuda.matmul, "allow_tf32"), (backends.cudnn, "allow_tf32")]


@contextlib.contextmanager
def numerics(tf32: bool = False) -> Iterator[None]:
    """Reproducible CUDA numerics inside the block, restored after it.

    float32 matrix products and convolutions in full IEEE precision (TF32 rounds their
    inputs to 10 mantissa bits: features then differ from the CPU's by ~1e-3) unless
    ``tf32``; cuDNN picks deterministic algorithms and does not autotune, so the same
    shapes give the same bits on every run. No effect on CPU computations.
    """
    flags = _precision_flags()
    legacy = flags[0][1] == "allow_tf32"
    value: Any = tf32 if legacy else ("tf32" if tf32 else "ieee")
    cudnn = torch.backends.cudnn
    saved = [getattr(obj, attr) for obj, attr in flags]
    saved_cudnn = (cudnn.deterministic, cudnn.benchmark)
    try:
        for obj, attr in flags:
            setattr(obj, attr, value)
        cudnn.deterministic, cudnn.benchmark = True, False
        yield
    finally:
        for (obj, attr), old in zip(flags, saved, strict=True):
            setattr(obj, attr, old)
        cudnn.deterministic, cudnn.benchmark = saved_cudnn


class StageTimer:
    """Wall time per stage.

    With ``profile`` on a CUDA device, every stage boundary waits for the device, so GPU
    work is attributed to its stage, at the cost of a host synchronisation per boundary;
    without it the device runs ahead and stage times measure only the host's part.
    """

    def __init__(self, device: torch.device, profile: bool = False) -> None:
        self.sync = profile and device.type == "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._wait()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.seconds[stage] += time.perf_counter() - start

    def _wait(self) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to copy to ``device``: pinned (page-locked) for CUDA, so the copy
    runs asynchronously; plain memory for the CPU."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor ``t`` on ``device``: for CUDA through pinned memory (``t`` itself when it
    is pinned), with an asynchronous copy; on the CPU ``t`` itself."""
    if device.type != "cuda":
        return t
    if not t.is_pinned():
        t = host_buffer(tuple(t.shape), t.dtype, device).copy_(t)
    return t.to(device, non_blocking=True)


def read_ahead(items: Iterable[T], read: Callable[[T], R]) -> Iterator[R]:
    """``read(item)`` for each item in order, the next ones read by a thread while the caller
    works on the current one (at most two items ahead). An exception of ``read`` is raised here, in
    order; leaving the loop early stops the thread after its current item."""
    out: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        for item in items:
            if stop.is_set():
                return
            try:
                result = (True, read(item))
            except BaseException as exc:  # handed to the consumer, which raises it
                out.put((False, exc))
                return
            out.put(result)
        out.put((True, _END))

    thread = threading.Thread(target=work, name="ratta-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = out.get()
            if not ok:
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            out.get_nowait()  # unblock a producer waiting to hand over its last item
        thread.join()


_END = object()
