"""Sampling speed of ``rlhf eval`` by replies per generate call, side by side in one run.

    .venv/bin/python bench/bench_generation.py --run runs/demo/ppo --batch_sizes 16,64
    .venv/bin/python bench/bench_generation.py --run runs/demo/sft --k 4 --max_new_tokens 32

What runs is ``rlhf eval``'s own sampling (:func:`rlhf.eval.sampling.sample_replies`, the held-out
prompts x ``k`` replies each, seeded) with the demo's sampling settings, once per batch size, in the
order given, after one untimed warm-up batch. Each row prints the seconds, the reply tokens sampled
(they differ a little: the batch layout changes the seeded samples) and the seconds per 1,000 reply
tokens; the last column is that figure as a ratio to the first row's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo/ppo", help="a stage output that generates (SFT, PPO, ...)")
    parser.add_argument("--prompts", default="data/demo/prompts_heldout.jsonl")
    parser.add_argument("--batch_sizes", default="16,64", help="replies per generate call, comma-separated")
    parser.add_argument("--k", type=int, default=4, help="replies per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)

    import torch

    from rlhf.core.data import load_rows
    from rlhf.core.generation import SamplingArguments, load_for_generation
    from rlhf.eval.sampling import sample_replies

    prompts = [r["prompt"] for r in load_rows(args.prompts, "prompt")]  # read as rlhf eval reads them
    sampling = SamplingArguments(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0,
                                 top_p=1.0, do_sample=True)
    model, tokenizer = load_for_generation(args.run)
    sample_replies(model, tokenizer, prompts[:4], sampling, 1, 4, 0, desc="warm-up")
    print(f"{args.run}: {len(prompts)} prompts x {args.k} replies, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'replies per call':>16} {'seconds':>8} {'reply tokens':>12} {'s / 1k tokens':>13} {'ratio':>6}")
    first = None
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        started = time.perf_counter()
        samples = sample_replies(model, tokenizer, prompts, sampling, args.k, batch_size, 0, desc=f"batch {batch_size}")
        seconds = time.perf_counter() - started
        tokens = sum(len(ids) for per_prompt in samples.reply_ids for ids in per_prompt)
        per_1k = 1000 * seconds / tokens
        first = first or per_1k
        print(f"{batch_size:>16} {seconds:>8.1f} {tokens:>12} {per_1k:>13.2f} {per_1k / first:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
