"""``rlhf estimate-memory``: the formula on a tiny config, and the estimate against a real CPU run.

    .venv/bin/python -m pytest -q tests/test_memory.py                 # unit tests + acceptance (slow)
    .venv/bin/python -m pytest -q tests/test_memory.py -m "not slow"   # unit tests only, ~15 s
    .venv/bin/python tests/test_memory.py                              # the calibration table of docs/memory.md

1. Unit tests: weights, adapters, gradients and optimizer bytes of a tiny Llama config, computed by
   hand in the comments, must match exactly; activations and the KV cache follow their formulas.
2. Acceptance (slow): a short SFT LoRA run and a short PPO step of the default model, each in a fresh
   subprocess that reports its peak resident set size (``ru_maxrss``); the estimate must be within
   25 % of it.

Each measured run is a child process running our own stage code (``sft.train.run``,
``reward.train.run``, ``rlhf.ppo.trainer.run``) on synthetic rows of exactly ``seq_len`` tokens, so the
peak includes everything a real run holds: Python, torch, the model, optimizer state, activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The child: build synthetic data (and, for PPO, random SFT/reward adapters), run one stage, print
# the peak RSS. Its one argument is a JSON spec: stage, method, model, work, sizes.
_CHILD = textwrap.dedent(r'''
    import json, logging, resource, sys, warnings
    from pathlib import Path

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    spec = json.loads(sys.argv[1])
    work, model = Path(spec["work"]), spec["model"]
    stage, method, b, s = spec["stage"], spec["method"], spec["batch_size"], spec["seq_len"]

    from rlhf.core.data import write_jsonl
    from rlhf.core.formatting import encode_prompt, encode_prompt_reply
    from rlhf.core.models import load_tokenizer

    tokenizer = load_tokenizer(model)

    def words(n):
        return " ".join(["hello"] * n)

    def exact(encode, width):
        """The longest run of words whose encoding is at most ``width`` tokens (checked below)."""
        n = width
        while len(encode(words(n))) > width:
            n -= 1
            if n < 1:  # the chat template alone (30 tokens with SmolLM2's system prompt) is too long
                raise SystemExit(f"seq_len {width}: shorter than the prompt template")
        return words(n)

    common = {"model_name_or_path": model, "peft_method": method, "lora_r": spec["lora_r"],
              "validation_size": 0, "test_size": 0, "validation_file": None, "test_file": None,
              "output_dir": str(work / "run"), "seed": 0}
    trainer = {"max_steps": spec["steps"], "per_device_train_batch_size": b, "save_strategy": "no",
               "eval_strategy": "no", "load_best_model_at_end": False, "disable_tqdm": True,
               "logging_steps": 1, "gradient_checkpointing": spec["gradient_checkpointing"]}
    if stage == "sft":
        from sft.train import run

        # Rows of s and s - 3 tokens: batches are s wide and padded, as real ones are.
        rows = [{"text": exact(lambda r: encode_prompt_reply(tokenizer, "", r)[0], s - 3 * (k % 2))}
                for k in range(b * spec["steps"])]
        assert len(encode_prompt_reply(tokenizer, "", rows[0]["text"])[0]) == s
        write_jsonl(work / "train.jsonl", rows)
        run({**common, **trainer, "train_file": str(work / "train.jsonl"), "max_length": s})
    elif stage == "reward":
        from reward.train import run

        prompt = "say hello"
        chosen = exact(lambda r: encode_prompt_reply(tokenizer, prompt, r)[0], s)
        rejected = exact(lambda r: encode_prompt_reply(tokenizer, prompt, r)[0], s - 3)
        assert len(encode_prompt_reply(tokenizer, prompt, chosen)[0]) == s
        rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}] * (b * spec["steps"])
        write_jsonl(work / "train.jsonl", rows)
        run({**common, **trainer, "train_file": str(work / "train.jsonl")})
    elif stage == "ppo":
        import torch
        from peft import get_peft_model
        from safetensors.torch import save_file

        from rlhf.core import generation
        from rlhf.core.adapters import HEAD_FILE
        from rlhf.core.models import ModelArguments, build_peft_config, load_base_model
        from rlhf.ppo.trainer import run

        # Random SFT and reward adapters on the base (LoRA B = 0, as peft initialises it), made in
        # this process so their loading is part of the measured run just as in a real PPO stage.
        base_args = ModelArguments(model_name_or_path=model, peft_method="lora", lora_r=spec["lora_r"])
        base = load_base_model(base_args)
        peft_model = get_peft_model(base, build_peft_config(base_args, base))
        for name in ("sft", "reward"):
            peft_model.save_pretrained(str(work / name))
            tokenizer.save_pretrained(str(work / name))
        save_file({"weight": torch.randn(1, base.config.hidden_size) * 0.01}, str(work / "reward" / HEAD_FILE))
        del peft_model, base
        import gc; gc.collect()
        # Every reply as long as max_new_tokens: the estimate is for the widest rollout.
        plain = generation.SamplingArguments.generation_kwargs
        def full_width(self, tok):
            return {**plain(self, tok), "min_new_tokens": self.max_new_tokens}
        generation.SamplingArguments.generation_kwargs = full_width
        # Prompts of s and s - 3 tokens: left-padded rollouts, as real ones are.
        prompts = [exact(lambda p: encode_prompt(tokenizer, p), s - 3 * (k % 2)) for k in range(b)]
        assert len(encode_prompt(tokenizer, prompts[0])) == s
        write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in prompts])
        micro = spec["micro_batch_size"]
        run({**common, "sft_model": str(work / "sft"), "reward_model": str(work / "reward"),
             "train_file": str(work / "prompts.jsonl"), "max_steps": spec["steps"], "batch_size": b,
             "mini_batch_size": b, "gradient_accumulation_steps": b // micro, "ppo_epochs": spec["ppo_epochs"],
             "max_new_tokens": spec["max_new_tokens"], "eval_prompts": 0, "save_steps": 1000,
             "gradient_checkpointing": spec["gradient_checkpointing"]})
    print("PEAK_RSS_BYTES", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
''')


def measure_peak_rss(work: Path, model: str, stage: str, method: str = "lora", *, batch_size: int = 8,
                     seq_len: int = 128, max_new_tokens: int = 48, micro_batch_size: int | None = None,
                     lora_r: int = 16, steps: int = 2, gradient_checkpointing: bool = False, qlora_bits: int = 4,
                     ppo_epochs: int = 2, allocator: str | None = None, timeout: float = 900) -> tuple[int, float]:
    """(peak RSS in bytes, wall seconds) of a fresh process running ``stage`` for ``steps`` steps.

    ``allocator``: RLHF_KEEP_FREED_MEMORY for the child (None: the default setting)."""
    work.mkdir(parents=True, exist_ok=True)
    method = f"qlora-{qlora_bits}bit" if method == "qlora" else method  # the stages' peft_method
    spec = dict(stage=stage, method=method, model=str(model), work=str(work), batch_size=batch_size,
                seq_len=seq_len, max_new_tokens=max_new_tokens, micro_batch_size=micro_batch_size or batch_size,
                lora_r=lora_r, steps=steps, gradient_checkpointing=gradient_checkpointing, ppo_epochs=ppo_epochs)
    # One thread: memory does not depend on it, and on a busy 2-core machine two threads spin-wait
    # each other into a many-fold slowdown (see tests/test_ppo.py).
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    if allocator is not None:
        env["RLHF_KEEP_FREED_MEMORY"] = allocator
    started = time.time()
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{stage}/{method} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    peak = [line for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_BYTES")]
    return int(peak[-1].split()[1]), time.time() - started


# -- 1. the formula on a tiny config ----------------------------------------------------------------


def tiny_config(tie: bool = True):
    """Llama, vocab 100, hidden 16, 4 heads x 4 dims, 2 KV heads, MLP 32, 2 layers."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=tie,
                       max_position_embeddings=64)


# Parameters of tiny_config(), by hand:
#   embedding 100 x 16                                                  = 1600
#   per layer: q 16x16 + k 16x8 + v 16x8 + o 16x16                     = 768
#              gate 16x32 + up 16x32 + down 32x16                      = 1536
#              two RMSNorm weights 2 x 16                              = 32    -> 2336, x 2 layers = 4672
#   final norm                                                          = 16
#   LM head tied to the embedding                                       = 0     -> 6288
# LoRA r=2, r x (in + out) per linear, per layer:
#   q 2(16+16)=64, k 2(16+8)=48, v 48, o 64, gate 2(16+32)=96, up 96, down 2(32+16)=96 = 512, x 2 = 1024
PARAMS, LORA_R2, HIDDEN = 6288, 1024, 16
SIZES = dict(batch_size=2, seq_len=5, max_new_tokens=3, lora_r=2, device="cpu")


def test_architecture_counts_parameters_and_lora_shapes():
    from rlhf.core.memory import architecture

    arch = architecture(tiny_config())
    assert arch.params == PARAMS
    assert arch.untied_head_params == 0
    assert arch.lora_params(2) == LORA_R2
    assert arch.linear_weights == 2 * (768 + 1536)  # every adapted linear's weight
    assert sorted(arch.lora_shapes)[:2] == [(16, 8), (16, 8)]  # k and v of one layer
    sizes = (arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.intermediate)
    assert sizes == (2, 16, 4, 2, 4, 32)
    assert arch.gated_mlp
    untied = architecture(tiny_config(tie=False))
    assert untied.params == PARAMS + 1600 and untied.untied_head_params == 1600


def test_sft_lora_and_full_bytes_are_exact():
    from rlhf.core.memory import estimate_memory

    lora = estimate_memory(tiny_config(), "sft", "lora", **SIZES)
    assert lora.weights == PARAMS * 4  # float32
    assert lora.adapters == LORA_R2 * 4  # one float32 adapter
    assert lora.gradients == LORA_R2 * 4
    assert lora.optimizer == 2 * LORA_R2 * 4  # AdamW exp_avg + exp_avg_sq
    assert lora.kv_cache == 0
    # Gradients grow during the backward as the activations are freed: the larger of the two counts.
    assert lora.total == lora.runtime + lora.weights + lora.adapters + lora.optimizer + lora.activations
    assert lora.activations > lora.gradients

    full = estimate_memory(tiny_config(), "sft", "full", **{**SIZES, "dtype": "bfloat16"})
    assert full.weights == PARAMS * 2
    assert full.adapters == 0
    assert full.gradients == PARAMS * 2  # gradients and AdamW states take the parameters' dtype
    assert full.optimizer == 2 * PARAMS * 2


def test_reward_and_ppo_roles():
    from rlhf.core.memory import estimate_memory

    # Reward: the LM head is tied, so the model gains a 16 -> 1 score head; peft trains a copy of it.
    reward = estimate_memory(tiny_config(), "reward", "lora", **SIZES)
    assert reward.weights == (PARAMS + HIDDEN) * 4
    assert reward.adapters == (LORA_R2 + HIDDEN) * 4
    assert reward.optimizer == 2 * (LORA_R2 + HIDDEN) * 4
    # Untied: the 100 x 16 LM head is dropped for the score head, so the same reward model.
    assert estimate_memory(tiny_config(tie=False), "reward", "lora", **SIZES).weights == reward.weights

    # PPO: 4 adapters (policy, reference, reward, value) + 2 heads; policy, value and its head train.
    ppo = estimate_memory(tiny_config(), "ppo", "lora", **SIZES)
    assert ppo.adapters == (4 * LORA_R2 + 2 * HIDDEN) * 4
    assert ppo.trainable_params == 2 * LORA_R2 + HIDDEN
    assert ppo.gradients == (2 * LORA_R2 + HIDDEN) * 4
    assert ppo.optimizer == 2 * (2 * LORA_R2 + HIDDEN) * 4
    # value_model policy_head: no critic adapter; the policy's LoRA and the value head train.
    head = estimate_memory(tiny_config(), "ppo", "lora", **SIZES, value_model="policy_head")
    assert head.adapters == (3 * LORA_R2 + 2 * HIDDEN) * 4
    assert head.trainable_params == LORA_R2 + HIDDEN
    assert head.optimizer == 2 * (LORA_R2 + HIDDEN) * 4
    assert head.activations == ppo.activations and head.total < ppo.total
    # KV cache: 2 (k, v) x 2 layers x 2 prompts x (5 + 3) tokens x 2 KV heads x 4 dims x 4 bytes
    assert ppo.kv_cache == 2 * 2 * 2 * 8 * 2 * 4 * 4 == 2048
    # Generation, scoring and training do not overlap: the total takes the largest phase. Without a
    # final evaluation that is the rollout: the heap the updates left (the activations here) and the
    # last update's gradients, which live until the next update.
    ppo = estimate_memory(tiny_config(), "ppo", "lora", **SIZES, eval_prompts=0)
    persistent = ppo.runtime + ppo.weights + ppo.adapters + ppo.optimizer
    assert ppo.activations > max(ppo.kv_cache, ppo.gradients)
    assert ppo.phases == {"training": persistent + ppo.activations,
                          "rollout": persistent + ppo.activations + ppo.gradients}
    assert ppo.total == persistent + ppo.activations + ppo.gradients < sum(ppo.components().values())


def test_ppo_merge_copy_follows_merge_for_generation():
    from rlhf.core.memory import CPU_MERGE_RAM_SHARE, estimate_memory
    from rlhf.ppo.trainer import CPU_MERGE_RAM_SHARE as ppo_share

    assert CPU_MERGE_RAM_SHARE == ppo_share  # the same rule as rlhf.ppo.trainer.merge_backup_device
    # Merging keeps a copy of every wrapped linear weight (4608 of them, float32) while sampling.
    merged = estimate_memory(tiny_config(), "ppo", "lora", **SIZES, merge_for_generation="true")
    assert merged.merged_copy == 4608 * 4
    assert estimate_memory(tiny_config(), "ppo", "lora", **SIZES, merge_for_generation="false").merged_copy == 0
    # auto: only when the copy is at most 10 % of RAM (18,432 bytes: merges with 184,320 bytes of RAM)
    for ram, copy in ((184_320, 4608 * 4), (184_319, 0)):
        auto = estimate_memory(tiny_config(), "ppo", "lora", **SIZES, ram_bytes=ram)
        assert auto.merged_copy == copy
    # On CUDA the copy goes to host memory; a quantized base is never merged.
    assert estimate_memory(tiny_config(), "ppo", "lora", **{**SIZES, "device": "cuda"},
                           merge_for_generation="true").merged_copy == 0
    assert estimate_memory(tiny_config(), "ppo", "qlora", **SIZES, merge_for_generation="true").merged_copy == 0
    # Generation (KV cache + the copy) and training never overlap: generation runs in the heap the
    # updates left, so the rollout holds the larger of the two (and the last update's gradients).
    merged = estimate_memory(tiny_config(), "ppo", "lora", **SIZES, merge_for_generation="true", eval_prompts=0)
    assert merged.total == merged.runtime + merged.weights + merged.adapters + merged.optimizer + max(
        merged.activations, merged.kv_cache + merged.merged_copy) + merged.gradients


def test_the_estimator_knows_every_ppo_value_model_and_refuses_others():
    from rlhf.core.errors import UserError
    from rlhf.core.memory import PPO_VALUE_MODELS, estimate_memory
    from rlhf.ppo.rollout import VALUE_MODELS

    assert PPO_VALUE_MODELS == VALUE_MODELS
    with pytest.raises(UserError, match="value_model: expected one of critic, policy_head, found 'shared'"):
        estimate_memory(tiny_config(), "ppo", "lora", **SIZES, value_model="shared")


def test_separate_models_layout_holds_three_models():
    from rlhf.core.memory import estimate_memory, estimate_separate_models_ppo

    trl = estimate_separate_models_ppo(tiny_config(), **{k: v for k, v in SIZES.items()})
    # policy (6288) + reward and value models with a 16 -> 1 score head instead of the tied LM head
    assert trl.weights == (PARAMS + 2 * (PARAMS + HIDDEN)) * 4
    # the value model trains in full: gradients and two AdamW states for its 6304 parameters + the LoRA
    assert trl.gradients == (LORA_R2 + PARAMS + HIDDEN) * 4
    assert trl.optimizer == 2 * trl.gradients
    ours = estimate_memory(tiny_config(), "ppo", "lora", **SIZES)
    assert trl.total > ours.total


def test_qlora_weights():
    from rlhf.core.memory import estimate_memory

    # 4608 linear weights (2 x (768 + 1536)) quantised; the other 6288 - 4608 = 1680 parameters are
    # upcast to float32 by prepare_model_for_kbit_training.
    nf4 = estimate_memory(tiny_config(), "sft", "qlora", qlora_bits=4, **SIZES)
    # NF4: 0.5 byte + an 8-bit absmax per 64 weights + a float32 per 256 blocks:
    # 4608 x 0.5 + 4608 / 64 + 4608 x 4 / 16384 = 2304 + 72 + 1.125
    assert nf4.weights == int(2304 + 72 + 1.125 + 1680 * 4)
    # LLM.int8: a byte per weight + a float32 scale per output row (2 x (16+8+8+16+32+32+16) = 256 rows).
    int8 = estimate_memory(tiny_config(), "sft", "qlora", qlora_bits=8, **SIZES)
    assert int8.weights == 4608 + 256 * 4 + 1680 * 4
    assert nf4.adapters == LORA_R2 * 4


def test_activations_scale_with_tokens_and_checkpointing():
    from rlhf.core.memory import estimate_memory

    base = estimate_memory(tiny_config(), "reward", "lora", **SIZES)
    # Activations grow with the batch (an affine function of it: the same per-sequence cost each time).
    double = estimate_memory(tiny_config(), "reward", "lora", **{**SIZES, "batch_size": 4})
    assert double.activations == pytest.approx(2 * base.activations, rel=1e-6)
    # Checkpointing keeps a layer's input instead of everything the layer saves.
    checkpointed = estimate_memory(tiny_config(), "reward", "lora", **SIZES, gradient_checkpointing=True)
    assert checkpointed.activations < base.activations
    assert checkpointed.weights == base.weights and checkpointed.optimizer == base.optimizer
    # On CUDA the allocator keeps less (RETENTION: 0.15 of a forward against 0.75 for reward on CPU).
    assert estimate_memory(tiny_config(), "reward", "lora", **{**SIZES, "device": "cuda"}).activations \
        < base.activations


@pytest.mark.parametrize("mode", ["lora-dropout", "lora-eval", "full"])
def test_saved_activations_match_autograd(mode):
    """The per-layer formula against the bytes autograd really saves in a tiny model's forward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from rlhf.core.memory import architecture, saved_bytes_per_token_layer

    config = tiny_config()
    arch = architecture(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if mode != "full":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.05, target_modules=targets))
    model.train(mode != "lora-eval")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # weights are not activations
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    body = model.get_base_model().model if mode != "full" else model.model
    ids = torch.randint(0, 100, (3, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row, as in every PPO rollout and most training batches
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        body(input_ids=ids, attention_mask=mask).last_hidden_state.sum()
    per_layer = saved_bytes_per_token_layer(arch, width=24, trainable_base=mode == "full", lora_r=2,
                                            lora_dropout=mode == "lora-dropout", act_bytes=4, device="cpu")
    tokens = ids.numel()
    # Outside the layers: the final norm's input and rstd (and its normalised input when it trains).
    outside = tokens * (HIDDEN + 1 + (HIDDEN if mode == "full" else 0)) * 4
    # With a frozen embedding the first layer's input needs no gradient, so that layer's first norm
    # saves nothing (input 16 + rstd 1) and neither do the q/k/v dropout masks (3 x 16); the formula
    # leaves this out, as it is one layer in 30 for real models.
    first_layer = {"full": 0, "lora-eval": HIDDEN + 1, "lora-dropout": HIDDEN + 1 + 3 * HIDDEN}[mode]
    expected = tokens * (arch.layers * per_layer - first_layer * 4) + outside
    assert sum(saved.values()) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("bf16_forwards", [False, True], ids=["peft-casts", "bf16-forwards"])
def test_ppo_saved_activations_on_a_bf16_base_match_autograd(bf16_forwards):
    """PPO's training forward through the adapter registry on a bf16 base, with and without
    bf16_forwards, against the bytes autograd really saves."""
    import torch
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    from rlhf.core.adapters import AdapterRegistry
    from rlhf.core.memory import architecture, saved_bytes_per_token_layer

    config = tiny_config()
    arch = architecture(config)
    torch.manual_seed(0)
    registry = AdapterRegistry(LlamaForCausalLM(config).to(torch.bfloat16))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    registry.add("policy", LoraConfig(r=2, target_modules=targets))
    registry.peft_model.train()
    registry.compute_dtype = torch.bfloat16 if bf16_forwards else None  # what PPOTrainer sets
    params = {p.untyped_storage().data_ptr() for p in registry.peft_model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 100, (3, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        registry.hidden_states("policy", ids, mask)
    per_layer = saved_bytes_per_token_layer(arch, width=24, trainable_base=False, lora_r=2, lora_dropout=False,
                                            act_bytes=2, device="cpu", bf16_forwards=bf16_forwards)
    # By hand (h = q = 16, i = 32, r = 2, 4 heads, width 24), in both: bf16 q, k and v repeated, o's
    # input (4 x 16), the mask (24), gate/activation/up outputs (3 x 32): 184 x 2 = 368 bytes; float32
    # norm inputs (2 x 16), rstd (2), logsumexp (4): 38 x 4 = 152. Without bf16_forwards peft casts the
    # input of each of the 7 adapted layers up to float32 and saves it (6 x 16 + 32) with a float32
    # rank-2 intermediate (7 x 2): 142 x 4 = 568 -> 1,088. With it each adapter saves its layer's own
    # bf16 input, once per distinct input (attention input 16, MLP input 16, down input 32; o's input
    # is above), and a bf16 intermediate (7 x 2): 78 x 2 = 156 -> 676.
    assert per_layer == {False: 1088, True: 676}[bf16_forwards]
    tokens = ids.numel()
    # Outside the layers: the final norm's float32 input and rstd (17 x 4 bytes a token), as much as the
    # first layer's first norm does not save (its input needs no gradient); the rotary cos and sin, once
    # (2 x 3 x 24 x 4 dims x 2 bytes); with bf16_forwards, autocast's bf16 copies of the LoRA weights.
    expected = tokens * arch.layers * per_layer + 2 * 3 * 24 * 4 * 2 + (LORA_R2 * 2 if bf16_forwards else 0)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.005)


def test_bf16_forwards_saving_is_counted_only_where_ppo_makes_it():
    from rlhf.core.errors import UserError
    from rlhf.core.memory import RETENTION, estimate_memory

    bf16 = {**SIZES, "dtype": "bfloat16", "eval_prompts": 0}
    on = estimate_memory(tiny_config(), "ppo", "lora", **bf16, bf16_forwards="true")
    off = estimate_memory(tiny_config(), "ppo", "lora", **bf16, bf16_forwards="false")
    # auto: on for a bf16 base, as rlhf.ppo.trainer.forward_dtype decides.
    assert estimate_memory(tiny_config(), "ppo", "lora", **bf16).activations == on.activations
    # The saving: 1,088 - 676 = 412 bytes per token-layer (test above), 2 replies x (5 + 3) tokens x 2
    # layers, in the forward's saved tensors and in the share of a forward the allocator keeps; less
    # autocast's bf16 copies of the trained LoRA weights (1,024 x 2 bytes).
    keeps = RETENTION["cpu"]["ppo-single-pass"]
    assert off.activations - on.activations == pytest.approx(412 * 16 * 2 * (1 + keeps) - LORA_R2 * 2, abs=2)
    for name in ("weights", "adapters", "gradients", "optimizer", "kv_cache", "merged_copy"):
        assert getattr(on, name) == getattr(off, name)
    # With checkpointing only the recomputed layer saves less (the kept layer inputs are bf16 either way).
    on_ck = estimate_memory(tiny_config(), "ppo", "lora", **bf16, bf16_forwards="true", gradient_checkpointing=True)
    off_ck = estimate_memory(tiny_config(), "ppo", "lora", **bf16, bf16_forwards="false", gradient_checkpointing=True)
    keeps = RETENTION["cpu"]["ppo-single-pass-ckpt"]  # the allocator keeps less under checkpointing
    assert off_ck.activations - on_ck.activations == pytest.approx(412 * 16 * (1 + 2 * keeps) - LORA_R2 * 2, abs=2)
    # No saving where PPO makes none: auto stays off on a float32 base and under QLoRA.
    for method, sizes in (("lora", SIZES), ("qlora", bf16)):
        auto = estimate_memory(tiny_config(), "ppo", method, **{**sizes, "eval_prompts": 0})
        assert auto.activations == estimate_memory(tiny_config(), "ppo", method, **{**sizes, "eval_prompts": 0},
                                                   bf16_forwards="false").activations
    # true where PPO refuses it, and an unknown setting, are errors.
    for method, sizes, setting in (("lora", SIZES, "true"), ("qlora", bf16, "true"), ("lora", bf16, "yes")):
        with pytest.raises(UserError, match="bf16_forwards"):
            estimate_memory(tiny_config(), "ppo", method, **sizes, bf16_forwards=setting)


def test_ppo_phases_count_the_final_evaluation():
    from rlhf.core.memory import PPO_EVAL_BATCH_SIZE, PPO_EVAL_PROMPTS, estimate_memory
    from rlhf.ppo.trainer import PPOArguments

    assert (PPO_EVAL_PROMPTS, PPO_EVAL_BATCH_SIZE) == (PPOArguments.eval_prompts, PPOArguments.eval_batch_size)
    sizes = {**SIZES, "batch_size": 8, "micro_batch_size": 4, "dtype": "bfloat16", "merge_for_generation": "false"}
    est = estimate_memory(tiny_config(), "ppo", "lora", **sizes)  # rlhf ppo's evaluation: 32 prompts, 16 at a time
    persistent = est.runtime + est.weights + est.adapters + est.optimizer
    heap = max(est.activations, est.kv_cache, (8 * 2 + 4) * 3 * 100)  # scoring: the batch's bf16 logits + a row
    # Evaluation: 16 prompts' KV cache (2 x 2 layers x 16 x 8 tokens x 2 KV heads x 4 dims x 2 bytes) and
    # one role's reply logits (16 x 3 x 100 x 2 bytes).
    assert est.evaluation == 2 * 2 * 16 * 8 * 2 * 4 * 2 + 16 * 3 * 100 * 2
    # Each phase on top of what is alive then: the update's activations (or its gradients), the heap
    # the updates left plus the last update's gradients for the rollout and the evaluation.
    expected = {"training": persistent + max(est.activations, est.gradients),
                "rollout": persistent + heap + est.gradients,
                "evaluation": persistent + heap + est.gradients + est.evaluation}
    assert est.phases == pytest.approx(expected, abs=3)
    assert est.total == max(est.phases.values()) == est.phases["evaluation"]
    # Fewer held-out prompts than a batch: that many rows; none: no evaluation phase.
    few = estimate_memory(tiny_config(), "ppo", "lora", **sizes, eval_prompts=5)
    assert few.evaluation == 2 * 2 * 5 * 8 * 2 * 4 * 2 + 5 * 3 * 100 * 2
    assert few.phases["evaluation"] - few.evaluation == pytest.approx(persistent + heap + est.gradients, abs=3)
    none = estimate_memory(tiny_config(), "ppo", "lora", **sizes, eval_prompts=0)
    assert set(none.phases) == {"training", "rollout"} and none.evaluation == 0
    assert none.total == max(none.phases.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_lm_head_reads_a_strided_slice_without_copying_its_weight(dtype, tmp_path):
    """PPO's reply positions (RoleForwards.reply_logits: the head on ``hidden[:, s - 1 : -1]``) and
    generate's last prefill position are strided slices. On some CPUs (measured on Intel with AMX)
    torch's half-precision bmm then copies the head weight once per row (96 MiB here, 16 rows); the
    loader's hook hands the head a contiguous input, so no model it loads makes that copy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.core.generation import SamplingArguments
    from rlhf.core.models import ModelArguments, load_base_model
    from rlhf.core.roles import RoleForwards, Rollout

    rows, prompt, reply, hidden, vocab = 16, 20, 8, 64, 49152
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_base_model(ModelArguments(model_name_or_path=str(tmp_path), peft_method="full", torch_dtype=dtype))
    head = model.get_output_embeddings().requires_grad_(False)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))

    class Registry:  # the two things RoleForwards reads off an AdapterRegistry
        states = torch.randn(rows, prompt + reply, hidden, dtype=getattr(torch, dtype))

        def hidden_states(self, role, input_ids, attention_mask):
            return self.states

        def lm_head(self):
            return head

    def peak_rise_mib(fn) -> float:
        def read(key):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            return 0.0  # no peak reset here: the contiguity check below still holds
        before = read("VmRSS:")
        out = fn()
        del out
        return (read("VmHWM:") - before) / 1024

    ids = torch.zeros(rows, prompt + reply, dtype=torch.long)
    rollout = Rollout(ids, torch.ones_like(ids), torch.ones(rows, reply, dtype=torch.bool),
                      torch.zeros(rows, dtype=torch.bool), prompt)
    roles = RoleForwards(Registry(), None, SamplingArguments(), None)
    width = 2 if dtype == "bfloat16" else 4
    copies = rows * vocab * hidden * width / 2**20
    with torch.no_grad():
        for run, positions in ((lambda: roles.reply_logits("policy", rollout), reply),
                               (lambda: head(Registry.states[:, -1:]), 1)):
            rise = peak_rise_mib(run) - rows * positions * vocab * width / 2**20  # less the logits
            assert rise < 0.2 * copies
    assert seen == [True, True]  # the head saw contiguous inputs, though both slices were strided
    assert not Registry.states[:, prompt - 1 : -1].is_contiguous()


def test_bad_input_is_a_user_error():
    from rlhf.core.errors import UserError
    from rlhf.core.memory import estimate_memory

    for kwargs, word in ((dict(stage="dpo"), "stage"), (dict(method="ia3"), "method"), (dict(dtype="int8"), "dtype"),
                         (dict(qlora_bits=3, method="qlora"), "bits"), (dict(batch_size=0), "batch_size"),
                         (dict(stage="ppo", batch_size=8, micro_batch_size=3), "micro_batch_size"),
                         (dict(device="tpu"), "device")):
        args = {"stage": "sft", "method": "lora", **kwargs}
        with pytest.raises(UserError, match=word):
            estimate_memory(tiny_config(), args.pop("stage"), args.pop("method"), **args)


def test_command_prints_the_breakdown(tiny_model_dir, capsys):
    from rlhf.app.cli import main

    assert main(["estimate-memory", "--model", str(tiny_model_dir), "--stage", "ppo", "--method", "full",
                 "--device", "cpu", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    for word in ("runtime", "weights", "adapters", "gradients", "optimizer", "activations", "kv_cache", "total"):
        assert word in out
    assert "note: our PPO trains LoRA roles" in out
    assert main(["estimate-memory", "--model", str(tiny_model_dir), "--stage", "sft", "--method", "prefix"]) == 2
    assert "method: expected one of full, lora, qlora" in capsys.readouterr().err
    assert main(["estimate-memory", "--model", "./no/such/dir"]) == 2


# -- 2. acceptance: the estimate against a real run's peak RSS --------------------------------------

# Small enough to keep this file near two minutes on a busy 2-core machine; the calibration table
# in docs/memory.md covers larger batches, full fine-tuning and the reward stage.
ACCEPTANCE = [
    pytest.param("sft", dict(batch_size=4, seq_len=128, steps=2), id="sft-lora-b4-s128"),
    pytest.param("ppo", dict(batch_size=4, seq_len=40, max_new_tokens=16, ppo_epochs=2, steps=1),
                 id="ppo-lora-b4-s40-t16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, sizes", ACCEPTANCE)
def test_estimate_is_within_25_percent_of_the_measured_peak(stage, sizes, default_model_dir, tmp_path):
    from rlhf.core.memory import estimate_memory, load_config

    sizes = dict(sizes)
    steps = sizes.pop("steps")
    estimate = estimate_memory(load_config(str(default_model_dir)), stage, "lora", device="cpu", eval_prompts=0,
                               **sizes)  # the measured PPO run has no final evaluation
    measured, seconds = measure_peak_rss(tmp_path, default_model_dir, stage, "lora", steps=steps, **sizes)
    error = (estimate.total - measured) / measured
    assert abs(error) <= 0.25, (f"{stage}: estimated {estimate.total / 2**20:,.0f} MiB, measured "
                                f"{measured / 2**20:,.0f} MiB ({error:+.0%}) in {seconds:.0f} s")


# -- the calibration table (docs/memory.md) ---------------------------------------------------------

CALIBRATION = [
    ("sft", "lora", dict(batch_size=4, seq_len=128)),
    ("sft", "lora", dict(batch_size=8, seq_len=128)),
    ("sft", "lora", dict(batch_size=8, seq_len=256)),
    ("sft", "lora", dict(batch_size=8, seq_len=256, gradient_checkpointing=True)),
    ("sft", "full", dict(batch_size=8, seq_len=128)),
    ("sft", "full", dict(batch_size=8, seq_len=256)),
    ("sft", "qlora", dict(batch_size=4, seq_len=128)),
    ("reward", "lora", dict(batch_size=4, seq_len=128)),
    ("ppo", "lora", dict(batch_size=4, seq_len=40, max_new_tokens=16, ppo_epochs=2)),
    ("ppo", "lora", dict(batch_size=8, seq_len=64, max_new_tokens=48, ppo_epochs=2)),
    ("ppo", "lora", dict(batch_size=8, seq_len=64, max_new_tokens=48, micro_batch_size=4, ppo_epochs=2)),
]


def calibrate(work: Path) -> list[dict]:
    """Measure every CALIBRATION run, one at a time, 2 steps each (step 2 is the steady state)."""
    from rlhf.core.memory import MiB, estimate_memory, load_config
    from rlhf.core.models import fetch_default_model

    model = fetch_default_model()
    config = load_config(str(model))
    rows = []
    for k, (stage, method, sizes) in enumerate(CALIBRATION):
        estimate = estimate_memory(config, stage, method, device="cpu", eval_prompts=0, **sizes)  # runs without one
        while _available_bytes() < estimate.total + 2 * 2**30:  # a shared machine: never push others out
            time.sleep(30)
        # The fp32 fractions of rlhf.core.memory.RETENTION were fitted with the setting keep.
        measured, seconds = measure_peak_rss(work / str(k), model, stage, method, steps=2, allocator="keep", **sizes)
        row = dict(stage=stage, method=method, **sizes, estimated_mib=round(estimate.total / MiB),
                   measured_mib=round(measured / MiB), error=round((estimate.total - measured) / measured, 3),
                   seconds=round(seconds))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def test_the_entropy_bonus_keeps_two_float32_copies_of_the_reply_logits():
    """PPO's entropy bonus differentiates rlhf.core.tensors.entropy_from_logits over the micro-batch's
    reply logits; what autograd keeps for it is the estimate's PPO_ENTROPY_LOGIT_COPIES float32 copies
    (bf16 logits here, so a copy kept in the logits' own dtype would be caught)."""
    import torch

    from rlhf.core.memory import PPO_ENTROPY_LOGIT_COPIES
    from rlhf.core.tensors import entropy_from_logits, masked_mean

    logits = torch.randn(3, 5, 1000).to(torch.bfloat16).requires_grad_()
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked_mean(entropy_from_logits(logits, 0.7), mask).backward()
    assert sum(saved.values()) == pytest.approx(PPO_ENTROPY_LOGIT_COPIES * logits.numel() * 4, rel=0.01)


def test_the_ppo_estimate_counts_the_entropy_bonus_only_when_it_is_on():
    from rlhf.core.memory import PPO_ENTROPY_LOGIT_COPIES, estimate_memory

    shape = dict(batch_size=4, seq_len=8, max_new_tokens=6, micro_batch_size=2)
    off, on = (estimate_memory(tiny_config(), "ppo", "lora", entropy_coef=coef, **shape) for coef in (0.0, 0.01))
    assert on.total - off.total == PPO_ENTROPY_LOGIT_COPIES * 2 * 6 * 100 * 4  # micro x reply tokens x vocab


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memory_calibration_") as tmp:
        calibrate(Path(tmp))
