"""``ratta db``: info, import, build, select, index, audit (a thin layer over ``ratta.db``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ratta.cli.options import (
    backbone_args,
    backbone_spec,
    backend_args,
    bars,
    command,
    command_group,
    decode_workers,
    model_device,
    ray_backend,
    workers_arg,
)
from ratta.cli.report import print_encoding_report, print_shards
from ratta.errors import RattaInputError
from ratta.resources import keep_freed_memory

if TYPE_CHECKING:
    import numpy as np


def _index_args(
    p: argparse.ArgumentParser, default: str | None = "exact", required: bool = False
) -> None:
    g = p.add_argument_group("search index")
    g.add_argument(
        "--index",
        default=default,
        required=required,
        help="'exact' (scan every row, the paper's search) or a FAISS factory string: "
        "IVF4096,Flat, IVF4096,SQ8, HNSW32, IVF4096,PQ64 ... (%(default)s)",
    )
    g.add_argument(
        "--search-params",
        default=None,
        help="FAISS search parameters (nprobe=32, efSearch=128); default: tuned to --target-recall",
    )
    g.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@20 to tune for (%(default)s)"
    )
    g.add_argument(
        "--eval-queries", type=int, default=1000, help="queries measuring recall (%(default)s)"
    )
    g.add_argument(
        "--train-rows", type=int, default=1 << 18, help="rows sampled for training (%(default)s)"
    )
    g.add_argument(
        "--queries",
        default=None,
        help="text .safetensors whose 'desc' rows are the recall queries "
        "(default: random vectors near database rows)",
    )


def _index_settings(args: argparse.Namespace, spec: str | None = None) -> Any:
    from ratta.db.index import IndexSettings

    spec = spec if spec is not None else args.index
    if spec is None:
        return None
    return IndexSettings(
        spec=spec,
        search_params=args.search_params,
        target_recall=args.target_recall,
        eval_queries=args.eval_queries,
        train_rows=args.train_rows,
    )


def _recall_queries(args: argparse.Namespace) -> np.ndarray | None:
    if not args.queries:
        return None
    from ratta.files import load_text

    return load_text(args.queries).desc.float().numpy()


def _backbone_label(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.model and not args.pretrained:
        return None
    return {"model": args.model, "pretrained": args.pretrained, "recorded_from": "arguments"}


def _print_written(manifest: Any, out: str) -> None:
    print(f"wrote {out}: {manifest.count:,} rows x {manifest.dimension} {manifest.dtype}")
    print(format_index(manifest.index))


_MEASURED = ("recall_at_20", "top1_agreement", "eval_queries", "ms_per_query")
_MEASURED += ("exact_ms_per_query", "build_s")


def format_index(index: dict[str, Any]) -> str:
    if index.get("spec", "exact") == "exact":
        return "index: exact (every row scanned at search time)"
    params = f" {index['search_params']}" if index.get("search_params") else ""
    if not all(isinstance(index.get(k), int | float) for k in _MEASURED):
        return f"index: {index['spec']}{params}: no recall measurements in the manifest"
    return (
        f"index: {index['spec']}{params}: recall@20 {index['recall_at_20']:.4f}, top-1 "
        f"agreement {index['top1_agreement']:.4f} on {index['eval_queries']} queries "
        f"({index.get('query_source', '?')}); {index['ms_per_query']:.3f} ms/query vs exact "
        f"{index['exact_ms_per_query']:.3f}; built in {index['build_s']:.1f} s"
        + (" on GPU" if index.get("gpu") else "")
    )


# ------------------------------------------------------------------------------ info


def format_backbone(backbone: dict[str, Any] | None) -> str:
    if not backbone:
        return "unknown"
    weights = backbone.get("pretrained") or (
        f"checkpoint sha256 {backbone['checkpoint_sha256'][:12]}"
        if backbone.get("checkpoint_sha256")
        else "?"
    )
    extra = f", {backbone['precision']}" if backbone.get("precision") else ""
    return f"{backbone.get('model', '?')} ({weights}{extra})"


def format_info(path: str, manifest: Any) -> str:
    m = manifest
    norm = m.normalisation
    lines = [
        f"database   {path}",
        f"rows       {m.count:,} x {m.dimension} {m.dtype} (L2-normalised; "
        f"{norm.get('renormalised_rows', 0):,} rows re-normalised when written)",
        f"shards     {len(m.shards)}: "
        + ", ".join(f"{s.file} ({s.rows:,})" for s in m.shards[:4])
        + (", ..." if len(m.shards) > 4 else ""),
        "metadata   "
        + (f"{m.metadata['file']} ({', '.join(m.metadata['columns'])})" if m.metadata else "none"),
        f"backbone   {format_backbone(m.backbone)}",
        format_index(m.index).replace("index: ", "index      ", 1),
    ]
    prov = m.provenance
    commit = prov.get("ratta_commit")
    lines.append(
        f"provenance {prov.get('operation', '?')} (ratta {prov.get('ratta_version', '?')}"
        + (f", git {commit[:7]})" if commit else ")")
    )
    for src in prov.get("sources", []):
        hashed = "hashed" if any(k.endswith("sha256") for k in src) else "not hashed"
        size = src.get("rows", src.get("images", "?"))
        size = f"{size:,}" if isinstance(size, int) else size
        lines.append(f"  source   {src.get('path')} ({src.get('format', '?')}, {size}, {hashed})")
    sel = prov.get("selection")
    if sel:
        counts = sel.get("counts", {})
        lines.append(
            f"  select   by {sel['by']}: {sel['rows_selected']:,} of {sel['rows_scanned']:,} rows "
            f"for {len(counts)} classes; duplicates dropped {sel.get('duplicates_dropped')}"
        )
        lines.append(f"  rule     {sel['rule']}")
        if counts:
            low = sorted(counts.items(), key=lambda kv: kv[1])[:3]
            lines.append("  fewest   " + ", ".join(f"{name}: {n:,}" for name, n in low))
    if prov.get("operation") == "build":
        lines.append(
            f"  images   {prov.get('images', 0):,} listed, {prov.get('encoded', 0):,} encoded, "
            f"{prov.get('skipped', 0):,} skipped"
        )
    audit = prov.get("audit")
    if audit:
        lines.append(
            f"  audit    threshold {audit['threshold']}: removed {audit['flagged_rows']:,} rows "
            f"near {audit['flagged_images']:,} test images of {audit.get('features')}"
        )
    return "\n".join(lines)


def _run_info(args: argparse.Namespace) -> int:
    from ratta.db.store import Database

    db = Database(args.dir)
    if args.json:
        print(json.dumps(db.manifest.to_dict(), indent=2))
    else:
        print(format_info(args.dir, db.manifest))
    if args.verify:
        bad = db.verify()
        for line in bad:
            print(f"MISMATCH {line}")
        print("hashes: " + ("all match" if not bad else f"{len(bad)} mismatched"))
        return 1 if bad else 0
    return 0


# ------------------------------------------------------------------------------ import


def _run_import(args: argparse.Namespace) -> int:
    from ratta.db.importers import import_database

    manifest = import_database(
        args.sources,
        args.out,
        key=args.key,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        backbone=_backbone_label(args),
        index=_index_settings(args),
        queries=_recall_queries(args),
        progress=bars(args, "db import"),
    )
    _print_written(manifest, args.out)
    return 0


# ------------------------------------------------------------------------------ build


def _run_build(args: argparse.Namespace) -> int:
    from ratta.backbones import load_backbone
    from ratta.db.build import build_database

    backend = ray_backend(args, local_workers=True)
    keep_freed_memory()
    backbone = load_backbone(backbone_spec(args), model_device(args, backend))
    manifest, summary = build_database(
        args.images,
        backbone,
        args.out,
        dtype=args.dtype,
        batch_size=args.batch_size,
        forward_batch=args.forward_batch,
        workers=decode_workers(args, backend),
        chunk_size=args.chunk_size,
        shard_rows=args.shard_rows,
        index=_index_settings(args),
        progress=bars(args, "db build"),
        backend=backend,
    )
    print(
        f"{summary['images']:,} images encoded, "
        f"{summary['skipped']:,} skipped (corrupt or unreadable)"
    )
    print_encoding_report(summary, "the first 20 are kept in the manifest's provenance")
    _print_written(manifest, args.out)
    return 0


# ------------------------------------------------------------------------------ select


def _class_names(args: argparse.Namespace) -> list[str]:
    if args.classes:
        p = Path(args.classes)
        if not p.is_file():
            raise RattaInputError(f"--classes {p}: file not found")
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not names:
            raise RattaInputError(f"--classes {p}: no class names (one per line)")
        return names
    if args.dataset:
        if not args.data_root:
            raise RattaInputError(f"--dataset {args.dataset} needs --data-root for its class names")
        from ratta.datasets import class_names

        return class_names(args.dataset, args.data_root)
    if args.text:
        from ratta.files import load_text

        return load_text(args.text).class_names
    raise RattaInputError("give the classes: --classes FILE, --dataset D --data-root R or --text T")


def _run_select(args: argparse.Namespace) -> int:
    from ratta.db.select import read_synonyms, select_by_caption, select_by_knn

    backend = ray_backend(args)
    names = _class_names(args)
    index = _index_settings(args)
    if args.by == "caption":
        synonyms = read_synonyms(args.synonyms, names) if args.synonyms else None
        manifest = select_by_caption(
            args.corpus,
            names,
            args.out,
            synonyms=synonyms,
            index=index,
            progress=bars(args, "db select"),
            backend=backend,
        )
    else:
        if not args.text:
            raise RattaInputError("--by knn needs --text (the query vectors)")
        import numpy as np

        from ratta.files import load_text

        text = load_text(args.text)
        if len(text.class_names) != len(names) or text.class_names != names:
            raise RattaInputError(
                f"--text {args.text}: its class names differ from the selected classes"
            )
        if args.queries_from == "classifier":
            queries, owner = text.classifier, np.arange(text.num_classes)
        else:
            queries, owner = text.desc, text.desc_class.numpy()
        manifest = select_by_knn(
            args.corpus,
            queries.float().numpy(),
            owner,
            names,
            args.out,
            k=args.k,
            query_kind=args.queries_from,
            index=index,
            progress=bars(args, "db select"),
            backend=backend,
        )
    sel = manifest.provenance["selection"]
    print(
        f"selected {sel['rows_selected']:,} of {sel['rows_scanned']:,} rows for "
        f"{len(names)} classes (duplicates dropped: {sel['duplicates_dropped']})"
    )
    print_shards(manifest.provenance)
    low = sorted(sel["counts"].items(), key=lambda kv: kv[1])
    empty = [n for n, c in low if c == 0]
    if empty:
        print(f"{len(empty)} classes got no rows: {', '.join(empty[:10])}")
    _print_written(manifest, args.out)
    return 0


# ------------------------------------------------------------------------------ index


def _run_index(args: argparse.Namespace) -> int:
    from ratta.db.index import reindex

    section = reindex(
        args.db,
        _index_settings(args),
        queries=_recall_queries(args),
        progress=bars(args, "db index"),
    )
    for row in section.get("tuning", []):
        print(
            f"  {row['search_params']:<16} recall@20 {row['recall_at_20']:.4f}  top-1 "
            f"{row['top1_agreement']:.4f}  {row['ms_per_query']:.3f} ms/query"
        )
    print(format_index(section))
    return 0


# ------------------------------------------------------------------------------ audit


def format_audit(report: Any, every_class: bool = False) -> str:
    """The audit's counts, then a row per class with findings (``every_class``: all)."""
    lines = [
        f"{report.images:,} test images x {report.rows:,} database rows, cosine >= "
        f"{report.threshold}: {report.flagged_images.size:,} images have near-duplicates, "
        f"{report.flagged_rows.size:,} rows flagged",
    ]
    shown = [c for c in report.per_class if every_class or c["images_with_duplicates"]]
    if shown:
        lines.append(f"{'class':<32}{'images':>8}{'with dup':>10}{'rows':>8}")
    for c in shown:
        lines.append(
            f"{c['name'][:31]:<32}{c['test_images']:>8}{c['images_with_duplicates']:>10}"
            f"{c['flagged_rows']:>8}"
        )
    hidden = len(report.per_class) - len(shown)
    if hidden:
        these = "class" if hidden == 1 else "classes"
        lines.append(
            f"{hidden:,} {these} without near-duplicates not listed "
            f"(--all lists {'it' if hidden == 1 else 'them'})"
        )
    return "\n".join(lines)


def _run_audit(args: argparse.Namespace) -> int:
    from ratta.db.audit import audit

    report, manifest = audit(
        args.db,
        args.features,
        args.threshold,
        text=args.text,
        report=args.report,
        clean=args.write_clean,
        index=_index_settings(args),
        progress=bars(args, "db audit"),
    )
    print(format_audit(report, args.all))
    if args.report:
        print(f"wrote {args.report}")
    if manifest is not None:
        print(f"clean copy without the {report.flagged_rows.size:,} flagged rows:")
        _print_written(manifest, args.write_clean)
    return 0


# ------------------------------------------------------------------------------ parser


def register(sub: argparse._SubParsersAction) -> None:
    commands = command_group(
        sub,
        "db",
        help="image databases: import, build, select, index, audit, info",
        description="Image-embedding databases for retrieval (format: docs/db.md).",
    )

    c = command(commands, "info", _run_info, help="print a database's manifest summary")
    c.add_argument("dir", help="database directory")
    c.add_argument("--json", action="store_true", help="print the whole manifest")
    c.add_argument(
        "--verify", action="store_true", help="check every file's sha256 (exit 1 if not)"
    )

    c = command(
        commands,
        "import",
        _run_import,
        help="import embeddings: reference pickles, .npy, .safetensors, clip-retrieval folders",
        description="Import embeddings into a database directory (pickles are read without "
        "running code: only numpy arrays and plain containers are admitted).",
    )
    c.add_argument("sources", nargs="+", help="files or folders, concatenated in order")
    c.add_argument("--out", required=True, help="new database directory")
    c.add_argument("--key", default=None, help="pickle dict / safetensors key (default: embedding)")
    c.add_argument(
        "--dtype",
        default=None,
        choices=("float16", "float32"),
        help="stored dtype (default: the sources')",
    )
    c.add_argument(
        "--shard-rows", type=int, default=1 << 20, help="rows per .npy shard (%(default)s)"
    )
    c.add_argument("--model", default=None, help="record the encoder's architecture")
    c.add_argument("--pretrained", default=None, help="record the encoder's weights")
    _index_args(c)
    c.add_argument("--quiet", action="store_true")

    c = command(
        commands,
        "build",
        _run_build,
        help="encode images (folders, webdataset tars) into a database",
        description="Encode the center crop of every image, as for test images; resumable.",
    )
    c.add_argument(
        "--images", nargs="+", required=True, help="image folders or uncompressed .tar shards"
    )
    c.add_argument("--out", required=True, help="new database directory")
    backbone_args(c)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    c.add_argument("--batch-size", type=int, default=64, help="images per DataLoader batch")
    c.add_argument("--forward-batch", type=int, default=256, help="images per model forward")
    workers_arg(c, "decoding workers")
    c.add_argument(
        "--chunk-size", type=int, default=4096, help="images per resumable chunk (a Ray shard)"
    )
    c.add_argument("--shard-rows", type=int, default=1 << 20, help="rows per .npy shard")
    _index_args(c)
    c.add_argument("--quiet", action="store_true")
    backend_args(c)

    c = command(
        commands,
        "select",
        _run_select,
        help="the subset of a corpus for a dataset's classes (by caption or knn)",
        description="Select corpus rows for a set of classes, streaming shard by shard.",
    )
    c.add_argument("--corpus", nargs="+", required=True, help="database or clip-retrieval folders")
    c.add_argument("--classes", default=None, help="file with one class name per line")
    c.add_argument("--dataset", default=None, help="take the class names of this dataset")
    c.add_argument("--data-root", default=None, help="data root for --dataset")
    c.add_argument("--text", default=None, help="text .safetensors: class names, knn queries")
    c.add_argument("--by", required=True, choices=("caption", "knn"))
    c.add_argument("--synonyms", default=None, help="caption: JSON {class name: [synonym, ...]}")
    c.add_argument("--k", type=int, default=256, help="knn: rows per query (%(default)s)")
    c.add_argument(
        "--queries-from",
        default="classifier",
        choices=("classifier", "desc"),
        help="knn: one query per class (classifier) or per description row (%(default)s)",
    )
    c.add_argument("--out", required=True, help="new database directory")
    _index_args(c)
    c.add_argument("--quiet", action="store_true")
    backend_args(c, workers=True)

    c = command(
        commands,
        "index",
        _run_index,
        help="(re)build a database's search index and measure its recall",
        description="Replace the index of a database directory ('exact' removes it).",
    )
    c.add_argument("--db", required=True, help="database directory")
    _index_args(c, default=None, required=True)
    c.add_argument("--quiet", action="store_true")

    c = command(
        commands,
        "audit",
        _run_audit,
        help="find test images that are (near-)duplicated in a database",
        description="Cosine similarity of every test image's center crop with every database "
        "row; pairs at or above --threshold are reported per class.",
    )
    c.add_argument("--db", required=True, help="database directory (or any importable source)")
    c.add_argument("--features", required=True, help="features .safetensors of the test split")
    c.add_argument("--threshold", type=float, default=0.95, help="cosine threshold (%(default)s)")
    c.add_argument("--text", default=None, help="text .safetensors naming the classes")
    c.add_argument("--report", default=None, help="write the report (pairs, per class) as JSON")
    c.add_argument("--write-clean", default=None, help="new database without the flagged rows")
    c.add_argument(
        "--all", action="store_true", help="list every class, not only those with findings"
    )
    _index_args(c, default=None)
    c.add_argument("--quiet", action="store_true")
