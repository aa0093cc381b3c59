"""Peak memory of one step of every stage at real model shapes, each row in its own process.

    .venv/bin/python bench/bench_scale.py --quick                          # tiny shape, seconds (the test)
    .venv/bin/python bench/bench_scale.py --shape 360m                     # every row at SmolLM2-360M's shape
    .venv/bin/python bench/bench_scale.py --shape 1.7b --rows sft-lora,ppo-lora,ppo-lora-ckpt
    .venv/bin/python bench/bench_scale.py --shape 1.7b --rows ppo-lora,ppo-lora-nobf16fwd --json 1.7b.json
                                                                           # bf16_forwards on / off
    .venv/bin/python bench/bench_scale.py --shape 135m --dtype float32 --rows sft-lora,ppo-lora \\
        --malloc keep,glibc,bounded --steps 3                                # allocator settings side by side
    python bench/bench_scale.py --device cuda --shape 8b --rows sft-qlora-ckpt,ppo-qlora-ckpt
                                                                           # on a GPU: GPU memory, not RSS

The model is built from a config at the shape asked (``SHAPES``: SmolLM2-360M and -1.7B, Llama
architecture, vocabulary 49152; Llama-3-8B, vocabulary 128256) with random weights, saved once under
``--cache`` with the default model's tokenizer (SmolLM2's, 49152 entries) and random SFT and reward
LoRA adapters: no hub.
Random weights cost what trained ones cost; only the shapes matter here.

Each row runs ONE step (``--steps``) of a stage through the project's own code, in a fresh child
process, and reports that process's peak resident set size (``ru_maxrss``, Python and torch
included) with the allocator settings ``rlhf`` users get by default (``rlhf/core/allocator.py``):

    sft-*, reward-*   ``sft.train.run`` / ``reward.train.run`` (TRL's trainers), batch 8 x (prompt +
                      new tokens), rows of that length and 3 tokens shorter (padded batches);
                      reward: 8 pairs, i.e. 16 sequences
    ppo-*             ``rlhf.ppo.trainer.build_roles`` + ``PPOTrainer.train_step``: 8 prompts of 64 tokens (and
                      61: left-padded), every reply forced to 128 tokens (min = max new tokens)
    trl019-lora       the PPO layout of TRL 0.19's ``PPOTrainer`` with a LoRA policy, rebuilt here with
                      transformers + peft (TRL 0.19 does not install beside TRL 1.16): reference = the
                      policy with its adapter off, a SEPARATE full reward model and a SEPARATE full
                      value model trained in full with AdamW, policy and value losses backpropagated
                      together, full-sequence logits, generation scores kept (see child_trl019)

Row names: ``<stage>-<lora|qlora>[-ckpt][-merge|-nomerge][-bf16fwd|-nobf16fwd][-policyhead]``: lora = LoRA on a
``--dtype`` base (bfloat16 by default), qlora = QLoRA 4-bit NF4 (compute in ``--dtype``), ckpt =
gradient checkpointing, merge/nomerge = PPO's ``merge_for_generation`` forced on/off, bf16fwd/nobf16fwd
= PPO's ``bf16_forwards`` forced on/off (else their defaults: ``bf16_forwards`` auto is on for lora
rows on a bfloat16 base, so ``ppo-lora`` against ``ppo-lora-nobf16fwd`` is the option's saving),
policyhead = PPO's ``value_model: policy_head`` (else its default, the critic adapter).
With ``--device cuda`` each row runs on the GPU (the stages' own device choice) and reports what
nvidia-smi would show at the peak: the caching allocator's peak reserved memory + the CUDA context
(the device's used memory less the reserved, read at the end of the row). Every row is printed beside
``rlhf estimate-memory``'s figure for it (``rlhf.core.memory``, with the row's settings: PPO rows
without the final evaluation, which these children do not run; one step where the estimate is for
the steady state of later steps, see bench/bench_estimate_vs_cli.py for the whole ``rlhf ppo`` run),
and the ratios the issue asks for: the TRL 0.19 layout / ours, PPO / SFT, rollout time with and without
merging, PPO with bf16 forwards on / off. Timings are wall seconds of a shared 2-core machine: compare
them within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Llama-architecture shapes from each model's config.json: hidden, intermediate, layers, heads, KV heads;
# vocab 49152, tied.
SHAPES = {
    "quick": (128, 256, 2, 4, 2),  # bitsandbytes' CPU 4-bit kernels need hidden >= 128
    "135m": (576, 1536, 30, 9, 3),
    "360m": (960, 2560, 32, 15, 5),
    "1.7b": (2048, 8192, 24, 32, 32),
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3-8B
}
VOCAB = 49152
# Shapes whose vocabulary is not SmolLM2's: (vocab, tied). SmolLM2's tokenizer uses the first 49152 rows.
SHAPE_VOCAB = {"8b": (128256, False)}
# batch (prompts, sequences or pairs), prompt tokens, new tokens; SFT and reward rows are prompt + new long.
SIZES = {"quick": (2, 40, 8)}
DEFAULT_SIZES = (8, 64, 128)
STAGE_ROWS = [f"{s}-{m}{c}" for s in ("sft", "reward", "ppo") for m in ("lora", "qlora") for c in ("", "-ckpt")]
DEFAULT_ROWS = {"quick": ["empty", "sft-lora", "reward-lora", "ppo-lora", "ppo-lora-nomerge", "ppo-lora-nobf16fwd",
                          "trl019-lora"],
                "360m": ["empty", *STAGE_ROWS, "ppo-lora-nomerge", "ppo-lora-nobf16fwd", "trl019-lora"],
                "1.7b": ["sft-lora", "reward-lora", "ppo-lora", "ppo-lora-policyhead", "ppo-lora-ckpt",
                         "ppo-lora-nobf16fwd"]}
ROW = re.compile(r"^(empty|trl019-lora|(sft|reward|ppo)-(lora|qlora)(-ckpt)?(-merge|-nomerge)?(-bf16fwd|-nobf16fwd)?"
                 r"(-policyhead)?)$")
# glibc malloc settings a child can run under (--malloc). "keep" / "glibc" are what
# RLHF_KEEP_FREED_MEMORY=1 / 0 give; "rlhf" is whatever rlhf/core/allocator.py does by default.
MALLOC = {
    "rlhf": {},
    "keep": {"RLHF_KEEP_FREED_MEMORY": "1"},
    "glibc": {"RLHF_KEEP_FREED_MEMORY": "0"},
    "bounded": {"RLHF_KEEP_FREED_MEMORY": "bounded"},  # mmap from 64 MiB, trim above 256 MiB free
    "bounded256": {"MALLOC_MMAP_THRESHOLD_": str(256 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)},
    "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},  # bench_ppo's memory children
}
RESULT_TAG = "BENCH_RESULT "
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="360m", choices=list(SHAPES), help="model shape")
    p.add_argument("--quick", action="store_true", help="= --shape quick (a tiny model: the smoke test)")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: the shape's list; see the docstring)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="weights dtype of lora rows")
    p.add_argument("--batch_size", type=int, default=None, help="prompts / sequences / pairs per step (default 8)")
    p.add_argument("--prompt_len", type=int, default=None, help="prompt tokens (default 64)")
    p.add_argument("--new_tokens", type=int, default=None, help="reply tokens (default 128)")
    p.add_argument("--steps", type=int, default=1, help="steps per row")
    p.add_argument("--malloc", default="rlhf", help=f"comma-separated allocator settings: {', '.join(MALLOC)}")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the rows run; cuda: peak = the caching allocator's peak reserved + the CUDA context")
    p.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's choice)")
    p.add_argument("--tokenizer", default=None, help="a model dir whose tokenizer (vocab <= 49152) to use "
                                                     "(default: the converted default model)")
    p.add_argument("--cache", default=str(REPO / "runs" / "bench_scale"), help="where the random models are kept")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    p.add_argument("--fits", action="store_true",
                   help="print the what-fits-where table of docs/results.md (estimates, CUDA)")
    p.add_argument("--from_json", default=None, help="print the table of earlier --json runs (comma-separated) with today's estimator")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.shape = "quick"
    b, s, t = SIZES.get(a.shape, DEFAULT_SIZES)
    a.batch_size, a.prompt_len, a.new_tokens = a.batch_size or b, a.prompt_len or s, a.new_tokens or t
    a.rows = a.rows.split(",") if a.rows else DEFAULT_ROWS.get(a.shape, DEFAULT_ROWS["360m"])
    a.malloc = a.malloc.split(",")
    if a.device == "cuda" and not a.fits and not a.from_json:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device on this machine")
    for row in a.rows if not a.child else []:
        if not ROW.match(row):
            p.error(f"--rows: expected names like sft-lora, ppo-qlora-ckpt, ppo-lora-nomerge, trl019-lora, found {row!r}")
        parsed = parse_row(row)
        if a.device == "cuda" and parsed["stage"] == "trl019-lora":
            p.error("--rows: trl019-lora runs on --device cpu only")
        if parsed["bf16fwd"] and (parsed["stage"], parsed["method"], a.dtype) != ("ppo", "lora", "bfloat16"):
            p.error(f"--rows: {row}: -bf16fwd is PPO's bf16_forwards on, which needs a ppo-lora row and --dtype bfloat16")
    for m in a.malloc:
        if m not in MALLOC:
            p.error(f"--malloc: expected one of {', '.join(MALLOC)}, found {m!r}")
    return a


def parse_row(row: str) -> dict:
    """``ppo-qlora-ckpt`` -> stage ppo, method qlora, checkpointing on, merge and bf16fwd None (the defaults)."""
    m = ROW.match(row)
    if row in ("empty", "trl019-lora"):
        return {"stage": row, "method": "lora", "ckpt": False, "merge": None, "bf16fwd": None, "value_model": "critic"}
    merge = {None: None, "-merge": True, "-nomerge": False}[m.group(5)]
    bf16fwd = {None: None, "-bf16fwd": True, "-nobf16fwd": False}[m.group(6)]
    return {"stage": m.group(2), "method": m.group(3), "ckpt": bool(m.group(4)), "merge": merge, "bf16fwd": bf16fwd,
            "value_model": "policy_head" if m.group(7) else "critic"}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cuda_peaks() -> dict:
    """GPU memory of this process: what nvidia-smi shows at the peak = peak reserved + the CUDA context."""
    import torch

    free, total = torch.cuda.mem_get_info()
    context = (total - free - torch.cuda.memory_reserved()) / MiB  # the only process on the device
    reserved = torch.cuda.max_memory_reserved() / MiB
    return {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated() / MiB, "peak_cuda_reserved_mib": reserved,
            "cuda_context_mib": context, "peak_cuda_mib": reserved + context}


def peak_mib(r: dict) -> float:
    """A row's measured peak: GPU memory for --device cuda rows, else the process's peak RSS."""
    return r.get("peak_cuda_mib", r["peak_rss_mib"])


def progress(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The model directory: random weights at the shape, the default tokenizer, SFT and reward adapters
# ----------------------------------------------------------------------------------------------


def model_config(shape: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = SHAPES[shape]
    vocab, tied = SHAPE_VOCAB.get(shape, (VOCAB, True))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                       max_position_embeddings=2048, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


def prepare(a: argparse.Namespace) -> Path:
    """Build (once) ``<cache>/<shape>``: model, tokenizer, ``sft/`` and ``reward/`` LoRA adapters."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from rlhf.core.adapters import HEAD_FILE
    from rlhf.core.models import ModelArguments, build_peft_config, load_tokenizer, resolve_model_path

    out = Path(a.cache) / a.shape
    if (out / "reward" / HEAD_FILE).exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tokenizer = load_tokenizer(resolve_model_path(a.tokenizer or "smollm2-135m-instruct"))
    if len(tokenizer) > VOCAB:
        raise SystemExit(f"--tokenizer: expected at most {VOCAB} tokens, found {len(tokenizer)}")
    torch.manual_seed(0)
    with torch.device(a.device):  # random initialisation of billions of weights is quicker on a GPU
        model = LlamaForCausalLM._from_config(model_config(a.shape), dtype=torch.bfloat16)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    args = ModelArguments(model_name_or_path=str(tmp))
    peft_model = get_peft_model(model, build_peft_config(args, model))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)  # a small but real update (peft starts B at zero)
    for name in ("sft", "reward"):
        peft_model.save_pretrained(str(tmp / name))
        tokenizer.save_pretrained(str(tmp / name))
        # The adapters name the directory they were made in; point them at the final one.
        config_file = tmp / name / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = str(out)
        config_file.write_text(json.dumps(config, indent=2))
    head = torch.randn(1, model.config.hidden_size) * model.config.hidden_size ** -0.5
    save_file({"weight": head}, str(tmp / "reward" / HEAD_FILE))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------
# Children: one row each
# ----------------------------------------------------------------------------------------------


def words(n: int) -> str:
    return " ".join(["hello"] * n)


def exact(encode, width: int) -> str:
    """The longest run of words whose encoding is at most ``width`` tokens."""
    n = width
    while len(encode(words(n))) > width:
        n -= 1
        if n < 1:
            raise SystemExit(f"{width} tokens: shorter than the chat template")
    return words(n)


def peft_method(method: str) -> str:
    return "qlora-4bit" if method == "qlora" else "lora"


class StepTimer:
    """A TrainerCallback that records each optimizer step's wall seconds."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.seconds: list[float] = []

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.seconds.append(time.perf_counter() - self._start)

        return _Timer()


def child_trainer_stage(a: argparse.Namespace, row: dict, model_dir: Path, work: Path) -> dict:
    """SFT or reward: the stage's own ``run`` on synthetic rows of exactly prompt + new tokens."""
    from rlhf.core.data import write_jsonl
    from rlhf.core.formatting import encode_prompt_reply
    from rlhf.core.hooks import with_trainer_callbacks
    from rlhf.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    b, width = a.batch_size, a.prompt_len + a.new_tokens
    if row["stage"] == "sft":
        from sft.train import run

        rows = [{"text": exact(lambda r: encode_prompt_reply(tokenizer, "", r)[0], width - 3 * (k % 2))}
                for k in range(b * a.steps)]
        extra = {"max_length": width}
    else:
        from reward.train import run

        chosen = exact(lambda r: encode_prompt_reply(tokenizer, "say hello", r)[0], width)
        rejected = exact(lambda r: encode_prompt_reply(tokenizer, "say hello", r)[0], width - 3)
        rows = [{"prompt": "say hello", "chosen": chosen, "rejected": rejected}] * (b * a.steps)
        extra = {}
    write_jsonl(work / "train.jsonl", rows)
    timer = StepTimer()
    started = time.perf_counter()
    run({"model_name_or_path": str(model_dir), "peft_method": peft_method(row["method"]),
         "torch_dtype": a.dtype, "bf16": a.dtype == "bfloat16", "train_file": str(work / "train.jsonl"),
         "validation_size": 0, "test_size": 0, "validation_file": None, "test_file": None,
         "output_dir": str(work / "run"), "seed": 0, "max_steps": a.steps, "per_device_train_batch_size": b,
         "save_strategy": "no", "eval_strategy": "no", "load_best_model_at_end": False, "disable_tqdm": True,
         "logging_steps": 1, "gradient_checkpointing": row["ckpt"], **extra},
        with_trainer_callbacks(timer))
    return {"step_seconds": timer.seconds, "run_seconds": time.perf_counter() - started}


def ppo_prompts(a: argparse.Namespace, tokenizer) -> list[str]:
    from rlhf.core.formatting import encode_prompt

    # Prompts of prompt_len and prompt_len - 3 tokens: left-padded rollouts, as real ones are.
    return [exact(lambda p: encode_prompt(tokenizer, p), a.prompt_len - 3 * (k % 2)) for k in range(a.batch_size)]


def force_reply_length() -> None:
    """Every reply exactly max_new_tokens long (min_new_tokens = max_new_tokens): comparable rows."""
    from rlhf.core import generation

    plain = generation.SamplingArguments.generation_kwargs
    if getattr(plain, "_forced", False):
        return

    def full_width(self, tokenizer):
        return {**plain(self, tokenizer), "min_new_tokens": self.max_new_tokens}

    full_width._forced = True
    generation.SamplingArguments.generation_kwargs = full_width


def child_ppo(a: argparse.Namespace, row: dict, model_dir: Path, work: Path) -> dict:
    """Our PPO step: ``build_roles`` + ``PPOTrainer.train_step`` with the stage's defaults."""
    import torch

    from rlhf.core.generation import SamplingArguments
    from rlhf.core.models import ModelArguments, load_tokenizer
    from rlhf.ppo.trainer import PPOArguments, PPOTrainer, build_roles

    force_reply_length()
    tokenizer = load_tokenizer(str(model_dir / "sft"))
    merge = {} if row["merge"] is None else {"merge_for_generation": row["merge"]}
    merge.update({} if row["bf16fwd"] is None else {"bf16_forwards": row["bf16fwd"]})
    args = PPOArguments(sft_model=str(model_dir / "sft"), reward_model=str(model_dir / "reward"),
                        output_dir=str(work / "ppo"), seed=0, max_steps=a.steps, batch_size=a.batch_size,
                        mini_batch_size=a.batch_size, gradient_checkpointing=row["ckpt"],
                        value_model=row["value_model"], **merge)
    model_args = ModelArguments(model_name_or_path=str(model_dir), peft_method=peft_method(row["method"]),
                                torch_dtype=a.dtype)
    started = time.perf_counter()
    registry, reference = build_roles(model_args, args, torch.device(a.device))
    trainer = PPOTrainer(args, SamplingArguments(max_new_tokens=a.new_tokens), registry, tokenizer,
                         ppo_prompts(a, tokenizer), reference)
    load_seconds = time.perf_counter() - started
    phases: dict[str, list[float]] = {"generate": [], "score": [], "update": []}
    steps, lengths = [], []
    for i in range(a.steps):
        start = time.perf_counter()
        stats = trainer.train_step()
        steps.append(time.perf_counter() - start)
        lengths.append(stats["response_length"])
        for name in phases:  # the trainer times its own numbered steps
            phases[name].append(stats.get(f"{name}_seconds", float("nan")))
        progress(f"PPO step {i + 1}/{a.steps}: {steps[-1]:.1f} s (generate {phases['generate'][-1]:.1f}, score "
                 f"{phases['score'][-1]:.1f}, update {phases['update'][-1]:.1f})")
    return {"step_seconds": steps, "phase_seconds": phases, "load_seconds": load_seconds,
            "reply_lengths": lengths, "merge_for_generation": args.merge_for_generation,
            "merged": trainer.roles.merge_backup is not None,
            "bf16_forwards": trainer.registry.compute_dtype is not None, "value_model": trainer.value_model.name}


def child_trl019(a: argparse.Namespace, row: dict, model_dir: Path, work: Path) -> dict:
    """TRL 0.19's PPOTrainer layout with a LoRA policy, rebuilt with transformers + peft.

    What TRL 0.19 (trl/trainer/ppo_trainer.py) holds, and this child does too: the policy is the base
    + LoRA; the reference is the policy with its adapter disabled (``ref_model=None`` with peft); the
    reward model and the value model are two more full ``AutoModelForSequenceClassification`` models
    (the value model initialised from the reward model, trained in full: ``PolicyAndValueWrapper``'s
    parameters all go to one AdamW); generation keeps every step's scores ``(b, t, v)`` to get the
    rollout logprobs; the reference, value and reward forwards run over the full sequence (the LM
    head on every position); the update runs the value backbone and the policy in one forward,
    sums the two losses and backpropagates once, so both graphs are alive together.
    """
    import torch
    from peft import PeftModel

    from rlhf.ppo import math as pm
    from rlhf.core.formatting import encode_prompt
    from rlhf.core.generation import pad_ids
    from rlhf.core.models import ModelArguments, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir / "sft"))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    full = ModelArguments(model_name_or_path=str(model_dir), peft_method="full", torch_dtype=a.dtype)
    started = time.perf_counter()
    policy = PeftModel.from_pretrained(load_base_model(full, "causal-lm"), str(model_dir / "sft"), is_trainable=True)
    reward = load_base_model(full, "seq-cls").requires_grad_(False)
    value = load_base_model(full, "seq-cls")  # value_model: trained in full
    for m in (reward, value):
        m.config.pad_token_id = pad
    policy.eval(), reward.eval(), value.eval()  # TRL 0.19 disables dropout
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-6, eps=1e-5)
    load_seconds = time.perf_counter() - started
    temperature = 0.7

    def body(model, ids, mask):  # TRL's forward / get_reward: position ids from the mask, no cache
        position_ids = (mask.cumsum(1) - mask).long()
        return dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)

    def get_reward(model, ids, mask):  # (b, s) scores at every position, as TRL 0.19's get_reward
        out = model.model(**body(model, ids, mask), output_hidden_states=True)
        return model.score(out.hidden_states[-1]).squeeze(-1)

    steps, phases = [], {"generate": [], "score": [], "update": []}
    for step in range(a.steps):
        start = time.perf_counter()
        prompts = [encode_prompt(tokenizer, p) for p in ppo_prompts(a, tokenizer)]
        query, query_mask = pad_ids(prompts, pad)
        with torch.no_grad():
            out = policy.generate(input_ids=query, attention_mask=query_mask, max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=True, temperature=temperature, top_k=0,
                                  top_p=1.0, pad_token_id=pad, eos_token_id=eos, output_scores=True,
                                  return_dict_in_generate=True)
            logits = torch.stack(out.scores, 1)  # (b, t, v): TRL's batch_generation returns them
            ids, s = out.sequences, query.shape[1]
            response = ids[:, s:]
            mask = torch.cat([query_mask, torch.ones_like(response)], 1)
            phases["generate"].append(time.perf_counter() - start)
            t0 = time.perf_counter()
            logprobs = pm.logprobs_from_logits(logits, response, temperature=temperature)
            del logits
            with policy.disable_adapter():  # the reference
                ref_logits = policy(**body(policy, ids, mask)).logits[:, s - 1 : -1]  # full-sequence head
                ref_logprobs = pm.logprobs_from_logits(ref_logits, response, temperature=temperature)
                del ref_logits
            values = get_reward(value, ids, mask)[:, s - 1 : -1]
            scores = get_reward(reward, ids, mask)[:, -1]
            response_mask = torch.ones_like(response, dtype=torch.bool)
            rewards, _ = pm.compute_rewards(scores, logprobs, ref_logprobs, response_mask, 0.05)
            advantages, returns = pm.gae_advantages(rewards, values, response_mask, 1.0, 0.95)
            advantages = pm.masked_whiten(advantages, response_mask)
        phases["score"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # One PPO epoch, one minibatch: PolicyAndValueWrapper's forward, one backward of the sum.
        vpred = get_reward(value, ids, mask)[:, s - 1 : -1]
        new_logits = policy(**body(policy, ids, mask)).logits[:, s - 1 : -1] / (temperature + 1e-7)
        new_logprobs = pm.logprobs_from_logits(new_logits, response)
        with torch.no_grad():  # TRL 0.19 logs the entropy from a full softmax
            probs = torch.softmax(new_logits, -1)
            (torch.logsumexp(new_logits, -1) - (probs * new_logits).sum(-1)).mean()
            del probs
        pg_loss, _ = pm.ppo_policy_loss(new_logprobs, logprobs, advantages, response_mask, 0.2)
        vf_loss, _ = pm.ppo_value_loss(vpred, values, returns, response_mask, 0.2)
        (pg_loss + 0.1 * vf_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        del new_logits, new_logprobs, vpred
        phases["update"].append(time.perf_counter() - t0)
        steps.append(time.perf_counter() - start)
        progress(f"TRL 0.19 layout step {step + 1}/{a.steps}: {steps[-1]:.1f} s")
    return {"step_seconds": steps, "phase_seconds": phases, "load_seconds": load_seconds}


def run_child_row(a: argparse.Namespace, row_name: str) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    # The allocator settings an `rlhf` stage applies when it starts (before anything is allocated).
    from rlhf.core.allocator import keep_freed_memory

    applied = keep_freed_memory()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    row = parse_row(row_name)
    model_dir, work = Path(a.cache) / a.shape, Path(a.workdir)
    if row["stage"] == "empty":  # the floor: python + torch + the stage imports
        import sft.train  # noqa: F401
        import reward.train  # noqa: F401
        import rlhf.ppo.trainer  # noqa: F401
        out = {}
    elif row["stage"] == "trl019-lora":
        out = child_trl019(a, row, model_dir, work)
    elif row["stage"] == "ppo":
        out = child_ppo(a, row, model_dir, work)
    else:
        out = child_trainer_stage(a, row, model_dir, work)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: less sensitive than wall time to a busy machine
    if a.device == "cuda":
        out.update(cuda_peaks())
    return {**out, "peak_rss_mib": peak_rss_mib(), "kept_heap": applied, "user_seconds": usage.ru_utime,
            "system_seconds": usage.ru_stime}


# ----------------------------------------------------------------------------------------------
# Estimates and the table
# ----------------------------------------------------------------------------------------------


def estimate_row(a: argparse.Namespace, row_name: str) -> float | None:
    """``rlhf estimate-memory``'s total for a row, MiB (None for the floor)."""
    try:
        from rlhf.core.memory import estimate_memory, estimate_separate_models_ppo
    except ImportError:  # an estimator without the separate-models layout
        return None
    row = parse_row(row_name)
    config = model_config(a.shape)
    common = dict(batch_size=a.batch_size, max_new_tokens=a.new_tokens, dtype=a.dtype, device=a.device,
                  gradient_checkpointing=row["ckpt"])
    if row["stage"] == "empty":
        return None
    if row["stage"] == "trl019-lora":
        return estimate_separate_models_ppo(config, seq_len=a.prompt_len, **common).total / MiB
    seq_len = a.prompt_len if row["stage"] == "ppo" else a.prompt_len + a.new_tokens
    extra = {} if row["merge"] is None else {"merge_for_generation": row["merge"]}
    if row["stage"] == "ppo":  # child_ppo runs train_step only: no final evaluation
        extra.update(eval_prompts=0, bf16_forwards={None: "auto", True: "true", False: "false"}[row["bf16fwd"]],
                     value_model=row["value_model"])
    return estimate_memory(config, row["stage"], row["method"], seq_len=seq_len, **common, **extra).total / MiB


def child_env(malloc: str = "rlhf") -> dict[str, str]:
    """The environment a measured child runs in: quiet, offline, and the allocator setting ``malloc``
    (``rlhf``: what a user gets; no inherited glibc tunables)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
                                                         or k == "RLHF_KEEP_FREED_MEMORY")}
    env.update({"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", **MALLOC[malloc]})
    return env


def run_child(a: argparse.Namespace, row: str, malloc: str, work: Path, retry: bool = True) -> dict:
    env = child_env(malloc)
    argv = [sys.executable, str(Path(__file__).resolve()), "--shape", a.shape, "--dtype", a.dtype,
            "--batch_size", str(a.batch_size), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
            "--steps", str(a.steps), "--device", a.device, "--cache", a.cache, "--child", row, "--workdir", str(work)]
    if a.threads:
        argv += ["--threads", str(a.threads)]
    started = time.perf_counter()
    child = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    results = [line for line in child.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if (child.returncode != 0 or not results) and retry:  # e.g. a working tree caught mid-edit
        print(f"    {row} ({malloc}) failed (exit {child.returncode}); once more in 30 s", file=sys.stderr, flush=True)
        time.sleep(30)
        (work / "retry").mkdir(exist_ok=True)
        return run_child(a, row, malloc, work / "retry", retry=False)
    if child.returncode != 0 or not results:
        raise SystemExit(f"bench child {row!r} ({malloc}) failed (exit {child.returncode}):\n{child.stdout[-4000:]}")
    return {**json.loads(results[-1][len(RESULT_TAG):]), "wall_seconds": time.perf_counter() - started}


def wait_for_memory(need_mib: float, patience: float = 600) -> bool:
    """A shared machine: start a row only when its estimate + 2 GiB is available (never push others out)."""
    deadline = time.time() + patience
    while True:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                if int(line.split()[1]) / 1024 >= need_mib + 2048:
                    return True
        if time.time() > deadline:
            return False
        time.sleep(15)


def _last(values) -> float | None:
    return values[-1] if values else None


def build_table(a: argparse.Namespace, results: dict[str, dict]) -> tuple[str, list[dict]]:
    peak_name = "peak GPU MiB" if any("peak_cuda_mib" in r for r in results.values()) else "peak RSS MiB"
    lines = [f"| row | allocator | {peak_name} | estimate MiB | error | step s | generate s | CPU s user / sys |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        est = r.get("estimate_mib")
        err = f"{(est - peak_mib(r)) / peak_mib(r):+.1%}" if est else ""
        step = _last(r.get("step_seconds"))
        gen = _last(r.get("phase_seconds", {}).get("generate"))
        lines.append(f"| {r['row']} | {r['malloc']} | {peak_mib(r):,.0f} | "
                     f"{f'{est:,.0f}' if est else ''} | {err} | {f'{step:.1f}' if step else ''} | "
                     f"{f'{gen:.1f}' if gen else ''} | "
                     + (f"{r['user_seconds']:.0f} / {r['system_seconds']:.0f} |" if "user_seconds" in r else " |"))
    ratios = []

    def peak(row, malloc="rlhf"):
        r = results.get(f"{row}/{malloc}") or next((v for k, v in results.items() if k.startswith(f"{row}/")), None)
        return r and peak_mib(r)

    for method in ("lora", "qlora"):
        for ck in ("", "-ckpt"):
            ppo, sft = peak(f"ppo-{method}{ck}"), peak(f"sft-{method}{ck}")
            if ppo and sft:
                ratios.append((f"PPO / SFT peak, {method}{ck}", ppo / sft, "<= 1.25"))
    head, sft = peak("ppo-lora-policyhead"), peak("sft-lora")
    if head and sft:
        ratios.append(("PPO / SFT peak, lora, value_model policy_head", head / sft, "<= 1.25"))
    trl, ours = peak("trl019-lora"), peak("ppo-lora")
    if trl and ours:
        ratios.append(("TRL 0.19 layout / our PPO peak, lora", trl / ours, ">= 3"))
    on, off = results.get("ppo-lora-merge/rlhf"), results.get("ppo-lora-nomerge/rlhf")
    if not on and results.get("ppo-lora/rlhf", {}).get("merged"):  # the default (auto) merged
        on = results["ppo-lora/rlhf"]
    if on and off:
        g_on, g_off = _last(on["phase_seconds"]["generate"]), _last(off["phase_seconds"]["generate"])
        ratios.append(("rollout seconds, merge on / off", g_on / g_off, ""))
        ratios.append(("peak, merge on / off", peak_mib(on) / peak_mib(off), ""))

    def find(row):
        return results.get(f"{row}/rlhf") or next((v for k, v in results.items() if k.startswith(f"{row}/")), None)

    for ck in ("", "-ckpt"):  # bf16_forwards forced on, or the default where it was on, against off
        on, off = find(f"ppo-lora{ck}-bf16fwd"), find(f"ppo-lora{ck}-nobf16fwd")
        default = find(f"ppo-lora{ck}")
        on = on or (default if default and default.get("bf16_forwards") else None)
        if on and off:
            ratios.append((f"PPO peak, bf16 forwards on / off, lora{ck}", peak_mib(on) / peak_mib(off),
                           "< 1"))
    if ratios:
        lines += ["", "| ratio | value | goal |", "|---|---:|---|"]
        lines += [f"| {name} | {value:.2f} | {goal} |" for name, value, goal in ratios]
    return "\n".join(lines), [{"name": n, "value": v, "goal": g} for n, v, g in ratios]


# Shapes of the "what fits where" table (docs/results.md), read off each model's config.json.
FIT_MODELS = {
    "SmolLM2-1.7B": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "Qwen2.5-3B": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                 tie_word_embeddings=True)),
    "Llama-3-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 tie_word_embeddings=False)),
}
GPUS_GIB = (8, 12, 16, 24)


def fits_table(a: argparse.Namespace) -> str:
    """Markdown: the estimate (CUDA, bf16 / QLoRA 4-bit) of every stage of FIT_MODELS, and the GPUs it fits."""
    from transformers import AutoConfig

    from rlhf.core.memory import architecture, estimate_memory

    lines = ["| model | stage | method | GiB, checkpointing off / on | " + " | ".join(f"{g} GB" for g in GPUS_GIB) + " |",
             "|---|---|---|---:|" + "---|" * len(GPUS_GIB)]
    for name, (kind, shape) in FIT_MODELS.items():
        config = AutoConfig.for_model(kind, **shape)
        arch = architecture(config)
        for stage in ("sft", "reward", "ppo"):
            for method in ("lora", "qlora"):
                seq_len = a.prompt_len if stage == "ppo" else a.prompt_len + a.new_tokens
                gib = [estimate_memory(config, stage, method, batch_size=a.batch_size, seq_len=seq_len,
                                       max_new_tokens=a.new_tokens, dtype="bfloat16", device="cuda",
                                       gradient_checkpointing=ck, arch=arch).total / 2**30 for ck in (False, True)]
                cells = ["yes" if gib[0] <= g else "with checkpointing" if gib[1] <= g else "no" for g in GPUS_GIB]
                label = "LoRA bf16" if method == "lora" else "QLoRA 4-bit"
                lines.append(f"| {name} | {stage} | {label} | {gib[0]:.1f} / {gib[1]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    a = parse_args(argv)
    if a.fits:
        print(fits_table(a))
        return None
    if a.child == "prepare":
        print(prepare(a))
        return None
    if a.child:
        result = run_child_row(a, a.child)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return None
    started = time.time()
    if a.from_json:  # the table again, with the estimator as it is now; several runs are joined
        out = {"results": {}}
        for name in a.from_json.split(","):
            out["results"].update(json.loads(Path(name).read_text())["results"])
        for r in out["results"].values():
            r["estimate_mib"] = estimate_row(a, r["row"])
        table, out["ratios"] = build_table(a, out["results"])
        print(table)
        return out
    # The model directory is built in a process of its own, so no child inherits its memory.
    prep = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--shape", a.shape, "--cache", a.cache,
                           "--device", a.device,
                           *(["--tokenizer", a.tokenizer] if a.tokenizer else []), "--child", "prepare"],
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    if prep.returncode != 0:
        raise SystemExit(f"preparing the {a.shape} model failed (exit {prep.returncode})")
    results: dict[str, dict] = {}
    plan = [(row, m) for row in a.rows for m in a.malloc]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        for i, (row, malloc) in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {row} ({malloc}), {time.time() - started:.0f} s so far", file=sys.stderr,
                  flush=True)
            work = Path(tmp) / f"{row}-{malloc}"
            work.mkdir()
            estimate = estimate_row(a, row)
            if a.device == "cpu" and not wait_for_memory(estimate or 0):
                print(f"    skipped: less than {estimate:,.0f} + 2,048 MiB available for 10 minutes", file=sys.stderr)
                continue
            r = run_child(a, row, malloc, work)
            r.update(row=row, malloc=malloc, estimate_mib=estimate)
            results[f"{row}/{malloc}"] = r
            if a.json:  # after every row: a long run stopped half-way keeps what it measured
                Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                Path(a.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
            print(f"    peak {peak_mib(r):,.0f} MiB, estimate "
                  f"{r['estimate_mib'] or 0:,.0f} MiB, {r['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    table, ratios = build_table(a, results)
    hidden, inter, layers, heads, kv = SHAPES[a.shape]
    settings = (f"shape {a.shape} (hidden {hidden}, intermediate {inter}, {layers} layers, {heads} heads, {kv} KV "
                f"heads, vocab {model_config(a.shape).vocab_size}), {a.device}, {a.dtype}, batch {a.batch_size} x "
                f"({a.prompt_len} + {a.new_tokens}) tokens, "
                f"{a.steps} step(s) per row, {os.cpu_count()} CPUs; total {time.time() - started:.0f} s")
    print(f"\nScale benchmark: {settings}\n\n{table}\n")
    out = {"settings": {k: v for k, v in vars(a).items() if k not in ("child", "workdir")}, "results": results,
           "ratios": ratios, "seconds": time.time() - started}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(f"{settings}.\n\n{table}\n")
    return out


if __name__ == "__main__":
    main()
