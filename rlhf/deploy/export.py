"""Export a stage output as a standalone model directory that bare transformers loads.

    rlhf export --model runs/demo/ppo --out exported/ppo               # LoRA merged into the base weights
    rlhf export runs/demo/ppo --out exported/ppo-bf16 --dtype bfloat16  # MODEL first: short for --model
    rlhf export --model runs/demo/ppo --out exported/ppo --push_to_hub me/ppo-demo [--private]

What comes out is ``config.json``, ``model.safetensors``, the tokenizer with its chat template, and a
``generation_config.json`` that holds the toolkit's sampling settings (the run's own where its
config.yaml sets them), so ``AutoModelForCausalLM.from_pretrained(out)`` + ``generate`` needs nothing
from this package. ``export.json`` records where it came from.

By kind of run:

- LoRA / IA3 adapter: loaded onto the base it was trained on, merged (``merge_and_unload``).
- QLoRA adapter: the 4-/8-bit base it trained against is dequantised, then the adapter merged into
  that, so the export computes what the QLoRA model computed (up to rounding);
  ``--qlora_base original`` merges into the original unquantised weights instead.
- Prefix / prompt tuning: refused (virtual tokens are not weights that can be merged).
- Full fine-tuned model: loaded and saved again (a copy, in safetensors and the asked dtype).
- Reward model: refused (not a causal LM).

The directory is written as ``<out>.tmp`` and renamed to ``<out>`` at the end: a failed export
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.core.config import build_config
from rlhf.core.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
MERGEABLE = ("LORA", "IA3")
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "do_sample")


def _merged_model(info, qlora_base: str):
    """The run's causal LM with its adapter (if any) merged: a plain transformers model, in eval mode."""
    from peft import PeftModel

    from rlhf.core.models import ModelArguments, load_base_model
    from rlhf.core.runs import load_run

    if not info.is_adapter:
        model, _ = load_run(info, "causal-lm")
        return model
    if info.quantisation in ("4-bit", "8-bit"):
        if qlora_base == "dequantized":
            # The base as training saw it: the same 4-/8-bit weights, turned back into plain Linear
            # layers, so W_merged = dequant(W_q) + B A, what the QLoRA forward computed.
            base = load_base_model(info.base_args(), "causal-lm").dequantize()
        else:
            base = load_base_model(ModelArguments(model_name_or_path=info.base_model, peft_method="full",
                                                  torch_dtype=info.torch_dtype), "causal-lm")
    else:
        base = load_base_model(info.base_args(), "causal-lm")
    model = PeftModel.from_pretrained(base, info.path).merge_and_unload()
    model.eval()
    return model


def generation_settings(run_dir: str | os.PathLike) -> dict:
    """The sampling settings the export's generation_config carries: the run's config.yaml, else our defaults."""
    from rlhf.core.config import load_yaml
    from rlhf.core.generation import SamplingArguments

    config_file = Path(run_dir) / "config.yaml"
    stage = load_yaml(config_file) if config_file.exists() else {}
    return {k: v for k, v in vars(SamplingArguments(**{k: stage[k] for k in SAMPLING_KEYS if k in stage})).items()}


def _check_hub(repo_id: str, private: bool) -> None:
    """Fail fast, before any work, when the hub cannot take the upload (offline, no token, no network)."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--push_to_hub {repo_id}: expected a reachable hub, found HF_HUB_OFFLINE=1 set; "
                        "export without --push_to_hub and upload the directory later")
    try:
        HfApi().create_repo(repo_id, exist_ok=True, private=private)
    except Exception as e:  # network, auth and HTTP errors all mean the same thing here
        raise UserError(f"--push_to_hub {repo_id}: expected a reachable hub, found {_first_line(e)}; "
                        "export without --push_to_hub and upload the directory later") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def export_model(run_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                 push_to_hub: str | None = None, private: bool = False, qlora_base: str = "dequantized",
                 overwrite: bool = False) -> Path:
    """Write ``run_dir``'s causal LM, adapters merged, as a standalone directory ``out``; return ``out``."""
    from transformers import GenerationConfig

    from rlhf.core.models import load_tokenizer
    from rlhf.core.runs import read_run

    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    if qlora_base not in ("dequantized", "original"):
        raise UserError(f"qlora_base: expected dequantized or original, found {qlora_base!r}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: expected a new output directory, found one there (pass --overwrite or choose another --out)")
    info = read_run(run_dir)
    if info.task == "seq-cls":
        raise UserError(f"{info.path}: expected a causal LM (an SFT or PPO stage output), found {info.describe()}; "
                        "export serves generation, reward models are used in place")
    if info.is_adapter and info.peft_type not in MERGEABLE:
        raise UserError(f"{info.path}: expected a LoRA or IA3 adapter, which merge into the weights, found "
                        f"{info.describe()}: its virtual tokens are not weights (use `rlhf chat` or "
                        "`rlhf generate` on the run directory, or train with peft_method: lora)")
    if push_to_hub:
        _check_hub(push_to_hub, private)

    model = _merged_model(info, qlora_base)
    target = getattr(torch, dtype or info.torch_dtype)
    model.to(target)
    own_tokenizer = (Path(info.path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(info.path if own_tokenizer or not info.is_adapter else info.base_model)

    # Sampling settings spelled out (as `rlhf generate` uses them), so a bare `generate` samples the
    # way the toolkit does rather than with transformers' global defaults (top_k=50, max_length=20).
    sampling = generation_settings(info.path)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=sampling["max_new_tokens"],
        do_sample=sampling["do_sample"],
        **({"temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"]}
           if sampling["do_sample"] else {}),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # a dequantised QLoRA base
        if hasattr(model.config, attr):
            delattr(model.config, attr)

    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / "export.json").write_text(json.dumps({
            "source": str(Path(info.path).resolve()) if Path(info.path).exists() else info.path,
            "source_kind": info.describe(),
            "base_model": info.base_model,
            "merged": info.is_adapter,
            "qlora_base": qlora_base if info.quantisation in ("4-bit", "8-bit") else None,
            "dtype": str(target).removeprefix("torch."),
            "sampling": sampling,
        }, indent=2) + "\n")
        if push_to_hub:
            from huggingface_hub import HfApi

            try:
                HfApi().upload_folder(repo_id=push_to_hub, folder_path=str(work),
                                      commit_message=f"rlhf export of {Path(info.path).name}")
            except Exception as e:
                raise UserError(f"--push_to_hub {push_to_hub}: upload failed ({_first_line(e)}); "
                                "nothing was written, rerun when the hub is reachable") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return out


@dataclass
class ExportArguments:
    """Settings of ``rlhf export``."""

    model: str
    """A stage output directory (SFT, PPO...), or a model directory."""
    out: str
    """The directory to write (must not exist unless overwrite)."""
    dtype: str | None = None
    """Weights dtype: float32, bfloat16 or float16 (null = the run's torch_dtype)."""
    push_to_hub: str | None = None
    """Also upload to this hub repository id (e.g. me/ppo-demo)."""
    private: bool = False
    """With push_to_hub: create a private repository."""
    qlora_base: str = "dequantized"
    """QLoRA runs: merge into the dequantised 4/8-bit base the adapter trained against (dequantized) or into
    the original unquantised weights (original)."""
    overwrite: bool = False
    """Replace an existing out directory."""


def export_command(argv: list[str]) -> int:
    """``rlhf export --model <run dir> --out <dir> [--dtype bfloat16] [--push_to_hub REPO [--private]]``
    (``rlhf export <run dir> --out <dir>`` is the same)."""
    (args,), _ = build_config([ExportArguments], argv, prog="rlhf export", positional=("model",),
                              description=__doc__.split("\n\n")[0])
    out = export_model(args.model, args.out, args.dtype, args.push_to_hub, args.private, args.qlora_base, args.overwrite)
    print(f"exported {args.model} -> {out}" + (f" (pushed to {args.push_to_hub})" if args.push_to_hub else ""))
    return 0
