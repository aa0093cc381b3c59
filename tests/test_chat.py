"""rlhf chat: streamed replies, the chat template over the whole conversation, /reset and /exit."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.deploy.chat import chat_loop, fit_history
from rlhf.core.formatting import encode_prompt
from rlhf.core.generation import SamplingArguments
from rlhf.core.models import load_tokenizer
from rlhf.core.runs import load_run

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingArguments(do_sample=False, max_new_tokens=8)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with random lora_B, so replies depend on the prompt."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("chat") / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(path)
    return path


class Recording:
    """Wraps model.generate to keep the prompt ids of each call and the reply it produced."""

    def __init__(self, model):
        self.calls: list[tuple[list[int], list[int]]] = []
        self.inner = model.generate
        model.generate = self

    def __call__(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        self.calls.append((input_ids[0].tolist(), out[0, input_ids.shape[1]:].tolist()))
        return out


def _text(tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_multi_turn_history_streaming_and_reset(adapter_run):
    model, tokenizer = load_run(str(adapter_run))
    recording = Recording(model)
    stdin = io.StringIO("describe the river\nwrite a short review of the tea\n/reset\ndescribe the river\n/exit\n"
                        "never read\n")
    stdout = io.StringIO()
    messages = chat_loop(model, tokenizer, GREEDY, stdin, stdout, system="reply with one sentence .")
    assert len(recording.calls) == 3  # /exit stopped it before the last line

    system = {"role": "system", "content": "reply with one sentence ."}
    u1, u2 = {"role": "user", "content": "describe the river"}, {"role": "user", "content": "write a short review of the tea"}
    a1 = {"role": "assistant", "content": _text(tokenizer, recording.calls[0][1])}
    # Turn 1: the chat template over system + user; turn 2: the whole conversation so far.
    assert recording.calls[0][0] == encode_prompt(tokenizer, [system, u1])
    assert recording.calls[1][0] == encode_prompt(tokenizer, [system, u1, a1, u2])
    # After /reset the conversation starts again from the system message alone: the same reply as turn 1.
    assert recording.calls[2][0] == recording.calls[0][0] and recording.calls[2][1] == recording.calls[0][1]
    assert messages == [system, u1, a1]

    # Each reply was streamed to the output as it was generated, after the assistant> marker.
    shown = stdout.getvalue()
    for _, reply in recording.calls:
        text = _text(tokenizer, reply)
        assert text and f"assistant> {text}" in shown
    assert shown.count("(new conversation)") == 1 and "never read" not in shown


def test_streamer_writes_while_generating(tiny_model_dir):
    """The text reaches the stream during generate (token by token), not once at the end."""
    model, tokenizer = load_run(str(tiny_model_dir))
    stdout = io.StringIO()
    sizes: list[int] = []
    inner = model.forward

    def forward(*args, **kwargs):
        sizes.append(len(stdout.getvalue()))
        return inner(*args, **kwargs)

    model.forward = forward
    chat_loop(model, tokenizer, GREEDY, io.StringIO("hi\n"), stdout)
    assert len(sizes) == GREEDY.max_new_tokens
    assert len(set(sizes[1:])) > 1, "the output should grow between decoding steps"


def test_unknown_command_and_end_of_input(tiny_model_dir):
    model, tokenizer = load_run(str(tiny_model_dir))
    stdout = io.StringIO()
    assert chat_loop(model, tokenizer, GREEDY, io.StringIO("/help\n\n"), stdout) == []
    assert "unknown command /help" in stdout.getvalue()


def test_old_turns_are_dropped_to_fit_the_context(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    system = {"role": "system", "content": "be short ."}
    turns = [{"role": r, "content": f"the {w} is good ."} for w in ("tea", "coffee", "soup", "bread", "cheese")
             for r in ("user", "assistant")][:-1]  # ends with a user message
    full = encode_prompt(tokenizer, [system] + turns)
    kept, ids = fit_history(tokenizer, [system] + turns, limit=len(full) - 1 + 8, reply_budget=8)
    assert kept[0] == system and kept[-1] == turns[-1] and kept[1]["role"] == "user"
    assert len(kept) == len(turns) + 1 - 2 and ids == encode_prompt(tokenizer, kept)
    assert fit_history(tokenizer, [system] + turns, limit=None, reply_budget=8)[1] == full


@pytest.mark.slow
def test_rlhf_chat_over_a_pipe(adapter_run):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "rlhf.app.cli", "chat", str(adapter_run), "--do_sample", "false", "--max_new_tokens", "6"],
                          input="describe the river\n/exit\n", capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "you> assistant> " in done.stdout and done.stdout.count("you> ") == 2
    reply = done.stdout.split("assistant> ", 1)[1].split("\n", 1)[0]
    assert reply.strip()
