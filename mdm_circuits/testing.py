"""Reference builders that tests and experiments share: tiny random Hugging Face models made in-process
and saved as real checkpoints, their PyTorch outputs, and random Flax models and examples.

Needs the test extra (`pip install -e '.[test]'`: torch and transformers); the library never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mdm_circuits.model.transformer import Transformer, assemble
from mdm_circuits.tasks.batch import Example

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, rope_theta=5_000.0, rms_norm_eps=1e-6, max_position_embeddings=64)
FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def tiny_torch_model(family: str, n_kv_heads: int, *, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random Qwen2 or Llama model with every weight (norms and biases included) drawn at random, so
    that a wrong layout or a skipped parameter changes the logits."""
    config_class, model_class = FAMILIES[family]
    config = config_class(**(TINY | dict(num_key_value_heads=n_kv_heads) | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.08 * torch.randn_like(parameter))
    return model


def save_hf(model: torch.nn.Module, directory: Path, **config_changes) -> Path:
    """Save as a Hugging Face checkpoint directory, optionally editing config.json afterwards."""
    model.save_pretrained(directory)
    if config_changes:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text()) | config_changes
        config_path.write_text(json.dumps({k: v for k, v in config.items() if v is not _DELETE}))
    return directory


_DELETE = object()
DELETE = _DELETE  # value for `save_hf(..., field=DELETE)` to remove a config field


def torch_logits(model: torch.nn.Module, tokens: np.ndarray, valid: np.ndarray | None = None,
                 bidirectional: bool = False, positions: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and hidden states (as float32) of the torch model for a batch, with `config.is_causal` set
    as asked."""
    model.config.is_causal = not bidirectional
    try:
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(tokens),
                        attention_mask=None if valid is None else torch.as_tensor(valid.astype(np.int64)),
                        position_ids=None if positions is None else torch.as_tensor(positions),
                        output_hidden_states=True)
    finally:
        model.config.is_causal = True
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def random_model(config, seed: int = 0, scale: float = 0.35, dtype=jnp.float32):
    """A `Transformer` whose weights are large enough for the model to be far from linear (the default
    initialisation, std 0.02, makes every attribution method look exact). Norm weights are drawn around 1.

    Keys are drawn layer by layer, then for the other parameters, so a seed gives the same weights as it did
    when the layers were stored one by one."""
    model = Transformer(config, rngs=nnx.Rngs(seed), dtype=dtype)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    block_paths = sorted(path for path in flat if path[0] == "blocks")
    other_paths = sorted(path for path in flat if path[0] != "blocks")
    keys = iter(jax.random.split(jax.random.key(seed + 1), config.n_layers * len(block_paths) + len(other_paths)))

    def draw(path, shape):
        key = next(keys)
        if path[-1] == "scale":  # norm weights
            return (1 + 0.2 * jax.random.normal(key, shape)).astype(dtype)
        return (scale * jax.random.normal(key, shape)).astype(dtype)

    layers = [{path: draw(path, flat[path].shape[1:]) for path in block_paths} for _ in range(config.n_layers)]
    drawn = {path: jnp.stack([layer[path] for layer in layers]) for path in block_paths}
    drawn |= {path: draw(path, flat[path].shape) for path in other_paths}
    return assemble(config, traverse_util.unflatten_dict(drawn))


def random_examples(config, n: int, seed: int = 0, min_length: int = 5, max_length: int = 9,
                    changed: int = 2):
    """Clean/corrupted pairs of random tokens differing at `changed` positions, answered at their end."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(min_length, max_length + 1))
        clean = rng.integers(0, config.vocab_size, length)
        corrupted = clean.copy()
        for position in rng.choice(length, changed, replace=False):
            corrupted[position] = (clean[position] + rng.integers(1, config.vocab_size)) % config.vocab_size
        correct, incorrect = rng.choice(config.vocab_size, 2, replace=False)
        examples.append(Example(clean.tolist(), corrupted.tolist(), [length], [[int(correct)]], [[int(incorrect)]]))
    return examples
