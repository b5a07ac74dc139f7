"""The comparison's measures, as pure functions of scores, graphs and models: `structure` (overlap,
importance, layers, specialisation, bootstrap and nulls), `semantics` (logit lens, neurons) and `causal`
(which components an ablation check zeroes)."""
