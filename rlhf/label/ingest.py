"""Fill a campaign: import prompts with their candidate replies, or sample the replies from a model.

Or sample them and keep only the pairs a reward model is least sure about
(:func:`generate_uncertain`, ``rlhf label generate --select uncertain``; see rlhf/label/select.py).

Import rows (JSONL, JSON, CSV or Parquet, read by :func:`rlhf.core.data.read_records`)::

    {"prompt": "Write a haiku about tea.", "responses": ["reply 1", "reply 2", "reply 3"]}
    {"prompt": [{"role": "user", "content": "Hi"}], "response_a": "Hello!", "response_b": "Hey."}

``prompt`` is a string or a list of chat messages (as everywhere in the toolkit); the replies are
either ``responses``, a list of two or more non-empty strings, or the two fields ``response_a`` and
``response_b``. A row needs at least two different replies (ignoring surrounding white space); a
repeated reply is dropped and counted. In CSV, ``responses`` is a JSON list in one cell.
"""

from __future__ import annotations

import random

from rlhf.label.select import candidate_pairs, select_pairs
from rlhf.label.store import AddResult, Campaign, prompt_json
from rlhf.core.data import Record, normalize_row, read_records
from rlhf.core.errors import DataError, UserError

_ROW_SHAPE = "a row with 'responses' (a list of 2 or more replies) or 'response_a' and 'response_b'"


def import_responses(path: str, campaign: Campaign, max_pairs_per_prompt: int | None = None,
                     seed: int = 0) -> AddResult:
    """Validate every row of ``path`` (first bad row raises, naming ``file:line``), then add them all."""
    items = []
    for rec in read_records(path):
        prompt = normalize_row(rec, "prompt")["prompt"]
        items.append((rec.location, prompt, _replies(rec), f"import {rec.location}"))
    return campaign.add_responses(items, max_pairs_per_prompt, seed)


def _replies(rec: Record) -> list[str]:
    row = rec.row
    if "responses" in row:
        replies = row["responses"]
        if not isinstance(replies, list) or len(replies) < 2:
            found = replies if not isinstance(replies, list) else f"<a list of {len(replies)}>"
            raise DataError(rec.location, "responses", "a list of 2 or more replies", found)
        fields = [f"responses[{i}]" for i in range(len(replies))]
    elif "response_a" in row or "response_b" in row:
        fields = ["response_a", "response_b"]
        for name in fields:
            if name not in row:
                raise DataError(rec.location, name, "a non-empty string", "<missing>")
        replies = [row[name] for name in fields]
    else:
        raise DataError(rec.location, None, _ROW_SHAPE, f"<fields {sorted(row)}>")
    for name, reply in zip(fields, replies):
        if not isinstance(reply, str) or not reply.strip():
            raise DataError(rec.location, name, "a non-empty string", "<an empty string>" if reply == "" else reply)
    if len({r.strip() for r in replies}) < 2:
        raise DataError(rec.location, fields[-1], "a reply different from the others", "<the same text>")
    return replies


def _sample(model_dirs: list[str], prompts: list, sampling, n: int, batch_size: int,
            seed: int) -> list[list[tuple[str, str]]]:
    """``(reply, origin)`` for each prompt: ``n`` samples from each model, models loaded one at a time."""
    # Imported late: torch and transformers are only needed here.
    from rlhf.core.generation import generate_replies, load_for_generation

    sampled: list[list[tuple[str, str]]] = [[] for _ in prompts]
    for model_dir in model_dirs:
        model, tokenizer = load_for_generation(model_dir)
        replies = generate_replies(model, tokenizer, prompts, sampling, n=n, batch_size=batch_size, seed=seed)
        del model
        for i, texts in enumerate(replies):
            sampled[i] += [(text, f"generate {model_dir}") for text in texts]
    return sampled


def _read_prompts(prompts_path: str) -> tuple[list[Record], list]:
    records = read_records(prompts_path)
    return records, [normalize_row(rec, "prompt")["prompt"] for rec in records]


def generate_responses(model_dir: str | list[str], prompts_path: str, campaign: Campaign, sampling, n: int = 2,
                       batch_size: int = 8, seed: int = 0, max_pairs_per_prompt: int | None = None) -> AddResult:
    """Sample ``n`` replies per prompt from one or more stage outputs and add them all to the campaign.

    Empty replies are left out (a preference row needs two non-empty replies); identical replies to
    one prompt are dropped by the store and counted; both show in the returned summary.
    """
    model_dirs = [model_dir] if isinstance(model_dir, str) else list(model_dir)
    if n * len(model_dirs) < 2:
        raise UserError(f"--n: expected at least 2 replies per prompt to form a pair, found {n}")
    records, prompts = _read_prompts(prompts_path)
    sampled = _sample(model_dirs, prompts, sampling, n, batch_size, seed)
    items, empty = [], 0
    for rec, prompt, replies in zip(records, prompts, sampled):
        for origin in dict.fromkeys(o for _, o in replies):  # each model's replies as its own item, in order
            texts = [t for t, o in replies if o == origin]
            kept = [t for t in texts if t.strip()]
            empty += len(texts) - len(kept)
            items.append((rec.location, prompt, kept, origin))
    result = campaign.add_responses(items, max_pairs_per_prompt, seed)
    result.skipped["empty reply(ies)"] = empty
    return result


def check_reward_model(reward_model: str):
    """The reward model's :class:`rlhf.core.runs.RunInfo`, read without loading it; refuses anything else."""
    from rlhf.core.runs import read_run

    info = read_run(reward_model)
    if info.task is not None and info.task != "seq-cls":
        raise UserError(f"--reward_model: expected a reward model (a reward stage output, or a sequence-"
                        f"classification model), found {info.describe()} in {info.path}")
    return info


def generate_uncertain(model_dirs: list[str], prompts_path: str, campaign: Campaign, sampling, reward_model: str,
                       budget: int, n: int = 2, random_share: float = 0.2, batch_size: int = 8,
                       seed: int = 0) -> AddResult:
    """Sample ``n`` replies per prompt from each model, score every candidate pair with the reward model
    and add the ``budget`` pairs chosen by :func:`rlhf.label.select.select_pairs` (least sure, plus a random
    share), each with its margin and how it was chosen.

    Candidates are every two different non-empty replies to a prompt, across models, leaving out pairs
    the campaign already has; each reply is scored once, margin = score(a) - score(b).
    """
    if budget < 1:
        raise UserError(f"--budget: expected at least 1 pair, found {budget}")
    if not 0 <= random_share <= 1:
        raise UserError(f"--random_share: expected a number from 0 to 1, found {random_share}")
    if n * len(model_dirs) < 2:
        raise UserError(f"--n: expected at least 2 replies per prompt to form a pair, found {n}")
    from rlhf.core.runs import load_run
    from rlhf.core.scoring import score_replies

    records, prompts = _read_prompts(prompts_path)
    info = check_reward_model(reward_model)  # before the (slow) sampling; loaded after it, not beside the policy
    sampled = _sample(model_dirs, prompts, sampling, n, batch_size, seed)
    reward, reward_tokenizer = load_run(info, "seq-cls")
    have = campaign.pair_texts()
    pool = []  # (prompt index, reply index, reply index)
    for p, replies in enumerate(sampled):
        texts = [t for t, _ in replies]
        for i, j in candidate_pairs(texts):
            if (prompt_json(prompts[p]), *sorted((texts[i].strip(), texts[j].strip()))) not in have:
                pool.append((p, i, j))
    keys = sorted({(p, i) for p, i, _ in pool} | {(p, j) for p, _, j in pool})
    scores = dict(zip(keys, score_replies(reward, reward_tokenizer, [prompts[p] for p, _ in keys],
                                          [sampled[p][i][0] for p, i in keys], batch_size)))
    margins = [scores[p, i] - scores[p, j] for p, i, j in pool]
    chosen = select_pairs(margins, budget, random_share, random.Random(seed)) if pool else []
    items = [{"source": records[p].location, "prompt": prompts[p], "a": sampled[p][i][0], "b": sampled[p][j][0],
              "origin_a": sampled[p][i][1], "origin_b": sampled[p][j][1], "margin": margins[k],
              "scored_by": str(reward_model), "chosen_as": how}
             for k, how in chosen for p, i, j in [pool[k]]]
    result = campaign.add_pairs(items, seed)
    result.skipped["empty reply(ies)"] = sum(not t.strip() for replies in sampled for t, _ in replies)
    uncertain = [abs(margins[k]) for k, how in chosen if how == "uncertain"]
    result.selection = {"pool": len(pool), "uncertain": len(uncertain), "random": len(chosen) - len(uncertain),
                        "max_uncertain_margin": max(uncertain, default=0.0)}
    return result
