import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a word-level tokenizer and chat template."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_4bit(tmp_path_factory) -> Path:
    """Large enough for bitsandbytes 4-bit kernels on CPU (see STACK-NOTES)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny4") / "model", hidden_size=128, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per session into a temporary RLHF_CACHE."""
    from rlhf.models import fetch_default_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(tmp_path_factory.mktemp("rlhf-cache")))
        return fetch_default_model()
