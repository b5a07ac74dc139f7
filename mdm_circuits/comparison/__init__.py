"""The main job: an ARM and the MDM post-trained from it (and controls), compared on every task by the
circuits EAP-IG finds, with nulls, bootstrap intervals, semantics, causal checks and a report
(`mdm-circuits compare`)."""

from mdm_circuits.comparison.run import compare
from mdm_circuits.comparison.settings import Settings

__all__ = ["Settings", "compare"]
