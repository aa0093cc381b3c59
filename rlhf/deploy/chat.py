"""An interactive terminal chat with any model this toolkit writes or reads.

    rlhf chat --model exported/ppo                 # an `rlhf export` directory
    rlhf chat runs/demo/ppo --do_sample false      # MODEL first: short for --model; greedy decoding
    rlhf chat smollm2-135m-instruct --system "Answer in one sentence."

Each turn goes through the model's chat template with the whole conversation so far (multi-turn), and
the reply is printed token by token as it is generated (transformers' ``TextStreamer``). ``/reset``
starts a new conversation, ``/exit`` (or Ctrl-D) quits, Ctrl-C stops a reply mid-way. When the
conversation outgrows the model's context, the oldest turns are dropped (the system message is kept).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

import torch
from transformers import TextStreamer

from rlhf.core.formatting import encode_prompt
from rlhf.core.generation import SamplingArguments

HELP = "/reset starts a new conversation, /exit quits"


class StreamTo(TextStreamer):
    """A TextStreamer that writes the reply to ``out`` (any text stream) instead of printing to stdout."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def _context_limit(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def fit_history(tokenizer, messages: list[dict], limit: int | None, reply_budget: int) -> tuple[list[dict], list[int]]:
    """(messages, prompt ids) with the oldest turns dropped until prompt + reply fit in ``limit`` tokens.

    A leading system message is always kept; the newest user message is never dropped (a single
    message too long for the context is cut from the left instead).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    ids = encode_prompt(tokenizer, system + turns)
    while limit is not None and len(ids) + reply_budget > limit and len(turns) > 1:
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
        ids = encode_prompt(tokenizer, system + turns)
    if limit is not None and len(ids) + reply_budget > limit:
        ids = ids[-max(1, limit - reply_budget):]
    return system + turns, ids


def chat_loop(model, tokenizer, sampling: SamplingArguments, stdin: TextIO, stdout: TextIO,
              system: str | None = None, seed: int = 0, max_context: int | None = None) -> list[dict]:
    """Run the chat until /exit or end of input; return the conversation as it stood at the end.

    ``stdin``/``stdout`` are any text streams (a terminal, a pipe, ``io.StringIO`` in tests). On a
    terminal the prompt goes through ``input()``, so line editing and history work.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    limit = max_context or _context_limit(model)
    interactive = stdin is sys.stdin and stdin.isatty()
    device = next(model.parameters()).device
    kwargs = sampling.generation_kwargs(tokenizer)
    if not sampling.do_sample:  # greedy: transformers warns about a top_k other than its default
        kwargs.pop("top_k", None)
    torch.manual_seed(seed)
    stdout.write(f"{HELP}\n")
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                stdout.write("you> ")
                stdout.flush()
                line = stdin.readline()
                if not line:  # end of input
                    stdout.write("\n")
                    break
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(start)
            stdout.write("(new conversation)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}: {HELP}\n")
            continue
        messages, ids = fit_history(tokenizer, messages + [{"role": "user", "content": text}], limit,
                                    sampling.max_new_tokens)
        stdout.write("assistant> ")
        stdout.flush()
        input_ids = torch.tensor([ids], device=device)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     streamer=StreamTo(tokenizer, stdout), **kwargs)
        except KeyboardInterrupt:  # stop this reply, keep the conversation without it
            stdout.write(" [stopped]\n")
            messages = messages[:-1]
            continue
        reply = out[0, input_ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in reply:
            reply = reply[: reply.index(tokenizer.eos_token_id)]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True).strip()})
    return messages


@dataclass
class ChatArguments:
    """Settings of ``rlhf chat`` besides the sampling ones."""

    model: str
    """An `rlhf export` directory, a stage output (SFT, PPO...), a model directory or a hub id."""
    system: str | None = None
    """A system message that starts every conversation."""
    seed: int = 0
    """Sampling seed."""
    device: str | None = None
    """Where the model runs, e.g. cuda or cpu (null = cuda when there is one)."""


def chat_command(argv: list[str]) -> int:
    """``rlhf chat --model <model dir or run dir>`` [sampling keys] (``rlhf chat <model>`` is the same)."""
    from rlhf.core.config import build_config

    # A chat reply may be longer than a training rollout; do_sample false is greedy decoding.
    (args, sampling), _ = build_config([ChatArguments, SamplingArguments], argv, prog="rlhf chat",
                                       positional=("model",), defaults={"max_new_tokens": 256},
                                       description=__doc__.split("\n\n")[0])
    from rlhf.core.runs import load_run

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    model, tokenizer = load_run(args.model, "causal-lm", device)
    if not getattr(tokenizer, "chat_template", None):
        print(f"note: {args.model} has no chat template; turns are joined as 'role: text' lines", file=sys.stderr)
    chat_loop(model, tokenizer, sampling, sys.stdin, sys.stdout, system=args.system, seed=args.seed)
    return 0
