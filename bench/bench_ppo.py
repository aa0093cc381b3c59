"""PPO on one shared base vs the alternatives, side by side in one run: memory, rollout speed, samples/s.

    make bench-ppo                                   # = .venv/bin/python bench/bench_ppo.py
    .venv/bin/python bench/bench_ppo.py --json runs/bench_ppo.json --markdown docs/bench_ppo.md
    .venv/bin/python bench/bench_ppo.py --batch_size 4 --max_new_tokens 32 --steps 2 --threads 2

Four figures, each the ratio of two measurements taken in this run (machines here vary by +-15 %
from run to run, so only side-by-side figures mean anything):

1. memory: peak RSS of our PPO step (policy, reference, reward and value as adapters on ONE base,
   ``rlhf.ppo.trainer.PPOTrainer.train_step``) vs the same step with four separate full models
   (``AutoModelForCausalLM`` x2 + ``AutoModelForSequenceClassification`` x2, each with its adapter,
   built here with the same rlhf.ppo.math functions and the same forward layout). Goal: >= 3x less.
2. memory: peak RSS of our PPO step vs an SFT LoRA step (forward + backward + AdamW of the same
   LoRA model, train mode, on batch x (prompt + max_new_tokens) tokens). Goal: <= 1.25.
3. speed: rollout tokens/s of ``PPOTrainer.generate`` (the generation part of our step, on the
   four-adapter model) vs a bare ``generate`` of base + the same (unmerged) LoRA adapter, as a user
   would call it: same settings, prompt batches and seeds, taking turns in one process so that a
   busy machine slows both alike. Goal: >= 0.9.
4. speed: PPO samples/s vs TRL's ``RLOOTrainer`` (LoRA, a Python reward function, beta > 0,
   ``num_generations=2`` so a step has as many completions as our batch, same lengths and sampling
   settings, fp32, no gradient checkpointing). Goal: >= 1.0.

The speed children (``SPEED_CHILDREN``) run ``--rounds`` times, in turn and each round in the
reverse order of the one before (critic, policy_head, RLOO, then RLOO, policy_head, critic), and a
figure is the median over every round's timed steps: on these shared machines one child's steps
swung from 22 to 31 s between two runs an hour apart while the others' did not, which a single
round of children run one after another cannot tell from a real difference. The report shows each
round's median beside the pooled one.

Every measurement runs in its own child process (this script with ``--child NAME``), so peak
memory is that process's own ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: absolute, Python and
torch included; the ``empty`` child (python + import torch) gives that floor. Speeds are medians
over the timed steps, after ``--warmup_steps`` untimed ones. With ``--threads 1`` steps are timed by
the process's CPU clock (``--clock``): on an idle machine it equals the wall clock, and on a shared
one it does not count the time other jobs take, which otherwise swings wall-clock figures by 2x
between two children run minutes apart.

Weights: transformers memory-maps an fp32 safetensors file, so four ``from_pretrained`` of one file
share one set of physical pages (RSS counts them four times, PSS once) that the kernel may drop and
re-read under memory pressure. That is neither what four copies cost on a GPU or in another dtype,
nor stable to measure on a shared machine, so the memory children copy the weights into their own
memory right after loading (all variants alike); ``--mmap_weights`` keeps the loader's mapping.

The SFT and reward adapters are synthetic (peft's LoRA with random B, a random score head), made
in a temporary directory in a few seconds: only shapes matter here, not what they learned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILDREN = ("prepare", "empty", "ppo_memory", "four_models", "sft", "generate", "ppo", "ppo_head", "rloo")
# Peak-memory children run with glibc's mmap threshold fixed at 64 KiB: every large tensor is then
# returned to the system when freed, so the peak is what the step needs at once. With glibc's
# default (a threshold that grows to 32 MiB), freed activations stay in the heap and the peak keeps
# growing for several steps by fragmentation: an SFT LoRA step measured 2.9 GB after 1 step and
# 3.7 GB after 3 with the default, 2.85 and 2.92 GB with the fixed threshold.
MEMORY_CHILDREN = ("empty", "ppo_memory", "four_models", "sft")
SPEED_CHILDREN = ("ppo", "ppo_head", "rloo")
RESULT_TAG = "BENCH_RESULT "
_now = time.perf_counter  # the children's clock; see --clock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model directory or hub id (default: the embedded model)")
    p.add_argument("--prompts", default=str(REPO / "data/demo/prompts_train.jsonl"), help="prompt rows (JSONL etc.)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts (= replies) per PPO step; RLOO completions per step")
    p.add_argument("--max_new_tokens", type=int, default=48, help="longest reply")
    p.add_argument("--ppo_epochs", type=int, default=1, help="PPO epochs per rollout batch")
    p.add_argument("--mini_batch_size", type=int, default=8, help="replies per optimizer step")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per minibatch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per speed measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each speed child (ppo, ppo_head, rloo), taking turns; figures pool their timed steps")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps before them")
    p.add_argument("--memory_steps", type=int, default=2, help="steps of each peak-memory measurement (PPO and SFT)")
    p.add_argument("--four_models_steps", type=int, default=1, help="steps of the four-copies variant (memory only)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="step timing: wall seconds, or the process's CPU seconds (auto: CPU with --threads 1, "
                        "where it equals wall time on an idle machine and does not count time other jobs take)")
    p.add_argument("--glibc_default_malloc", action="store_true",
                   help="measure peak memory with glibc's default mmap threshold (see MEMORY_CHILDREN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmap_weights", action="store_true",
                   help="keep the loader's memory-mapped weights instead of copying them into process memory")
    p.add_argument("--skip", action="append", default=[], choices=CHILDREN[1:], help="leave a measurement out")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--markdown", default=None, help="also write the table and the command to this Markdown file")
    p.add_argument("--child", default=None, choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds: expected 1 or more, found {a.rounds}")
    return a


# ----------------------------------------------------------------------------------------------
# Helpers shared by the children
# ----------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_now_mb() -> dict[str, float]:
    """Current RSS split into anonymous and file-backed pages, and PSS (shared pages counted once)."""
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def progress(message: str) -> None:
    print(f"    {message}", file=sys.stderr, flush=True)


def child_setup(a: argparse.Namespace):
    import logging
    import warnings

    import torch

    global _now
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    _now = time.process_time if uses_cpu_clock(a) else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    return torch


def uses_cpu_clock(a: argparse.Namespace) -> bool:
    return a.clock == "cpu" or (a.clock == "auto" and a.threads == 1)


def load_prompts(a: argparse.Namespace) -> list:
    from rlhf.core.data import load_rows

    return [r["prompt"] for r in load_rows(a.prompts, "prompt")]


def model_path(a: argparse.Namespace) -> str:
    from rlhf.core.models import resolve_model_path

    return resolve_model_path(a.model)


def model_args(a: argparse.Namespace, path: str, peft_method: str = "lora"):
    from rlhf.core.models import ModelArguments

    return ModelArguments(model_name_or_path=path, peft_method=peft_method, torch_dtype=a.dtype)


def sampling_args(a: argparse.Namespace):
    from rlhf.core.generation import SamplingArguments

    return SamplingArguments(max_new_tokens=a.max_new_tokens)  # temperature 0.7, top_k/top_p off


def sampler(a: argparse.Namespace, prompts: list):
    """The prompt batches every speed measurement uses, in the same order."""
    from rlhf.ppo.trainer import PromptSampler

    return PromptSampler(prompts, a.batch_size, a.seed)


def own_weights(a: argparse.Namespace, model) -> None:
    """Copy memory-mapped weights into this process's memory (see the module docstring)."""
    if a.mmap_weights:
        return
    for param in model.parameters():  # each tied tensor once
        param.data = param.data.clone()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------------


def child_prepare(a: argparse.Namespace, work: Path) -> dict:
    """Synthetic SFT adapter (causal LM) and reward adapter + score head (sequence classification)."""
    torch = child_setup(a)
    from peft import get_peft_model

    from rlhf.core.models import build_peft_config, load_base_model, load_tokenizer

    path = model_path(a)
    tokenizer = load_tokenizer(path)
    for name, task in (("sft", "causal-lm"), ("reward", "seq-cls")):
        margs = model_args(a, path)
        base = load_base_model(margs, task)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = get_peft_model(base, build_peft_config(margs, base, task))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0.0, 1e-3)  # a small but real update (peft starts B at zero)
                elif param_name.endswith("score.modules_to_save.default.weight"):
                    param.normal_(0.0, base.config.hidden_size ** -0.5)
        model.save_pretrained(str(work / name))
        tokenizer.save_pretrained(str(work / name))
        progress(f"{name} adapter -> {work / name}")
    return {"model": path}


def child_empty(a: argparse.Namespace, work: Path) -> dict:
    child_setup(a)
    return {"peak_rss_mb": peak_rss_mb()}


def child_ppo(a: argparse.Namespace, work: Path) -> dict:
    """Our PPO step: PPOTrainer.train_step on one base with four adapters."""
    torch = child_setup(a)
    from rlhf.core.models import load_tokenizer
    from rlhf.ppo.trainer import PPOArguments, PPOTrainer, build_roles

    path = model_path(a)
    # ppo_memory: a few steps for the peak; ppo: warm-up + timed steps for the speed.
    total, w = (a.memory_steps, 0) if a.child == "ppo_memory" else (a.warmup_steps + a.steps, a.warmup_steps)
    args = PPOArguments(sft_model=str(work / "sft"), reward_model=str(work / "reward"), output_dir=str(work / "ppo"),
                        seed=a.seed, max_steps=total, batch_size=a.batch_size,
                        mini_batch_size=a.mini_batch_size, gradient_accumulation_steps=a.gradient_accumulation_steps,
                        ppo_epochs=a.ppo_epochs, value_model="policy_head" if a.child == "ppo_head" else "critic")
    registry, reference = build_roles(model_args(a, path), args, torch.device("cpu"))
    own_weights(a, registry.base_model)
    tokenizer = load_tokenizer(str(work / "sft"))
    trainer = PPOTrainer(args, sampling_args(a), registry, tokenizer, load_prompts(a), reference)
    after_load = memory_now_mb()

    # train_step times its own numbered steps: generate (2), score (3), update (4-6).
    phases: dict[str, list[float]] = {"generate": [], "score": [], "update": []}
    steps, tokens_per_second, reply_tokens = [], [], []
    for i in range(total):
        start = _now()
        stats = trainer.train_step()
        steps.append(_now() - start)
        for name in phases:
            phases[name].append(stats[f"{name}_seconds"])
        tokens_per_second.append(stats["rollout_tokens_per_second"])
        reply_tokens.append(round(stats["response_length"] * a.batch_size))
        progress(f"PPO ({args.value_model}) step {i + 1}/{total}: {steps[-1]:.2f} s (generate {phases['generate'][-1]:.2f}, "
                 f"score {phases['score'][-1]:.2f}, update {phases['update'][-1]:.2f}), reply length "
                 f"{stats['response_length']:.1f}, kl {stats['kl']:.3f}")
    return {
        "peak_rss_mb": peak_rss_mb(), "after_load": after_load, "at_end": memory_now_mb(),
        "step_seconds": median(steps[w:]), "samples_per_second": a.batch_size / median(steps[w:]),
        "phase_seconds": {k: median(v[w:]) for k, v in phases.items()},
        "rollout_tokens_per_second": median(tokens_per_second[w:]),
        "reply_tokens": reply_tokens,
        "timed": {"step": steps[w:], "rollout_tokens_per_second": tokens_per_second[w:],
                  **{name: v[w:] for name, v in phases.items()}},
    }


def child_four_models(a: argparse.Namespace, work: Path) -> dict:
    """The same PPO step with policy, reference, reward and value as four separate full models."""
    torch = child_setup(a)
    from peft import PeftModel

    from rlhf.ppo import math as pm
    from rlhf.core.adapters import last_non_pad_index, position_ids_from_mask
    from rlhf.core.formatting import encode_prompt
    from rlhf.core.generation import sample_responses
    from rlhf.core.models import load_base_model, load_tokenizer

    path = model_path(a)
    full = model_args(a, path, peft_method="full")
    tokenizer = load_tokenizer(str(work / "sft"))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def load(task: str, adapter: str, trainable: bool):
        base = load_base_model(full, task)
        base.config.pad_token_id = pad
        model = PeftModel.from_pretrained(base, str(work / adapter), is_trainable=trainable)
        model.eval()  # no dropout, as in our trainer
        own_weights(a, model)
        return model

    policy = load("causal-lm", "sft", True)
    reference = load("causal-lm", "sft", False)
    reward = load("seq-cls", "reward", False)
    value = load("seq-cls", "reward", True)
    after_load = memory_now_mb()
    sampling = sampling_args(a)
    batches = sampler(a, load_prompts(a))
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, eps=1e-5, weight_decay=0.0)

    # The same forward layout as rlhf.core.adapters / rlhf.ppo.trainer: the transformer body, then the LM head
    # on reply positions only, the score head at the last non-pad token or on every reply position.
    def hidden(model, ids, mask):
        return model.get_base_model().model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                            use_cache=False).last_hidden_state

    def reply_logprobs(model, ids, mask, s):
        logits = model.get_base_model().lm_head(hidden(model, ids, mask)[:, s - 1 : -1])
        return pm.logprobs_from_logits(logits, ids[:, s:], temperature=sampling.temperature)

    def reply_values(ids, mask, s):
        return value.get_base_model().score(hidden(value, ids, mask)[:, s - 1 : -1]).squeeze(-1)

    def step() -> None:
        prompt_ids = [encode_prompt(tokenizer, p) for p in batches.next_batch()]
        query, query_mask, response = sample_responses(policy, tokenizer, prompt_ids, sampling)
        mask, ends = pm.response_mask_after_eos(response, eos, pad)
        response = torch.where(mask, response, torch.full_like(response, pad))
        ids, attn, s = torch.cat([query, response], 1), torch.cat([query_mask, mask.long()], 1), query.shape[1]
        with torch.no_grad():
            h = hidden(reward, ids, attn)
            last = h[torch.arange(len(h)), last_non_pad_index(ids, pad)]
            scores = pm.apply_missing_eos_penalty(reward.get_base_model().score(last).squeeze(-1), ends, -1.0)
            old_logprobs = reply_logprobs(policy, ids, attn, s)
            ref_logprobs = reply_logprobs(reference, ids, attn, s)
            old_values = reply_values(ids, attn, s)
        rewards, _ = pm.compute_rewards(scores, old_logprobs, ref_logprobs, mask, 0.05)
        advantages, returns = pm.gae_advantages(rewards, old_values, mask, 1.0, 0.95)
        advantages = pm.masked_whiten(advantages, mask)
        micro = a.mini_batch_size // a.gradient_accumulation_steps
        for _ in range(a.ppo_epochs):
            order = torch.randperm(len(ids))
            for start in range(0, len(order), a.mini_batch_size):
                minibatch = order[start : start + a.mini_batch_size]
                tokens = mask[minibatch].sum().clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                for m0 in range(0, len(minibatch), micro):
                    rows = minibatch[m0 : m0 + micro]
                    share = mask[rows].sum() / tokens
                    # One backward per role, as PPOTrainer.update does: one role's activations at a time.
                    logprobs = reply_logprobs(policy, ids[rows], attn[rows], s)
                    pg_loss, _ = pm.ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask[rows], 0.2)
                    (pg_loss * share).backward()
                    del logprobs
                    vf_loss, _ = pm.ppo_value_loss(reply_values(ids[rows], attn[rows], s), old_values[rows],
                                                   returns[rows], mask[rows], 0.2)
                    (0.1 * vf_loss * share).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()

    steps = []
    for i in range(a.four_models_steps):
        start = _now()
        step()
        steps.append(_now() - start)
        progress(f"four-models step {i + 1}/{a.four_models_steps}: {steps[-1]:.2f} s")
    return {"peak_rss_mb": peak_rss_mb(), "after_load": after_load, "at_end": memory_now_mb(),
            "step_seconds": median(steps)}


def child_sft(a: argparse.Namespace, work: Path) -> dict:
    """An SFT LoRA step on batch x (prompt + max_new_tokens) tokens: forward, backward, AdamW."""
    torch = child_setup(a)
    from peft import PeftModel

    from rlhf.core.formatting import encode_prompt
    from rlhf.core.generation import pad_ids
    from rlhf.core.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(str(work / "sft"))
    model = PeftModel.from_pretrained(load_base_model(model_args(a, model_path(a), "full")), str(work / "sft"),
                                      is_trainable=True)
    model.train()  # SFT trains with LoRA dropout on
    own_weights(a, model)
    after_load = memory_now_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    batches = sampler(a, load_prompts(a))
    generator = torch.Generator().manual_seed(a.seed)
    steps, total = [], a.memory_steps
    for i in range(total):
        prompt_ids = [encode_prompt(tokenizer, p) for p in batches.next_batch()]
        replies = torch.randint(3, len(tokenizer), (len(prompt_ids), a.max_new_tokens), generator=generator)
        # Right padding, loss on the reply only.
        ids, attention = pad_ids([p + reply.tolist() for p, reply in zip(prompt_ids, replies)],
                                 tokenizer.pad_token_id, side="right")
        labels = torch.full_like(ids, -100)
        for r, p in enumerate(prompt_ids):
            labels[r, len(p) : len(p) + a.max_new_tokens] = replies[r]
        start = _now()
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(_now() - start)
        progress(f"SFT step {i + 1}/{total}: {steps[-1]:.2f} s, {ids.shape[1]} x {len(prompt_ids)} tokens")
    return {"peak_rss_mb": peak_rss_mb(), "after_load": after_load, "at_end": memory_now_mb(),
            "step_seconds": median(steps)}


def child_generate(a: argparse.Namespace, work: Path) -> dict:
    """Rollouts: ``PPOTrainer.generate`` vs a bare ``generate`` of base + the SFT LoRA, taking turns.

    The bare model is what a user would otherwise call: the base with the same LoRA adapter,
    unmerged, loaded with peft. Both run in this one process on the same prompt batches and seeds,
    alternating which goes first, so a busy machine slows both alike.
    """
    torch = child_setup(a)
    from peft import PeftModel

    from rlhf.ppo import math as pm
    from rlhf.core.formatting import encode_prompt
    from rlhf.core.generation import pad_ids
    from rlhf.core.models import load_base_model, load_tokenizer
    from rlhf.ppo.trainer import PPOArguments, PPOTrainer, build_roles

    tokenizer = load_tokenizer(str(work / "sft"))
    args = PPOArguments(sft_model=str(work / "sft"), reward_model=str(work / "reward"), output_dir=str(work / "ppo"),
                        seed=a.seed, batch_size=a.batch_size, mini_batch_size=a.mini_batch_size)
    registry, reference = build_roles(model_args(a, model_path(a)), args, torch.device("cpu"))
    trainer = PPOTrainer(args, sampling_args(a), registry, tokenizer, [], reference)
    bare = PeftModel.from_pretrained(load_base_model(model_args(a, model_path(a), "full")), str(work / "sft"))
    bare.eval()
    kwargs = sampling_args(a).generation_kwargs(tokenizer)

    def ours(prompts):
        rollout = trainer.roles.generate("policy", prompts)
        return rollout.response_mask

    def plain(prompts):
        query, query_mask = pad_ids([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
        with torch.no_grad():
            out = bare.generate(input_ids=query, attention_mask=query_mask, **kwargs)
        mask, _ = pm.response_mask_after_eos(out[:, query.shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)
        return mask

    batches = sampler(a, load_prompts(a))
    runs: dict[str, list[tuple[float, int, int]]] = {"ppo": [], "bare": []}  # (seconds, tokens, positions)
    for i in range(a.warmup_steps + a.steps):
        prompts = batches.next_batch()
        order = [("ppo", ours), ("bare", plain)][:: 1 if i % 2 == 0 else -1]
        for name, fn in order:
            torch.manual_seed(a.seed + i)
            start = _now()
            mask = fn(prompts)
            runs[name].append((_now() - start, int(mask.sum()), mask.numel()))
        progress(f"generate {i + 1}/{a.warmup_steps + a.steps}: PPO {runs['ppo'][-1][0]:.2f} s "
                 f"({runs['ppo'][-1][1]} tokens), bare {runs['bare'][-1][0]:.2f} s ({runs['bare'][-1][1]} tokens)")
    out = {"paired_ratio": median([b[0] / p[0] for p, b in zip(runs["ppo"][a.warmup_steps:], runs["bare"][a.warmup_steps:])])}
    for name, rows in runs.items():
        timed = rows[a.warmup_steps:]
        out[name] = {"seconds": median([t for t, _, _ in timed]),
                     "tokens_per_second": median([n / t for t, n, _ in timed]),
                     "positions_per_second": median([p / t for t, _, p in timed]),
                     "reply_tokens": [n for _, n, _ in rows]}
    return out


def child_rloo(a: argparse.Namespace, work: Path) -> dict:
    """TRL's RLOOTrainer with LoRA and a Python reward, matched to our step; every step timed."""
    torch = child_setup(a)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rlhf.core.formatting import as_messages
    from rlhf.core.models import load_tokenizer

    sft_config = json.loads((work / "sft" / "adapter_config.json").read_text())
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=sft_config["r"], lora_alpha=sft_config["lora_alpha"],
                             lora_dropout=sft_config["lora_dropout"], target_modules=sorted(sft_config["target_modules"]))
    batches = sampler(a, load_prompts(a))
    rows = [{"prompt": as_messages(p)} for _ in range(a.warmup_steps + a.steps) for p in batches.next_batch()]

    def reward_length(completions, **kwargs) -> list[float]:
        # Cheap and deterministic: RLOO's own cost is what we measure, not a reward model's.
        return [len(c[0]["content"] if isinstance(c, list) else c) / 100.0 for c in completions]

    config = RLOOConfig(
        output_dir=str(work / "rloo"), per_device_train_batch_size=a.batch_size, num_generations=2,
        steps_per_generation=1, num_iterations=a.ppo_epochs, max_completion_length=a.max_new_tokens,
        temperature=0.7, top_p=1.0, top_k=0, beta=0.05, learning_rate=5e-5, bf16=a.dtype == "bfloat16",
        gradient_checkpointing=False, disable_dropout=True, logging_steps=1, save_strategy="no", report_to="none",
        max_steps=a.warmup_steps + a.steps, seed=a.seed, use_cpu=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": getattr(torch, a.dtype)}, disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(_now())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(_now())
            progress(f"RLOO step {state.global_step}/{args.max_steps}: {self.ends[-1] - self.ends[-2]:.2f} s")

    timer = StepTimer()
    trainer = RLOOTrainer(model=model_path(a), reward_funcs=reward_length, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(str(work / "sft")),
                          peft_config=peft_config, callbacks=[timer])
    trainer.train()
    steps = [b - e for e, b in zip(timer.ends, timer.ends[1:])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"peak_rss_mb": peak_rss_mb(), "step_seconds": median(steps[a.warmup_steps:]),
            "samples_per_second": a.batch_size / median(steps[a.warmup_steps:]), "all_steps": steps,
            "completion_lengths": lengths, "timed": {"step": steps[a.warmup_steps:]}}


# ----------------------------------------------------------------------------------------------
# The parent: run the children, print the table
# ----------------------------------------------------------------------------------------------


def child_argv(a: argparse.Namespace) -> list[str]:
    """The measurement flags, as given to every child (and shown in the report)."""
    defaults = parse_args([])
    out = []
    for key in ("model", "prompts", "batch_size", "max_new_tokens", "ppo_epochs", "mini_batch_size",
                "gradient_accumulation_steps", "dtype", "threads", "steps", "rounds", "warmup_steps", "memory_steps",
                "four_models_steps", "clock", "seed"):
        if getattr(a, key) != getattr(defaults, key):
            out += [f"--{key}", str(getattr(a, key))]
    return out + [f"--{flag}" for flag in ("mmap_weights", "glibc_default_malloc") if getattr(a, flag)]


def run_child(name: str, argv: list[str], work: Path, fixed_mmap_threshold: bool) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if fixed_mmap_threshold and name in MEMORY_CHILDREN:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--workdir", str(work)],
                           env=env, stdout=subprocess.PIPE, text=True)
    results = [line for line in child.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if child.returncode != 0 or not results:
        raise SystemExit(f"bench child {name!r} failed (exit {child.returncode}); its output:\n{child.stdout[-4000:]}")
    return json.loads(results[-1][len(RESULT_TAG):])


def pool_rounds(rounds: list[dict], batch_size: int) -> dict:
    """One speed child's result over its rounds: the first round's, with every timed list pooled and
    the medians (step, phases, samples/s) taken over the pool; the peak is the highest round's, and
    ``round_step_seconds`` keeps each round's own median step."""
    pooled = {key: [x for r in rounds for x in r["timed"][key]] for key in rounds[0]["timed"]}
    out = {**rounds[0], "timed": pooled, "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
           "step_seconds": median(pooled["step"]), "samples_per_second": batch_size / median(pooled["step"]),
           "round_step_seconds": [r["step_seconds"] for r in rounds]}
    if "phase_seconds" in out:
        out["phase_seconds"] = {name: median(pooled[name]) for name in out["phase_seconds"]}
        out["rollout_tokens_per_second"] = median(pooled["rollout_tokens_per_second"])
        out["reply_tokens"] = [x for r in rounds for x in r["reply_tokens"]]
    if "all_steps" in out:
        out["all_steps"] = [x for r in rounds for x in r["all_steps"]]
        out["completion_lengths"] = [x for r in rounds for x in r["completion_lengths"]]
    return out


def run_plan(children: list[str], rounds: int) -> list[str]:
    """The order children run in: every other child once, then the speed children ``rounds`` times,
    each round reversing the order of the one before."""
    speed = [c for c in children if c in SPEED_CHILDREN]
    plan = [c for c in children if c not in SPEED_CHILDREN]
    for i in range(rounds):
        plan += speed if i % 2 == 0 else speed[::-1]
    return plan


def machine_check(threads: int | None) -> dict:
    """How busy the machine is right now: fp32 GEMM GFLOP/s (best of 5, 1024^2) and the load average."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"gemm_gflops": 2 * 1024**3 / best / 1e9, "loadavg_1min": os.getloadavg()[0]}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def build_table(a: argparse.Namespace, r: dict) -> tuple[list[dict], str]:
    rows = []

    def add(name, ours, base, value, goal, met, unit):
        rows.append({"figure": name, "ours": ours, "baseline": base, "ratio": value, "goal": goal, "met": met,
                     "unit": unit})

    if "ppo_memory" in r and "four_models" in r:
        ours, four = r["ppo_memory"]["peak_rss_mb"], r["four_models"]["peak_rss_mb"]
        add("peak RSS: four full models / our shared base", ours, four, ratio(four, ours), ">= 3x",
            ratio(four, ours) >= 3, "MB")
    if "ppo_memory" in r and "sft" in r:
        ours, sft = r["ppo_memory"]["peak_rss_mb"], r["sft"]["peak_rss_mb"]
        add("peak RSS: our PPO step / SFT LoRA step", ours, sft, ratio(ours, sft), "<= 1.25", ratio(ours, sft) <= 1.25,
            "MB")
    if "generate" in r:
        g = r["generate"]
        v = g["paired_ratio"]  # median over batches of (bare seconds / our seconds): same tokens, same seed
        add("rollout tokens/s: PPOTrainer.generate / bare generate (base + LoRA), paired", g["ppo"]["tokens_per_second"],
            g["bare"]["tokens_per_second"], v, ">= 0.9", v >= 0.9, "tok/s")
    if "ppo_head" in r and "rloo" in r:
        v = ratio(r["ppo_head"]["samples_per_second"], r["rloo"]["samples_per_second"])
        add("samples/s: our PPO, value_model policy_head / TRL RLOOTrainer", r["ppo_head"]["samples_per_second"],
            r["rloo"]["samples_per_second"], v, ">= 1.0", v >= 1.0, "samples/s")
    if "ppo" in r and "rloo" in r:
        v = ratio(r["ppo"]["samples_per_second"], r["rloo"]["samples_per_second"])
        add("samples/s: our PPO, value_model critic / TRL RLOOTrainer", r["ppo"]["samples_per_second"],
            r["rloo"]["samples_per_second"], v, ">= 0.85", v >= 0.85, "samples/s")

    lines = ["| figure | ours | baseline | ratio | goal | met |", "|---|---:|---:|---:|---|---|"]
    for row in rows:
        lines.append(f"| {row['figure']} | {row['ours']:.1f} {row['unit']} | {row['baseline']:.1f} {row['unit']} | "
                     f"{row['ratio']:.2f} | {row['goal']} | {'yes' if row['met'] else 'NO'} |")
    lines += ["", "| raw figure | value |", "|---|---:|"]
    raw = []
    if "empty" in r:
        raw.append(("peak RSS, python + import torch (the floor)", f"{r['empty']['peak_rss_mb']:.0f} MB"))
    for name, label in (("ppo_memory", "our PPO step"), ("four_models", "four-models PPO step"),
                        ("sft", "SFT LoRA step"), ("ppo", "our PPO step (critic, speed run)"),
                        ("ppo_head", "our PPO step (policy_head, speed run)"), ("rloo", "TRL RLOO")):
        if name not in r:
            continue
        x = r[name]
        raw.append((f"peak RSS, {label}", f"{x['peak_rss_mb']:.0f} MB"))
        if "after_load" in x:
            m = x["after_load"]
            raw.append((f"RSS after loading, {label} (anon / file / PSS)",
                        f"{m.get('RssAnon', 0):.0f} / {m.get('RssFile', 0):.0f} / {m.get('Pss', 0):.0f} MB"))
        if "at_end" in x:
            m = x["at_end"]
            raw.append((f"RSS at the end, {label} (anon / file / PSS)",
                        f"{m.get('RssAnon', 0):.0f} / {m.get('RssFile', 0):.0f} / {m.get('Pss', 0):.0f} MB"))
        if "step_seconds" in x:
            rounds = x.get("round_step_seconds", [])
            each = f" (each round: {', '.join(f'{v:.2f}' for v in rounds)} s)" if len(rounds) > 1 else ""
            raw.append((f"step time, {label}", f"{x['step_seconds']:.2f} s{each}"))
    for name in ("ppo", "ppo_head"):
        if name not in r:
            continue
        p, label = r[name], "critic" if name == "ppo" else "policy_head"
        raw.append((f"our PPO step ({label}): generate / score / update",
                    " / ".join(f"{v:.2f}" for v in p["phase_seconds"].values()) + " s"))
        raw.append((f"our PPO step ({label}): rollout tokens/s (inside train_step)", f"{p['rollout_tokens_per_second']:.1f}"))
        raw.append((f"our PPO step ({label}): reply tokens per step (warm-up first)", str(p["reply_tokens"])))
    if "generate" in r:
        for name, label in (("ppo", "PPOTrainer.generate"), ("bare", "bare generate")):
            g = r["generate"][name]
            raw.append((f"{label}: seconds per batch / batch x width positions per s",
                        f"{g['seconds']:.2f} / {g['positions_per_second']:.1f}"))
            raw.append((f"{label}: reply tokens per batch (warm-up first)", str(g["reply_tokens"])))
    if "rloo" in r:
        raw.append(("RLOO step times (warm-up first, round after round)",
                    ", ".join(f"{s:.2f}" for s in r["rloo"]["all_steps"]) + " s"))
        raw.append(("RLOO mean completion length per step", ", ".join(f"{x:.1f}" for x in r["rloo"]["completion_lengths"])))
    lines += [f"| {k} | {v} |" for k, v in raw]
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    if a.child:
        # Every child gets the allocator settings our stages use (rlhf/core/allocator.py), TRL's RLOO too;
        # memory children keep the fixed mmap threshold run_child gives them (explicit settings win).
        from rlhf.core.allocator import keep_freed_memory

        keep_freed_memory()
        child = child_ppo if a.child in ("ppo_memory", "ppo_head") else globals()[f"child_{a.child}"]
        result = child(a, Path(a.workdir))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return None

    import torch  # only for the thread count in the report

    passed = child_argv(a)
    started = time.time()
    machine = {"start": machine_check(a.threads)}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        plan = run_plan([c for c in CHILDREN if c not in a.skip], a.rounds)
        runs: dict[str, list[dict]] = {}
        for i, name in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {name} ({time.time() - started:.0f} s so far)", file=sys.stderr, flush=True)
            runs.setdefault(name, []).append(run_child(name, passed, work, not a.glibc_default_malloc))
        results = {name: pool_rounds(r, a.batch_size) if name in SPEED_CHILDREN else r[0] for name, r in runs.items()}
    machine["end"] = machine_check(a.threads)
    rows, table = build_table(a, results)
    rounds = f" x {a.rounds} rounds" if a.rounds > 1 else ""
    settings = (f"batch {a.batch_size} prompts, {a.max_new_tokens} new tokens, {a.ppo_epochs} PPO epoch(s), minibatch "
                f"{a.mini_batch_size}, {a.dtype}, threads {a.threads or torch.get_num_threads()} (of {os.cpu_count()} "
                f"CPUs), {a.warmup_steps} warm-up + {a.steps} timed steps{rounds}, "
                f"{'CPU' if uses_cpu_clock(a) else 'wall'}-clock "
                f"seconds, peak memory over {a.memory_steps} steps; total {time.time() - started:.0f} s. Machine at "
                f"start / end: fp32 GEMM {machine['start']['gemm_gflops']:.0f} / {machine['end']['gemm_gflops']:.0f} "
                f"GFLOP/s, load average {machine['start']['loadavg_1min']:.1f} / {machine['end']['loadavg_1min']:.1f}")
    print(f"\nPPO benchmark: {settings}\n\n{table}\n")
    out = {"settings": vars(a), "machine": machine, "rows": rows, "results": results, "seconds": time.time() - started}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    if a.markdown:
        flags = "".join(f" {x}" for x in passed)
        command = (f".venv/bin/python bench/bench_ppo.py{flags}  # make bench-ppo runs it without flags" if flags
                   else "make bench-ppo  # = .venv/bin/python bench/bench_ppo.py")
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(a.markdown).write_text(f"# PPO benchmark\n\n```\n{command}\n```\n\n{settings}.\n\n{table}\n")
    return out


if __name__ == "__main__":
    main()
