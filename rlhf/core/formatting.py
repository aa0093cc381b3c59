"""One way to turn a prompt and a reply into tokens, shared by SFT, reward model, PPO and generation.

The reward model must see exactly the layout the policy generates, so every stage builds sequences
here: the prompt goes through the chat template (with the generation prompt) when the tokenizer has
one, and a reply is its text followed by EOS, the token generation stops at.
"""

from __future__ import annotations


def as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def prompt_text(prompt: str | list[dict]) -> str:
    """A prompt as plain text (what judges and logs show): a string as it is, chat messages as their
    contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt, ready for the reply to follow."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, list):
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant: "
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_reply(tokenizer, reply: str) -> list[int]:
    """Token ids of a reply, ending with EOS."""
    return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_prompt_reply(tokenizer, prompt: str | list[dict], reply: str) -> tuple[list[int], int]:
    """(ids of prompt + reply, number of prompt tokens)."""
    prompt_ids = encode_prompt(tokenizer, prompt) if prompt else []
    return prompt_ids + encode_reply(tokenizer, reply), len(prompt_ids)
