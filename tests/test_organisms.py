"""The shipped ARM/MDM pair, its tokenizer, its adaptation trajectory and the pipeline that builds them."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mdm_circuits import cli, organisms
from mdm_circuits.decoding.accuracy import common_correct_pool
from mdm_circuits.model import checkpoint
from mdm_circuits.organisms import recipe, vocabulary
from mdm_circuits.tasks import TASKS, greater_than, infilling
from mdm_circuits.tasks.splits import Split
from mdm_circuits.tasks.views import View

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def pair():
    return organisms.load()


def test_the_tokenizer_poses_every_task_in_both_views():
    tokenizer = vocabulary.build()
    mask = tokenizer.token_to_id(vocabulary.MASK)
    assert greater_than.year_tokens(tokenizer) == "pairs"  # "1732" = "17" "32", as GPT-2 writes years
    assert tokenizer.encode("Numbers: 3, 17. Solution: 17+3").tokens == [
        vocabulary.BOS, "Numbers", ":", "3", ",", "17", ".", "Solution", ":", "17", "+", "3"]
    for task in TASKS.values():
        for view in (View(), View(mask)):
            for example in task.examples(tokenizer, 20, seed=3, view=view):
                assert vocabulary.UNK not in tokenizer.decode(example.clean, skip_special_tokens=False)
                assert (mask in example.clean) == view.is_mdm
    assert infilling.usable_frames(tokenizer) == list(infilling.FRAMES)  # every infilling choice is posable


def test_the_shipped_pair_is_an_arm_and_the_mdm_post_trained_from_it(pair):
    arm, mdm, tokenizer = pair
    assert arm.config.n_layers >= 8  # enough depth for a layer distribution of importance
    assert arm.config.attention == "causal" and arm.config.mask_token_id is None and arm.config.qkv_bias
    assert arm.config.n_kv_heads < arm.config.n_heads  # grouped-query attention, as Qwen2
    assert mdm.config == arm.config.replace(attention="bidirectional",
                                            mask_token_id=tokenizer.token_to_id(vocabulary.MASK))
    assert mdm.config.logit_shift  # kept from the ARM, as Dream and DiffuLLaMA keep it
    assert tokenizer.get_vocab() == vocabulary.build().get_vocab()


def test_the_arm_is_causal_and_the_mdm_is_not(pair):
    tokens = jnp.asarray(pair.tokenizer.encode("When Mary and John went to the store , John gave a drink to").ids)
    changed = tokens.at[-3].set(pair.tokenizer.token_to_id("kiss"))
    np.testing.assert_array_equal(pair.arm(tokens)[:-3], pair.arm(changed)[:-3])  # earlier positions unchanged
    assert not np.allclose(pair.arm(tokens)[-3:], pair.arm(changed)[-3:])
    assert not np.allclose(pair.mdm(tokens)[:-3], pair.mdm(changed)[:-3])  # the MDM reads the future


def test_the_trajectory_starts_at_the_arm_and_ends_at_the_mdm(pair):
    steps = organisms.trajectory_steps()
    assert len(steps) == recipe.Recipe().trajectory and steps[0] == 0 and steps == sorted(steps)
    first, last = organisms.trajectory_model(steps[0]), organisms.trajectory_model(steps[-1])
    assert first.config == last.config == pair.mdm.config
    for a, b in zip(jax.tree.leaves(nnx.state(first, nnx.Param)), jax.tree.leaves(nnx.state(pair.arm, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    middle = organisms.trajectory_model(steps[len(steps) // 2])
    assert not np.array_equal(middle.embedding[...], first.embedding[...])
    with pytest.raises(checkpoint.CheckpointError, match="no adaptation checkpoint of step 1"):
        organisms.trajectory_model(1)


def _weights(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_the_controls_start_from_the_arm_and_differ_where_they_should(pair):
    """The continued ARM is a causal model of the ARM's shapes with other weights; the second MDM seed is an MDM
    of the MDM's settings whose weights differ from the first seed's."""
    continued, second = organisms.control(organisms.CONTINUED_ARM), organisms.control(organisms.MDM_SEED_2)
    assert continued.config == pair.arm.config and second.config == pair.mdm.config
    for control, reference in ((continued, pair.arm), (second, pair.mdm), (second, pair.arm)):
        differing = [not np.array_equal(a, b) for a, b in zip(_weights(control), _weights(reference))]
        assert all(differing)
    with pytest.raises(checkpoint.CheckpointError, match="the controls are continued_arm, mdm_seed_2"):
        organisms.control("arm_seed_2")
    recorded = organisms.report()["recipe"]
    assert recorded["continued_arm"] == recorded["mdm"] | {"objective": "causal"}
    assert recorded["mdm_seed_2"] == recorded["mdm"] | {"seed": recorded["second_seed"]}


def test_no_evaluation_question_occurs_in_the_training_corpus(pair):
    """Over the whole training corpus of both views: the test split's questions (as the report evaluates them)
    never occur as a training question."""
    report = organisms.report()
    tokenizer, n = pair.tokenizer, report["recipe"]["examples_per_task"]
    arm_corpus = recipe.corpus(tokenizer, View(), n)
    assert arm_corpus.size == n * len(TASKS)
    test = recipe.evaluation_examples(tokenizer, View(), report["recipe"]["eval_examples"])
    assert not any(found.any() for found in recipe.in_corpus(arm_corpus, test).values())
    mdm_view = View.for_model(pair.mdm.config)
    mdm_corpus = recipe.corpus(tokenizer, mdm_view, n)
    mask = pair.mdm.config.mask_token_id
    questions = np.where(np.asarray(mdm_corpus.maskable), mask, np.asarray(mdm_corpus.tokens))
    trained = {tuple(row[valid]) for row, valid in zip(questions, np.asarray(mdm_corpus.valid))}
    for task, posed in recipe.evaluation_examples(tokenizer, mdm_view, report["recipe"]["eval_examples"]).items():
        # A training row is the question with its answer and <eos>; the question is that row less <eos>.
        assert not [e for e in posed if tuple(e.clean) + (tokenizer.token_to_id(vocabulary.EOS),) in trained], task
    assert report["eval_questions_in_training"]["test"] == {task: 0.0 for task in TASKS}


def test_the_shipped_files_are_small_and_carry_no_machine_paths():
    shipped = [file for file in organisms.SHIPPED.rglob("*")
               if file.is_file() and recipe.TRAINING_STATE not in file.relative_to(organisms.SHIPPED).parts]
    assert sum(file.stat().st_size for file in shipped) < 45e6
    assert not [file for file in shipped if file.name == "commit_success.txt"]  # orbax writes the save's path


def _sample(view, n):
    return recipe.evaluation_examples(vocabulary.build(), view, n)


def test_the_shipped_models_reproduce_their_recorded_accuracy(pair):
    """Recomputed on the first test-split questions of each task, the accuracies match those the build
    recorded for the same questions (to one question, for argmax ties on other hardware)."""
    report = organisms.report()
    n = report["recipe"]["progress_examples"]
    models = {organisms.ARM: pair.arm, organisms.MDM: pair.mdm} | {
        name: organisms.control(name) for name in organisms.CONTROLS}
    for name, model in models.items():
        measured = recipe.accuracies(model, _sample(View.for_model(model.config), n))
        for task, accuracy in report["sample_accuracy"][name].items():
            assert abs(measured[task] - accuracy) <= 1 / n + 1e-9, (name, task, measured[task], accuracy)


def test_the_readme_table_is_the_recorded_one():
    table = recipe.accuracy_table(organisms.report())
    assert table in README.read_text()


def test_the_mdm_beats_the_arm_weights_under_mdm_settings(pair):
    """Adaptation is what makes the MDM: step 0 (the ARM's weights, bidirectional, masked answers) has a far
    higher masked diffusion loss on held-out sequences, and solves far fewer multi-token answers."""
    report = organisms.report()
    steps = [str(step) for step in organisms.trajectory_steps()]
    loss, accuracy = report["trajectory_masked_diffusion_loss"], report["trajectory_accuracy"]
    assert loss[steps[-1]] < 0.5 * loss[steps[0]]
    assert accuracy[steps[-1]]["countdown"] > accuracy[steps[0]]["countdown"]
    # The recorded losses are those of the shipped weights.
    mdm_view = View.for_model(pair.mdm.config)
    sequences = recipe.corpus(pair.tokenizer, mdm_view, report["recipe"]["eval_examples"], seed=recipe.EVAL_SEED,
                              split=Split.TEST)
    for step, model in ((steps[0], organisms.trajectory_model(0)), (steps[-1], pair.mdm)):
        np.testing.assert_allclose(recipe.held_out_loss(model, sequences), loss[step], rtol=1e-4)


# Chance on the test split, generously: IOI and Greater-Than are two-way choices (the two names; an ending
# above or below the start), an infilling frame offers 2 to 8 words, a Countdown answer is one of 12 orderings.
WELL_ABOVE_CHANCE = {"ioi": 0.6, "greater_than": 0.6, "countdown": 0.2, "infilling": 0.5}


def test_the_targets_of_the_shipped_pair_are_met():
    """On questions never seen in training, both models are well above chance on every task and, on at least
    three tasks, neither is at ceiling (so a common-correct pool is a real selection)."""
    accuracy = organisms.report()["accuracy"]
    test = {name: accuracy[name]["test"] for name in (organisms.ARM, organisms.MDM)}
    for name, by_task in test.items():
        assert all(by_task[task] >= floor for task, floor in WELL_ABOVE_CHANCE.items()), (name, by_task)
    assert sum(max(test[name][task] for name in test) < 0.97 for task in TASKS) >= 3, test


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_every_task_has_a_common_correct_pool_on_the_test_split(pair, task):
    distinct = len({tuple(e.clean + e.corrupted) for e in task.examples(pair.tokenizer, 2000, split="test")})
    pool = common_correct_pool(task, pair.tokenizer, pair.arm, pair.mdm, n=200, budget=1000, split="test")
    assert len(pool.arm) == len(pool.mdm) >= min(200, distinct // 2)


def test_loading_a_directory_without_organisms_says_how_to_build_them(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="organisms train"):
        organisms.load(tmp_path)


def test_the_cli_builds_a_set_that_loads_and_a_rerun_gives_the_same_accuracies(tmp_path, capsys):
    cli.main(["organisms", "train", str(tmp_path / "a"), "--quick"])
    printed = capsys.readouterr().out
    assert re.search(r"step 20/20 +loss", printed) and "adaptation step 0:" in printed
    assert "control: the ARM trained on, causal" in printed and "control: the adaptation with another seed" in printed
    built = organisms.load(tmp_path / "a")
    assert built.mdm.config.is_mdm and built.arm.config.attention == "causal"
    assert organisms.control(organisms.CONTINUED_ARM, tmp_path / "a").config == built.arm.config
    first = organisms.report(tmp_path / "a")
    assert not list((tmp_path / "a" / organisms.ARM).rglob("commit_success.txt"))
    assert len(first["trajectory_steps"]) == recipe.QUICK.trajectory
    # Rerunning the finished build resumes at the end of both stages and reports the same numbers.
    cli.main(["organisms", "train", str(tmp_path / "a"), "--quick"])
    assert "resuming from step 20" in capsys.readouterr().out
    assert organisms.report(tmp_path / "a")["accuracy"] == first["accuracy"]
    cli.main(["organisms", "show", str(tmp_path / "a")])
    assert recipe.accuracy_table(first) in capsys.readouterr().out
    # A build from scratch elsewhere gives the same weights and accuracies.
    recipe.build(tmp_path / "b", recipe.QUICK, progress=lambda line: None)
    assert organisms.report(tmp_path / "b")["accuracy"] == first["accuracy"]
    rebuilt = organisms.load(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(nnx.state(built.mdm)), jax.tree.leaves(nnx.state(rebuilt.mdm))):
        np.testing.assert_array_equal(a, b)
