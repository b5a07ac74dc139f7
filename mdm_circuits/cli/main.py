"""The `mdm-circuits` command line: compare ARM and MDM circuits (the main job), convert checkpoints, query
converted models, plan memory, generate, build common-correct pools, find circuits and train the shipped
ARM/MDM pair."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from conversion import config_from_hf, convert
from conversion.hf_configs import read_config
from mdm_circuits import organisms, sharding
from mdm_circuits.circuits import plans
from mdm_circuits.circuits.attribution import attribute
from mdm_circuits.circuits.evaluation import faithfulness_curve, smallest_faithful
from mdm_circuits.circuits.graph import Graph, NodeKind
from mdm_circuits.cli import compare
from mdm_circuits.decoding.accuracy import common_correct_pool
from mdm_circuits.decoding.generation import diffuse, greedy
from mdm_circuits.errors import Error, UsageError
from mdm_circuits.model import checkpoint
from mdm_circuits.model.config import ModelConfig
from mdm_circuits.model.planning import plan
from mdm_circuits.model.presets import PRESETS
from mdm_circuits.model.transformer import with_config
from mdm_circuits.organisms import recipe
from mdm_circuits.outputs import RunDirectory
from mdm_circuits.tasks import TASKS
from mdm_circuits.tasks.batch import collate
from mdm_circuits.tasks.views import View


def _convert(args: argparse.Namespace) -> None:
    checkpoint.check_destination(args.destination)
    print(f"converting {args.source}", flush=True)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {done}/{total} tensors", flush=True)

    converted = convert(args.source, mdm=True if args.mdm else None, mask_token_id=args.mask_token_id,
                        dtype=args.dtype, ignore_config_fields=tuple(args.ignore_config_field),
                        progress=progress)
    converted_at = time.perf_counter()
    config = converted.model.config
    print(f"converted in {converted_at - start:.1f} s: {config.n_layers} layers, {config.n_heads} heads "
          f"({config.n_kv_heads} kv), d_model {config.d_model}, {config.attention} attention, "
          f"logit shift {config.logit_shift}, mask token {config.mask_token_id}, "
          f"{jnp.dtype(converted.model.embedding.dtype).name}")
    checkpoint.save(args.destination, converted.model, converted.tokenizer)
    print(f"saved to {args.destination} in {time.perf_counter() - converted_at:.1f} s"
          + ("" if converted.tokenizer else f" without a tokenizer: {converted.tokenizer_problem}"
             if converted.tokenizer_problem else " (the source holds no tokenizer)"))


def _mask_token_id(args: argparse.Namespace, config: ModelConfig, tokenizer) -> int:
    if args.mask_token_id is not None:
        return args.mask_token_id
    if args.mask_token is not None:
        token_id = tokenizer.token_to_id(args.mask_token) if tokenizer else None
        if token_id is None:
            raise UsageError(f"--mask-token {args.mask_token!r} is not a single token of this tokenizer")
        return token_id
    if config.mask_token_id is None:
        raise UsageError("this model has no mask token; pass --mask-token-id N or --mask-token TEXT")
    return config.mask_token_id


def _predict(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    model = checkpoint.load(args.model, verify=not args.no_verify)
    tokenizer = checkpoint.load_tokenizer(args.model)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer.json; convert from a source that has one")
    config = model.config
    if args.attention is not None:
        config = config.replace(attention=args.attention)
    mask_answer = config.is_mdm if args.mask_answer is None else args.mask_answer
    if not mask_answer and (args.mask_token is not None or args.mask_token_id is not None):
        raise UsageError("a mask token was given but the answer is not masked; add --mask-answer")
    tokens = tokenizer.encode(args.prompt).ids
    if not tokens:
        raise UsageError("the prompt is empty")
    answer_position = len(tokens)
    if mask_answer:
        config = config.replace(mask_token_id=_mask_token_id(args, config, tokenizer))
        tokens = tokens + [config.mask_token_id]
    elif not config.logit_shift:
        raise UsageError("this model's logits are not shifted (output i predicts token i); "
                         "pass --mask-answer to append a masked answer position")
    model = with_config(model, config)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s; {config.attention} attention")
    logits = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
    read_at = config.read_position(answer_position)
    probabilities = np.asarray(jax.nn.softmax(logits[read_at]))
    print(f"input ({len(tokens)} tokens): " + "|".join(tokenizer.decode([t], skip_special_tokens=False)
                                                       for t in tokens))
    print(f"top {args.top} predictions for position {answer_position}"
          f"{' (masked)' if mask_answer else ''}, read from the logits at position {read_at}:")
    for rank, token in enumerate(np.argsort(-probabilities)[: args.top], start=1):
        print(f"  {rank}. {tokenizer.decode([int(token)])!r:>16}  p={probabilities[token]:.4f}  "
              f"logit={float(logits[read_at, token]):.3f}")


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


def _bytes(text: str) -> int:
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise UsageError(f"--device-memory takes a size such as 80GiB or 141GB; got {text!r}") from None


def _plan(args: argparse.Namespace) -> None:
    saved = args.model not in PRESETS and (Path(args.model) / checkpoint.MANIFEST).exists()
    if args.model in PRESETS:
        config = PRESETS[args.model]
    else:
        config = _config_from_path(Path(args.model), args.ignore_config_field)
    # A saved model is planned in the dtype it was saved in, anything else in bfloat16, unless told.
    dtype = jnp.dtype(args.dtype or (checkpoint.read_manifest(args.model)[1] if saved else "bfloat16"))
    gib = 2**30
    mesh = None if args.mesh is None else sharding.parse_mesh(args.mesh)
    where = "" if mesh is None else f" on a {args.mesh} (data x model) mesh, per device"
    if args.mode in plans.MODES:
        if args.device_memory is not None:
            limit = _bytes(args.device_memory)
            print(f"finding the largest {args.mode} batch of {args.seq_len} tokens that fits {limit / gib:.1f} GiB"
                  f"{where} ...", flush=True)
            batch, step_chunk, result = plans.largest_fit(
                config, limit, mode=args.mode, seq_len=args.seq_len, steps=args.steps, dtype=dtype, mesh=mesh,
                progress=lambda b, c, p: print(f"  batch {b:5d}, step chunk {c}: peak {p.peak_bytes / gib:8.2f} "
                                               f"GiB", flush=True))
            print(f"chosen: --batch-size {batch}" + (f" --step-chunk {step_chunk}" if args.mode == "eap-ig" else ""))
        else:
            print(f"compiling one {args.mode} batch of {args.batch} x {args.seq_len} tokens ({args.steps} IG steps, "
                  f"{args.step_chunk} at once), {dtype.name} parameters{where}, without allocating them ...",
                  flush=True)
            result = plans.program_memory(config, mode=args.mode, batch=args.batch, seq_len=args.seq_len,
                                          steps=args.steps, step_chunk=args.step_chunk, dtype=dtype, mesh=mesh)
    else:
        if mesh is not None:
            raise UsageError("--mesh plans the circuit programs (--mode eap-ig or patching)")
        print(f"compiling a {args.mode} pass of batch {args.batch} x {args.seq_len} tokens, {dtype.name} "
              f"parameters, without allocating them ...", flush=True)
        result = plan(config, batch=args.batch, seq_len=args.seq_len, dtype=dtype, mode=args.mode)
    print(f"parameters:       {result.n_parameters:,} ({result.parameter_bytes / gib:.2f} GiB)")
    print(f"compiled for {result.backend} in {result.compile_seconds:.1f} s{where}:")
    print(f"  arguments       {result.argument_bytes / gib:8.2f} GiB")
    print(f"  outputs         {result.output_bytes / gib:8.2f} GiB")
    print(f"  temporaries     {result.temp_bytes / gib:8.2f} GiB")
    print(f"  peak estimate   {result.peak_bytes / gib:8.2f} GiB")
    if result.backend == "cpu" and dtype == jnp.bfloat16:
        print("note: XLA on CPU computes bfloat16 matmuls through float32 copies of the weights, which the "
              "temporaries include; an accelerator compiles the same program to less. Run this command on "
              "the target machine for its own figure.")


def _progress(what: str):
    def report(done: int, total: int) -> None:
        print(f"  {what} {done}/{total} examples", flush=True)

    return report


FIND_CIRCUIT_OUTPUTS = ("scores.json", "curve.json", "circuit.json", "attribution-progress.npz")


def _find_circuit(args: argparse.Namespace) -> None:
    settings = {"model": str(Path(args.model).absolute()), "task": args.task, "n": args.n, "seed": args.seed,
                "max_length": args.max_length, "method": args.method, "steps": args.steps,
                "batch_size": args.batch_size, "ks": list(args.ks), "tau": args.tau}
    checkpoint.read_manifest(args.model)  # a wrong path is refused before the output directory is made
    out = RunDirectory(args.out, settings, owned=FIND_CIRCUIT_OUTPUTS, fresh=args.fresh)
    model = checkpoint.load(args.model, verify=not args.no_verify)
    tokenizer = checkpoint.load_tokenizer(args.model)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer.json; the task needs one to build its prompts")
    config, task = model.config, TASKS[args.task]
    examples = task.examples(tokenizer, args.n, seed=args.seed, max_length=args.max_length,
                             view=View.for_model(config))
    batch = collate(examples)
    graph = Graph.for_model(config)
    print(f"{batch.size} {args.task} pairs of up to {batch.clean.shape[1]} tokens "
          f"({'MDM view: masked answer' if config.is_mdm else 'ARM view'}); {graph.n_edges:,} edges; "
          f"{args.method}" + ("" if args.method in ("eap", "exact") else f", {args.steps} steps"), flush=True)
    start = time.perf_counter()
    scores = attribute(model, batch, task.METRIC, method=args.method, steps=args.steps,
                       batch_size=args.batch_size, progress=_progress("attributed"),
                       resume=None if args.method == "exact" else out.path("attribution-progress.npz"))
    print(f"attributed in {time.perf_counter() - start:.1f} s; {task.METRIC.name}: clean {scores.clean_metric:.3f}, "
          f"corrupted {scores.corrupted_metric:.3f}", flush=True)
    out.write("scores.json", graph.json(scores.matrix))
    importance = scores.node_importance()
    heads = sorted((i for i, node in enumerate(graph.sources) if node.kind == NodeKind.HEAD),
                   key=lambda i: -importance[i])[: args.top_heads]
    print(f"top {args.top_heads} heads by summed |score| of their edges: "
          + ", ".join(f"{graph.sources[i].name} ({importance[i]:.3g})" for i in heads))
    ks = sorted({min(k, graph.n_edges) for k in args.ks})
    curve = faithfulness_curve(model, batch, scores, task.METRIC, ks, batch_size=args.batch_size,
                               progress=_progress("evaluated"))
    print(f"faithfulness of the top-K circuit (clean {curve.evaluation.clean_metric:.3f}, "
          f"fully ablated {curve.evaluation.ablated_metric:.3f}):")
    for k, value in zip(curve.ks, curve.faithfulness):
        print(f"  K = {k:>7,}  {value:7.3f}")
    out.write("curve.json", json.dumps({"ks": curve.ks.tolist(), "faithfulness": curve.faithfulness.tolist(),
                                        "clean_metric": curve.evaluation.clean_metric,
                                        "ablated_metric": curve.evaluation.ablated_metric}, indent=1))
    if args.tau is not None:
        k, circuit, value = smallest_faithful(model, batch, scores, task.METRIC, args.tau,
                                              batch_size=args.batch_size)
        out.write("circuit.json", graph.json(scores.matrix, circuit))
        print(f"smallest top-K circuit reaching faithfulness {args.tau}: K = {k:,} ({value:.3f})")
    print(f"wrote {', '.join(name for name in FIND_CIRCUIT_OUTPUTS if out.path(name).exists())} to {args.out}")


def _load_with_tokenizer(directory: str, verify: bool = True):
    model, tokenizer = checkpoint.load(directory, verify=verify), checkpoint.load_tokenizer(directory)
    if tokenizer is None:
        raise UsageError(f"{directory} has no tokenizer.json; convert from a source that has one")
    return model, tokenizer


def _generate(args: argparse.Namespace) -> None:
    model, tokenizer = _load_with_tokenizer(args.model, verify=not args.no_verify)
    config = model.config
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt:
        raise UsageError("the prompt is empty")
    tokens = jnp.asarray(prompt + [config.mask_token_id or 0] * args.new)
    start = time.perf_counter()
    if config.attention == "causal":
        output = greedy(model, tokens, jnp.asarray(len(prompt)), args.new)
        how = "greedy decoding"
    else:
        at = jnp.arange(len(prompt), len(prompt) + args.new)
        output = diffuse(model, tokens, jnp.ones(tokens.shape, bool), jax.random.key(args.seed), at,
                         steps=args.steps or args.new, unmasking=args.unmasking, temperature=args.temperature)
        how = (f"diffusion decoding, {args.steps or args.new} steps, {args.unmasking} order, temperature "
               f"{args.temperature}")
    generated = [int(t) for t in output[len(prompt):]]
    print(f"{how} ({time.perf_counter() - start:.1f} s):")
    print(tokenizer.decode(prompt + generated))


def _pool(args: argparse.Namespace) -> None:
    arm, tokenizer = _load_with_tokenizer(args.arm, verify=not args.no_verify)
    mdm = checkpoint.load(args.mdm, verify=not args.no_verify)
    if arm.config.attention != "causal" or not mdm.config.is_mdm:
        raise UsageError("the first model must be an ARM (causal) and the second an MDM (mask token)")
    task = TASKS[args.task]
    print(f"drawing {args.task} examples until {args.n} are solved by both models (budget {args.budget})",
          flush=True)
    start = time.perf_counter()
    pool = common_correct_pool(task, tokenizer, arm, mdm, n=args.n, budget=args.budget, chunk=args.chunk,
                               seed=args.seed, max_length=args.max_length,
                               progress=lambda drawn, pooled, n: print(f"  drawn {drawn}, pooled {pooled}/{n}",
                                                                       flush=True))
    print(f"pool of {len(pool.arm)} from {pool.drawn} drawn in {time.perf_counter() - start:.1f} s; accuracy: "
          f"ARM {pool.arm_accuracy:.3f}, MDM {pool.mdm_accuracy:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as file:
        for arm_example, mdm_example in zip(pool.arm, pool.mdm):
            file.write(json.dumps({"arm": dataclasses.asdict(arm_example), "mdm": dataclasses.asdict(mdm_example)})
                       + "\n")
    print(f"wrote {out}")


def _organisms_train(args: argparse.Namespace) -> None:
    chosen = recipe.QUICK if args.quick else recipe.Recipe()
    print(f"building the organisms in {args.out}" + (" (quick smoke-test recipe)" if args.quick else ""), flush=True)
    start = time.perf_counter()
    report = recipe.build(args.out, chosen, progress=lambda line: print(line, flush=True))
    print(f"built in {time.perf_counter() - start:.0f} s")
    print(recipe.accuracy_table(report))


def _organisms_show(args: argparse.Namespace) -> None:
    print(recipe.accuracy_table(organisms.report(args.directory)))


def _config_from_path(path: Path, ignore_fields: list[str]) -> ModelConfig:
    if (path / checkpoint.MANIFEST).exists():
        return checkpoint.read_manifest(path)[0]
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.exists():
        raise UsageError(f"{path} is neither a preset, a saved model nor a Hugging Face config.json")
    return config_from_hf(read_config(config_file), source=str(config_file), ignore_fields=tuple(ignore_fields))[0]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        return sorted({_positive(part) for part in text.split(",")})
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from error


def _default_cache() -> str:
    """$MDM_CIRCUITS_COMPILATION_CACHE, else the user's cache directory ($XDG_CACHE_HOME or ~/.cache)."""
    if "MDM_CIRCUITS_COMPILATION_CACHE" in os.environ:
        return os.environ["MDM_CIRCUITS_COMPILATION_CACHE"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache_home) / "mdm_circuits" / "xla")


def _use_compilation_cache(directory: str | None) -> None:
    """Keep compiled XLA programs on disk, so a second run with the same shapes does not compile again."""
    if not directory or directory == "off":
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--no-verify", action="store_true",
                        help="load saved models without checking their checksum (saves one read of the weights)")
    cache = common.add_mutually_exclusive_group()
    cache.add_argument("--compilation-cache", default=_default_cache(), metavar="DIR",
                       help="directory of compiled programs kept between runs (default: %(default)s; "
                            "$MDM_CIRCUITS_COMPILATION_CACHE sets another, 'off' none)")
    cache.add_argument("--no-compilation-cache", dest="compilation_cache", action="store_const", const=None,
                       help="compile everything afresh and keep nothing")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdm-circuits", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_options()

    convert = commands.add_parser("convert", parents=[common],
                                  help="convert a Hugging Face or GGUF checkpoint and save it")
    convert.add_argument("source", help="Hugging Face directory, .gguf file, or 'smollm2-135m-instruct'")
    convert.add_argument("destination", help="directory to save the converted model in")
    convert.add_argument("--mdm", action="store_true",
                         help="read a Llama/Qwen2 checkpoint as an MDM (DiffuLLaMA): bidirectional, shifted")
    convert.add_argument("--mask-token-id", type=int, help="mask token of the MDM (DiffuLLaMA default: 811)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                         help="parameter dtype; auto keeps bfloat16 checkpoints in bfloat16, else float32")
    convert.add_argument("--ignore-config-field", action="append", default=[], metavar="FIELD",
                         help="a config.json field you know does not change the computation (repeatable)")
    convert.set_defaults(run=_convert)

    predict = commands.add_parser("predict", parents=[common], help="top predictions of a converted model for a prompt")
    predict.add_argument("model", help="directory written by `mdm-circuits convert`")
    predict.add_argument("prompt")
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--attention", choices=["causal", "bidirectional"],
                         help="override the model's attention (e.g. query an ARM bidirectionally)")
    predict.add_argument("--mask-answer", action=argparse.BooleanOptionalAction, default=None,
                         help="append a mask token at the answer position (the MDM view); "
                              "the default for models with a mask token")
    predict.add_argument("--mask-token-id", type=int, help="mask token id, if the model has none")
    predict.add_argument("--mask-token", help="mask token given as text, e.g. '<|endoftext|>'")
    predict.set_defaults(run=_predict)

    plan = commands.add_parser("plan", parents=[common], help="parameter count and compiled memory, without weights")
    plan.add_argument("model", help=f"a preset ({', '.join(PRESETS)}), a saved model or a config.json")
    plan.add_argument("--batch", type=int, default=8)
    plan.add_argument("--seq-len", type=int, default=128)
    plan.add_argument("--dtype", choices=["float32", "bfloat16"],
                      help="parameter dtype (default: a saved model's own, else bfloat16)")
    plan.add_argument("--mode", default="forward", choices=["forward", "gradient", *plans.MODES],
                      help="gradient: forward + backward to the input embeddings; eap-ig, patching: one batch of "
                           "the real attribution or node-patching program")
    plan.add_argument("--steps", type=int, default=5, help="IG steps (eap-ig)")
    plan.add_argument("--step-chunk", type=int, default=1, help="IG steps batched together (eap-ig)")
    plan.add_argument("--mesh", metavar="DATAxMODEL", help="plan per device on a mesh, such as 2x4 (eap-ig, patching)")
    plan.add_argument("--device-memory", metavar="SIZE",
                      help="find the largest batch (and step chunk) that fits this much per device, such as 80GiB")
    plan.add_argument("--ignore-config-field", action="append", default=[], metavar="FIELD",
                      help="a config.json field you know does not change the computation (repeatable)")
    plan.set_defaults(run=_plan)

    find = commands.add_parser("find-circuit", parents=[common],
                               help="attribute a task's edges, evaluate top-K circuits, save JSON")
    find.add_argument("model", help="directory written by `mdm-circuits convert`")
    find.add_argument("--task", default="ioi", choices=sorted(TASKS))
    find.add_argument("--n", type=_positive, default=32, help="number of clean/corrupted pairs")
    find.add_argument("--seed", type=int, default=0)
    find.add_argument("--max-length", type=int, help="leave out prompts longer than this many tokens")
    find.add_argument("--method", default="eap_ig_inputs", choices=["eap", "eap_ig_inputs", "eap_ig_activations",
                                                                    "exact"])
    find.add_argument("--steps", type=_positive, default=5, help="integration steps of EAP-IG")
    find.add_argument("--batch-size", type=_positive, default=32)
    find.add_argument("--ks", type=_sizes, default=[10, 100, 1000, 10000],
                      help="comma-separated circuit sizes to evaluate (default 10,100,1000,10000)")
    find.add_argument("--tau", type=float, help="also find the smallest top-K circuit reaching this faithfulness")
    find.add_argument("--top-heads", type=_positive, default=10)
    find.add_argument("--out", default="out/circuit", help="directory for scores.json, curve.json, circuit.json "
                                                           "(a rerun with the same settings resumes there)")
    find.add_argument("--fresh", action="store_true",
                      help="delete the results of a run with other settings in --out and start again")
    find.set_defaults(run=_find_circuit)

    generate = commands.add_parser("generate", parents=[common],
                                   help="continue a prompt: greedy for an ARM, diffusion for an MDM")
    generate.add_argument("model", help="directory written by `mdm-circuits convert`")
    generate.add_argument("prompt")
    generate.add_argument("--new", type=_positive, default=16, help="tokens to generate (the MDM's mask canvas)")
    generate.add_argument("--steps", type=_positive, help="diffusion steps (default: one per token)")
    generate.add_argument("--unmasking", default="confidence", choices=["confidence", "margin", "entropy", "random"])
    generate.add_argument("--temperature", type=float, default=0.0, help="0: the most likely token")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=_generate)

    pool = commands.add_parser("pool", parents=[common], help="the common-correct pool of an ARM/MDM pair for a task")
    pool.add_argument("arm", help="the ARM's directory (its tokenizer is used)")
    pool.add_argument("mdm", help="the MDM's directory")
    pool.add_argument("--task", default="ioi", choices=sorted(TASKS))
    pool.add_argument("--n", type=_positive, default=500, help="examples to pool")
    pool.add_argument("--budget", type=_positive, default=5000, help="examples to draw at most")
    pool.add_argument("--chunk", type=_positive, default=100)
    pool.add_argument("--seed", type=int, default=0)
    pool.add_argument("--max-length", type=_positive)
    pool.add_argument("--out", default="out/pool.jsonl", help="JSONL of {arm, mdm} example pairs")
    pool.set_defaults(run=_pool)

    compare.add_parser(commands, common, _positive)

    organisms_parser = commands.add_parser("organisms", help="the shipped ARM/MDM pair trained by this project")
    organism_commands = organisms_parser.add_subparsers(dest="organisms_command", required=True)
    train = organism_commands.add_parser("train", parents=[common],
                                         help="train the pair and its adaptation trajectory from scratch")
    train.add_argument("out", help="directory for arm/, mdm/, trajectory/ and organisms.json (resumes a build there)")
    train.add_argument("--quick", action="store_true", help="a seconds-long smoke test of the pipeline (tiny model)")
    train.set_defaults(run=_organisms_train)
    show = organism_commands.add_parser("show", parents=[common],
                                        help="the accuracy table of a built pair (default: the shipped one)")
    show.add_argument("directory", nargs="?", help="a directory written by `organisms train`")
    show.set_defaults(run=_organisms_show)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _use_compilation_cache(args.compilation_cache)
    try:
        args.run(args)
    except Error as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
