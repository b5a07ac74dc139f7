"""The refusal catalogue: bad inputs and faults across the library, each refused with the project's error
class and a message that names the problem (or, for faults, a result equal to an undisturbed run).

Areas: conversion, saved models, tokens and prompts, tasks and JSONL, attribution and circuits, generation,
planning, the organisms build, `compare`, `find-circuit`, and interruptions (SIGKILL in subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models as tokenizer_models
from tokenizers import pre_tokenizers

from conversion import ConversionError, convert
from mdm_circuits import Error, circuits, organisms
from mdm_circuits.analysis import structure
from mdm_circuits.circuits.ablations import Ablation
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.graph import Graph
from mdm_circuits.circuits.interventions import EdgeWeights, Interventions, Probes, run
from mdm_circuits.circuits.patching import ablate_node_sets
from mdm_circuits.cli import main
from mdm_circuits.comparison import Settings, compare
from mdm_circuits.decoding.accuracy import common_correct_pool
from mdm_circuits.decoding.generation import diffuse, greedy
from mdm_circuits.errors import (
    AttributionError,
    BatchError,
    CheckpointError,
    CircuitError,
    DecodingError,
    GraphError,
    InterventionError,
    PlanningError,
    TrainingError,
    UnknownTask,
    UsageError,
)
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.planning import plan
from mdm_circuits.model.transformer import with_config
from mdm_circuits.organisms import recipe
from mdm_circuits.tasks import TASKS, ioi, jsonl, metrics
from mdm_circuits.tasks.batch import Example, collate
from mdm_circuits.tasks.views import View
from mdm_circuits.testing import random_examples, random_model, save_hf, tiny_torch_model
from test_tasks import WORDS, word_tokenizer

ARM = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_mlp=24)
MDM = ARM.replace(attention="bidirectional", mask_token_id=39)
METRIC = metrics.logit_difference


def refused(capsys, argv: list[str]) -> str:
    """The command line refuses: exit status 2, one line on stderr (returned)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith("error: ") and printed.count("\n") == 1, printed
    return printed


def word_level(n: int) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(tokenizer_models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


@pytest.fixture
def llama_dir(tmp_path):
    return save_hf(tiny_torch_model("llama", 2), tmp_path / "hf")


@pytest.fixture
def saved(tmp_path):
    """A converted tiny model with its word-level tokenizer."""
    directory = tmp_path / "model"
    checkpoint.save(directory, random_model(ARM, 0), word_level(ARM.vocab_size))
    return directory


# ---- the error classes ----


def test_every_refusal_is_an_error_of_the_library():
    for error in (AttributionError, BatchError, CheckpointError, CircuitError, ConversionError, DecodingError,
                  GraphError, InterventionError, PlanningError, TrainingError, UnknownTask, UsageError):
        assert issubclass(error, Error)


# ---- conversion ----


def _rewrite_header(directory: Path, change) -> None:
    """Edit the safetensors header of `directory`'s model file in place."""
    path = directory / "model.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


def _norms(header):
    return sorted(name for name in header if name.endswith("norm.weight"))


@pytest.mark.parametrize("damage, phrase", [
    ("negative", "negative or non-integer offsets"),
    ("overlap", "two tensors overlap"),
    ("gap", "the data has a gap"),
])
def test_safetensors_with_bad_offsets(llama_dir, damage, phrase):
    def change(header):
        first, second = _norms(header)[:2]
        if damage == "negative":
            header[first]["data_offsets"] = [-4, header[first]["data_offsets"][1]]
        elif damage == "overlap":  # the second norm reads the first one's bytes
            header[second]["data_offsets"] = header[first]["data_offsets"]
        else:  # a hole before the last tensor
            last = max(header, key=lambda n: header[n]["data_offsets"][1] if n != "__metadata__" else -1)
            begin, end = header[last]["data_offsets"]
            header[last]["data_offsets"] = [begin + 2, end + 2]

    _rewrite_header(llama_dir, change)
    with pytest.raises(ConversionError, match=phrase):
        convert(llama_dir)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_checkpoint_with_non_finite_weights(tmp_path, value):
    import torch

    model = tiny_torch_model("qwen2", 2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    with pytest.raises(ConversionError, match=r"up_proj.weight: 1 of its .* values are NaN or infinite"):
        convert(save_hf(model, tmp_path / "hf"))


@pytest.mark.parametrize("text, phrase", [("{not json", "is not JSON"), ("[1, 2]", "not a JSON object")])
def test_a_config_json_that_is_not_a_json_object(llama_dir, text, phrase):
    (llama_dir / "config.json").write_text(text)
    with pytest.raises(ConversionError, match=phrase):
        convert(llama_dir)


def test_diffullama_mask_is_not_guessed_for_another_vocabulary(llama_dir):
    word_level(96).save(str(llama_dir / "tokenizer.json"))  # not LLaMA-2's 32,000 tokens
    with pytest.raises(ConversionError, match="has 96 tokens, not 32000; pass the mask token"):
        convert(llama_dir, mdm=True)


def test_a_source_that_does_not_exist(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nowhere")


def test_convert_refuses_a_destination_with_files_of_the_user(llama_dir, tmp_path, capsys):
    destination = tmp_path / "mine"
    destination.mkdir()
    (destination / "notes.txt").write_text("keep me")
    assert "files that are not a saved model (notes.txt)" in refused(
        capsys, ["convert", str(llama_dir), str(destination)])
    assert (destination / "notes.txt").read_text() == "keep me"


def test_convert_refuses_to_delete_files_inside_a_saved_model(llama_dir, saved, capsys):
    (saved / "params" / "notes.txt").write_text("keep me")
    assert "files of yours (params/notes.txt)" in refused(capsys, ["convert", str(llama_dir), str(saved)])
    assert (saved / "params" / "notes.txt").exists() and checkpoint.load(saved) is not None


def test_convert_into_a_file(llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is a file" in refused(capsys, ["convert", str(llama_dir), str(tmp_path / "file")])


def test_convert_refuses_a_destination_it_cannot_write_before_converting(llama_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        main(["convert", str(llama_dir), str(tmp_path / "file" / "model")])
    printed = capsys.readouterr()
    assert printed.err.startswith("error: cannot write beside") and "converting" not in printed.out


# ---- saved models ----


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in (directory / "params").rglob("*") if p.is_file() and p.parent.name == "d")


def test_damaged_parameter_data(saved):
    target = max(_data_files(saved), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 3  # a load does not read every byte near the end
    data[middle: middle + 500] = bytes(500)
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="missing or damaged|does not match the checksum"):
        checkpoint.load(saved)


@pytest.mark.parametrize("edit, phrase", [
    (lambda m: m["config"].update(rope_theta=123.0), "does not match the checksum"),
    (lambda m: m.update(param_dtype="bfloat16"), "does not match the checksum"),
    (lambda m: m.update(format=99), "format 99"),
    (lambda m: m.update(param_dtype="int8"), "not float32 or bfloat16"),
])
def test_an_edited_manifest(saved, edit, phrase):
    path = saved / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=phrase):
        checkpoint.load(saved)


def test_an_unverified_load_is_an_explicit_choice(saved):
    path = saved / checkpoint.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["config"]["rope_theta"] = 123.0
    path.write_text(json.dumps(manifest))
    assert checkpoint.load(saved, verify=False).config.rope_theta == 123.0


def test_a_manifest_that_is_not_json(saved):
    (saved / checkpoint.MANIFEST).write_text("{")
    with pytest.raises(CheckpointError, match="is not a saved model's manifest"):
        checkpoint.load(saved)


@pytest.mark.parametrize("remove", ["params", "params/_METADATA", "data file"])
def test_missing_parameter_files(saved, remove):
    target = _data_files(saved)[0] if remove == "data file" else saved / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match="missing or damaged"):
        checkpoint.load(saved)


def test_another_models_tokenizer(saved, capsys):
    word_level(500).save(str(saved / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="500 tokens, more than the model's vocabulary of 40"):
        checkpoint.load_tokenizer(saved)
    assert "another model's tokenizer" in refused(capsys, ["predict", str(saved), "w1 w2"])


def test_an_unreadable_tokenizer(saved):
    (saved / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(CheckpointError, match="is not a readable tokenizer"):
        checkpoint.load_tokenizer(saved)


# ---- tokens and prompts ----


@pytest.fixture(scope="module")
def arm_model():
    return random_model(ARM, 1)


@pytest.mark.parametrize("token", [-1, 40, 1000])
def test_token_ids_outside_the_vocabulary(arm_model, token):
    example = Example([1, 2, token, 4], [1, 2, 3, 4], [4], [[5]], [[6]])
    with pytest.raises(BatchError, match=r"outside the vocabulary \[0, 40\)"):
        attribute(arm_model, collate([example]), METRIC)
    with pytest.raises(BatchError, match=r"outside the vocabulary \[0, 40\)"):
        greedy(arm_model, jnp.array([1, 2, token, 0, 0]), jnp.array(3), 2)


def test_diffusion_tokens_outside_the_vocabulary():
    with pytest.raises(BatchError, match="the tokens to decode hold token ids outside"):
        diffuse(random_model(MDM, 0), jnp.array([3, 39, 77]), jnp.ones(3, bool), None, jnp.array([1]), steps=1)


def test_predict_with_a_mask_token_outside_the_vocabulary(saved, capsys):
    assert "mask_token_id must be a token id in [0, vocab_size=40)" in refused(
        capsys, ["predict", str(saved), "w1 w2", "--mask-answer", "--mask-token-id", "400"])


def test_batches_without_values_are_checked_by_shape():
    """Abstract and traced batches cannot have their values read: a consistent one passes, one whose arrays
    disagree is refused by shape alone."""
    import dataclasses

    import jax

    batch = collate([Example([1, 2, 3, 0], [1, 2, 4, 0], [4], [[5]], [[6]])])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    abstract.check(ARM)
    jax.jit(lambda b: b.check(ARM) or b.clean)(batch)  # traced: nothing to read, nothing refused
    broken = dataclasses.replace(abstract, valid=jax.ShapeDtypeStruct((1, 5), bool))
    with pytest.raises(BatchError, match=r"valid \(1, 5\) must have one shape"):
        broken.check(ARM)
    with pytest.raises(BatchError, match="disagree on the number of examples"):
        dataclasses.replace(abstract, answer_mask=jax.ShapeDtypeStruct((2, 1), bool),
                            answer_positions=jax.ShapeDtypeStruct((2, 1), jnp.int32)).check(ARM)


# ---- tasks and JSONL ----


@pytest.fixture(scope="module")
def words():
    return word_tokenizer(WORDS)


@pytest.mark.parametrize("n", [-3, 0, 2.5, True, "4"])
def test_a_number_of_examples_that_is_not_a_positive_integer(words, n):
    with pytest.raises(BatchError, match="must be a positive integer"):
        ioi.examples(words, n)


def test_an_unknown_split(words):
    with pytest.raises(BatchError, match="unknown split 'dev'; the splits are all, train, test"):
        ioi.examples(words, 4, split="dev")


def test_a_max_length_that_is_not_positive(words):
    with pytest.raises(BatchError, match="max_length must be a positive integer"):
        ioi.examples(words, 4, max_length=0)


def test_an_unknown_task_name():
    with pytest.raises(UnknownTask, match="unknown task 'ioi2'; the tasks are ioi, greater_than"):
        TASKS["ioi2"]
    assert "ioi2" not in TASKS and TASKS.get("ioi2") is None  # still a mapping


@pytest.mark.parametrize("line, phrase", [
    ('{"prompt": "When", "corrupted_prompt": "When", "answer": " Zorblax", "counterfactual": " Mary"}',
     "the answer ' Zorblax' is not in the tokenizer's vocabulary"),
    ('{"prompt": "When", "corrupted_prompt": "When", "answer": " Mary", "counterfactual": " Qwxz"}',
     "the counterfactual ' Qwxz' is not in the tokenizer's vocabulary"),
    ("[1, 2", "not JSON"),
    ("", "no examples"),
])
def test_jsonl_answers_the_tokenizer_cannot_write(words, tmp_path, line, phrase):
    (tmp_path / "mine.jsonl").write_text(line + "\n")
    with pytest.raises(BatchError, match=phrase):
        jsonl.load(tmp_path / "mine.jsonl", words)


@pytest.mark.parametrize("argument, value", [("n", 0), ("budget", -1), ("chunk", 1.5)])
def test_pool_sizes_that_are_not_positive(arm_model, argument, value):
    with pytest.raises(BatchError, match=f"{argument} must be a positive integer"):
        common_correct_pool(TASKS["ioi"], None, arm_model, random_model(MDM, 0), **{argument: value})


# ---- attribution and circuits ----


def _posed(view: View):
    examples = random_examples(ARM, 3, 0, min_length=5, max_length=6)
    if view.is_mdm:
        examples = [Example([*e.clean, 39], [*e.corrupted, 39], [len(e.clean)], e.correct, e.incorrect)
                    for e in examples]
    return collate(examples)


def test_mdm_view_examples_on_an_arm(arm_model):
    with pytest.raises(BatchError, match="look like MDM-view examples"):
        attribute(arm_model, _posed(View(39)), METRIC)


def test_arm_view_examples_on_an_mdm():
    with pytest.raises(BatchError, match="not the MDM's mask token 39"):
        attribute(random_model(MDM, 0), _posed(View()), METRIC)


def test_a_bidirectional_model_without_a_mask_token(arm_model):
    with pytest.raises(BatchError, match="without a mask token cannot be asked a question"):
        attribute(with_config(arm_model, ARM.replace(attention="bidirectional")), _posed(View()), METRIC)


def test_a_circuit_file_of_a_model_with_another_width(tmp_path):
    wider = Graph(2, 2, d_model=32)
    wider.to_json(tmp_path / "other.json", np.zeros((wider.n_sources, wider.n_destinations)))
    with pytest.raises(GraphError, match="d_model 32; this model's is 16"):
        Graph(2, 2, d_model=16).from_json(tmp_path / "other.json")


@pytest.mark.parametrize("choose", [
    lambda graph, scores: circuits.top_k(graph, scores, 3),
    lambda graph, scores: circuits.greedy(graph, scores, 3),
    lambda graph, scores: structure.top_k_set(graph.edge_vector(scores), 3),
])
def test_circuits_from_scores_with_nan(choose):
    graph = Graph(2, 2)
    scores = graph.edge_matrix(np.where(np.arange(graph.n_edges) == 7, np.nan, 1.0))
    with pytest.raises(CircuitError, match="NaN or infinite"):
        choose(graph, scores)


def test_a_resume_file_of_another_run(arm_model, tmp_path):
    batch = _posed(View())
    state = tmp_path / "progress.npz"
    np.savez(state, key=np.array("another run"), done=np.array(1), total=np.zeros(1), clean=np.zeros((1, 1)),
             corrupted=np.zeros((1, 1)))
    with pytest.raises(AttributionError, match="holds the progress of another run"):
        attribute(arm_model, batch, METRIC, method="eap", batch_size=1, resume=state)


def test_wrongly_shaped_circuits_and_node_sets(arm_model):
    batch = _posed(View())
    with pytest.raises(CircuitError, match="do not fit this model's graph"):
        circuits.evaluate(arm_model, batch, np.ones((3, 3), bool), METRIC)
    with pytest.raises(CircuitError, match=r"node sets must be bool \[S, 7\]"):
        ablate_node_sets(arm_model, batch, METRIC, np.ones((2, 5), bool))


def test_interventions_that_cannot_combine(arm_model):
    graph = Graph.for_model(ARM)
    edges = EdgeWeights(jnp.ones((graph.n_sources, graph.n_destinations)), jnp.zeros((graph.n_sources, 4, 16)))
    with pytest.raises(InterventionError, match="edge weights combine with node patches only"):
        run(arm_model, arm_model.embed(jnp.arange(4)), Interventions(edges=edges, probes=Probes.zeros(ARM, 4)))
    with pytest.raises(InterventionError, match="unknown ablation kind 'shuffle'"):
        Ablation("shuffle").sources(jnp.zeros((1, 7, 4, 16)), jnp.zeros((1, 7, 4, 16)))


# ---- generation ----


def test_decoding_the_wrong_kind_of_model(arm_model, saved, tmp_path, capsys):
    with pytest.raises(DecodingError, match="needs a causal model"):
        greedy(random_model(MDM, 0), jnp.zeros(6, jnp.int32), jnp.array(2), 2)
    with pytest.raises(DecodingError, match="needs a model with a mask token"):
        diffuse(arm_model, jnp.zeros(6, jnp.int32), jnp.ones(6, bool), None, jnp.array([4]), steps=1)
    with pytest.raises(DecodingError, match="unknown unmasking 'loudest'"):
        diffuse(random_model(MDM, 0), jnp.zeros(6, jnp.int32), jnp.ones(6, bool), None, jnp.array([4]), steps=1,
                unmasking="loudest")
    bidirectional = tmp_path / "bidirectional"
    checkpoint.save(bidirectional, with_config(random_model(ARM, 0), ARM.replace(attention="bidirectional")),
                    word_level(40))
    assert "needs a model with a mask token" in refused(capsys, ["generate", str(bidirectional), "w1 w2"])


# ---- planning ----


def test_planning_refusals(tmp_path, capsys):
    with pytest.raises(PlanningError, match="mode must be 'forward' or 'gradient'"):
        plan(ARM, batch=1, seq_len=4, mode="backward")
    assert "neither a preset, a saved model nor a Hugging Face config.json" in refused(
        capsys, ["plan", str(tmp_path)])


def test_plan_reads_a_saved_models_dtype(saved, capsys):
    main(["plan", str(saved), "--batch", "1", "--seq-len", "4"])
    assert "float32 parameters" in capsys.readouterr().out


# ---- the organisms build ----


def test_organisms_refusals(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainingError, match="is a file; give a directory"):
        recipe.build(tmp_path / "file", recipe.QUICK, progress=lambda line: None)
    with pytest.raises(CheckpointError, match="organisms train"):
        organisms.load(tmp_path)
    with pytest.raises(CheckpointError, match="no adaptation checkpoint of step 7"):
        organisms.trajectory_model(7)


# ---- compare ----


@pytest.mark.parametrize("changes, phrase", [
    (dict(tasks=("ioi", "sudoku")), "unknown or no task(s) ['sudoku']"),
    (dict(pool=3), "cannot be split into halves"),
    (dict(arm="somewhere"), "give both --arm and --mdm"),
    (dict(controls=(("MDM", "x"),)), "control names must be distinct and not 'ARM', 'MDM'"),
    (dict(order="backwards"), "order must be left_to_right"),
    (dict(steps=0), "steps must be positive"),
    (dict(exact_questions=-1), "exact_questions must be 0 (no exact patching) or positive"),
])
def test_compare_settings_that_are_refused(changes, phrase):
    with pytest.raises(UsageError, match=phrase.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Settings(**changes)


def test_compare_refuses_swapped_and_unequal_models(tmp_path):
    arm, mdm = tmp_path / "arm", tmp_path / "mdm"
    checkpoint.save(arm, random_model(ARM, 0), word_level(40))
    checkpoint.save(mdm, random_model(MDM, 1), word_level(40))
    with pytest.raises(UsageError, match="the ARM must be causal without a mask token"):
        compare(Settings(arm=str(mdm), mdm=str(arm)), tmp_path / "out")
    deeper = tmp_path / "deeper"
    checkpoint.save(deeper, random_model(MDM.replace(n_layers=3), 1), word_level(40))
    with pytest.raises(UsageError, match="MDM has 3 layers of 2 heads, the ARM 2 of 2"):
        compare(Settings(arm=str(arm), mdm=str(deeper)), tmp_path / "out2")


def test_compare_output_that_is_a_file_and_a_control_without_a_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file; give a directory for the results"):
        compare(Settings(), tmp_path / "file")
    with pytest.raises(SystemExit):
        main(["compare", "--control", "continued"])
    assert "expected NAME=DIR" in capsys.readouterr().err


# ---- find-circuit ----


@pytest.fixture
def task_model(tmp_path):
    tokenizer = word_tokenizer(WORDS)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=8, d_mlp=24)
    checkpoint.save(tmp_path / "task-model", random_model(config, 0, scale=0.2), tokenizer)
    return tmp_path / "task-model"


def test_find_circuit_never_mixes_two_runs(task_model, tmp_path, capsys):
    out = tmp_path / "out"
    arguments = ["find-circuit", str(task_model), "--n", "4", "--steps", "1", "--ks", "5", "--out", str(out)]
    main(arguments)
    written = (out / "scores.json").read_text()
    assert "other settings (n: 4 -> 6); pass --fresh" in refused(capsys, [*arguments[:3], "6", *arguments[4:]])
    assert (out / "scores.json").read_text() == written
    main([*arguments[:3], "6", *arguments[4:], "--fresh"])
    assert json.loads((out / "settings.json").read_text())["n"] == 6


def test_find_circuit_over_results_that_no_settings_describe(task_model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "circuit.json").write_text("{}")  # left by an earlier version, or by hand
    printed = refused(capsys, ["find-circuit", str(task_model), "--n", "2", "--out", str(out)])
    assert "holds results (circuit.json) without the settings.json" in printed
    assert (out / "circuit.json").read_text() == "{}"


def test_find_circuit_with_a_bidirectional_model_without_a_mask(task_model, tmp_path, capsys):
    model = checkpoint.load(task_model)
    bidirectional = tmp_path / "bidirectional"
    checkpoint.save(bidirectional, with_config(model, model.config.replace(attention="bidirectional")),
                    checkpoint.load_tokenizer(task_model))
    assert "without a mask token cannot be asked a question" in refused(
        capsys, ["find-circuit", str(bidirectional), "--n", "2", "--out", str(tmp_path / "o")])


# ---- interruptions ----


def _cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "mdm_circuits.cli", *arguments, "--no-compilation-cache"]


def _run_until(command: list[str], marker: str) -> None:
    """Start `command`, and SIGKILL it as soon as it prints a line containing `marker`."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=os.environ | {"JAX_PLATFORMS": "cpu"})
    for line in process.stdout:
        if marker in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    process.stdout.close()


def test_a_convert_killed_over_a_saved_model_leaves_a_whole_model(llama_dir, tmp_path):
    """Killed after converting, while saving over an earlier model: the directory holds the old model or the
    new one, complete and verified, never a mix; the next save cleans the leftovers."""
    destination = tmp_path / "model"
    main(["convert", str(llama_dir), str(destination)])
    _run_until(_cli("convert", str(llama_dir), str(destination), "--dtype", "bfloat16"), "converted in")
    model = checkpoint.load(destination)  # verified against its checksum
    assert model.embedding.dtype in (jnp.float32, jnp.bfloat16)
    main(["convert", str(llama_dir), str(destination), "--dtype", "bfloat16"])
    assert checkpoint.load(destination).embedding.dtype == jnp.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]


def test_a_save_interrupted_between_its_renames_is_recovered(saved, monkeypatch):
    """The one moment a directory is missing: the old model has been moved aside and the new one not yet
    moved in. The next load or save puts the old model back."""
    original = os.replace
    calls = []

    def crash_on_second(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        original(source, target)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(saved, random_model(ARM, 5), word_level(40))
    monkeypatch.setattr(os, "replace", original)
    assert not saved.exists()
    restored = checkpoint.load(saved)
    assert np.array_equal(restored.embedding[...], random_model(ARM, 0).embedding[...])


def test_a_killed_find_circuit_resumes_to_the_same_scores(task_model, tmp_path):
    arguments = ["find-circuit", str(task_model), "--n", "8", "--batch-size", "2", "--steps", "2", "--ks", "5"]
    subprocess.run(_cli(*arguments, "--out", str(tmp_path / "whole")), check=True, capture_output=True,
                   env=os.environ | {"JAX_PLATFORMS": "cpu"})
    _run_until(_cli(*arguments, "--out", str(tmp_path / "parts")), "attributed 4/8 examples")
    assert (tmp_path / "parts" / "attribution-progress.npz").exists()
    assert not (tmp_path / "parts" / "scores.json").exists()
    resumed = subprocess.run(_cli(*arguments, "--out", str(tmp_path / "parts")), check=True, capture_output=True,
                             text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert "attributed 2/8" not in resumed.stdout  # it did not start again from the first batch
    assert (tmp_path / "parts" / "scores.json").read_text() == (tmp_path / "whole" / "scores.json").read_text()
    assert not (tmp_path / "parts" / "attribution-progress.npz").exists()

