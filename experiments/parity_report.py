"""Print the largest logit and hidden-state differences against transformers, per family and setting.

    python experiments/parity_report.py

Uses the same tiny random models as tests/test_parity.py (float32, 3 layers, d_model 64, 4 heads).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from conversion import convert
from mdm_circuits.model.transformer import activations, forward, with_config
from mdm_circuits.testing import save_hf, tiny_torch_model, torch_logits


def main() -> None:
    tokens = np.random.default_rng(1).integers(0, 96, size=(3, 12))
    valid = np.ones_like(tokens, dtype=bool)
    valid[1, :4] = valid[2, -2:] = False  # one left-padded and one right-padded row
    print(f"{'family':8} {'kv heads':>8} {'attention':>13} {'padding':>8} {'max |logit diff|':>17} "
          f"{'max |hidden diff|':>18}")
    for family in ("qwen2", "llama"):
        for n_kv_heads in (2, 4):
            torch_model = tiny_torch_model(family, n_kv_heads)
            with tempfile.TemporaryDirectory() as directory:
                model = convert(save_hf(torch_model, Path(directory))).model
            for attention in ("causal", "bidirectional"):
                variant = with_config(model, model.config.replace(attention=attention))
                graphdef, state = nnx.split(variant)
                for padded in (False, True):
                    mask = valid if padded else np.ones_like(valid)
                    want_logits, want_hidden = torch_logits(torch_model, tokens, mask, attention == "bidirectional")
                    logits = jax.vmap(forward, in_axes=(None, None, 0, 0))(graphdef, state, tokens, mask)
                    stream = jax.vmap(activations, in_axes=(None, None, 0, 0))(graphdef, state, tokens, mask).residual
                    hidden_error = max(np.abs(np.asarray(stream[:, layer]) - want_hidden[layer])[mask].max()
                                       for layer in range(variant.config.n_layers))
                    logit_error = np.abs(np.asarray(logits) - want_logits)[mask].max()
                    print(f"{family:8} {n_kv_heads:>8} {attention:>13} {'ragged' if padded else 'none':>8} "
                          f"{logit_error:>17.2e} {hidden_error:>18.2e}")


if __name__ == "__main__":
    main()
