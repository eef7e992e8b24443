"""``ratta db select``: the subset of a corpus that concerns a dataset's classes.

Two rules, both streaming over the corpus shard by shard (a corpus never has to fit in
memory), both writing a database whose metadata has a ``classes`` column (the classes a
row was selected for) and whose manifest records the rule and the rows per class:

- ``caption`` (the paper's): a row is selected for class c when its caption contains the
  class name, or one of its synonyms, as whole words, ignoring case. Names and captions
  are compared as token sequences (runs of letters/digits/underscore, and single
  punctuation marks; whitespace separates tokens), so "Boeing 737" matches "a boeing  737
  on the runway" and "Boeing 737-800", but not "Boeing 7370"; ``_`` in class names counts
  as a space.
- ``knn``: the k database rows nearest (L2, as RA-TTA retrieves) to each query vector of a
  text features file: the class's zero-shot classifier row, or each of its description
  rows; a row is selected for the classes of the queries that found it.

Rows are stored once even when selected for several classes (counted for each). Later
rows that repeat an earlier selected row are dropped: the same embedding bytes, the same
origin (``source`` file and ``source_row``: one corpus row reached twice, e.g. through
overlapping corpora) or the same (non-empty) ``url``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ratta import __version__
from ratta.db.index import IndexSettings, exact_search
from ratta.db.sources import (
    COLUMNS,
    Source,
    SourceShard,
    _clip_files,
    common_backbone,
    open_source,
)
from ratta.db.store import BLOCK_ROWS, Manifest
from ratta.db.writer import DatabaseWriter, new_database
from ratta.distributed import ShardStore, file_stamp
from ratta.errors import RattaInputError
from ratta.guard import Read, Write, guarded
from ratta.progress import Progress, label, progress_bar, within

if TYPE_CHECKING:
    from ratta.distributed import RayBackend, ShardJob

_TOKEN = re.compile(r"\w+|[^\w\s]")
CAPTION_RULE = (
    "class name or synonym as a whole-token sequence in the caption, case-insensitive "
    "(tokens: runs of letters/digits/_ and single punctuation marks; _ in names is a space)"
)


def tokens(text: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(text.casefold()))


class CaptionMatcher:
    """Which classes a caption mentions, in time linear in the caption's length.

    Phrases are indexed by their first token; at each token of the caption only the
    phrases starting with it are compared.
    """

    def __init__(self, phrases: Sequence[Sequence[str]]) -> None:
        self.by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        for c, names in enumerate(phrases):
            for name in names:
                toks = tokens(name.replace("_", " "))
                if not toks:
                    raise RattaInputError(f"class {c}: name or synonym {name!r} has no words")
                self.by_first.setdefault(toks[0], []).append((toks, c))

    def match(self, caption: str | None) -> set[int]:
        if not caption:
            return set()
        toks = tokens(caption)
        found: set[int] = set()
        for i, tok in enumerate(toks):
            for phrase, c in self.by_first.get(tok, ()):
                if toks[i : i + len(phrase)] == phrase:
                    found.add(c)
        return found


def read_synonyms(path: str | os.PathLike[str], class_names: Sequence[str]) -> list[list[str]]:
    """A JSON object {class name: [synonym, ...]} -> synonyms per class, in class order."""
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"--synonyms {p}: file not found")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RattaInputError(f"--synonyms {p}: invalid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()
    ):
        raise RattaInputError(f"--synonyms {p}: expected a JSON object {{name: [synonym, ...]}}")
    index = {n: i for i, n in enumerate(class_names)}
    out: list[list[str]] = [[] for _ in class_names]
    for name, syns in data.items():
        if name not in index:
            raise RattaInputError(f"--synonyms {p}: '{name}' is not one of the class names")
        out[index[name]].extend(syns)
    return out


@dataclass
class _Dedupe:
    """Identities of the rows kept so far, as 16-byte digests (~100 bytes per kept row).

    A row repeats a kept one when it has the same embedding bytes, the same origin (source
    file and row: the same corpus row given twice) or the same non-empty url.
    """

    embeddings: set[bytes] = field(default_factory=set)
    origins: set[bytes] = field(default_factory=set)
    urls: set[bytes] = field(default_factory=set)
    dropped: dict[str, int] = field(default_factory=lambda: {"embedding": 0, "origin": 0, "url": 0})

    def keep(self, row: np.ndarray, origin: str, url: str | None) -> bool:
        keys = (
            ("embedding", self.embeddings, _digest(row.tobytes())),
            ("origin", self.origins, _digest(origin.encode())),
            ("url", self.urls, _digest(url.encode()) if url else None),
        )
        for name, seen, key in keys:
            if key is not None and key in seen:
                self.dropped[name] += 1
                return False
        for _, seen, key in keys:
            if key is not None:
                seen.add(key)
        return True


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass
class _Selection:
    """Appends picked rows of each shard to the writer, deduplicated, counting per class."""

    writer: DatabaseWriter
    num_classes: int
    dedupe: _Dedupe = field(default_factory=_Dedupe)
    counts: np.ndarray = field(init=False)
    scanned: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.num_classes, dtype=np.int64)

    def add(self, shard: SourceShard, rows: np.ndarray, classes: list[list[int]]) -> None:
        import pyarrow as pa

        if rows.size == 0:
            return
        emb = np.asarray(shard.embeddings[rows])
        meta = shard.metadata(COLUMNS, rows=rows)
        origins = [
            f"{src}\t{row}"
            for src, row in zip(
                meta.column("source").to_pylist(),
                meta.column("source_row").to_pylist(),
                strict=True,
            )
        ]
        urls = meta.column("url").to_pylist()
        keep = [i for i in range(rows.size) if self.dedupe.keep(emb[i], origins[i], urls[i])]
        if not keep:
            return
        kept_classes = [sorted(classes[i]) for i in keep]
        for cs in kept_classes:
            self.counts[cs] += 1
        take = pa.array(keep, pa.int64())
        table = meta.take(take).append_column(
            "classes", pa.array(kept_classes, pa.list_(pa.int32()))
        )
        self.writer.add(emb[keep], table, source=str(shard.file), rows=rows[keep])


def _open_corpus(corpus: Sequence[str | os.PathLike[str]]) -> list[Source]:
    if not corpus:
        raise RattaInputError("--corpus: give at least one corpus folder")
    sources = [open_source(c) for c in corpus]
    dims = {s.dim for s in sources}
    if len(dims) != 1:
        raise RattaInputError(
            "--corpus: folders have different dimensions "
            f"({', '.join(f'{s.path}: {s.dim}' for s in sources)})"
        )
    return sources


def _finish(
    sel: _Selection,
    sources: list[Source],
    class_names: Sequence[str],
    rule: dict[str, Any],
    index: IndexSettings | None,
    progress: Progress,
    shards: dict[str, Any] | None = None,
) -> Manifest:
    """Commit the selection; ``shards``: the Ray run's shard report, kept in the provenance."""
    if sel.writer.count == 0:
        raise RattaInputError(
            f"no corpus row was selected for any of the {len(class_names)} classes "
            f"({sel.scanned} rows scanned)"
        )
    selection = {
        **rule,
        "classes": list(class_names),
        "rows_scanned": sel.scanned,
        "rows_selected": sel.writer.count,
        "duplicates_dropped": dict(sel.dedupe.dropped),
        "counts": {name: int(n) for name, n in zip(class_names, sel.counts, strict=True)},
    }
    provenance: dict[str, Any] = {
        "operation": "select",
        "sources": [s.provenance() for s in sources],
        "selection": selection,
    }
    if shards is not None:
        provenance["shards"] = shards
    return sel.writer.commit(provenance, index, progress=within(progress, "index"))


def _dtype(sources: Sequence[Source]) -> str:
    from ratta.db.importers import default_dtype

    return default_dtype(sources)


def _selection_writer(
    out: str | os.PathLike[str], sources: Sequence[Source], backbone: dict[str, Any] | None
) -> DatabaseWriter:
    """The writer of a selection: the corpus's dimension and dtype, plus a classes column."""
    return DatabaseWriter(
        out,
        dim=sources[0].dim,
        dtype=_dtype(sources),
        classes=True,
        backbone=backbone or common_backbone(sources),
    )


def _plan(
    corpus: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **_: Any
) -> tuple[list[Write], list[Read]]:
    return new_database(out, [r for c in corpus for r in Read.of(c, "--corpus")])


@guarded(_plan)
def select_by_caption(
    corpus: Sequence[str | os.PathLike[str]],
    class_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    synonyms: Sequence[Sequence[str]] | None = None,
    backbone: dict[str, Any] | None = None,
    index: IndexSettings | None = None,
    progress: Progress = False,
    backend: RayBackend | None = None,
) -> Manifest:
    """Rows whose caption mentions a class name or synonym (the paper's rule, above).

    With ``backend=RayBackend(...)``, Ray workers match the corpus shards (the costly
    part: reading and tokenising every caption) and the driver merges their rows in shard
    order, so the result, deduplication included, is the local one.
    """
    if not class_names:
        raise RattaInputError("no class names to select for")
    phrases = [[n, *(synonyms[i] if synonyms else ())] for i, n in enumerate(class_names)]
    matcher = CaptionMatcher(phrases)
    sources = _open_corpus(corpus)
    with _selection_writer(out, sources, backbone) as writer:
        sel = _Selection(writer, len(class_names))
        captioned = 0
        shards: dict[str, Any] | None = None
        if backend is None:
            bar = progress_bar(progress, "select", total=sum(s.rows for s in sources), unit="row")
            for source in sources:
                for shard in source.shards():
                    rows, classes, found = _match_shard(shard, matcher)
                    captioned += found
                    sel.add(shard, rows, classes)
                    sel.scanned += shard.rows
                    bar.update(shard.rows)
            bar.close()
        else:
            identity = {"rule": "caption", "phrases": phrases}
            store = _store(out, sources, identity)
            job = _CaptionJob([str(s.path) for s in sources], phrases)

            def merge(shard: SourceShard, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
                nonlocal captioned
                rows, classes = _unpack_classes(tensors)
                sel.add(shard, rows, classes)
                sel.scanned += shard.rows
                captioned += meta["captioned"]

            shards = _select_on_ray(job, sources, store, merge, backend, progress)
        if not captioned:
            raise RattaInputError(
                f"--corpus: none of the {sel.scanned} rows has a caption; select with --by knn"
            )
        rule = {"by": "caption", "rule": CAPTION_RULE, "synonyms": _synonym_record(synonyms)}
        manifest = _finish(sel, sources, class_names, rule, index, progress, shards)
    if backend is not None:
        store.remove()
    return manifest


def _match_shard(
    shard: SourceShard, matcher: CaptionMatcher
) -> tuple[np.ndarray, list[list[int]], int]:
    """Rows of the shard whose caption mentions a class, their classes, and how many rows
    have a caption at all."""
    captions = _captions(shard)
    rows, classes = [], []
    for r, caption in enumerate(captions):
        found = matcher.match(caption)
        if found:
            rows.append(r)
            classes.append(sorted(found))
    captioned = sum(c is not None and c != "" for c in captions)
    return np.array(rows, dtype=np.int64), classes, captioned


def _captions(shard: SourceShard) -> list[str | None]:
    found = shard.read_metadata(["caption"]) if shard.read_metadata else {}
    if "caption" not in found:
        raise RattaInputError(
            f"{shard.file}: no captions (metadata column 'caption'); select with --by knn instead"
        )
    return found["caption"].to_pylist()


def _synonym_record(synonyms: Sequence[Sequence[str]] | None) -> dict[str, Any] | None:
    if not synonyms:
        return None
    return {"count": sum(len(s) for s in synonyms), "per_class": [list(s) for s in synonyms]}


@guarded(_plan)
def select_by_knn(
    corpus: Sequence[str | os.PathLike[str]],
    queries: np.ndarray,
    query_class: np.ndarray,
    class_names: Sequence[str],
    out: str | os.PathLike[str],
    *,
    k: int = 256,
    query_kind: str = "classifier",
    backbone: dict[str, Any] | None = None,
    index: IndexSettings | None = None,
    progress: Progress = False,
    backend: RayBackend | None = None,
) -> Manifest:
    """The ``k`` rows nearest to each query [Q, d]; a row joins its queries' classes [Q].

    Two streaming passes: a running exact top-k over all shards, then the picked rows are
    copied shard by shard. With ``backend=RayBackend(...)`` the first pass is distributed:
    each Ray worker finds the top-k of one corpus shard, and the driver merges them
    (nearest first, ties to the lower row id).
    """
    if k < 1:
        raise RattaInputError(f"--k must be >= 1, got {k}")
    sources = _open_corpus(corpus)
    dim = sources[0].dim
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise RattaInputError(
            f"queries have shape {tuple(queries.shape)} but the corpus has dimension {dim}"
        )
    total = sum(s.rows for s in sources)

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        start = 0
        bar = progress_bar(progress, "select", total=total, unit="row")
        for source in sources:
            for shard in source.shards():
                for s in range(0, shard.rows, BLOCK_ROWS):
                    block = shard.embeddings[s : s + BLOCK_ROWS]
                    yield start + s, block
                    bar.update(block.shape[0])
                start += shard.rows
        bar.close()

    shards: dict[str, Any] | None = None
    if backend is None:
        _, picked = exact_search(blocks(), total, queries, k)
    else:
        identity = {
            "rule": "knn",
            "k": k,
            "queries": hashlib.sha256(np.ascontiguousarray(queries, np.float32)).hexdigest(),
        }
        store = _store(out, sources, identity)
        job = _KnnJob([str(s.path) for s in sources], queries, k)
        best: tuple[np.ndarray, np.ndarray] | None = None

        def merge(shard: SourceShard, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
            nonlocal best
            found = (tensors["dist"].numpy(), tensors["ids"].numpy())
            best = found if best is None else _merge_topk(*best, *found, k)

        shards = _select_on_ray(job, sources, store, merge, backend, progress)
        assert best is not None  # a corpus has at least one shard
        picked = best[1]
    owners = np.repeat(query_class.astype(np.int64), picked.shape[1])
    flat = picked.reshape(-1)
    order = np.lexsort((owners, flat))
    flat, owners = flat[order], owners[order]
    rows, first = np.unique(flat, return_index=True)
    class_sets = [sorted(set(c.tolist())) for c in np.split(owners, first[1:])]

    with _selection_writer(out, sources, backbone) as writer:
        sel = _Selection(writer, len(class_names))
        start = 0
        for source in sources:
            for shard in source.shards():
                lo, hi = np.searchsorted(rows, [start, start + shard.rows])
                sel.add(shard, rows[lo:hi] - start, class_sets[lo:hi])
                start += shard.rows
        sel.scanned = total
        if backend is not None:
            store.remove()
        rule = {
            "by": "knn",
            "rule": f"the {k} rows nearest (L2) to each {query_kind} query of a text file",
            "k": k,
            "queries": query_kind,
            "query_count": int(queries.shape[0]),
        }
        return _finish(sel, sources, class_names, rule, index, progress, shards)


# ------------------------------------------------------------------------------ Ray


def _store(
    out: str | os.PathLike[str], sources: Sequence[Source], identity: dict[str, Any]
) -> ShardStore:
    """Finished corpus shards of a Ray selection, in ``<out>.parts/``."""
    corpus = [
        [file_stamp(f) for f in (_clip_files(s.path) if s.format == "clip-retrieval" else [s.path])]
        for s in sources
    ]
    identity = {"ratta_version": __version__, "corpus": corpus, **identity}
    return ShardStore(Path(f"{out}.parts"), identity, "selection", prefix="shard")


def _select_on_ray(
    job: ShardJob,
    sources: Sequence[Source],
    store: ShardStore,
    merge: Callable[[SourceShard, dict[str, Tensor], dict[str, Any]], None],
    backend: RayBackend,
    progress: Progress,
) -> dict[str, Any]:
    """Run ``job`` on every corpus shard not finished yet, and ``merge`` every shard's
    result in corpus order, as soon as the ones before it are in; the shard report."""
    from ratta.distributed import run_shards

    places = [(s, j, sh.rows) for s, src in enumerate(sources) for j, sh in enumerate(src.shards())]
    starts = np.concatenate([[0], np.cumsum([rows for _, _, rows in places])]).tolist()
    shards = (sh for src in sources for sh in src.shards())
    merged = 0

    def drain() -> None:
        nonlocal merged
        while merged < len(places) and store.path(merged).exists():
            merge(next(shards), *store.load(merged))
            merged += 1

    def save(i: int, result: tuple[dict[str, Tensor], dict[str, Any]]) -> None:
        store.save(i, *result)
        drain()

    todo = store.todo(len(places))
    report = run_shards(
        job,
        [(i, (*places[i][:2], starts[i])) for i in todo],
        save,
        backend,
        total=len(places),
        sizes=[places[i][2] for i in todo],
        progress=progress,
        desc=label(progress, "select"),
        unit="row",
    )
    report.raise_if_failed(store.folder)
    drain()
    return report.to_dict()


def _nth_shard(source: Source, j: int) -> SourceShard:
    return next(itertools.islice(source.shards(), j, None))


def _unpack_classes(tensors: dict[str, Tensor]) -> tuple[np.ndarray, list[list[int]]]:
    counts = tensors["class_counts"].numpy()
    ids = np.split(tensors["class_ids"].numpy(), np.cumsum(counts)[:-1]) if counts.size else []
    return tensors["rows"].numpy(), [c.tolist() for c in ids]


class _CaptionJob:
    """Ray job: the rows of one corpus shard whose caption mentions a class."""

    def __init__(self, corpus: list[str], phrases: list[list[str]]) -> None:
        self.corpus, self.phrases = corpus, phrases

    def setup(self, device: str) -> None:
        self.sources = [open_source(c) for c in self.corpus]
        self.matcher = CaptionMatcher(self.phrases)

    def __call__(self, where: tuple[int, int, int]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        rows, classes, captioned = _match_shard(
            _nth_shard(self.sources[where[0]], where[1]), self.matcher
        )
        flat = [c for cs in classes for c in cs]
        tensors = {
            "rows": torch.from_numpy(rows),
            "class_ids": torch.tensor(flat, dtype=torch.int32),
            "class_counts": torch.tensor([len(cs) for cs in classes], dtype=torch.int64),
        }
        return tensors, {"captioned": captioned}


class _KnnJob:
    """Ray job: the exact top-k rows of one corpus shard for every query."""

    def __init__(self, corpus: list[str], queries: np.ndarray, k: int) -> None:
        self.corpus, self.queries, self.k = corpus, queries, k

    def setup(self, device: str) -> None:
        self.sources = [open_source(c) for c in self.corpus]

    def __call__(self, where: tuple[int, int, int]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        shard = _nth_shard(self.sources[where[0]], where[1])
        start = where[2]
        blocks = (
            (start + s, shard.embeddings[s : s + BLOCK_ROWS])
            for s in range(0, shard.rows, BLOCK_ROWS)
        )
        dist, ids = exact_search(blocks, shard.rows, self.queries, self.k)
        return {"dist": torch.from_numpy(dist), "ids": torch.from_numpy(ids)}, {}


def _merge_topk(
    d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest of two top-k lists [Q, k1], [Q, k2]: nearest first, ties to the lower id."""
    d, i = np.concatenate([d1, d2], 1), np.concatenate([i1, i2], 1)
    order = np.lexsort((i, d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
