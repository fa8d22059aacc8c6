"""TRL's SFTTrainer on bench/sft_gpu.py's model, packs and order: the baseline of the SFT GPU benchmark.

"TRL at its best" is what a TRL user gets on one GPU: padding-free BFD packing with a varlen attention kernel
(flash-attention's; here the same kernel posttrain uses, registered as `posttrain_varlen` and passed as the
model's attn_implementation: TRL's padding-free collator hands the model position_ids, from which the kernel
finds the samples), optionally Liger's kernels (`use_liger_kernel`: RMSNorm, RoPE, SwiGLU and its fused linear
cross-entropy) and `torch_compile`. Each combination is one variant; the benchmark takes the fastest.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from gpu_harness import ROOT, build_model, cleanup, peak_gib, start_profiler, stop_profiler, sync, throughput


def run_trl(
    attn: str,
    ctx: dict[str, Any],
    profile: bool = False,
    use_liger: bool = False,
    torch_compile: bool = False,
) -> dict[str, Any]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device, steps, warmup = ctx["device"], ctx["steps"], ctx["warmup"]
    total_steps = steps + (ctx["profile_steps"] if profile else 0)

    class InOrder(SFTTrainer):
        """Packs in dataset order, as posttrain reads them (TRL's own sampler would shuffle them)."""

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN202
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    marks: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN003
            if state.global_step == warmup:
                sync(device)
                marks["from"] = time.perf_counter()
            if state.global_step == steps:
                sync(device)
                marks["to"] = time.perf_counter()
                if profile:
                    marks["profiler"] = start_profiler(device)

    samples = [
        s.tolist() for pack in ctx["packs"].packs for s in pack
    ]  # TRL re-packs them into the same bins
    model = build_model(ctx["cfg"], attn, device, ctx["state"])
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_steps=total_steps,
            per_device_train_batch_size=ctx["batch"],
            gradient_accumulation_steps=1,
            learning_rate=ctx["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            packing=True,
            packing_strategy="bfd",
            padding_free=True,
            max_length=ctx["packs"].capacity,
            gradient_checkpointing=False,
            use_liger_kernel=use_liger,
            torch_compile=torch_compile,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = InOrder(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": samples}),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        same_packs = [list(map(len, p)) for p in ctx["packs"].packs] == [
            list(r) for r in trainer.train_dataset["seq_lengths"]
        ]
        cleanup()
        trainer.train()
        if profile:
            sync(device)
            prof = stop_profiler(marks["profiler"], device, ctx["profile_steps"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:steps]
    result = {
        "attn_implementation": attn,
        "use_liger_kernel": use_liger,
        "torch_compile": torch_compile,
        "same_packs_as_posttrain": same_packs,
        "losses": losses,
        "peak_gib": peak_gib(device),
        **throughput(
            ctx["cfg"],
            [
                ctx["packs"].lengths(range(s * ctx["batch"], (s + 1) * ctx["batch"]))
                for s in range(warmup, steps)
            ],
            marks["to"] - marks["from"],
        ),
    }
    if profile:
        result["profile"] = prof
    del trainer, model
    return result
