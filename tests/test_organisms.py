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
    assert len(steps) >= 6 and steps[0] == 0 and steps == sorted(steps)
    first, last = organisms.trajectory_model(steps[0]), organisms.trajectory_model(steps[-1])
    assert first.config == last.config == pair.mdm.config
    for a, b in zip(jax.tree.leaves(nnx.state(first, nnx.Param)), jax.tree.leaves(nnx.state(pair.arm, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    middle = organisms.trajectory_model(steps[len(steps) // 2])
    assert not np.array_equal(middle.embedding[...], first.embedding[...])
    with pytest.raises(checkpoint.CheckpointError, match="no adaptation checkpoint of step 1"):
        organisms.trajectory_model(1)


def test_the_shipped_files_are_small_and_carry_no_machine_paths():
    shipped = [file for file in organisms.SHIPPED.rglob("*")
               if file.is_file() and recipe.TRAINING_STATE not in file.relative_to(organisms.SHIPPED).parts]
    assert sum(file.stat().st_size for file in shipped) < 30e6
    assert not [file for file in shipped if file.name == "commit_success.txt"]  # orbax writes the save's path


def _sample(view, n):
    return recipe.evaluation_examples(vocabulary.build(), view, n)


def test_the_shipped_pair_reproduces_its_recorded_accuracy(pair):
    """Recomputed on the first held-out questions of each task, the accuracies match those the build
    recorded for the same questions (to one question, for argmax ties on other hardware)."""
    report = organisms.report()
    n = report["recipe"]["progress_examples"]
    for name, model in (("arm", pair.arm), ("mdm", pair.mdm)):
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
    assert loss[steps[-1]] < 0.3 * loss[steps[0]]
    assert accuracy[steps[-1]]["countdown"] - accuracy[steps[0]]["countdown"] > 0.5
    assert all(accuracy[steps[-1]][task] >= accuracy[steps[0]][task] for task in accuracy[steps[0]])
    # The recorded losses are those of the shipped weights.
    mdm_view = View.for_model(pair.mdm.config)
    sequences = recipe.corpus(pair.tokenizer, mdm_view, report["recipe"]["eval_examples"], seed=recipe.EVAL_SEED)
    for step, model in ((steps[0], organisms.trajectory_model(0)), (steps[-1], pair.mdm)):
        np.testing.assert_allclose(recipe.held_out_loss(model, sequences), loss[step], rtol=1e-4)


def test_the_targets_of_the_shipped_pair_are_met():
    accuracy = organisms.report()["accuracy"]
    for name in ("arm", "mdm"):
        assert accuracy[name]["ioi"] >= 0.85 and accuracy[name]["greater_than"] >= 0.85
        assert accuracy[name]["countdown"] >= 0.25 and accuracy[name]["infilling"] >= 0.25


@pytest.mark.parametrize("task", TASKS.values(), ids=TASKS.keys())
def test_every_task_has_a_common_correct_pool_of_200(pair, task):
    pool = common_correct_pool(task, pair.tokenizer, pair.arm, pair.mdm, n=200, budget=1000)
    assert len(pool.arm) == len(pool.mdm) == 200


def test_loading_a_directory_without_organisms_says_how_to_build_them(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="organisms train"):
        organisms.load(tmp_path)


def test_the_cli_builds_a_set_that_loads_and_a_rerun_gives_the_same_accuracies(tmp_path, capsys):
    cli.main(["organisms", "train", str(tmp_path / "a"), "--quick"])
    printed = capsys.readouterr().out
    assert re.search(r"step 20/20 +loss", printed) and "adaptation step 0:" in printed
    built = organisms.load(tmp_path / "a")
    assert built.mdm.config.is_mdm and built.arm.config.attention == "causal"
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
