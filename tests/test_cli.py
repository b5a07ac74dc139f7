"""The command line end to end on a tiny checkpoint: convert, predict, plan, and errors as exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdm_circuits.cli import main
from mdm_circuits.errors import CheckpointError
from mdm_circuits.model import checkpoint
from mdm_circuits.testing import save_hf, tiny_torch_model


def refused(capsys, argv: list[str]) -> str:
    """Run the command expecting a refusal: exit code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: ") and "Traceback" not in printed
    return printed


@pytest.fixture
def llama_dir(tmp_path):
    directory = save_hf(tiny_torch_model("llama", 2), tmp_path / "hf")
    # A word-level tokenizer.json, as a Hugging Face directory would carry one.
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tokenizer = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_convert_then_predict(llama_dir, tmp_path, capsys):
    main(["convert", str(llama_dir), str(tmp_path / "out"), "--mdm", "--mask-token-id", "95"])
    output = capsys.readouterr().out
    assert "bidirectional attention" in output and "mask token 95" in output and "30/30 tensors" in output
    assert checkpoint.read_manifest(tmp_path / "out")[0].mask_token_id == 95

    main(["predict", str(tmp_path / "out"), "w1 w2 w3", "--mask-answer", "--top", "3"])
    output = capsys.readouterr().out
    assert "top 3 predictions for position 3 (masked), read from the logits at position 2" in output
    assert output.count(" p=") == 3


def test_predict_refuses_masking_without_a_mask_token(llama_dir, tmp_path, capsys):
    main(["convert", str(llama_dir), str(tmp_path / "arm")])
    assert "no mask token" in refused(capsys, ["predict", str(tmp_path / "arm"), "w1 w2", "--mask-answer"])


def test_plan_from_config_json(llama_dir, capsys):
    main(["plan", str(llama_dir / "config.json"), "--batch", "2", "--seq-len", "8", "--dtype", "float32"])
    output = capsys.readouterr().out
    assert "peak estimate" in output and "parameters:" in output


def test_plan_passes_ignored_config_fields(tmp_path, capsys):
    config = json.loads((Path(__file__).parent / "data" / "configs" / "llama-2-7b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"rope_dtype": "fp8"}))
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path), "--batch", "1", "--seq-len", "8"])
    assert "'rope_dtype'" in capsys.readouterr().err
    main(["plan", str(tmp_path), "--batch", "1", "--seq-len", "8", "--ignore-config-field", "rope_dtype"])
    assert "6,738,415,616" in capsys.readouterr().out


def test_bad_source_exits_with_the_error(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "unknown model_type 't5'" in capsys.readouterr().err


def test_an_mdm_is_queried_with_a_masked_answer_by_default(llama_dir, tmp_path, capsys):
    main(["convert", str(llama_dir), str(tmp_path / "mdm"), "--mdm", "--mask-token-id", "95"])
    main(["predict", str(tmp_path / "mdm"), "w1 w2"])
    assert "predictions for position 2 (masked)" in capsys.readouterr().out
    main(["predict", str(tmp_path / "mdm"), "w1 w2", "--no-mask-answer"])
    assert "(masked)" not in capsys.readouterr().out


def test_predict_refuses_contradictory_or_empty_input(llama_dir, tmp_path, capsys):
    main(["convert", str(llama_dir), str(tmp_path / "arm")])
    contradictory = ["predict", str(tmp_path / "arm"), "w1 w2", "--mask-token-id", "3"]
    assert "answer is not masked" in refused(capsys, contradictory)
    assert "prompt is empty" in refused(capsys, ["predict", str(tmp_path / "arm"), ""])


def test_find_circuit_end_to_end(tmp_path, capsys):
    """A tiny random model with a word-level tokenizer covering the IOI templates: the job runs, reports
    progress and writes reference-format JSON."""
    from mdm_circuits.circuits.graph import Graph
    from mdm_circuits.model.config import ModelConfig
    from mdm_circuits.testing import random_model
    from test_tasks import WORDS, word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=8, d_mlp=24)
    checkpoint.save(tmp_path / "model", random_model(config, 0, scale=0.2), tokenizer)
    main(["find-circuit", str(tmp_path / "model"), "--n", "6", "--steps", "2", "--batch-size", "4",
          "--ks", "5,40", "--tau", "0.5", "--out", str(tmp_path / "out")])
    output = capsys.readouterr().out
    assert "attributed 4/6 examples" in output and "attributed 6/6 examples" in output
    assert "K =       5" in output and "smallest top-K circuit reaching faithfulness 0.5" in output
    graph = Graph.for_model(config)
    scores, circuit = graph.from_json(tmp_path / "out" / "circuit.json")
    assert circuit.any() and np.isfinite(scores).all()
    assert json.loads((tmp_path / "out" / "curve.json").read_text())["ks"] == [5, 40]


def _successor_directory(tmp_path):
    """The successor MDM of test_diffusion, saved with a word-level tokenizer (token i is 't{i}')."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from test_diffusion import successor_model

    tokenizer = tokenizers.Tokenizer(models.WordLevel({**{f"t{i}": i for i in range(11)}, "[MASK]": 11},
                                                      unk_token="[MASK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    checkpoint.save(tmp_path / "mdm", successor_model(), tokenizer)
    return tmp_path / "mdm"


def test_generate_with_diffusion_and_greedy(tmp_path, capsys):
    from mdm_circuits.model.transformer import with_config

    directory = _successor_directory(tmp_path)
    main(["generate", str(directory), "t3", "--new", "4"])
    output = capsys.readouterr().out
    assert "diffusion decoding, 4 steps, confidence order" in output and output.strip().endswith("t3 t4 t5 t6 t7")
    model = checkpoint.load(directory)
    arm = with_config(model, model.config.replace(attention="causal", mask_token_id=None))
    checkpoint.save(tmp_path / "arm", arm, checkpoint.load_tokenizer(directory))
    main(["generate", str(tmp_path / "arm"), "t8", "--new", "3"])
    output = capsys.readouterr().out
    assert "greedy decoding" in output and output.strip().endswith("t8 t9 t10 t0")


def test_pool_writes_pairs_of_views(tmp_path, capsys):
    from mdm_circuits.model.config import ModelConfig
    from mdm_circuits.testing import random_model
    from test_tasks import WORDS, word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size() + 1, d_model=16, n_layers=1, n_heads=2,
                         n_kv_heads=1, head_dim=8, d_mlp=16)
    checkpoint.save(tmp_path / "arm", random_model(config, 0), tokenizer)
    mdm_config = config.replace(attention="bidirectional", mask_token_id=config.vocab_size - 1)
    checkpoint.save(tmp_path / "mdm", random_model(mdm_config, 1), tokenizer)
    main(["pool", str(tmp_path / "arm"), str(tmp_path / "mdm"), "--n", "3", "--budget", "12", "--chunk", "6",
          "--out", str(tmp_path / "pool.jsonl")])
    output = capsys.readouterr().out
    assert "drawn 6, pooled" in output and "from 12 drawn" in output
    lines = (tmp_path / "pool.jsonl").read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        assert record["arm"]["correct"] == record["mdm"]["correct"]
    assert "first model must be an ARM" in refused(capsys, ["pool", str(tmp_path / "mdm"), str(tmp_path / "arm")])


def test_a_user_error_is_one_line_without_a_traceback_unless_debugging(tmp_path, capsys):
    arguments = ["find-circuit", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]
    printed = refused(capsys, arguments)
    assert printed.count("\n") == 1 and "does not hold a saved mdm_circuits model" in printed
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="does not hold a saved mdm_circuits model"):
        main([*arguments, "--debug"])


def test_a_second_run_compiles_nothing_new(tmp_path):
    """Two processes running the same job share the persistent compilation cache: the first writes the
    compiled programs, the second finds every one of them (and writes nothing)."""
    from mdm_circuits.model.config import ModelConfig
    from mdm_circuits.testing import random_model
    from test_tasks import WORDS, word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=8, d_mlp=24)
    checkpoint.save(tmp_path / "model", random_model(config, 0, scale=0.2), tokenizer)
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "mdm_circuits.cli", "find-circuit", str(tmp_path / "model"), "--n", "4",
               "--steps", "2", "--ks", "5", "--out", str(tmp_path / "out"), "--compilation-cache", str(cache)]
    environment = os.environ | {"JAX_PLATFORMS": "cpu"}
    subprocess.run(command, check=True, capture_output=True, env=environment)
    written = sorted(path.name for path in cache.iterdir())
    assert any("attribute_batch" in name for name in written), written
    subprocess.run(command, check=True, capture_output=True, env=environment)
    assert sorted(path.name for path in cache.iterdir()) == written
