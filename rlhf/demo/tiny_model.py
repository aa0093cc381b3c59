"""Tiny random-weight Llama and GPT-2 models with a word-level tokenizer and a chat template, for fast tests."""

from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
WORDS = """
a an the and or but of to in on for with is are was be it this that what how why who your my our
write short review describe give opinion think do you one two sentences sentence about please reply
good great lovely wonderful amazing nice fine okay bad terrible awful boring poor dull average
coffee tea pizza bread cheese apple mango pasta soup salad beach mountain city river forest museum
phone laptop camera watch bicycle car train book novel poem song movie game garden park library
really very quite rather not so too much more most less it's i i'm we they he she them love like
hate enjoy recommend would could should will can must may might time day people place thing way
user assistant system : . , ! ? ' - ( ) \n
""".split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} : {{ message['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant : {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model_dir(path: str | Path, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                        kv_heads: int = 2, seed: int = 0) -> Path:
    """Save a random-weight Llama causal LM + tokenizer into ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_gpt2_dir(path: str | Path, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                       dropout: float = 0.1, seed: int = 0) -> Path:
    """Save a random-weight GPT-2 causal LM + tokenizer into ``path`` and return it.

    Llama's rotary embeddings see only position differences, so positions shifted by a row's left
    padding change (almost) nothing; GPT-2's learned absolute position embeddings change every hidden
    state. Its config also carries dropout (resid, embd and attn, ``dropout`` each), live in training
    mode. Tests that pin left padding, position ids and dropout being off want both.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    tokenizer = build_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=layers,
        n_head=heads,
        n_inner=hidden_size * 2,
        n_positions=512,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)
