"""Name tables: which checkpoint tensor fills which model parameter, per checkpoint family.

A family is only a set of names. The roles (`w_q`, `w_gate`, ...) and their relayouts are the same for
every family, so one builder turns any family's names into the full list of entries for a configuration.
"""

from __future__ import annotations

import dataclasses
import re

from conversion import transforms
from conversion.transforms import Transform
from mdm_circuits.model.config import ModelConfig

ParameterPath = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor, the parameter it fills, and the relayout between them."""

    source: str
    target: ParameterPath
    transform: Transform


@dataclasses.dataclass(frozen=True)
class FamilyNames:
    """Checkpoint names of one family. Layer names contain `{layer}`; `ignored` are regexes of keys
    that are present in real checkpoints but carry nothing the model needs."""

    embedding: str
    final_norm: str
    unembedding: str
    layer: dict[str, str]
    ignored: tuple[str, ...] = ()
    rope_permuted: bool = False

    def entries(self, config: ModelConfig) -> list[Entry]:
        entries = [
            Entry(self.embedding, ("embedding",), transforms.identity),
            Entry(self.final_norm, ("final_norm", "scale"), transforms.identity),
        ]
        if not config.tie_embeddings:
            entries.append(Entry(self.unembedding, ("unembedding",), transforms.transpose))
        roles = _layer_roles(config, self.rope_permuted)
        for layer in range(config.n_layers):
            for role, (target, transform) in roles.items():
                entries.append(Entry(self.layer[role].format(layer=layer), ("blocks", layer, *target), transform))
        return entries

    def ignored_patterns(self, config: ModelConfig) -> list[re.Pattern]:
        patterns = [re.compile(pattern) for pattern in self.ignored]
        if config.tie_embeddings:
            # Some tied checkpoints store the (identical) output matrix anyway.
            patterns.append(re.compile(re.escape(self.unembedding)))
        return patterns


def _layer_roles(config: ModelConfig, rope_permuted: bool) -> dict[str, tuple[ParameterPath, Transform]]:
    h, k = config.n_heads, config.n_kv_heads
    query, key = transforms.split_output_heads(h), transforms.split_output_heads(k)
    query_bias, key_bias = transforms.split_bias_heads(h), transforms.split_bias_heads(k)
    if rope_permuted:
        query, query_bias = (transforms.undo_gguf_rope_permutation(h).then(t) for t in (query, query_bias))
        key, key_bias = (transforms.undo_gguf_rope_permutation(k).then(t) for t in (key, key_bias))
    roles = {
        "attn_norm": (("attn_norm", "scale"), transforms.identity),
        "w_q": (("attn", "w_q"), query),
        "w_k": (("attn", "w_k"), key),
        "w_v": (("attn", "w_v"), transforms.split_output_heads(k)),
        "w_o": (("attn", "w_o"), transforms.split_input_heads(h)),
        "mlp_norm": (("mlp_norm", "scale"), transforms.identity),
        "w_gate": (("mlp", "w_gate"), transforms.transpose),
        "w_up": (("mlp", "w_up"), transforms.transpose),
        "w_down": (("mlp", "w_down"), transforms.transpose),
    }
    if config.qkv_bias:
        roles |= {
            "b_q": (("attn", "b_q"), query_bias),
            "b_k": (("attn", "b_k"), key_bias),
            "b_v": (("attn", "b_v"), transforms.split_bias_heads(k)),
        }
    return roles


# Qwen2, Dream, Llama and DiffuLLaMA checkpoints (transformers' `*ForCausalLM` layout).
HUGGING_FACE = FamilyNames(
    embedding="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    unembedding="lm_head.weight",
    layer={
        "attn_norm": "model.layers.{layer}.input_layernorm.weight",
        "w_q": "model.layers.{layer}.self_attn.q_proj.weight",
        "w_k": "model.layers.{layer}.self_attn.k_proj.weight",
        "w_v": "model.layers.{layer}.self_attn.v_proj.weight",
        "w_o": "model.layers.{layer}.self_attn.o_proj.weight",
        "b_q": "model.layers.{layer}.self_attn.q_proj.bias",
        "b_k": "model.layers.{layer}.self_attn.k_proj.bias",
        "b_v": "model.layers.{layer}.self_attn.v_proj.bias",
        "mlp_norm": "model.layers.{layer}.post_attention_layernorm.weight",
        "w_gate": "model.layers.{layer}.mlp.gate_proj.weight",
        "w_up": "model.layers.{layer}.mlp.up_proj.weight",
        "w_down": "model.layers.{layer}.mlp.down_proj.weight",
    },
    # Older transformers versions saved the (recomputable) rotary frequencies.
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

# LLaDA (OLMo-derived names; the MLP gate is `ff_proj`, the down projection `ff_out`).
LLADA = FamilyNames(
    embedding="model.transformer.wte.weight",
    final_norm="model.transformer.ln_f.weight",
    unembedding="model.transformer.ff_out.weight",
    layer={
        "attn_norm": "model.transformer.blocks.{layer}.attn_norm.weight",
        "w_q": "model.transformer.blocks.{layer}.q_proj.weight",
        "w_k": "model.transformer.blocks.{layer}.k_proj.weight",
        "w_v": "model.transformer.blocks.{layer}.v_proj.weight",
        "w_o": "model.transformer.blocks.{layer}.attn_out.weight",
        "b_q": "model.transformer.blocks.{layer}.q_proj.bias",
        "b_k": "model.transformer.blocks.{layer}.k_proj.bias",
        "b_v": "model.transformer.blocks.{layer}.v_proj.bias",
        "mlp_norm": "model.transformer.blocks.{layer}.ff_norm.weight",
        "w_gate": "model.transformer.blocks.{layer}.ff_proj.weight",
        "w_up": "model.transformer.blocks.{layer}.up_proj.weight",
        "w_down": "model.transformer.blocks.{layer}.ff_out.weight",
    },
)

_GGUF_LAYER = {
    "attn_norm": "blk.{layer}.attn_norm.weight",
    "w_q": "blk.{layer}.attn_q.weight",
    "w_k": "blk.{layer}.attn_k.weight",
    "w_v": "blk.{layer}.attn_v.weight",
    "w_o": "blk.{layer}.attn_output.weight",
    "b_q": "blk.{layer}.attn_q.bias",
    "b_k": "blk.{layer}.attn_k.bias",
    "b_v": "blk.{layer}.attn_v.bias",
    "mlp_norm": "blk.{layer}.ffn_norm.weight",
    "w_gate": "blk.{layer}.ffn_gate.weight",
    "w_up": "blk.{layer}.ffn_up.weight",
    "w_down": "blk.{layer}.ffn_down.weight",
}

# GGUF (llama.cpp) names. llama.cpp permutes Llama's q/k rows for its rotary kernel, not Qwen2's.
GGUF_LLAMA = FamilyNames(
    embedding="token_embd.weight", final_norm="output_norm.weight", unembedding="output.weight",
    layer=_GGUF_LAYER, rope_permuted=True)
GGUF_QWEN2 = dataclasses.replace(GGUF_LLAMA, rope_permuted=False)
