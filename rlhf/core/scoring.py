"""Scoring (prompt, reply) rows with a sequence-classification reward model, as the reward stage trained it.

Shared by the reward stage's held-out metrics, ``rlhf reward score`` and ``rlhf monitor``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from rlhf.core.formatting import encode_prompt_reply
from rlhf.core.generation import pad_ids


@torch.no_grad()
def score_replies(model, tokenizer, prompts: list, replies: list[str], batch_size: int = 16,
                  progress: bool = False) -> list[float]:
    """Reward-model score of each (prompt, reply), laid out exactly as in training."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in tqdm(range(0, len(replies), batch_size), desc="scoring", disable=not progress):
        seqs = [encode_prompt_reply(tokenizer, p, r)[0]
                for p, r in zip(prompts[start : start + batch_size], replies[start : start + batch_size])]
        ids, mask = pad_ids(seqs, tokenizer.pad_token_id, side="right")
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (b, 1)
        scores.extend(logits.squeeze(-1).float().cpu().tolist())
    return scores
