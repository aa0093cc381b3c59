"""The model passes of ``rlhf eval`` and its risk checks: k seeded samples per prompt and summed
reply log-probabilities, with the bookkeeping they share (run names, freeing memory)."""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class Samples:
    """k sampled replies per prompt from one run."""

    texts: list[list[str]]
    """``[n][k]`` reply texts, cut at the first EOS."""
    prompt_ids: list[list[int]]
    """``[n]`` the encoded prompts."""
    reply_ids: list[list[list[int]]]
    """``[n][k]`` sampled token ids, up to and including the first EOS (all of them when cut off)."""
    ended_with_eos: np.ndarray
    """``(n, k)`` bool."""
    logprobs: np.ndarray | None = None
    """``(n, k)`` summed logprob of each reply under the run itself, at the sampling temperature."""
    reference_logprobs: np.ndarray | None = None
    """``(n, k)`` the same under the reference run."""
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    """judge name -> ``(n, k)`` scores."""


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: list, sampling, k: int, batch_size: int, seed: int,
                   desc: str = "generating") -> Samples:
    """``k`` replies per prompt, seeded: the same jobs, batch layout and seed for every run.

    :func:`rlhf.core.generation.generate_replies` returns texts only; this keeps the sampled token ids
    too (the KL is computed on exactly the sampled tokens, and EOS is read off them).
    """
    from rlhf.core.formatting import encode_prompt
    from rlhf.core.generation import decode_responses, sample_responses
    from rlhf.core.tensors import response_mask_after_eos

    model.eval()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(k)]
    texts: list[list[str]] = [[] for _ in prompts]
    reply_ids: list[list[list[int]]] = [[] for _ in prompts]
    ended = np.zeros((len(prompts), k), dtype=bool)
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc):
        chunk = jobs[start : start + batch_size]
        _, _, response = sample_responses(model, tokenizer, [encoded[i] for i in chunk], sampling)  # (b, t)
        response = response.cpu()
        mask, eos = response_mask_after_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)  # (b, t), (b,)
        for row, i, text in zip(range(len(chunk)), chunk, decode_responses(tokenizer, response)):
            ended[i, len(texts[i])] = bool(eos[row])
            texts[i].append(text)
            reply_ids[i].append(response[row][mask[row]].tolist())
    return Samples(texts=texts, prompt_ids=encoded, reply_ids=reply_ids, ended_with_eos=ended)


@torch.no_grad()
def reply_logprobs(model, pad_id: int, sequences: list[tuple[list[int], list[int]]], temperature: float = 1.0,
                   batch_size: int = 8, desc: str | None = None) -> list[tuple[float, int]]:
    """Summed log-probability of each reply given its prompt, and its token count.

    Args:
        sequences: ``(prompt_ids, reply_ids)`` pairs; the prompt must be non-empty (its last token
            predicts the reply's first).
        temperature: logits are divided by it (the sampling temperature for KL, 1 for perplexity).

    Returns ``[(sum of logprobs of the reply tokens, number of reply tokens)]`` in input order.
    """
    from rlhf.core.generation import pad_ids
    from rlhf.core.tensors import logprobs_from_logits, masked_sum

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]) - len(sequences[i][1]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None):
        idx = order[start : start + batch_size]
        ids, attention = pad_ids([sequences[i][0] + sequences[i][1] for i in idx], pad_id, side="right")  # (b, s)
        keep = torch.zeros_like(ids, dtype=torch.bool)  # (b, s) True = a reply token
        for row, i in enumerate(idx):
            p, r = len(sequences[i][0]), len(sequences[i][1])
            keep[row, p : p + r] = True
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (b, s, v)
        # logits at position j predict token j + 1.
        logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:].to(device), temperature)  # (b, s - 1)
        sums = masked_sum(logp, keep[:, 1:].to(device), dim=1).cpu()  # (b,)
        for row, i in enumerate(idx):
            results[i] = (float(sums[row]), len(sequences[i][1]))
    return results


def perplexity(pairs: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in pairs)
    return math.exp(-sum(s for s, _ in pairs) / tokens) if tokens else float("nan")


def start_token(tokenizer) -> list[int]:
    """What general text is conditioned on: BOS, or EOS for tokenizers without one (as at a document start)."""
    return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


def run_names(paths: list[str]) -> list[str]:
    """Short unique names: the directory name, more of the path where two runs share it, and ``#i``
    (the position in --runs) on a path given more than once."""
    unique = list(dict.fromkeys(paths))
    names = [Path(p).name or p for p in unique]
    for depth in (2, 3, 99):
        if len(set(names)) == len(names):
            break
        names = ["/".join(Path(p).parts[-depth:]) for p in unique]
    by_path = dict(zip(unique, names))
    return [f"{by_path[p]}#{i}" if paths.count(p) > 1 else by_path[p] for i, p in enumerate(paths)]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_prompt_reply(pair: tuple[list[int], int]) -> tuple[list[int], list[int]]:
    ids, n_prompt = pair
    return ids[:n_prompt], ids[n_prompt:]


def reference_logprobs(model, pad: int, samples: dict[str, Samples], temperature: float, batch_size: int) -> None:
    """Logprobs of every run's samples under the reference model, but for samples that have them
    already (the reference's own)."""
    for name, s in samples.items():
        if s.reference_logprobs is not None:
            continue
        seqs = [(s.prompt_ids[p], ids) for p in range(len(s.texts)) for ids in s.reply_ids[p]]
        lp = reply_logprobs(model, pad, seqs, temperature, batch_size, desc=f"reference logprobs {name}")
        s.reference_logprobs = np.array([v for v, _ in lp]).reshape(s.ended_with_eos.shape)
