"""Image databases: the directory format, import, build, selection, indexes, leakage audit.

The stage "corpus -> database" of the pipeline. A database is a directory (see
:mod:`ratta.db.store`) or, as before, a single ``.npy`` array; ``ratta adapt`` reads both
through :func:`load_for_search`. Modules, one per step:

- ``store``: the format, the manifest, opening and loading for search;
- ``writer``: writing a directory atomically, shard by shard;
- ``sources``: reading any embedding source shard by shard (``safe_pickle`` for pickles);
- ``importers``, ``build``, ``select``, ``index``, ``audit``: the steps of ``ratta db``
  (its command line is :mod:`ratta.cli.db`).

Only ``store`` is imported here, on first use, so ``ratta adapt`` pays for neither pyarrow
nor FAISS unless it needs them.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ratta.db.store import (
        Database,
        DatabaseInfo,
        Manifest,
        inspect_database,
        is_database_dir,
        load_for_search,
    )

__all__ = [
    "Database",
    "DatabaseInfo",
    "Manifest",
    "inspect_database",
    "is_database_dir",
    "load_for_search",
]


def __getattr__(name: str) -> Any:
    """The exports load from ``store`` on first use: ``ratta db --help`` imports no torch."""
    if name in __all__:
        from ratta.db import store

        return getattr(store, name)
    raise AttributeError(f"module 'ratta.db' has no attribute {name!r}")
