r"""The peers' stage of ``ratta eval``: ZERO, MTA, TDA, BoostAdapter and DMN-ZS on one cell's
cached features and text files, into ``peers.safetensors``.

Every peer runs from the files ratta already wrote (nothing is re-encoded): z_0 and the first
N - 1 stored views (N as the official code, or fewer when fewer views were extracted), on
two classifiers: its paper's (the text file's ``baseline_peer_*``) and ratta's CuPL
classifier. Settings are the official per-dataset ones (:func:`ratta.peers.peer_defaults`;
ImageNet's, flagged, where none are published), changed only by a sweep's value.

The features are streamed: one pass over the file per distinct classifier, a batch of
:data:`BATCH` images at a time (the reader reopened per batch, so at most one batch of the
file is mapped), computing the view logits once for every peer of the pass, the episodic
peers' outputs and the online peers' per-image inputs; the online peers then run on every
stream. Each output is written to the file as soon as it is complete.

``peers.safetensors`` (float32 probabilities [N, C] by each method's rule, rows in the
features file's order):

- ``labels`` [N] int64; ``order/stream-<k>`` [N] int64, the dataset indices in stream order;
- ``<run>/<classifier>`` for an episodic run (``zero``, ``mta``), and
  ``<run>/<classifier>/stream-<k>`` for an online one (``tda``, ``tda_views``,
  ``boostadapter``, ``dmn_zs``, ``dmn_zs_oracle``); ``<classifier>`` is ``paper`` or
  ``cupl``;
- with the oracle, ``dmn_zs_oracle/gamma`` [2, K] float64: the gamma picked per classifier
  and stream;
- metadata ``ratta_peers``: JSON with every run's label, settings and inputs, the streams,
  the correlation, the seed, the dataset and whether its settings are published.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ratta.atomic import check_free_space
from ratta.errors import RattaInputError
from ratta.files import FeatureReader, SafetensorsStreamWriter, atomic_path, load_text
from ratta.peers import (
    BoostConfig,
    DMNConfig,
    MTAConfig,
    TDAConfig,
    ZeroConfig,
    boost,
    boost_views,
    correlated_streams,
    dmn,
    dmn_inputs,
    fill,
    mta,
    peer_defaults,
    shuffled_streams,
    tda,
    tda_inputs,
    view_logits,
    zero,
)
from ratta.peers.defaults import CACHE_SETTINGS
from ratta.peers.prompts import PAPER_CLASSIFIERS
from ratta.progress import Progress, progress_bar

# ``ratta eval``'s method keys (those of ratta.published) -> ratta.peers' names
PEER_METHODS = {
    "zero": "zero",
    "mta": "mta",
    "tda": "tda",
    "boostadapter": "boost",
    "dmn_zs": "dmn",
}
ONLINE = ("tda", "boostadapter", "dmn_zs")
# The runs of each peer: its variants, by their report keys
RUN_METHOD = {
    "zero": "zero",
    "mta": "mta",
    "tda": "tda",
    "tda_views": "tda",
    "boostadapter": "boostadapter",
    "dmn_zs": "dmn_zs",
    "dmn_zs_oracle": "dmn_zs",
}
CLASSIFIERS = ("paper", "cupl")
# The gammas DMN's code searches on the test labels (YBZh/DMN @c6c218c, dmn_main.py: the
# first best wins, so ties go to the smaller gamma).
DMN_ORACLE_GAMMAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
BATCH = 256
PEERS_FORMAT = 1
PEERS_FILE = "peers.safetensors"


@dataclass(frozen=True)
class PeerParam:
    """A peer hyperparameter a sweep can vary: ``field`` of the method's config (dotted for
    BoostAdapter's caches), its type and range (``low`` included unless ``open_low``)."""

    method: str
    field: str
    integer: bool = False
    low: float = 0.0
    open_low: bool = False
    high: float | None = None


def _cache_params(method: str, prefix: str) -> dict[str, PeerParam]:
    return {
        f"{method}.alpha_pos": PeerParam(method, f"{prefix}alpha"),
        f"{method}.beta_pos": PeerParam(method, f"{prefix}beta"),
        f"{method}.alpha_neg": PeerParam(method, f"{prefix}alpha_neg"),
        f"{method}.beta_neg": PeerParam(method, f"{prefix}beta_neg"),
        f"{method}.pos_capacity": PeerParam(method, f"{prefix}capacity", True, 1),
        f"{method}.neg_capacity": PeerParam(method, f"{prefix}capacity_neg", True, 1),
        f"{method}.inputs": PeerParam(method, f"{prefix}inputs", True, 1),
    }


PEER_PARAMS: dict[str, PeerParam] = {
    "zero.inputs": PeerParam("zero", "inputs", True, 1),
    "zero.gamma": PeerParam("zero", "gamma", low=0.0, open_low=True, high=1.0),
    "zero.temperature": PeerParam("zero", "temperature"),
    "mta.inputs": PeerParam("mta", "inputs", True, 2),
    "mta.lambda_y": PeerParam("mta", "lambda_y", open_low=True),
    "mta.lambda_q": PeerParam("mta", "lambda_q"),
    "mta.neighbours": PeerParam("mta", "neighbours", open_low=True, high=1.0),
    **_cache_params("tda", ""),
    **_cache_params("boostadapter", "cache."),
    "boostadapter.delta": PeerParam("boostadapter", "delta", True, 0),
    "dmn_zs.inputs": PeerParam("dmn_zs", "inputs", True, 1),
    "dmn_zs.gamma": PeerParam("dmn_zs", "gamma"),
    "dmn_zs.beta": PeerParam("dmn_zs", "beta"),
    "dmn_zs.memory": PeerParam("dmn_zs", "memory", True, 1),
}


def check_peer_value(param: str, value: float, views: int) -> float | int:
    """``value`` of a peer hyperparameter, checked: finite, in range, an integer where the
    parameter is one; ``inputs`` at most 1 + ``views`` (z_0 and the views extracted)."""
    spec = PEER_PARAMS[param]
    if not math.isfinite(value):
        raise RattaInputError(f"--values: {value} is not a finite number")
    high = 1 + views if spec.field.endswith("inputs") else spec.high
    if spec.integer and value != int(value):
        raise RattaInputError(f"--values: {param} takes integers, got {value}")
    too_low = value <= spec.low if spec.open_low else value < spec.low
    if too_low or (high is not None and value > high):
        lo = f"> {spec.low:g}" if spec.open_low else f">= {spec.low:g}"
        bound = lo if high is None else f"{lo} and <= {high:g}"
        if spec.field.endswith("inputs"):
            bound += f" (z_0 and the {views} views extracted)"
        raise RattaInputError(f"--values: {param} {value:g} is outside {bound}")
    return int(value) if spec.integer else float(value)


@dataclass(frozen=True)
class PeerSettings:
    """What the peers of a cell run with, besides the dataset and the files.

    Attributes:
        methods: the peers (``ratta eval``'s keys: zero, mta, tda, boostadapter, dmn_zs).
        streams: K, the orders each online peer runs over (seeded by the cell's seed).
        correlation: None for uniformly shuffled streams; else the Dirichlet concentration
            of class-correlated streams (:func:`ratta.peers.correlated_streams`).
        dmn_oracle: also report DMN-ZS with gamma picked on the test labels, per stream
            (as its paper did): an oracle, labelled so.
        overrides: (param, value) pairs of :data:`PEER_PARAMS` replacing official settings.
    """

    methods: tuple[str, ...] = tuple(PEER_METHODS)
    streams: int = 3
    correlation: float | None = None
    dmn_oracle: bool = False
    overrides: tuple[tuple[str, float | int], ...] = ()

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise RattaInputError(f"--streams must be >= 1, got {self.streams}")
        c = self.correlation
        if c is not None and not (math.isfinite(c) and c > 0):
            raise RattaInputError(f"--stream-correlation must be a finite number > 0, got {c}")
        unknown = [m for m in self.methods if m not in PEER_METHODS]
        if unknown:
            raise RattaInputError(f"unknown peers {', '.join(unknown)}")
        if self.dmn_oracle and "dmn_zs" not in self.methods:
            raise RattaInputError("--dmn-oracle applies to DMN-ZS (dmn_zs), which is not run")

    @property
    def online(self) -> bool:
        return any(m in ONLINE for m in self.methods)

    def check_views(self, views: int) -> None:
        """Refuse a peer that is not defined with ``views`` stored views (MTA needs one)."""
        if "mta" in self.methods and views < 1:
            raise RattaInputError(
                f"--views {views}: MTA needs at least one view (leave mta out of --methods)"
            )

    def stream_kind(self) -> str:
        if self.correlation is None:
            return "shuffled"
        return f"class-correlated (Dirichlet gamma = {self.correlation:g})"


@dataclass(frozen=True)
class PeerRun:
    """One row family of the reports: a peer in one variant with its settings.

    Attributes:
        key: the report's method key (``tda_views``, ``dmn_zs_oracle``, ...).
        method: the peer (ratta.published's key).
        label: its name in every table, naming what differs from the official run.
        config: the settings it runs with.
        inputs: N, the inputs it reads (z_0 and N - 1 views); official: the official N.
    """

    key: str
    method: str
    label: str
    config: ZeroConfig | MTAConfig | TDAConfig | BoostConfig | DMNConfig
    inputs: int
    official: int

    @property
    def online(self) -> bool:
        return self.method in ONLINE

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "label": self.label,
            "config": asdict(self.config),
            "inputs": self.inputs,
            "official_inputs": self.official,
        }


def _label(name: str, qualifiers: Sequence[str], inputs: int, official: int) -> str:
    quals = [*qualifiers, *([f"{inputs} of {official} inputs"] if inputs < official else [])]
    return f"{name} ({', '.join(quals)})" if quals else name


def _set(config: Any, dotted: str, value: float | int) -> Any:
    head, _, rest = dotted.partition(".")
    if rest:
        return replace(config, **{head: _set(getattr(config, head), rest, value)})
    return replace(config, **{head: value})


def plan_peers(dataset: str, preset: str, views: int, settings: PeerSettings) -> list[PeerRun]:
    """The runs of ``settings.methods`` on ``dataset`` with ``views`` stored views.

    ``preset``: the dataset whose official settings apply (the dataset itself, or its preset
    for custom data). Each peer reads min(N, 1 + views) inputs (N the official one, or the
    sweep's value); MTA needs one view, refused in one line without.
    """
    settings.check_views(views)
    defaults = peer_defaults(preset)
    configs: dict[str, Any] = {
        "zero": defaults.zero,
        "mta": defaults.mta,
        "tda": defaults.tda,
        "boostadapter": defaults.boost,
        "dmn_zs": defaults.dmn,
    }
    limited: set[str] = set()
    for param, value in settings.overrides:
        spec = PEER_PARAMS[param]
        configs[spec.method] = _set(configs[spec.method], spec.field, value)
        if spec.field.endswith("inputs"):
            limited.add(spec.method)
    avail = 1 + views

    def inputs_of(method: str, field: str, official: int) -> tuple[Any, int, int]:
        cfg = configs[method]
        n = _get(cfg, field)
        if method not in limited:
            n = min(n, avail)
            cfg = _set(cfg, field, n)
        return cfg, n, official if method not in limited else n

    runs = []
    for method in settings.methods:
        if method == "zero":
            cfg, n, off = inputs_of("zero", "inputs", ZeroConfig().inputs)
            runs.append(PeerRun("zero", "zero", _label("ZERO", (), n, off), cfg, n, off))
        elif method == "mta":
            cfg, n, off = inputs_of("mta", "inputs", MTAConfig().inputs)
            runs.append(PeerRun("mta", "mta", _label("MTA", (), n, off), cfg, n, off))
        elif method == "tda":
            z0 = replace(configs["tda"], query="z0")
            runs.append(PeerRun("tda", "tda", "TDA (z0)", z0, 1, 1))
            if configs["tda"].query == "views":
                cfg, n, off = inputs_of("tda", "inputs", TDAConfig().inputs)
                label = _label("TDA", ("views",), n, off)
                runs.append(PeerRun("tda_views", "tda", label, cfg, n, off))
        elif method == "boostadapter":
            official = configs["boostadapter"].cache.inputs
            cfg, n, off = inputs_of("boostadapter", "cache.inputs", official)
            label = _label("BoostAdapter", (), n, off)
            runs.append(PeerRun("boostadapter", "boostadapter", label, cfg, n, off))
        else:
            cfg, n, off = inputs_of("dmn_zs", "inputs", DMNConfig().inputs)
            gamma = () if cfg.gamma == 1.0 else (f"gamma {cfg.gamma:g}",)
            label = _label("DMN-ZS", ("ratta views", *gamma), n, off)
            runs.append(PeerRun("dmn_zs", "dmn_zs", label, cfg, n, off))
            if settings.dmn_oracle:
                label = _label("DMN-ZS", ("ratta views", "oracle gamma"), n, off)
                runs.append(PeerRun("dmn_zs_oracle", "dmn_zs", label, cfg, n, off))
    return runs


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def peers_identity(
    dataset: str, runs: Sequence[PeerRun], settings: PeerSettings, seed: int
) -> dict[str, Any]:
    """What changes the peers' numbers of a cell besides its features and text files."""
    return {
        "format": PEERS_FORMAT,
        "runs": {r.key: r.describe() for r in runs},
        "classifiers": list(CLASSIFIERS),
        "streams": settings.streams if settings.online else None,
        "correlation": settings.correlation if settings.online else None,
        "seed": seed,
        "published_settings": dataset in CACHE_SETTINGS,
    }


def _paper_key(run: PeerRun) -> str:
    return PAPER_CLASSIFIERS[PEER_METHODS[run.method]]


@dataclass
class _Pass:
    """The runs computed on one classifier in one pass over the features."""

    classifier: str  # paper or cupl
    weights: Tensor
    runs: list[PeerRun]
    keys: list[str] = field(default_factory=list)


def _passes(runs: Sequence[PeerRun], baselines: dict[str, Tensor], cupl: Tensor) -> list[_Pass]:
    passes: dict[str, _Pass] = {}
    for run in runs:
        key = _paper_key(run)
        passes.setdefault(key, _Pass("paper", baselines[key].float(), [])).runs.append(run)
    return [*passes.values(), _Pass("cupl", cupl.float(), list(runs))]


def tensor_key(run: str, classifier: str, stream: int | None) -> str:
    return f"{run}/{classifier}" + ("" if stream is None else f"/stream-{stream}")


def run_peers(
    dataset: str,
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    out: str | os.PathLike[str],
    runs: Sequence[PeerRun],
    settings: PeerSettings,
    seed: int,
    *,
    progress: Progress = False,
) -> dict[str, Any]:
    """Compute every run on both classifiers and write ``out`` (see the module docstring).

    Returns a summary: seconds per stage (``pass`` over the features per classifier,
    ``streams``), and the oracle's gammas per classifier and stream.
    """
    txt = load_text(text)
    missing = sorted({_paper_key(r) for r in runs} - set(txt.baselines))
    if missing:
        raise RattaInputError(
            f"{text}: no {', '.join(missing)} classifier (rebuild it with ratta text)"
        )
    reader = FeatureReader(features)
    n, views = reader.num_images, reader.num_views
    if reader.labels is None:
        reader.close()
        raise RattaInputError(f"{features}: no labels: the peers are evaluated against them")
    labels = reader.labels.clone()  # not a view of the file's mapping
    reader.check_labels(txt.num_classes)
    reader.close()
    if max(r.inputs for r in runs) > 1 + views:
        raise RattaInputError(f"{features}: {views} views, fewer than the peers' inputs need")
    k = settings.streams
    online = any(r.online for r in runs)
    streams = k if online else 0
    c = txt.num_classes
    oracle = any(r.key == "dmn_zs_oracle" for r in runs)
    passes = _passes(runs, txt.baselines, txt.classifier)
    # the data's size first: a huge K is refused before its tensors are even listed
    outputs = sum(len(p.runs) + (streams - 1) * sum(r.online for r in p.runs) for p in passes)
    check_free_space(out, 8 * n * (1 + streams) + 4 * n * c * outputs + 16 * k * oracle)
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"labels": (torch.int64, (n,))}
    specs |= {f"order/stream-{i}": (torch.int64, (n,)) for i in range(streams)}
    for p in passes:  # the file's order is the order of computation
        p.keys = [tensor_key(run.key, p.classifier, None) for run in p.runs if not run.online]
        p.keys += [
            tensor_key(run.key, p.classifier, i)
            for i in range(streams)
            for run in p.runs
            if run.online
        ]
        specs |= {key: (torch.float32, (n, c)) for key in p.keys}
    if oracle:
        specs["dmn_zs_oracle/gamma"] = (torch.float64, (len(CLASSIFIERS), k))
    info = {
        "runs": {r.key: r.describe() for r in runs},
        "streams": k if online else None,
        "stream_kind": settings.stream_kind() if online else None,
        "correlation": settings.correlation if online else None,
        "seed": seed,
        "dtype": "float32",
        "dataset": dataset,
        "published_settings": dataset in CACHE_SETTINGS,
    }
    seconds: dict[str, float] = {}
    gammas = torch.zeros(len(CLASSIFIERS), k, dtype=torch.float64)
    steps = sum(streams * sum(r.online for r in p.runs) for p in passes)
    total = len(passes) * math.ceil(n / BATCH) + steps
    with (
        progress_bar(progress, "peers", total=total, unit="step") as bar,
        atomic_path(out) as tmp,
        SafetensorsStreamWriter(tmp, specs, {"ratta_peers": json.dumps(info)}) as writer,
    ):
        if settings.correlation is None:
            orders = shuffled_streams(n, streams, seed)
        else:
            orders = correlated_streams(labels, settings.correlation, streams, seed)
        writer.write("labels", labels)
        for i, order in enumerate(orders):
            writer.write(f"order/stream-{i}", order)
        for p in passes:
            t0 = time.perf_counter()
            episodic, prepared = _pass(features, n, p, txt.logit_scale, bar.update)
            for key in p.keys[: len(episodic)]:
                writer.write(key, episodic.pop(key))
            seconds[f"pass {p.classifier} {_pass_name(p)}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i, order in enumerate(orders):
                stream = _Stream(prepared, order, p.weights, txt.logit_scale, labels, oracle)
                for run in (r for r in p.runs if r.online):
                    with one_thread():
                        probs = stream.probs(run)
                    writer.write(tensor_key(run.key, p.classifier, i), probs)
                    bar.update(1)
                if oracle:
                    gammas[CLASSIFIERS.index(p.classifier), i] = stream.gamma
            seconds[f"streams {p.classifier} {_pass_name(p)}"] = time.perf_counter() - t0
        if oracle:
            writer.write("dmn_zs_oracle/gamma", gammas)
    return {
        "seconds": {key: round(v, 3) for key, v in seconds.items()},
        "oracle_gamma": dict(zip(CLASSIFIERS, gammas.tolist(), strict=True)) if oracle else None,
    }


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, then as before: an online peer's stream is thousands of tiny
    per-block ops, where a second thread only adds a barrier wait to each (on this 2-core
    machine under load, a 9-image stream took 100 ms on two threads, 0.5 ms on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pass_name(p: _Pass) -> str:
    return "+".join(dict.fromkeys(r.method for r in p.runs))


def _pass(
    features: str | os.PathLike[str],
    n: int,
    p: _Pass,
    scale: float,
    step: Callable[[int], object],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One pass over the features: the episodic runs' probabilities [n, C] (by tensor key)
    and the online runs' per-image inputs."""
    w = p.weights
    c = w.shape[0]
    inputs = max(r.inputs for r in p.runs)
    episodic = {
        tensor_key(r.key, p.classifier, None): torch.empty(n, c) for r in p.runs if not r.online
    }
    prepared: dict[str, Any] = {}
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        reader = FeatureReader(features)  # reopened per batch: only one batch is ever mapped
        x = reader.batch(start, stop, views=inputs - 1).float()
        reader.close()
        logits = view_logits(x, w, scale)
        for run in p.runs:
            cfg: Any = run.config
            if run.key in ("zero", "mta"):
                fn = zero if run.key == "zero" else mta
                out = fn(x, w, scale, cfg, logits=logits)
                episodic[tensor_key(run.key, p.classifier, None)][start:stop] = out.probs
            elif run.method == "tda":
                prepared[run.key] = fill(
                    prepared.get(run.key), tda_inputs(x, w, scale, cfg, logits=logits), start, n
                )
            elif run.method == "boostadapter":
                items = tda_inputs(x, w, scale, cfg.cache, logits=logits)
                prepared["boost"] = fill(prepared.get("boost"), items, start, n)
                views = boost_views(x, w, scale, cfg, logits=logits)
                prepared["boost_views"] = fill(prepared.get("boost_views"), views, start, n)
            elif run.key == "dmn_zs":
                prepared["dmn"] = fill(
                    prepared.get("dmn"), dmn_inputs(x, w, scale, cfg, logits=logits), start, n
                )
        step(1)
    return episodic, prepared


class _Stream:
    """The online runs of one pass on one stream, in order (DMN-ZS before its oracle)."""

    def __init__(
        self,
        prepared: dict[str, Any],
        order: Tensor,
        w: Tensor,
        scale: float,
        labels: Tensor,
        oracle: bool,
    ) -> None:
        self.prepared, self.order, self.w, self.scale = prepared, order, w, scale
        self.labels, self.oracle = labels, oracle
        self.parts: tuple[Tensor, Tensor] | None = None
        self.gamma = float("nan")

    def probs(self, run: PeerRun) -> Tensor:
        """The probabilities [n, C] of ``run`` over the stream (dataset order)."""
        cfg: Any = run.config
        prep, order, w, scale = self.prepared, self.order, self.w, self.scale
        if run.method == "tda":
            return tda(prep[run.key], order, w, scale, cfg).probs
        if run.method == "boostadapter":
            return boost(prep["boost"], prep["boost_views"], order, w, scale, cfg).probs
        if run.key == "dmn_zs":
            out = dmn(prep["dmn"], order, w, scale, cfg)
            if self.oracle:  # the memory does not depend on gamma: p_mem serves every gamma
                p0 = torch.softmax(scale * (prep["dmn"].query @ w.T), dim=-1)
                self.parts = p0, (out.scores - p0) / cfg.gamma
            return out.probs
        assert self.parts is not None, "DMN-ZS runs before its oracle"
        p0, p_mem = self.parts
        self.gamma = oracle_gamma(p0, p_mem, self.labels)
        return (p0 + self.gamma * p_mem) / (1 + self.gamma)


def oracle_gamma(p0: Tensor, p_mem: Tensor, labels: Tensor) -> float:
    """The gamma of :data:`DMN_ORACLE_GAMMAS` whose p0 + gamma p_mem has the best top-1 on
    ``labels`` (the first best: DMN's strict ``>``), as DMN's paper picked it."""
    best, pick = -1, DMN_ORACLE_GAMMAS[0]
    for gamma in DMN_ORACLE_GAMMAS:
        hits = int(((p0 + gamma * p_mem).argmax(-1) == labels).sum())
        if hits > best:
            best, pick = hits, gamma
    return pick
