"""GGUF conversion on tiny files written here the way llama.cpp writes them (q/k rows permuted for Llama)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import run
from conversion import ConversionError, convert
from mdm_circuits.testing import tiny_torch_model, torch_logits

TOKENS = np.array([[4, 9, 61, 30, 2, 77, 15, 50]])
# GGUF quantizes rows in blocks of 32 values, so every input width must be a multiple of 32.
SHAPE = dict(intermediate_size=128)


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (written out here independently of the
    inverse under test)."""
    rows = weights.shape[0]
    return (weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(torch_model, path, architecture: str, quantization=gguf.GGMLQuantizationType.F32,
               extra_metadata=lambda writer: None):
    """Write `torch_model` as a GGUF file; quantized 2-D weights are written back into the torch model
    dequantized, so both sides compute with the same numbers (as transformers does for real GGUF files)."""
    config = torch_model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    extra_metadata(writer)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if name.startswith("model.layers."):
                layer, rest = name.removeprefix("model.layers.").split(".", 1)
                gguf_name = f"blk.{layer}.{per_layer[rest]}"
            else:
                gguf_name = names[name]
            array = parameter.numpy().astype(np.float32)
            if array.ndim == 2 and quantization != gguf.GGMLQuantizationType.F32:
                quantized = gguf.quants.quantize(array, quantization)
                array = gguf.quants.dequantize(quantized, quantization)
                parameter.copy_(torch.from_numpy(array))
                stored, raw_dtype = quantized, quantization
            else:
                stored, raw_dtype = array, None
            if architecture == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = n_heads if "attn_q" in gguf_name else n_kv
                permuted = llama_cpp_permute(array, heads)
                stored = permuted if raw_dtype is None else gguf.quants.quantize(permuted, raw_dtype)
            writer.add_tensor(gguf_name, stored, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_llama_gguf_q8_matches_transformers(tmp_path, n_kv_heads):
    torch_model = tiny_torch_model("llama", n_kv_heads, **SHAPE)
    path = write_gguf(torch_model, tmp_path / "tiny.gguf", "llama", gguf.GGMLQuantizationType.Q8_0)
    converted = convert(path)
    assert converted.tokenizer is None and converted.model.config.attention == "causal"
    expected, _ = torch_logits(torch_model, TOKENS)
    np.testing.assert_allclose(run(converted.model, TOKENS[0]), expected[0], atol=1e-4)


def test_qwen2_gguf_is_not_unpermuted(tmp_path):
    torch_model = tiny_torch_model("qwen2", 2, **SHAPE)
    converted = convert(write_gguf(torch_model, tmp_path / "tiny.gguf", "qwen2"))
    assert converted.model.config.qkv_bias
    expected, _ = torch_logits(torch_model, TOKENS)
    np.testing.assert_allclose(run(converted.model, TOKENS[0]), expected[0], atol=1e-4)


def test_gguf_as_mdm_needs_a_mask_token(tmp_path):
    path = write_gguf(tiny_torch_model("qwen2", 2, **SHAPE), tmp_path / "tiny.gguf", "qwen2")
    with pytest.raises(ConversionError, match="needs a mask token"):
        convert(path, mdm=True)
    config = convert(path, mdm=True, mask_token_id=3).model.config
    assert config.attention == "bidirectional" and config.mask_token_id == 3


def test_gguf_with_rope_scaling_is_refused(tmp_path):
    path = write_gguf(tiny_torch_model("llama", 2, **SHAPE), tmp_path / "tiny.gguf", "llama",
                      extra_metadata=lambda writer: writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    with pytest.raises(ConversionError, match="rope.scaling.type = 'linear' is not supported"):
        convert(path)


def test_truncated_gguf(tmp_path):
    path = write_gguf(tiny_torch_model("llama", 2, **SHAPE), tmp_path / "tiny.gguf", "llama")
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(ConversionError, match="cannot read GGUF file"):
        convert(path)


def test_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="architecture 'mamba' is not supported"):
        convert(tmp_path / "other.gguf")


def _byte_level_vocabulary():
    """A byte-level BPE vocabulary in GPT-2's spelling: the 256 bytes, some merges, a control token and a
    user-defined one (as Qwen2.5's `<tool_call>`)."""
    from conversion.gguf_files import _byte_alphabet

    spelling = _byte_alphabet()
    tokens = [spelling[byte] for byte in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "r e", "o n", "Ġ w", "e r", "1 2", "' s", "Ġ 1", "o r"]
    for merge in merges:
        tokens.append(merge.replace(" ", ""))
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens += ["<|endoftext|>", "<tool_call>"]
    types += [int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)]
    return tokens, merges, types


TOKENIZER_TEXTS = ["The weather in 1234 is nice, isn't it?", "the  tower's  there\n\nwere 12 or 123456 rooms",
                   "Hello<tool_call>{\"a\": 1}</tool_call><|endoftext|>", "  leading spaces\tand\ttabs  ",
                   "Ünïcödé wörds and 99 balloons"]


@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_gguf_byte_level_tokenizers_match_transformers(tmp_path, pre):
    """Every pre-tokenizer of the llama and qwen2 families is rebuilt as transformers rebuilds it from the
    same GGUF, control and user-defined tokens kept whole (SmolLM's digit split is llama.cpp's: transformers
    does not split digits for it, so its texts are compared without digits)."""
    from transformers import AutoTokenizer

    from conversion.gguf_files import GGUFCheckpoint

    tokens, merges, types = _byte_level_vocabulary()

    def tokenizer_metadata(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)
        writer.add_eos_token_id(len(tokens) - 2)

    path = write_gguf(tiny_torch_model("qwen2", 2, **SHAPE), tmp_path / "tiny.gguf", "qwen2",
                      extra_metadata=tokenizer_metadata)
    ours = GGUFCheckpoint(path).tokenizer()
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = [t for t in TOKENIZER_TEXTS if pre != "smollm" or not any(c.isdigit() for c in t)]
    for text in texts:
        assert ours.encode(text).ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.encode("a<tool_call>b").tokens[1] == "<tool_call>"  # a user-defined token stays whole
    if pre == "smollm":
        assert ours.encode("12").ids == [ours.token_to_id("1"), ours.token_to_id("2")]  # digits one by one


@pytest.mark.parametrize("kind, pre, named", [("llama", "default", "'llama' (SentencePiece)"),
                                              ("gpt2", "deepseek-coder", "pre-tokenizer 'deepseek-coder'")])
def test_a_gguf_tokenizer_that_cannot_be_rebuilt_is_named(tmp_path, capsys, kind, pre, named):
    from mdm_circuits.cli import main

    tokens, merges, types = _byte_level_vocabulary()

    def tokenizer_metadata(writer):
        writer.add_tokenizer_model(kind)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)

    path = write_gguf(tiny_torch_model("qwen2", 2, **SHAPE), tmp_path / "tiny.gguf", "qwen2",
                      extra_metadata=tokenizer_metadata)
    with pytest.warns(UserWarning, match="converted without a tokenizer"):
        converted = convert(path)
    assert converted.tokenizer is None and named in converted.tokenizer_problem
    with pytest.warns(UserWarning):
        main(["convert", str(path), str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert named in printed and "the source holds no tokenizer" not in printed
