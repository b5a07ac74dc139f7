"""Circuits on the EAP-IG graph: the graph, interventions as data, attribution (EAP, EAP-IG, exact
patching), node patching, and circuit selection and evaluation."""

from mdm_circuits.circuits.evaluation import Curve, Evaluation, evaluate, faithfulness_curve, smallest_faithful
from mdm_circuits.circuits.selection import greedy, prune, top_k
from mdm_circuits.errors import CircuitError

__all__ = ["CircuitError", "Curve", "Evaluation", "evaluate", "faithfulness_curve", "greedy", "prune",
           "smallest_faithful", "top_k"]
