"""Scratch probe: does the reward model transfer better when its score is the mean over the reply's
tokens instead of the last token's?

    python experiments/pooling_probe.py --label runs/demo/label --samples runs/demo/eval/samples.jsonl \
        --pooling last,mean

Trains a LoRA + linear score head (the reward stage's settings: r 16, alpha 32, every linear layer,
lr 5e-4 cosine with 5 % warmup, 1 epoch, 8 pairs a step, seed 42) in a plain loop, for each pooling,
and prints its accuracy on the label stage's test pairs and how often it orders same-prompt pairs of
each policy's held-out replies like the noiseless annotator.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_jsonl(path) -> list[dict]:
    from rlhf.core.data import read_records

    return [record.row for record in read_records(path)]


class PooledRewardModel(nn.Module):
    def __init__(self, base, hidden: int, pooling: str):
        super().__init__()
        self.base = base
        self.head = nn.Linear(hidden, 1, bias=False)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        self.pooling = pooling

    def forward(self, ids, mask, reply_mask):
        hidden = self.base(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, t, h)
        if self.pooling == "last":
            last = mask.sum(1) - 1
            pooled = hidden[torch.arange(len(ids)), last]
            return self.head(pooled).squeeze(-1)
        per_token = self.head(hidden).squeeze(-1)  # (b, t)
        return (per_token * reply_mask).sum(1) / reply_mask.sum(1)


def batch(tokenizer, prompts, replies):
    from rlhf.core.formatting import encode_prompt_reply
    from rlhf.core.generation import pad_ids

    seqs = [encode_prompt_reply(tokenizer, p, r) for p, r in zip(prompts, replies)]
    ids, mask = pad_ids([s for s, _ in seqs], tokenizer.pad_token_id, side="right")
    reply = torch.zeros(mask.shape)
    for i, (s, n_prompt) in enumerate(seqs):
        reply[i, n_prompt : len(s)] = 1
    return ids, mask, reply


@torch.no_grad()
def score(model, tokenizer, prompts, replies, bs=32):
    model.eval()
    out = []
    for i in range(0, len(replies), bs):
        out.extend(model(*batch(tokenizer, prompts[i : i + bs], replies[i : i + bs])).tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="runs/demo/label")
    parser.add_argument("--samples", default="runs/demo/eval/samples.jsonl")
    parser.add_argument("--pooling", default="last,mean")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from rlhf.core.models import default_model_dir, find_target_modules, load_tokenizer
    from rlhf.eval.statistics import judge_agreement

    label = Path(args.label)
    train = read_jsonl(label / "train.jsonl")
    test = read_jsonl(label / "test.jsonl")
    samples = read_jsonl(args.samples)
    tokenizer = load_tokenizer(str(default_model_dir()))
    for pooling in args.pooling.split(","):
        torch.manual_seed(args.seed)
        base = AutoModel.from_pretrained(str(default_model_dir()), torch_dtype=torch.float32)
        base = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                               target_modules=find_target_modules(base)))
        model = PooledRewardModel(base, base.config.hidden_size, pooling)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)
        steps = math.ceil(len(train) * args.epochs / 8)
        warm = math.ceil(0.05 * steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
        t0 = time.time()
        model.train()
        for step in range(steps):
            idx = [order[(step * 8 + j) % len(order)] for j in range(8)]
            rows = [train[i] for i in idx]
            prompts = [r["prompt"] for r in rows] * 2
            replies = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
            s = model(*batch(tokenizer, prompts, replies))
            loss = -torch.nn.functional.logsigmoid(s[:8] - s[8:]).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            if step % 20 == 0:
                print(f"{pooling} step {step}/{steps} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        chosen = score(model, tokenizer, [r["prompt"] for r in test], [r["chosen"] for r in test])
        rejected = score(model, tokenizer, [r["prompt"] for r in test], [r["rejected"] for r in test])
        acc = np.mean([c > r for c, r in zip(chosen, rejected)])
        line = f"{pooling}: test pairs {acc:.1%} of {len(test)}"
        for run in dict.fromkeys(r["run"] for r in samples):
            rows = [r for r in samples if r["run"] == run]
            scores = score(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
            words = [len(r["response"].split()) for r in rows]
            by_prompt: dict[str, list] = {}
            for row, sc in zip(rows, scores):
                by_prompt.setdefault(row["prompt"], []).append((sc, row["scores"]["annotator"], row["scores"]["lexicon"]))
            grid = np.array(list(by_prompt.values()))
            ann = judge_agreement(grid[:, :, 0], grid[:, :, 1])["agreement"]
            lex = judge_agreement(grid[:, :, 0], grid[:, :, 2])["agreement"]
            line += (f"; {run}: annotator {ann:.1%}, lexicon {lex:.1%}, "
                     f"corr(words) {np.corrcoef(words, scores)[0, 1]:+.2f}")
        print(line + f"; train {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
