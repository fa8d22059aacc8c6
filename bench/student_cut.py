"""Which layers a shallower student keeps: a teacher cut to N layers evenly spaced, or to the N layers that change
the hidden state most on calibration conversations (posttrain.model.student), scored by its loss before any
training — how much of the teacher survives the cut.

Loss: mean negative log-likelihood (nats per token) of the assistant tokens of held-out conversations, one
forward per conversation in float32: the hard tier's SFT traces (rows after the calibration rows) and
general assistant answers (the bundled RewardBench pairs' prompt → chosen answer). CPU is enough (SmolLM2-135M:
about 20 s per model on 2 cores).

    python bench/student_cut.py --out results                          # SmolLM2-135M-Instruct, 15/20/24 layers
    python bench/student_cut.py --model runs/smollm2/grpo/model --layers 20 --out results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# bench/rewards.py would shadow the `rewards` package: import from the repository root, not from bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from posttrain.data.chat import conversation_token_ids, encode_conversation  # noqa: E402
from posttrain.model.gguf import SMOLLM2_GGUF, resolve_model_path  # noqa: E402
from posttrain.model.student import choose_layers, keep_layers, layer_changes  # noqa: E402

CALIBRATION = "data/arith_hard/sft.jsonl"
CALIBRATION_ROWS = 32  # posttrain convert's rows per calibration file


def held_out_sets(tokenizer, rows: int) -> dict[str, list[tuple[list[int], list[bool]]]]:
    traces = [json.loads(line)["messages"] for line in open(ROOT / CALIBRATION)]
    traces = traces[CALIBRATION_ROWS : CALIBRATION_ROWS + rows]  # not the calibration rows
    pairs = [json.loads(line) for line in open(ROOT / "data/rewardbench/pairs.jsonl")][:rows]
    answers = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]
        for r in pairs
    ]
    return {
        "hard-tier SFT traces": [encode_conversation(tokenizer, m) for m in traces],
        "general answers (RewardBench chosen)": [encode_conversation(tokenizer, m) for m in answers],
    }


@torch.no_grad()
def loss(model, samples: list[tuple[list[int], list[bool]]]) -> float:
    total, count = 0.0, 0
    for ids, targets in samples:
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].double()
        picked = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        mask = torch.tensor(targets[1:])
        total -= picked[mask].sum().item()
        count += int(mask.sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2_GGUF)
    p.add_argument("--layers", type=int, nargs="+", default=[15, 20, 24])
    p.add_argument("--rows", type=int, default=48, help="held-out conversations per set")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    sets = held_out_sets(tokenizer, args.rows)
    teacher = load()
    total = len(teacher.model.layers)
    started = time.perf_counter()
    changes = layer_changes(teacher, conversation_token_ids([str(ROOT / CALIBRATION)], tokenizer))
    results = {
        "model": args.model,
        "calibration": f"{CALIBRATION}, first {CALIBRATION_ROWS} rows",
        "layer_changes": [round(c, 4) for c in changes],
        "calibration_s": time.perf_counter() - started,
        "rows": {},
    }
    cuts = [("teacher", list(range(total)))] + [
        (f"{n} layers, {how}", choose_layers(total, n, changes if how == "calibrated" else None))
        for n in args.layers
        for how in ("evenly spaced", "calibrated")
    ]
    for name, kept in cuts:
        student = keep_layers(load(), kept)
        row = {"layers": kept, **{label: loss(student, samples) for label, samples in sets.items()}}
        results["rows"][name] = row
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "student_cut.json").write_text(json.dumps(results, indent=2))
    labels = list(sets)
    lines = ["| student | layers kept | " + " | ".join(f"loss, {x}" for x in labels) + " |"]
    lines.append("|---" * (2 + len(labels)) + "|")
    for name, row in results["rows"].items():
        cells = " | ".join(f"{row[x]:.3f}" for x in labels)
        lines.append(f"| {name} | {', '.join(map(str, row['layers']))} | {cells} |")
    (out / "student_cut.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
