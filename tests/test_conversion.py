"""Checkpoint formats (Dream, LLaDA, DiffuLLaMA, sharded, bfloat16) and every refusal of a bad checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run
from conversion import ConversionError, config_from_hf, convert
from conversion.conventions import DIFFULLAMA_MASK_TOKEN_ID
from mdm_circuits.model.presets import PRESETS
from mdm_circuits.testing import DELETE, save_hf, tiny_torch_model, torch_logits

TOKENS = np.array([[5, 17, 33, 2, 90, 41, 8, 64, 12, 3]])


def _assert_matches(model, torch_model, bidirectional: bool, tolerance: float = 1e-4):
    expected, _ = torch_logits(torch_model, TOKENS, bidirectional=bidirectional)
    np.testing.assert_allclose(run(model, TOKENS[0]), expected[0], atol=tolerance)


def test_dream_checkpoint_is_bidirectional_and_shifted(tmp_path):
    torch_model = tiny_torch_model("qwen2", 2)
    directory = save_hf(torch_model, tmp_path, model_type="Dream", architectures=["DreamModel"],
                        mask_token_id=77, auto_map={"AutoModel": "modeling_dream.DreamModel"})
    model = convert(directory).model
    assert model.config.attention == "bidirectional"
    assert model.config.logit_shift and model.config.mask_token_id == 77 and model.config.qkv_bias
    assert model.config.read_position(5) == 4
    _assert_matches(model, torch_model, bidirectional=True)


def _llada_checkpoint(torch_model, directory, **config_changes):
    """Tiny Llama weights under LLaDA's names, with an LLaDA-style (OLMo) config."""
    renames = {"model.embed_tokens.": "model.transformer.wte.", "model.norm.": "model.transformer.ln_f.",
               "lm_head.": "model.transformer.ff_out.", "model.layers.": "model.transformer.blocks.",
               "self_attn.o_proj": "attn_out", "self_attn.": "", "mlp.gate_proj": "ff_proj",
               "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ff_norm"}
    tensors = {}
    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and torch_model.config.tie_word_embeddings:
            continue  # a tied LLaDA has no output matrix of its own
        for old, new in renames.items():
            name = name.replace(old, new)
        tensors[name] = tensor.contiguous()
    directory.mkdir(exist_ok=True)
    save_file(tensors, directory / "model.safetensors")
    hf = torch_model.config
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": hf.hidden_size,
        "n_heads": hf.num_attention_heads, "n_kv_heads": hf.num_key_value_heads, "n_layers": hf.num_hidden_layers,
        "mlp_hidden_size": hf.intermediate_size, "mlp_ratio": 4, "vocab_size": hf.vocab_size,
        "embedding_size": hf.vocab_size, "rope_theta": hf.rope_parameters["rope_theta"],
        "rms_norm_eps": hf.rms_norm_eps, "mask_token_id": 95, "eos_token_id": 94, "pad_token_id": 94,
        "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "block_type": "llama",
        "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False, "scale_logits": False,
        "input_emb_norm": False, "attention_layer_norm": False, "multi_query_attention": None,
        "max_sequence_length": 4096, "flash_attention": False, "rope_full_precision": True,
        "init_fn": "mitchell", "init_std": 0.02, "attention_dropout": 0.0, "residual_dropout": 0.0,
        "embedding_dropout": 0.0, "use_cache": False,
    } | config_changes
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_llada_checkpoint_matches_bidirectional_llama(tmp_path):
    torch_model = tiny_torch_model("llama", 2)
    model = convert(_llada_checkpoint(torch_model, tmp_path)).model
    config = model.config
    assert config.attention == "bidirectional" and not config.logit_shift and config.mask_token_id == 95
    assert config.read_position(5) == 5
    _assert_matches(model, torch_model, bidirectional=True)


def test_llama_checkpoint_is_an_arm_unless_declared_an_mdm(tmp_path):
    torch_model = tiny_torch_model("llama", 4, vocab_size=32_000)  # LLaMA-2's vocabulary size
    directory = save_hf(torch_model, tmp_path)
    arm = convert(directory).model
    assert arm.config.attention == "causal" and arm.config.mask_token_id is None
    _assert_matches(arm, torch_model, bidirectional=False)
    # DiffuLLaMA's mask token is LLaMA-2's token 811: assumed only where the tokenizer has LLaMA-2's size.
    with pytest.raises(ConversionError, match=r"tokenizer is missing; pass the mask token \(--mask-token-id N\)"):
        convert(directory, mdm=True)
    import tokenizers
    from tokenizers import models

    tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(32_000)}, unk_token="w0")).save(
        str(directory / "tokenizer.json"))
    diffullama = convert(directory, mdm=True).model.config
    assert diffullama.attention == "bidirectional" and diffullama.logit_shift
    assert diffullama.mask_token_id == DIFFULLAMA_MASK_TOKEN_ID
    assert convert(directory, mdm=True, mask_token_id=3).model.config.mask_token_id == 3
    with pytest.raises(ConversionError, match=r"mask_token_id must be a token id in \[0, vocab_size=32000\)"):
        convert(directory, mdm=True, mask_token_id=50_000)


def test_sharded_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    torch_model = tiny_torch_model("qwen2", 2).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = convert(tmp_path).model
    assert model.embedding.dtype == jnp.bfloat16
    reference = tiny_torch_model("qwen2", 2)  # same seed; round its weights (not its buffers) to bf16
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    assert np.array_equal(np.asarray(model.embedding[...], np.float32),
                          reference.model.embed_tokens.weight.detach().numpy())
    full = convert(tmp_path, dtype="float32").model
    _assert_matches(full, reference, bidirectional=False)


# ---- refusals: each bad checkpoint raises one ConversionError naming the problem ----


def _qwen2_directory(tmp_path):
    return save_hf(tiny_torch_model("qwen2", 2), tmp_path)


def _rewrite_tensors(directory, edit):
    from safetensors.torch import load_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    directory = _qwen2_directory(tmp_path)
    _rewrite_tensors(directory, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ConversionError, match=r"missing key model\.layers\.1\.self_attn\.k_proj\.bias"):
        convert(directory)


def test_unexpected_key_is_named(tmp_path):
    directory = _qwen2_directory(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"unexpected key model\.layers\.0\.mlp\.extra\.weight"):
        convert(directory)


def test_wrong_shape_is_named(tmp_path):
    directory = _qwen2_directory(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(112, 60)}))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.up_proj\.weight: shape \(112, 60\)"):
        convert(directory)


def test_all_problems_are_reported_together(tmp_path):
    directory = _qwen2_directory(tmp_path)

    def edit(tensors):
        tensors.pop("model.norm.weight")
        tensors["lm_head.weight"] = torch.zeros(3, 3)

    _rewrite_tensors(directory, edit)
    with pytest.raises(ConversionError) as error:
        convert(directory)
    assert len(error.value.problems) == 2
    assert "missing key model.norm.weight" in str(error.value) and "lm_head.weight: shape (3, 3)" in str(error.value)


def test_truncated_safetensors_is_named(tmp_path):
    directory = _qwen2_directory(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ConversionError, match=r"model\.safetensors: truncated"):
        convert(directory)


def test_unknown_model_type(tmp_path):
    directory = save_hf(tiny_torch_model("qwen2", 2), tmp_path, model_type="mamba")
    with pytest.raises(ConversionError, match="unknown model_type 'mamba'"):
        convert(directory)


def test_mdm_without_mask_token(tmp_path):
    directory = save_hf(tiny_torch_model("qwen2", 2), tmp_path, model_type="Dream", mask_token_id=DELETE)
    with pytest.raises(ConversionError, match="needs a mask token.*--mask-token-id"):
        convert(directory)
    assert convert(directory, mask_token_id=7).model.config.mask_token_id == 7


def test_llada_without_mask_token(tmp_path):
    directory = _llada_checkpoint(tiny_torch_model("llama", 2), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["mask_token_id"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="needs a mask token"):
        convert(directory)


def test_unsupported_config_values_are_refused(tmp_path):
    directory = save_hf(tiny_torch_model("llama", 2), tmp_path, hidden_act="gelu",
                        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0})
    with pytest.raises(ConversionError) as error:
        convert(directory)
    assert "'hidden_act' = 'gelu'" in str(error.value) and "rope_parameters" in str(error.value)


def test_unknown_config_field_is_refused_unless_ignored(tmp_path):
    directory = save_hf(tiny_torch_model("qwen2", 2), tmp_path, attn_logit_softcapping=30.0)
    with pytest.raises(ConversionError, match="'attn_logit_softcapping'.*--ignore-config-field"):
        convert(directory)
    assert convert(directory, ignore_config_fields=("attn_logit_softcapping",)).model is not None


def test_llada_switch_that_changes_the_computation_is_refused(tmp_path):
    directory = _llada_checkpoint(tiny_torch_model("llama", 2), tmp_path, scale_logits=True)
    with pytest.raises(ConversionError, match="'scale_logits' = True"):
        convert(directory)


def test_missing_config_and_missing_directory(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path)
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere")


def test_shard_missing_from_index(tmp_path):
    tiny_torch_model("qwen2", 2).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name}: named by model.safetensors.index.json but missing"):
        convert(tmp_path)


def test_integer_tensor_is_refused(tmp_path):
    directory = _qwen2_directory(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update(
        {"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(ConversionError, match="model.norm.weight: dtype int32 is not a floating-point weight"):
        convert(directory)


def test_bfloat16_reader_is_exact(tmp_path):
    values = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"x": values}, tmp_path / "model.safetensors")
    from conversion.safetensors_files import SafetensorsCheckpoint

    read = SafetensorsCheckpoint(tmp_path)["x"]
    assert read.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(read, np.float32), values.float().numpy())


# ---- the study's real configurations ----

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.mark.parametrize("file, mdm, preset", [
    ("qwen2.5-7b.json", None, "qwen2.5-7b"), ("dream-v0-base-7b.json", None, "dream-v0-base-7b"),
    ("llama-2-7b.json", None, "llama-2-7b"), ("llama-2-7b.json", True, "diffullama-7b"),
    ("llada-8b-base.json", None, "llada-8b"),
])
def test_released_configs_read_as_the_presets(file, mdm, preset):
    # DiffuLLaMA ships LLaMA-2's tokenizer (32,000 tokens), which confirms its mask token 811.
    config, _ = config_from_hf(json.loads((CONFIGS / file).read_text()), mdm=mdm, tokenizer_vocabulary=32_000)
    assert config == PRESETS[preset]


def test_arm_given_a_mask_token_is_refused(tmp_path):
    directory = _qwen2_directory(tmp_path)
    with pytest.raises(ConversionError, match="mask token was given for an autoregressive model.*--mdm"):
        convert(directory, mask_token_id=3)


def test_dream_refuses_to_be_read_as_an_arm(tmp_path):
    directory = save_hf(tiny_torch_model("qwen2", 2), tmp_path, model_type="Dream", mask_token_id=7)
    with pytest.raises(ConversionError, match="is a masked diffusion model; do not pass mdm=False"):
        convert(directory, mdm=False)


def test_is_causal_contradiction(tmp_path):
    directory = save_hf(tiny_torch_model("llama", 2), tmp_path, is_causal=False)
    with pytest.raises(ConversionError, match="'is_causal' = False contradicts the causal attention"):
        convert(directory)
    assert convert(directory, mdm=True, mask_token_id=5).model.config.attention == "bidirectional"


def test_rope_theta_and_rope_parameters_must_agree(tmp_path):
    directory = save_hf(tiny_torch_model("llama", 2), tmp_path, rope_theta=10_000.0)
    with pytest.raises(ConversionError, match="'rope_theta' = 10000.0 and 'rope_parameters'.*disagree"):
        convert(directory)


def test_tied_checkpoint(tmp_path):
    torch_model = tiny_torch_model("llama", 2, tie_word_embeddings=True)
    model = convert(save_hf(torch_model, tmp_path)).model
    assert model.config.tie_embeddings and model.unembedding is None
    _assert_matches(model, torch_model, bidirectional=False)


def test_llada_with_tied_weights_and_qkv_biases(tmp_path):
    """LLaDA's `weight_tying` and `include_qkv_bias` switches, on Qwen2 weights (which have q/k/v biases)."""
    torch_model = tiny_torch_model("qwen2", 2, tie_word_embeddings=True)
    directory = _llada_checkpoint(torch_model, tmp_path, weight_tying=True, include_qkv_bias=True)
    model = convert(directory).model
    assert model.config.qkv_bias and model.config.tie_embeddings
    _assert_matches(model, torch_model, bidirectional=True)


def test_both_single_file_and_index_are_refused(tmp_path):
    directory = _qwen2_directory(tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(ConversionError, match="holds both model.safetensors and model.safetensors.index.json"):
        convert(directory)


def test_malformed_index_is_named(tmp_path):
    tiny_torch_model("qwen2", 2).save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConversionError, match="not a valid safetensors index"):
        convert(tmp_path)


def test_null_config_value_is_refused_clearly(tmp_path):
    directory = save_hf(tiny_torch_model("llama", 2), tmp_path, rms_norm_eps=None)
    with pytest.raises(ConversionError, match="norm_eps must be a positive number, got None"):
        convert(directory)
