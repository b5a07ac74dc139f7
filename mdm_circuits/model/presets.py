"""Configurations of the released checkpoints the study uses, for planning without downloading weights.

Values follow each checkpoint's config.json (DESIGN.md section 3; tests/data/configs holds the configs they
are checked against); a converted checkpoint carries its own configuration, so these are only needed
before one is at hand.
"""

from __future__ import annotations

from types import MappingProxyType

from mdm_circuits.model.config import ModelConfig

_QWEN25_7B = ModelConfig(
    vocab_size=152_064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, d_mlp=18_944,
    rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True)
_LLAMA2_7B = ModelConfig(
    vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, d_mlp=11_008,
    rope_theta=10_000.0, norm_eps=1e-5)

PRESETS: MappingProxyType[str, ModelConfig] = MappingProxyType({
    "qwen2.5-7b": _QWEN25_7B,
    "dream-v0-base-7b": _QWEN25_7B.replace(attention="bidirectional", mask_token_id=151_666),
    "llama-2-7b": _LLAMA2_7B,
    "diffullama-7b": _LLAMA2_7B.replace(attention="bidirectional", mask_token_id=811),
    "llada-8b": ModelConfig(
        vocab_size=126_464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        d_mlp=12_288, rope_theta=500_000.0, rope_in_float32=True, norm_eps=1e-5, attention="bidirectional",
        logit_shift=False, mask_token_id=126_336),
    "smollm2-135m": ModelConfig(
        vocab_size=49_152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_mlp=1536,
        rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True),
})
