"""Where an SFT LoRA step spends its CPU time: torch.profiler over one step, top ops by self time.

    .venv/bin/python bench/profile_sft_step.py [--batch_size 8 --seq_len 256 --rows 25]

A plain transformers step (``model(input_ids, labels=...)``, backward, AdamW) on the default model
with the stage's LoRA settings (every linear layer, r 16, no dropout) and our allocator settings;
TRL's fused LM head and metrics are not in it (docs/bench_sft.md compares the two).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rows", type=int, default=25, help="ops to list")
    args = p.parse_args()

    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from rlhf.core.allocator import keep_freed_memory
    from rlhf.core.models import ModelArguments, build_peft_config, load_base_model

    keep_freed_memory()
    model_args = ModelArguments()
    model = load_base_model(model_args)
    model = get_peft_model(model, build_peft_config(model_args, model))
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    print(f"step: {seconds:.2f} s, {args.batch_size * args.seq_len / seconds:.1f} tokens/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
