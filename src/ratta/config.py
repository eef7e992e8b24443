"""The RA-TTA hyperparameters, with the reference code's defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ratta.errors import RattaInputError


@dataclass(frozen=True)
class RATTAConfig:
    """Hyperparameters of RA-TTA (paper and reference-code defaults).

    Attributes:
        k_d: K_D, number of top-scoring descriptions kept per test image.
        k_s: K_S, number of database images retrieved per candidate set.
        quantile: q, quantile of the description scores over the V+1 test embeddings
            (0.75 by default; the ImageNet family uses 0.90).
        min_desc: a class survives only if it owns at least this many of the K_D descriptions.
        ot_reg: entropic regularisation of Sinkhorn.
        ot_max_iter: Sinkhorn iteration cap.
        ot_stop_thr: Sinkhorn stop threshold on the marginal error (checked every 10 iterations).
        entropy_eps: epsilon inside the log of the retrieval-prediction entropy.
    """

    k_d: int = 20
    k_s: int = 20
    quantile: float = 0.75
    min_desc: int = 5
    ot_reg: float = 0.1
    ot_max_iter: int = 100
    ot_stop_thr: float = 1e-2
    entropy_eps: float = 1e-7

    def __post_init__(self) -> None:
        checks = {
            "k_d": self.k_d >= 1,
            "k_s": self.k_s >= 1,
            "quantile": 0.0 <= self.quantile <= 1.0,
            "min_desc": self.min_desc >= 1,
            "ot_reg": self.ot_reg > 0,
            "ot_max_iter": self.ot_max_iter >= 1,
            "ot_stop_thr": self.ot_stop_thr >= 0,
            "entropy_eps": self.entropy_eps > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise RattaInputError(
                    f"config: invalid {name}={getattr(self, name)!r} "
                    "(k_d, k_s, min_desc >= 1; 0 <= quantile <= 1; ot_reg > 0)"
                )

    @property
    def max_candidates(self) -> int:
        """Most classes that can survive: floor(K_D / min_desc)."""
        return self.k_d // self.min_desc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
