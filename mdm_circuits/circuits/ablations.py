"""What an ablated node outputs instead: the corrupted run's output, zero, a dataset mean (over examples and
positions, or per position), or another example's clean output."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float

from mdm_circuits.errors import InterventionError

AblationKind = Literal["corrupted", "zero", "mean", "mean_positional", "resample"]


@struct.dataclass
class Ablation:
    """How ablated nodes are replaced.

    kind: "corrupted" (the corrupted run, i.e. patching; the default), "zero", "mean" (each node's mean
      output over the examples and real positions of `fit`), "mean_positional" (its mean at each position),
      or "resample" (the clean output of another example of the dataset: example i takes example
      (i − s) mod n's, s = 1 + seed mod (n − 1), so never its own).
    """

    kind: AblationKind = struct.field(pytree_node=False, default="corrupted")
    seed: int = struct.field(pytree_node=False, default=0)
    mean: Float[Array, "N T D"] | None = None

    def needs_fit(self) -> bool:
        return self.kind in ("mean", "mean_positional") and self.mean is None

    def fit(self, sums: Float[Array, "N T D"], counts: Float[Array, " T"]) -> Ablation:
        """Fix the means from per-position sums of clean node outputs over a dataset and their counts."""
        if self.kind == "mean":
            mean = sums.sum(1, keepdims=True) / jnp.maximum(counts.sum(), 1).astype(sums.dtype)
            mean = jnp.broadcast_to(mean, sums.shape)
        else:
            mean = sums / jnp.maximum(counts, 1).astype(sums.dtype)[None, :, None]
        return self.replace(mean=mean)

    def partners(self, n: int) -> np.ndarray | None:
        """For "resample": the example each of the dataset's n examples takes its ablation from."""
        if self.kind != "resample":
            return None
        if n < 2:
            raise InterventionError("resample ablation needs at least two examples")
        return (np.arange(n) - (1 + self.seed % (n - 1))) % n

    def sources(self, clean: Float[Array, "B N T D"], corrupted: Float[Array, "B N T D"],
                partner: Float[Array, "B N T D"] | None = None) -> Float[Array, "B N T D"]:
        """The ablation value of every node for every example; `partner` holds the clean outputs of each
        example's resampling partner (for "resample")."""
        match self.kind:
            case "corrupted":
                return corrupted
            case "zero":
                return jnp.zeros_like(clean)
            case "mean" | "mean_positional":
                if self.mean is None:
                    raise InterventionError(f"{self.kind} ablation needs its means; call fit (attribute does)")
                length = clean.shape[2]
                if self.mean.shape[1] < length:
                    raise InterventionError(f"means were fitted on {self.mean.shape[1]} positions, the batch has "
                                            f"{length}")
                return jnp.broadcast_to(self.mean[None, :, :length].astype(clean.dtype), clean.shape)
            case "resample":
                if partner is None:
                    raise InterventionError("resample ablation needs the partners' clean outputs")
                return partner
        raise InterventionError(f"unknown ablation kind {self.kind!r}")
