"""Fill a campaign: import prompts with their candidate replies, or sample the replies from a model.

Import rows (JSONL, JSON, CSV or Parquet, read by :func:`rlhf.data.read_records`)::

    {"prompt": "Write a haiku about tea.", "responses": ["reply 1", "reply 2", "reply 3"]}
    {"prompt": [{"role": "user", "content": "Hi"}], "response_a": "Hello!", "response_b": "Hey."}

``prompt`` is a string or a list of chat messages (as everywhere in the toolkit); the replies are
either ``responses``, a list of two or more non-empty strings, or the two fields ``response_a`` and
``response_b``. A row needs at least two different replies (ignoring surrounding white space); a
repeated reply is dropped and counted. In CSV, ``responses`` is a JSON list in one cell.
"""

from __future__ import annotations

from rlhf.data import Record, normalize_row, read_records
from rlhf.errors import DataError, UserError

from label.store import AddResult, Campaign

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


def generate_responses(model_dir: str, prompts_path: str, campaign: Campaign, sampling, n: int = 2,
                       batch_size: int = 8, seed: int = 0, max_pairs_per_prompt: int | None = None) -> AddResult:
    """Sample ``n`` replies per prompt from any stage's output and add them to the campaign.

    Empty replies are left out (a preference row needs two non-empty replies); identical replies to
    one prompt are dropped by the store and counted; both show in the returned summary.
    """
    if n < 2:
        raise UserError(f"--n: expected at least 2 replies per prompt to form a pair, found {n}")
    records = read_records(prompts_path)
    prompts = [normalize_row(rec, "prompt")["prompt"] for rec in records]
    # Imported late: torch and transformers are only needed here.
    from rlhf.generation import generate_replies, load_for_generation

    model, tokenizer = load_for_generation(model_dir)
    replies = generate_replies(model, tokenizer, prompts, sampling, n=n, batch_size=batch_size, seed=seed)
    items, empty = [], 0
    for rec, prompt, texts in zip(records, prompts, replies):
        kept = [t for t in texts if t.strip()]
        empty += len(texts) - len(kept)
        items.append((rec.location, prompt, kept, f"generate {model_dir}"))
    result = campaign.add_responses(items, max_pairs_per_prompt, seed)
    result.skipped["empty reply(ies)"] = empty
    return result
