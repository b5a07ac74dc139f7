"""`mdm-circuits compare`: the main job, with a rich progress bar for every stage."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mdm_circuits import sharding
from mdm_circuits.comparison import Settings, compare
from mdm_circuits.comparison.progress import Reporter
from mdm_circuits.errors import UsageError
from mdm_circuits.tasks import TASKS


class RichReporter(Reporter):
    """Each stage as a line with a bar (where the stage has a count) and its time."""

    def __init__(self, progress: Progress):
        self.progress, self.task = progress, None

    def begin(self, stage: str, total: int | None = None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(stage, total=total)

    def update(self, done: int, total: int | None = None) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=done, **({} if total is None else {"total": total}))

    def end(self, stage: str, seconds: float) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.progress.console.print(f"  {stage}: {seconds:.1f} s", markup=False)

    def note(self, line: str) -> None:
        self.progress.console.print(f"  {line}", markup=False)


def _control(text: str) -> tuple[str, str]:
    name, separator, directory = text.partition("=")
    if not separator or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, directory


def _names(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part}))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def add_parser(commands, common: argparse.ArgumentParser, positive) -> None:
    defaults = Settings()
    compare_parser = commands.add_parser(
        "compare", parents=[common], help="the main job: ARM vs MDM circuits with nulls, controls and a report",
        description="Compare the circuits of an ARM and the MDM post-trained from it on every task, and write a "
                    "report. With no --arm/--mdm, the default pair shipped with the package (and its adaptation "
                    "trajectory) is compared.")
    models = compare_parser.add_argument_group("models")
    models.add_argument("--arm", help="the ARM: a converted model or a Hugging Face checkpoint directory")
    models.add_argument("--mdm", help="the MDM post-trained from it (same kinds of directory)")
    models.add_argument("--mdm-kind", choices=["dream", "diffullama", "llada"],
                        help="read a Hugging Face MDM as this family (DiffuLLaMA's config does not say it is an MDM)")
    models.add_argument("--control", type=_control, action="append", default=[], metavar="NAME=DIR",
                        help="another model to compare (a continued ARM, another seed, a checkpoint); repeatable")
    study = compare_parser.add_argument_group("protocol")
    study.add_argument("--tasks", type=_names, default=defaults.tasks,
                       help=f"comma-separated tasks (default: all of {', '.join(TASKS)})")
    study.add_argument("--pool", type=positive, default=defaults.pool, help="questions both models solve, per task")
    study.add_argument("--budget", type=positive, default=defaults.budget, help="questions drawn at most, per task")
    study.add_argument("--split", choices=("test", "train", "all"), default=defaults.split,
                       help="the tasks' questions to pool (test: held out from the default pair's training)")
    study.add_argument("--method", default=defaults.method, choices=["eap", "eap_ig_inputs", "eap_ig_activations"])
    study.add_argument("--steps", type=positive, default=defaults.steps, help="integration steps of EAP-IG")
    study.add_argument("--protocol", default=defaults.protocol, choices=["single", "multi"],
                       help="query the MDM once with every answer position masked, or step by step")
    study.add_argument("--denoising-steps", type=positive, help="steps of the multi-step protocol "
                                                                "(default: one per answer token)")
    study.add_argument("--order", default=defaults.order, choices=["left_to_right", "confidence", "random"],
                       help="the reveal order of the multi-step protocol")
    study.add_argument("--ks", type=_ks, default=defaults.ks, help="comma-separated circuit sizes to sweep "
                                                                   "(default: 1-50%% of the edges, 100, 1000, 10000)")
    study.add_argument("--ablation", default=defaults.ablation,
                       choices=["corrupted", "zero", "mean", "mean_positional", "resample"])
    study.add_argument("--seed", type=int, default=defaults.seed)
    study.add_argument("--bootstrap", type=positive, default=defaults.bootstrap, help="resamples per interval")
    study.add_argument("--null-draws", type=positive, default=defaults.null_draws,
                       help="random edge-set pairs of the chance null")
    study.add_argument("--splits", type=positive, default=defaults.splits, help="half-pool splits of the noise null")
    study.add_argument("--causal-size", type=positive, default=defaults.causal_size,
                       help="important early components zeroed in the causal check")
    study.add_argument("--causal-draws", type=positive, default=defaults.causal_draws,
                       help="draws of each control set of the causal check")
    study.add_argument("--exact-questions", type=int, default=defaults.exact_questions,
                       help="pooled questions on which attribution is checked against exact patching of every "
                            "edge, ARM and MDM (0: no check; cost edges x questions forwards per model)")
    study.add_argument("--faithfulness-questions", type=positive, default=defaults.faithfulness_questions,
                       help="pooled questions every compared circuit is run on for its faithfulness")
    study.add_argument("--max-length", type=positive, help="leave out questions longer than this many tokens")
    running = compare_parser.add_argument_group("running")
    running.add_argument("--batch-size", type=positive, default=defaults.batch_size)
    running.add_argument("--mesh", metavar="DATAxMODEL",
                         help="run attribution and causal checks on a device mesh, such as 2x4 (not a setting: a "
                              "run may resume on another mesh)")
    running.add_argument("--distributed", nargs="?", const="", metavar="COORDINATOR:PORT,PROCESSES,ID",
                         help="run as one of several processes (one or more per host, every one with this command) "
                              "on a --mesh over all their devices; JAX finds the others on a Cloud TPU pod slice, "
                              "under Slurm or Open MPI, elsewhere give process 0's address, the count and this id")
    running.add_argument("--models-per-program", type=int, default=defaults.models_per_program,
                         help="stack at most this many models of one architecture in one program (0: all)")
    running.add_argument("--out", default="out/compare", help="output directory (a rerun resumes there)")
    running.add_argument("--fresh", action="store_true",
                         help="delete the results of a run with other settings in --out and start again")
    compare_parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    settings = Settings(arm=args.arm, mdm=args.mdm, mdm_kind=args.mdm_kind, controls=tuple(args.control),
                        tasks=args.tasks, pool=args.pool, budget=args.budget, split=args.split, method=args.method,
                        steps=args.steps, protocol=args.protocol, denoising_steps=args.denoising_steps,
                        order=args.order, ks=args.ks,
                        ablation=args.ablation, seed=args.seed, bootstrap=args.bootstrap, null_draws=args.null_draws,
                        splits=args.splits, causal_size=args.causal_size, causal_draws=args.causal_draws,
                        exact_questions=args.exact_questions, faithfulness_questions=args.faithfulness_questions,
                        max_length=args.max_length, batch_size=args.batch_size,
                        models_per_program=args.models_per_program)
    if args.models_per_program < 0:
        raise UsageError("--models-per-program must be 0 (all) or positive")
    if args.distributed is not None:
        if args.mesh is None:
            raise UsageError("--distributed runs on a mesh over every process's devices; give --mesh DATAxMODEL")
        sharding.join_processes(args.distributed)
    console = Console(highlight=False)
    console.print(f"comparing ARM and MDM circuits on {', '.join(settings.tasks)} into {args.out}", markup=False)
    start = time.perf_counter()
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        summary = compare(settings, args.out, fresh=args.fresh, reporter=RichReporter(progress),
                          mesh=None if args.mesh is None else sharding.parse_mesh(args.mesh))
    console.print(f"done in {time.perf_counter() - start:.0f} s; the paper's findings, by this run:")
    for finding in summary["findings"]:
        console.print(f"  {finding['verdict']:>12}: {finding['finding']}", markup=False)
    console.print(f"wrote {args.out}/report.md, report.html, summary.json and figures/", markup=False)
