"""The test splits: the paper's 17 datasets (CoOp layout) and users' own ``folder``/``csv`` data.

``load_split(name, root)`` gives a :class:`Split` (image paths, labels, class names);
``check(root)`` reports which datasets are under a data root. Layouts: docs/datasets.md.
"""

from ratta.datasets.check import CheckResult, check
from ratta.datasets.registry import DATASETS, DatasetInfo
from ratta.datasets.split import Split, class_names, load_split

__all__ = [
    "DATASETS",
    "CheckResult",
    "DatasetInfo",
    "Split",
    "check",
    "class_names",
    "load_split",
]
