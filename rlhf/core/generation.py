"""Batched sampling with fixed settings, and loading any stage's output for generation.

The sampling settings always come from our config (or the command line), never from the model's
``generation_config``: the implementation details of RLHF-PPO (Huang et al. 2024, detail 6) rely on
known temperature / top-k / top-p, and the logprobs used by PPO are computed with the same temperature.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from rlhf.core.errors import UserError
from rlhf.core.formatting import encode_prompt


@dataclass
class SamplingArguments:
    """Sampling settings for rollouts and ``rlhf generate``."""

    max_new_tokens: int = 48
    """Longest reply, in tokens."""
    temperature: float = 0.7
    """Softmax temperature; the log-probabilities of PPO and of `rlhf eval`'s KL are taken at the same value."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    do_sample: bool = True
    """False = greedy decoding."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"temperature: expected a positive number, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p: expected a number in (0, 1], found {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens: expected at least 1, found {self.max_new_tokens}")

    def generation_kwargs(self, tokenizer) -> dict:
        """Every setting spelled out, so the model's own generation defaults never apply."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=1,
            do_sample=self.do_sample,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
            repetition_penalty=1.0,
            num_beams=1,
        )
        # Explicit values, never None: transformers fills None fields from the model's
        # generation_config and then from its global defaults (top_k=50).
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
        return kwargs


def pad_ids(sequences: list[list[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into ``(ids (b, s), attention_mask (b, s))``, mask 1 = real token.

    ``side="left"`` for generation (every prompt ends where the reply starts), ``"right"`` where a
    model reads whole sequences (training, reward scoring).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side: expected 'left' or 'right', found {side!r}")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: list[list[int]], sampling: SamplingArguments,
                     generator_seed: int | None = None,
                     synced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one reply per prompt with the KV cache. ``synced``: the model is sharded over processes,
    so each keeps stepping (its forwards are collectives) until every process's replies are done.

    Returns ``(query (b, s), query_mask (b, s), response (b, t))``: the left-padded prompts, their
    attention mask, and the generated tokens (t <= max_new_tokens; rows that stopped early are padded).
    """
    query, query_mask = pad_ids(prompt_ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    query, query_mask = query.to(device), query_mask.to(device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    out = model.generate(input_ids=query, attention_mask=query_mask, synced_gpus=synced,
                         **sampling.generation_kwargs(tokenizer))
    return query, query_mask, out[:, query.shape[1] :]


def decode_responses(tokenizer, response: torch.Tensor) -> list[str]:
    """Text of each reply, cut at the first EOS."""
    texts = []
    for row in response.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generate_replies(model, tokenizer, prompts: list, sampling: SamplingArguments, n: int = 1,
                     batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[list[str]]:
    """``n`` sampled replies for each prompt (a string or chat messages)."""
    model.eval()
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
    replies: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not progress):
        chunk = jobs[start : start + batch_size]
        _, _, response = sample_responses(model, tokenizer, [ids for _, ids in chunk], sampling)
        for (i, _), text in zip(chunk, decode_responses(tokenizer, response)):
            replies[i].append(text)
    return replies


def load_for_generation(run_dir: str, device: str | None = None):
    """Load (model, tokenizer) from any stage's output directory (SFT, PPO), a model directory, or a hub id.

    See :func:`rlhf.core.runs.load_run`: an adapter goes onto the base it was trained on, quantised as
    in training (QLoRA) and in the stage's dtype; a reward model is refused with a one-line error.
    """
    from rlhf.core.runs import load_run

    return load_run(run_dir, "causal-lm", device)


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingArguments))


@dataclass
class GenerateArguments:
    """Settings of ``rlhf generate`` besides the sampling ones."""

    model: str
    """A stage output directory (SFT, PPO...), a model directory or a hub id."""
    prompts: str
    """Rows with a 'prompt' field (.jsonl/.json/.csv/...)."""
    out: str
    """Output JSONL: one prompt, response row per reply."""
    sampling_config: str | None = None
    """Take the sampling keys (max_new_tokens, temperature, top_k, top_p, do_sample) from this stage config
    (YAML), e.g. configs/ppo.yaml, to sample as that stage did; keys given here win over it."""
    n: int = 1
    """Replies per prompt."""
    batch_size: int = 8
    """Sequences per generate call."""
    seed: int = 0
    """Sampling seed."""


def generate_command(argv: list[str]) -> int:
    """``rlhf generate --model <run dir> --prompts <file> --out <jsonl>`` [sampling keys]."""
    from rlhf.core.config import build_config, load_yaml
    from rlhf.core.data import load_rows, write_jsonl

    (args, _), given = build_config([GenerateArguments, SamplingArguments], argv, prog="rlhf generate",
                                    description="Replies to every prompt of a file from any stage's output.")
    stage_config = load_yaml(args.sampling_config) if args.sampling_config else {}
    sampling = SamplingArguments(**{**{k: stage_config[k] for k in SAMPLING_KEYS if k in stage_config},
                                    **{k: given[k] for k in SAMPLING_KEYS if k in given}})
    prompts = [r["prompt"] for r in load_rows(args.prompts, "prompt")]
    model, tokenizer = load_for_generation(args.model)
    replies = generate_replies(model, tokenizer, prompts, sampling, n=args.n, batch_size=args.batch_size, seed=args.seed)
    rows = [{"prompt": p, "response": r} for p, rs in zip(prompts, replies) for r in rs]
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} replies -> {args.out}")
    return 0
