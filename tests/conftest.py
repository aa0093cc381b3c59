import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).parent))

from rlhf.demo.tiny_model import make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (and OMP_NUM_THREADS=1 for child processes) for a module of tiny-model tests:
    tiny matmuls gain nothing from a second thread, and on a 2-core machine shared with other jobs two
    threads spin-wait on each other (a tiny matmul measured 70x slower: 17 ms against 0.23 ms)."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a word-level tokenizer and chat template."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_4bit(tmp_path_factory) -> Path:
    """Large enough for bitsandbytes 4-bit kernels on CPU (they need hidden >= 128)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny4") / "model", hidden_size=128, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once per session into a temporary RLHF_CACHE."""
    from rlhf.core.models import fetch_default_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(tmp_path_factory.mktemp("rlhf-cache")))
        return fetch_default_model()
