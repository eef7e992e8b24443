"""Shards of work: resumable shard files, and their execution on a Ray cluster.

Every stage that scales out (``extract`` and ``db build``, ``db select``, ``adapt``) cuts
its work into an ordered list of shards (image chunks, corpus shards, test-image ranges)
and describes the work on one shard as a *job*: a picklable object whose ``setup(device)``
loads, once per worker, what the work needs (a model, a database) and whose
``__call__(shard)`` returns the shard's result. Then:

- :class:`ShardStore` keeps each finished shard in its own file beside the output
  (``<out>.parts/``), written atomically, under a ``settings.json`` identity: a rerun with
  the same settings skips the finished shards, one with other settings is refused. The
  identity never names the backend or the worker count, so a run started on one backend
  resumes on the other.
- :func:`run_shards` runs a job's shards on a pool of Ray actors (one job, so one model,
  per actor, loaded once). Results come back to the driver, which alone writes files: the
  workers need to read the inputs, not to share the output's filesystem. A shard whose
  worker dies (killed, out of memory, node lost) or raises is retried on a fresh or the
  same worker, up to ``max_retries`` times; bad input (:class:`RattaInputError`) stops the
  run at once, as it would locally.

Ray is imported only by :func:`connect`, i.e. only with ``--backend ray``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ratta.atomic import write_json
from ratta.errors import RattaInputError
from ratta.identity import changes

if TYPE_CHECKING:
    from torch import Tensor

    from ratta.progress import Progress

BACKENDS = ("local", "ray")


class ShardJob(Protocol):
    """The work on one shard; pickled once to every worker.

    A job may also list, in ``imports``, modules its unpickling needs besides its own
    (e.g. a model's), which workers import while the driver serialises the job.
    """

    def setup(self, device: str) -> None:
        """Load what every shard needs (model, database) on ``device``; runs once per worker."""

    def __call__(self, shard: Any) -> Any:
        """The result of one shard (tensors, arrays: what the driver writes)."""


@dataclass(frozen=True)
class RayBackend:
    """Where and how wide to run on Ray (``--backend ray`` and its flags).

    Attributes:
        address: ``auto`` (the cluster this machine belongs to), ``HOST:PORT`` of a head
            node, ``ray://HOST:PORT`` (Ray Client); ``None``: ``$RAY_ADDRESS`` if set, else
            a Ray instance started on this machine.
        workers: actors, each holding one copy of the job (one model).
        num_cpus_per_worker, num_gpus_per_worker: Ray resources reserved per actor; the
            actors run on CUDA exactly when they reserve GPUs (fractions share a GPU).
        max_retries: retries of a shard whose worker died or raised, before it counts as
            failed.
    """

    address: str | None = None
    workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise RattaInputError(f"--workers must be >= 1 with --backend ray, got {self.workers}")
        if self.num_cpus_per_worker <= 0:
            raise RattaInputError(
                f"--num-cpus-per-worker must be > 0, got {self.num_cpus_per_worker}"
            )
        if self.num_gpus_per_worker < 0:
            raise RattaInputError(
                f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}"
            )
        if self.max_retries < 0:
            raise RattaInputError(f"--max-retries must be >= 0, got {self.max_retries}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"

    @property
    def threads(self) -> int:
        """Torch threads of an actor: its CPU reservation (at least one)."""
        return max(1, int(self.num_cpus_per_worker))

    def check_device(self, device: str) -> str:
        """The actors' device, given the ``--device`` the user asked for."""
        if device == self.device:
            return device
        if self.device == "cuda":
            raise RattaInputError(
                f"--device {device}: --num-gpus-per-worker {self.num_gpus_per_worker:g} "
                "reserves GPUs for the Ray workers; add --device cuda"
            )
        if device.startswith("cuda"):
            hint = "use --device cuda (Ray assigns each worker its GPUs)"
            if device == "cuda":
                hint = "reserve GPUs for the Ray workers with --num-gpus-per-worker (e.g. 1)"
            raise RattaInputError(f"--device {device} with --backend ray: {hint}")
        raise RattaInputError(f"--device {device}: use cpu or cuda with --backend ray")

    def to_dict(self) -> dict[str, Any]:
        return {"name": "ray", **asdict(self)}


# ------------------------------------------------------------------------------ shard files


class ShardStore:
    """Finished shards of one run, one safetensors file each, in ``folder``.

    ``identity`` (JSON-able) is everything that determines the shards' content; it is
    written to ``folder/settings.json`` on the first run and compared on every rerun.
    """

    def __init__(
        self, folder: Path, identity: dict[str, Any], what: str, prefix: str = "chunk"
    ) -> None:
        self.folder, self.prefix = folder, prefix
        folder.mkdir(exist_ok=True)
        ident = folder / "settings.json"
        if ident.exists():
            old = json.loads(ident.read_text())
            if old != json.loads(json.dumps(identity)):
                changed = ", ".join(changes(old, identity)[:4])
                raise RattaInputError(
                    f"{folder}: an unfinished {what} with other inputs or settings is there "
                    f"(changed: {changed}); rerun with the same ones to resume it, or delete "
                    "the folder"
                )
        else:
            write_json(ident, identity)

    def path(self, k: int) -> Path:
        return self.folder / f"{self.prefix}-{k:06d}.safetensors"

    def todo(self, count: int) -> list[int]:
        """Shards 0..count-1 without a finished file."""
        return [k for k in range(count) if not self.path(k).exists()]

    def save(self, k: int, tensors: dict[str, Tensor], meta: dict[str, Any] | None = None) -> None:
        """Write shard ``k`` atomically (a killed run never leaves a partial shard)."""
        from ratta.files import save_safetensors

        save_safetensors(self.path(k), tensors, {"shard": json.dumps(meta or {})})

    def load(self, k: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        from safetensors import safe_open

        with safe_open(str(self.path(k)), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            meta = json.loads((f.metadata() or {}).get("shard", "{}"))
        return tensors, meta

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def file_stamp(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A cheap identity of an input file or database folder: path, size, modification time.

    Hashing a multi-gigabyte database on every resume would cost more than the shards.
    """
    p = Path(path)
    target = p / "manifest.json" if (p / "manifest.json").is_file() else p
    st = target.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------------------------ reports


@dataclass
class ShardReport:
    """What happened to the shards of one run; ``line()`` is the summary printed at the end."""

    backend: str
    total: int
    skipped: int = 0
    workers: int = 1
    unit: str = "item"
    done: list[int] = field(default_factory=list)
    retried: dict[int, int] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    items: int = 0
    seconds: float = 0.0
    start_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "shards": self.total,
            "done": len(self.done),
            "skipped": self.skipped,
            "retried": len(self.retried),
            "retries": sum(self.retried.values()),
            "failed": len(self.failed),
            "failures": [{"shard": k, "error": e} for k, e in sorted(self.failed.items())],
            "workers": self.workers,
            "first_worker_ready_s": None if self.start_s is None else round(self.start_s, 3),
            f"{self.unit}s_per_s": round(self.items / self.seconds, 3) if self.seconds else None,
            "summary": self.line(),
        }

    def line(self) -> str:
        """E.g. ``ray, 2 workers: 6 shards, 4 done, 2 skipped (finished earlier), ...``."""
        rate = f"; {self.items / self.seconds:.2f} {self.unit}s/s" if self.seconds else ""
        who = self.backend
        if self.backend != "local":
            who += f", {self.workers} worker{'s' if self.workers != 1 else ''}"
        return (
            f"{who}: {self.total} shards, {len(self.done)} done, {self.skipped} skipped "
            f"(finished earlier), {len(self.retried)} retried, {len(self.failed)} failed{rate}"
        )

    def raise_if_failed(self, folder: Path) -> None:
        if not self.failed:
            return
        k, error = min(self.failed.items())
        raise RattaInputError(
            f"{len(self.failed)} of {self.total} shards failed (shard {k}: {error}); the "
            f"finished ones are kept in {folder}: rerun the same command to retry the rest"
        )


# ------------------------------------------------------------------------------ Ray


def connect(backend: RayBackend) -> Any:
    """The ``ray`` module, connected to ``backend.address`` (or to a local instance)."""
    try:
        import ray
    except ImportError:
        raise RattaInputError(
            "--backend ray needs Ray, which is not installed: pip install 'ratta[ray]'"
        ) from None
    if ray.is_initialized():
        return ray
    address = backend.address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RattaInputError(f"--ray-address {address}: no Ray cluster there ({first})") from None
    _check_resources(ray, backend, started_here=address is None)
    return ray


def _check_reachable(address: str) -> None:
    """Fail in seconds on an address nobody listens at (``ray.init`` would retry for minutes)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RattaInputError(
            f"--ray-address {address}: expected auto, HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise RattaInputError(
            f"--ray-address {address}: cannot reach a Ray head node there "
            f"({exc.strerror or type(exc).__name__})"
        ) from None


def _check_resources(ray: Any, backend: RayBackend, started_here: bool) -> None:
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus >= backend.num_cpus_per_worker and gpus >= backend.num_gpus_per_worker:
        return
    message = (
        f"a Ray worker asks for {backend.num_cpus_per_worker:g} CPUs and "
        f"{backend.num_gpus_per_worker:g} GPUs but the cluster has {cpus:g} CPUs and "
        f"{gpus:g} GPUs (--num-cpus-per-worker, --num-gpus-per-worker)"
    )
    if started_here:  # nothing will ever add resources to a local instance
        raise RattaInputError(message)
    warnings.warn(f"{message}; waiting for the cluster to scale up", stacklevel=3)


class _Actor:
    """A Ray actor: one job, set up once, then called once per shard.

    The constructor imports the job's modules while the driver is still serialising the
    job (its model): a worker is ready sooner.
    """

    def __init__(self, threads: int, modules: Sequence[str]) -> None:
        import importlib

        import torch

        from ratta.resources import keep_freed_memory

        keep_freed_memory()
        torch.set_num_threads(threads)
        for name in modules:
            with contextlib.suppress(ImportError):  # only a head start: setup imports them too
                importlib.import_module(name)

    def setup(self, job: ShardJob, device: str) -> None:
        self.job = job
        job.setup(device)

    def run(self, shard: Any) -> Any:
        return self.job(shard)


def run_shards(
    job: ShardJob,
    shards: Sequence[tuple[int, Any]],
    on_result: Callable[[int, Any], None],
    backend: RayBackend,
    *,
    total: int,
    sizes: Sequence[int] | None = None,
    progress: Progress = False,
    desc: str = "shards",
    unit: str = "item",
) -> ShardReport:
    """Run ``job`` on ``shards`` ((shard id, payload), in order) with a pool of Ray actors.

    ``on_result(id, result)`` runs on the driver as each shard finishes (in any order);
    ``total`` counts every shard of the run, the ones finished earlier included, and
    ``sizes`` the items of each shard, for the progress bar (items/s, shards done).
    A shard that fails ``max_retries + 1`` times is reported in ``failed``; the others
    still run. Actors are killed when the call returns.
    """
    from tqdm import tqdm

    workers = min(backend.workers, len(shards))
    report = ShardReport("ray", total, skipped=total - len(shards), workers=workers, unit=unit)
    if not shards:
        return report
    ray = connect(backend)
    from ray import exceptions as rex

    started = time.perf_counter()
    sizes = list(sizes) if sizes is not None else [1] * len(shards)
    actor_cls = ray.remote(_Actor).options(
        num_cpus=backend.num_cpus_per_worker,
        num_gpus=backend.num_gpus_per_worker,
        max_restarts=0,
        max_task_retries=0,
    )
    modules = [type(job).__module__, *getattr(job, "imports", ())]
    queue: deque[int] = deque(range(len(shards)))
    attempts = [0] * len(shards)
    pool: list[Any] = []  # every actor started, killed on return
    starting: dict[Any, Any] = {}
    running: dict[Any, tuple[Any, int]] = {}
    idle: deque[Any] = deque()
    # every worker may die max_retries times before the shards themselves run out of retries
    spawn_limit = workers * (backend.max_retries + 2)

    lost: list[str] = []  # why workers died

    def start() -> Any:
        if len(pool) >= spawn_limit:
            raise RattaInputError(
                f"Ray workers keep dying ({len(pool)} started, {len(report.done)} of "
                f"{len(shards)} shards done; last: {lost[-1]}); see the Ray logs "
                "(/tmp/ray/session_latest/logs on the node)"
            )
        pool.append(actor_cls.remote(backend.threads, modules))
        return pool[-1]

    def set_up(actor: Any) -> None:
        starting[actor.setup.remote(job_ref, backend.device)] = actor

    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    bar.set_postfix_str(f"shards {report.skipped}/{total}")
    try:
        # the actors' processes start (and import torch) while the job, with its model, is
        # serialised into the object store
        first = [start() for _ in range(workers)]
        job_ref = ray.put(job)
        for actor in first:
            set_up(actor)
        while queue or running:
            while idle and queue:
                actor, pos = idle.popleft(), queue.popleft()
                running[actor.run.remote(shards[pos][1])] = (actor, pos)
            (ref,), _ = ray.wait([*running, *starting], num_returns=1)
            if ref in starting:
                actor = starting.pop(ref)
                try:
                    ray.get(ref)
                except rex.RayTaskError as exc:  # the job's setup raised: no worker can start
                    raise _as_input_error(exc, "a Ray worker could not start") from None
                except rex.RayError as exc:  # died while starting
                    lost.append(_first_line(exc))
                    set_up(start())
                else:
                    if report.start_s is None:
                        report.start_s = time.perf_counter() - started
                    idle.append(actor)
                continue
            actor, pos = running.pop(ref)
            shard_id = shards[pos][0]
            try:
                result = ray.get(ref)
            except rex.RayTaskError as exc:
                if isinstance(exc.cause, RattaInputError):  # bad input: stop, as locally
                    raise RattaInputError(str(exc.cause)) from None
                error = f"{type(exc.cause).__name__}: {exc.cause}"
                idle.append(actor)
            except rex.RayError as exc:  # the worker died: killed, out of memory, node lost
                error = f"worker lost ({type(exc).__name__})"
                lost.append(_first_line(exc))
                set_up(start())
            else:
                on_result(shard_id, result)
                report.done.append(shard_id)
                report.items += sizes[pos]
                idle.append(actor)
                done = report.skipped + len(report.done)
                retried = f", retried {len(report.retried)}" if report.retried else ""
                bar.set_postfix_str(f"shards {done}/{total}{retried}", refresh=False)
                bar.update(sizes[pos])
                continue
            attempts[pos] += 1
            if attempts[pos] > backend.max_retries:
                report.failed[shard_id] = error
            else:
                report.retried[shard_id] = attempts[pos]
                queue.appendleft(pos)
    finally:
        bar.close()
        report.seconds = time.perf_counter() - started
        for actor in pool:
            ray.kill(actor)
    return report


def _as_input_error(exc: Any, what: str) -> RattaInputError:
    cause = exc.cause
    if isinstance(cause, RattaInputError):
        return RattaInputError(str(cause))
    return RattaInputError(f"{what}: {type(cause).__name__}: {cause}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
