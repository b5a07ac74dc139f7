"""Hugging Face `config.json` to `ModelConfig`, per model_type, strictly.

Each field of config.json is read, checked against the one value this library implements, or listed as
metadata that cannot change the computation. Any other field is an error: a field we do not understand
may change the numbers, and a wrong number is worse than a refusal. A user who knows a field is harmless
passes it in `ignore_fields` (`--ignore-config-field` on the command line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from conversion import tables
from conversion.conventions import resolve_conventions
from conversion.errors import ConversionError
from conversion.tables import FamilyNames
from mdm_circuits.errors import ConfigError
from mdm_circuits.model.config import ModelConfig

_METADATA = frozenset({
    "_name_or_path", "name_or_path", "architectures", "auto_map", "model_type", "transformers_version",
    "dtype", "torch_dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id",
    "sep_token_id", "initializer_range", "attention_dropout", "max_position_embeddings", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention",
})
_MISSING = object()


class _Reader:
    """Reads fields of one config.json, remembering which were accounted for and what was wrong."""

    def __init__(self, raw: dict[str, Any], source: str, metadata: frozenset[str], ignore: tuple[str, ...]):
        self.raw, self.source = raw, source
        self.seen = set(metadata) | set(ignore)
        self.problems: list[str] = []

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.seen.add(key)
        value = self.raw.get(key, default)
        if value is _MISSING:
            self.problems.append(f"field {key!r} is missing")
        return value

    def require(self, key: str, accepted: Callable[[Any], bool], explanation: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is not _MISSING and not accepted(value):
            self.problems.append(f"field {key!r} = {value!r} is not supported ({explanation})")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        self.problems += [
            f"field {key!r} = {self.raw[key]!r} is not understood by mdm_circuits and might change the "
            f"computation; if it does not, ignore it with ignore_config_fields=[{key!r}] "
            f"(--ignore-config-field {key})" for key in unknown]
        if self.problems:
            raise ConversionError(f"cannot convert {self.source}", self.problems)


def _rope_theta(reader: _Reader) -> Any:
    """RoPE base from transformers v5 (`rope_parameters`) and/or v4 (`rope_theta`, `rope_scaling`)."""
    parameters = reader.get("rope_parameters", None)
    theta = reader.get("rope_theta", None)
    reader.require("rope_scaling", lambda value: value is None, "only plain RoPE is implemented")
    if parameters is None:
        return 10_000.0 if theta is None else theta
    if not isinstance(parameters, dict) or parameters.get("rope_type", "default") != "default" or (
            set(parameters) - {"rope_type", "rope_theta"}):
        reader.problems.append(
            f"field 'rope_parameters' = {parameters!r} is not supported (only plain RoPE is implemented)")
        return theta
    if theta is not None and parameters.get("rope_theta", theta) != theta:
        reader.problems.append(f"fields 'rope_theta' = {theta!r} and 'rope_parameters' = {parameters!r} disagree")
    return parameters.get("rope_theta", 10_000.0 if theta is None else theta)


def _decoder_shape(reader: _Reader) -> dict[str, Any]:
    """The fields shared by Qwen2, Dream and Llama configs."""
    reader.require("hidden_act", lambda value: value == "silu", "only SwiGLU with SiLU", "silu")
    d_model = reader.get("hidden_size")
    n_heads = reader.get("num_attention_heads")
    head_dim = reader.get("head_dim", None)
    if head_dim is None and isinstance(d_model, int) and isinstance(n_heads, int):
        head_dim = d_model // n_heads
    return dict(
        vocab_size=reader.get("vocab_size"),
        d_model=d_model,
        n_layers=reader.get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=reader.get("num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        d_mlp=reader.get("intermediate_size"),
        rope_theta=_rope_theta(reader),
        norm_eps=reader.get("rms_norm_eps", 1e-6),
        tie_embeddings=reader.get("tie_word_embeddings", False),
    )


def _qwen2_shape(reader: _Reader) -> dict[str, Any]:
    reader.seen |= {"sliding_window", "max_window_layers"}  # only read when sliding windows are on
    reader.require("use_sliding_window", lambda value: value is False, "full attention only", False)
    reader.require("use_mrope", lambda value: value is False, "text-only RoPE, not multimodal", False)
    reader.require("layer_types", lambda value: value is None or set(value) <= {"full_attention"},
                   "full attention in every layer only")
    return _decoder_shape(reader) | dict(qkv_bias=True)


def _llama_shape(reader: _Reader) -> dict[str, Any]:
    reader.seen.add("pretraining_tp")  # splits matmuls during pretraining only; same function
    reader.require("attention_bias", lambda value: value is False, "Llama without attention biases", False)
    reader.require("mlp_bias", lambda value: value is False, "MLP without biases", False)
    return _decoder_shape(reader) | dict(qkv_bias=False)


_LLADA_METADATA = frozenset({
    "max_sequence_length", "init_device", "init_fn", "init_std", "init_cutoff_factor", "embedding_dropout",
    "residual_dropout", "flash_attention", "precision", "block_group_size", "alibi_bias_max",
    "bias_for_layer_norm", "attention_layer_norm_with_affine", "mlp_ratio",
})


# LLaDA's OLMo-style switches, with the values this library implements (the first is the default).
_LLADA_FIXED = (
    ("block_type", ("llama",), "the LLaMA block"),
    ("activation_type", ("silu",), "SwiGLU with SiLU"),
    ("layer_norm_type", ("rms",), "RMSNorm"),
    ("rope", (True,), "rotary embeddings"),
    ("alibi", (False,), "no ALiBi"),
    ("include_bias", (False,), "no biases"),
    ("scale_logits", (False,), "unscaled logits"),
    ("input_emb_norm", (False,), "no embedding scaling"),
    ("attention_layer_norm", (False,), "no q/k norms"),
    ("layer_norm_with_affine", (True,), "norms with a weight"),
    ("clip_qkv", (None,), "no q/k/v clipping"),
    ("multi_query_attention", (None, False), "grouped heads through n_kv_heads"),
)


def _llada_shape(reader: _Reader) -> dict[str, Any]:
    for key, accepted, explanation in _LLADA_FIXED:
        reader.require(key, lambda value, accepted=accepted: value in accepted, explanation, accepted[0])
    n_heads = reader.get("n_heads")
    d_model = reader.get("d_model")
    d_mlp = reader.get("mlp_hidden_size", None)
    if d_mlp is None and isinstance(d_model, int):
        d_mlp = reader.get("mlp_ratio", 4) * d_model
    vocab_size = reader.get("vocab_size")
    return dict(
        vocab_size=reader.get("embedding_size", None) or vocab_size,
        d_model=d_model,
        n_layers=reader.get("n_layers"),
        n_heads=n_heads,
        n_kv_heads=reader.get("n_kv_heads", None) or n_heads,
        head_dim=d_model // n_heads if isinstance(d_model, int) and isinstance(n_heads, int) else None,
        d_mlp=d_mlp,
        rope_theta=reader.get("rope_theta", 10_000.0),
        rope_in_float32=reader.get("rope_full_precision", True),
        norm_eps=reader.get("rms_norm_eps", 1e-5),
        qkv_bias=bool(reader.get("include_qkv_bias", False)),
        tie_embeddings=bool(reader.get("weight_tying", False)),
    )


def config_from_hf(
    raw: dict[str, Any],
    *,
    mdm: bool | None = None,
    mask_token_id: int | None = None,
    ignore_fields: tuple[str, ...] = (),
    source: str = "config.json",
    tokenizer_vocabulary: int | None = None,
) -> tuple[ModelConfig, FamilyNames]:
    """The model configuration and checkpoint names for a Hugging Face config.

    Args:
      raw: the parsed config.json.
      mdm: None for the family's own convention; True to read a Llama/Qwen2 checkpoint as a masked diffusion
        model post-trained from an ARM (DiffuLLaMA-style: bidirectional, shifted logits); False to insist on
        an ARM.
      mask_token_id: overrides the config's mask token (or supplies one it lacks).
      ignore_fields: config fields the user declares irrelevant to the computation.
      tokenizer_vocabulary: the size of the checkpoint's tokenizer, if it has one.
    """
    if not isinstance(raw, dict):
        raise ConversionError(f"cannot convert {source}: a config.json must hold a JSON object, not "
                              f"{type(raw).__name__}")
    model_type = raw.get("model_type")
    families = {"qwen2": (_qwen2_shape, "arm"), "llama": (_llama_shape, "arm"),
                "dream": (_qwen2_shape, "shifted_mdm"), "llada": (_llada_shape, "unshifted_mdm")}
    if not isinstance(model_type, str) or model_type.lower() not in families:
        raise ConversionError(
            f"cannot convert {source}: unknown model_type {model_type!r}; supported: qwen2, Dream, llama "
            f"(also DiffuLLaMA with --mdm), llada")
    family = model_type.lower()
    shape_of, native = families[family]
    metadata = _METADATA | (_LLADA_METADATA if family == "llada" else frozenset())
    reader = _Reader(raw, source, metadata, ignore_fields)
    fields = shape_of(reader) | resolve_conventions(
        family=family, native=native, mdm=mdm, mask_token_id=mask_token_id,
        config_mask_token_id=reader.get("mask_token_id", None), problems=reader.problems,
        tokenizer_vocabulary=tokenizer_vocabulary)
    is_causal = reader.get("is_causal", None)
    if is_causal is not None and is_causal != (fields["attention"] == "causal"):
        reader.problems.append(
            f"field 'is_causal' = {is_causal!r} contradicts the {fields['attention']} attention of this "
            f"conversion; pass mdm=True (--mdm) for a bidirectional model")
    reader.finish()
    try:
        config = ModelConfig(**fields)
    except ConfigError as error:
        raise ConversionError(f"cannot convert {source}: {error}") from error
    return config, tables.LLADA if family == "llada" else tables.HUGGING_FACE


def read_config(path: str | Path) -> dict:
    """A config.json's contents, refused clearly when it is not a JSON object."""
    try:
        raw = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not JSON ({error}); a Hugging Face config.json is a JSON object") from error
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} holds {type(raw).__name__}, not a JSON object; is it a config.json?")
    return raw
