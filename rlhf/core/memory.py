"""Expected peak memory of a stage, broken down: ``rlhf estimate-memory``.

    rlhf estimate-memory --stage sft --method lora --batch_size 8 --seq_len 256
    rlhf estimate-memory --stage ppo --method lora --batch_size 8 --seq_len 64 --max_new_tokens 48
    rlhf estimate-memory --model runs/bench_scale/360m --stage ppo --dtype bfloat16 --seq_len 42 --max_new_tokens 64
    rlhf estimate-memory --model path/to/model --stage reward --method qlora --bits 4 --dtype bfloat16 --device cuda

Only the model's config is read. :func:`estimate_memory` builds the model on the ``meta`` device
(no weights, no memory) to count its parameters exactly and to find the linear layers LoRA adapts
(:func:`rlhf.core.models.find_target_modules`), so any architecture works; the activation formula is
derived for decoder-only pre-norm transformers (Llama, Mistral, Qwen, SmolLM exactly; GPT-2-style
blocks approximately) and its allocator terms are calibrated against peaks measured on CPU.

Components, in bytes (:class:`MemoryEstimate`):
    runtime      the process before any model: Python + torch + transformers + peft + TRL + datasets
                 + tokenizer (CPU; `rlhf ppo` imports no TRL), or the CUDA context (GPU)
    weights      the base model: dtype bytes per parameter; QLoRA keeps linear weights in 4/8 bits
                 and peft's prepare_model_for_kbit_training upcasts everything else to float32
    adapters     LoRA parameters of every role plus scalar heads (float32: peft keeps adapters in
                 float32 even on a bf16 base): sft 1 adapter, reward 1 + score head, ppo 4 + 2 heads
    gradients    one gradient per trainable parameter, in its dtype
    optimizer    AdamW: two states per trainable parameter, in its dtype (float32 for adapters)
    activations  the training step: tensors saved for backward, per layer per token
                 (:func:`saved_bytes_per_token_layer`, exact against autograd), freed memory the
                 allocator keeps (``RETENTION``), and the LM head's working set (SFT: TRL's fused
                 head, a tile at a time; PPO: reply positions only; reward: no vocabulary logits)
    kv_cache     PPO generation: 2 x layers x batch x (prompt + new) x kv_heads x head_dim x bytes
    merged_copy  PPO generation with merge_for_generation on a CPU: the backup of the wrapped weights
    evaluation   PPO's final evaluation: its KV cache and reply logits at eval_batch_size prompts

How the total combines them. Weights, adapters and optimizer state live for the whole run. SFT and
reward: within a training step the gradients grow during the backward while the activations are
freed (they are set to None after each optimizer step), so

    total = runtime + weights + adapters + optimizer + max(gradients, activations)

PPO's phases never overlap: it generates (KV cache, merged copy), scores the rollout without
gradients (the batch's reply logits), trains micro-batch by micro-batch (activations), and after the
last step evaluates; but the allocator keeps what the updates free, so the rollout and the
evaluation run in that heap, with the last update's gradients alive. With
heap = max(activations, kv_cache + merged_copy, scoring):

    total = runtime + weights + adapters + optimizer + max(
        training:   max(gradients, activations),
        rollout:    heap + gradients,
        evaluation: heap + gradients + evaluation)

The calibration (peak RSS of our stage code on CPU against this estimate: within 5 % on the default
model, within 15 % at SmolLM2-360M's shape in bf16; whole `rlhf ppo` runs at that shape within -3 %
and +5 %, the runs PPO's kept share was fitted on) is in docs/memory.md; ``python
tests/test_memory.py``, ``python bench/bench_scale.py`` and ``python bench/bench_estimate_vs_cli.py``
measure it again.
:func:`estimate_separate_models_ppo` estimates TRL 0.19's PPO layout for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.core.errors import UserError

STAGES = ("sft", "reward", "ppo")
METHODS = ("full", "lora", "qlora")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICES = ("cpu", "cuda")
MiB = 2**20

# -- constants: measured, or stated assumptions -----------------------------------------------

# Peak RSS of a fresh process that imports what every stage imports (sft.train, reward.train,
# rlhf.ppo.trainer, trl's trainers, peft, datasets, accelerate with an Accelerator) and loads the default
# tokenizer, one thread, measured on CPU (torch 2.13, transformers 5.24, trl 1.16, peft 0.21,
# Python 3.11): 564 MiB. Of that, torch alone is 219 MiB, torch + transformers' Llama classes 336 MiB,
# the stage imports 502 MiB, the 49k-entry tokenizer 62 MiB.
RUNTIME_CPU = 564 * MiB
# `rlhf ppo` imports no TRL: peak RSS of the process before it loads the model (torch, transformers,
# peft, accelerate with an Accelerator, the prompt files through datasets, the tokenizer), measured
# at SmolLM2-360M's width with 4, 8 and 16 layers: 306 MiB resident, 320 MiB peak, in every run.
RUNTIME_CPU_PPO = 320 * MiB
# The CUDA context (driver, kernels, cuBLAS handles): the device's used memory less the caching
# allocator's reserved memory, measured on an H200 (torch 2.11, CUDA 13) at the end of every stage
# row of bench/bench_scale.py --device cuda: 767 MiB (527 MiB before any kernel ran).
# torch.cuda.max_memory_allocated leaves it out, as it counts tensors only.
RUNTIME_CUDA = 768 * MiB
# PPO's value models (rlhf.ppo.rollout.VALUE_MODELS; tests/test_memory.py checks they agree: core may
# not import a stage).
PPO_VALUE_MODELS = ("critic", "policy_head")
# Freed memory the allocator keeps, as a fraction of the activations one forward saves (without
# checkpointing: the volume of per-layer temporaries is about the same either way).
# CPU (rlhf/core/allocator.py sets glibc malloc; docs/memory.md, "The allocator"): a step's temporaries
# stay in the heap between steps and fragment it. Fitted with the setting keep on the fp32
# calibration runs of docs/memory.md (2 steps each, step 2 is the steady state): LoRA SFT 0.91-0.99,
# QLoRA with float32 compute 1.8 (the dequantised weights are temporaries too), full fine-tuning
# 0.37-0.40 (the weight gradients fill the holes), reward 0.73, PPO with 2 epochs 2.4-2.9 (each
# micro-batch builds and frees the policy graph, then the value graph, every epoch, and the second
# graph does not fit in the first one's holes; these children also keep the heap of the model they
# load to make their random adapters, which `rlhf ppo` does not). Fitted on bench/bench_scale.py's
# bf16 rows at SmolLM2-360M's shape (one step each): QLoRA with bf16 compute 0.38-0.67 -> 0.5, TRL
# 0.19's layout 0.21 (one run). PPO's single-pass update (PPO's defaults), with the default setting
# bounded, without and with gradient checkpointing (with it the backward's recomputed layers leave
# smaller holes): fitted on five runs, in-sample: the two whole `rlhf ppo --max_steps 2` runs at
# SmolLM2-360M's shape with PPO's defaults (bf16, bf16_forwards auto, the final evaluation;
# bench/bench_estimate_vs_cli.py; docs/memory.md, "The estimate against `rlhf ppo`") and three
# one-step bench/bench_scale.py rows at SmolLM2-1.7B's (bf16_forwards on and off, and on with
# checkpointing; docs/memory.md, "Measured at SmolLM2-1.7B's shape"). Without checkpointing they ask
# for 0.7 (360M) to 1.2-1.4 (1.7B), with it for 0.5 (360M) and 0.3 (1.7B); earlier runs at 360M's
# width with 4-16 layers asked for 0.6-2.1 (what the allocator keeps is not one fixed share of a
# forward). One step keeps less, later steps more. Elsewhere the default
# setting, bounded, held the same or less than keep in every side by side run, so those fractions
# err high for it.
# CUDA: the caching allocator reuses its blocks. SFT and reward, LoRA and QLoRA with bf16 compute:
# 0.05, fitted on the H200 rows of docs/memory.md ("Measured on a GPU": 1.7B and 8B shapes, reserved
# 1.6-7.4 % above allocated; the estimate then lies within -2 % and +9 % of each peak). PPO, full
# fine-tuning, QLoRA with float32 compute and TRL 0.19's layout were not measured on a GPU: 0.15 for
# rounding and fragmentation is an assumption.
RETENTION = {"cpu": {"sft": 0.95, "reward": 0.75, "ppo": 2.6, "ppo-single-pass": 1.0, "ppo-single-pass-ckpt": 0.6,
                     "full": 0.4, "qlora": 1.8, "qlora-half": 0.5, "separate": 0.2},
             "cuda": {"sft": 0.05, "reward": 0.05, "qlora-half": 0.05,
                      **{key: 0.15 for key in ("ppo", "ppo-single-pass", "ppo-single-pass-ckpt", "full", "qlora",
                                               "separate")}}}
# TRL's fused LM head (SFT) projects at most 4096 tokens x 32768 vocabulary entries at a time.
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768
# Tiles alive at once. Without Triton (CPU) the backward folds a tile with plain torch ops (scaled
# logits, log-probabilities, probabilities, gradient...): measured 7.8 float32 tiles above the
# forward's end, at 1024 and at 2048 tokens. With Triton (CUDA) the tile is folded in place: 1.
FUSED_TILES = {"cpu": 8, "cuda": 1}
# PPO's merge_for_generation auto on a CPU merges when the weight backup is at most this share of
# RAM: the value of rlhf.ppo.trainer.CPU_MERGE_RAM_SHARE (tests/test_memory.py checks they agree; the core
# does not import a stage).
CPU_MERGE_RAM_SHARE = 0.10
# PPO's final evaluation: rlhf.ppo.trainer.PPOArguments' eval_prompts and eval_batch_size defaults
# (tests/test_memory.py checks they agree).
PPO_EVAL_PROMPTS, PPO_EVAL_BATCH_SIZE = 32, 16
# PPO's (micro, t, v) reply logits: the logits, the per-row float32 temperature-scaled copies that
# logprobs_from_logits saves for backward, and the logits' gradient (rlhf/core/tensors.py).
PPO_LOGIT_COPIES = 3
# PPO's entropy bonus (entropy_coef > 0) differentiates the entropy of the reply logits: its float32
# log-probabilities and probabilities are kept for the backward, two (micro, t, v) copies more.
PPO_ENTROPY_LOGIT_COPIES = 2
# bitsandbytes storage per quantised weight: NF4 packs 2 weights a byte, plus one 8-bit absmax per
# block of 64 and (double quantisation) one float32 per 256 blocks; LLM.int8 stores one byte a weight
# plus a float32 scale per output row (counted separately).
QUANT_BYTES = {4: 0.5 + 1 / 64 + 4 / (64 * 256), 8: 1.0}


@dataclass
class MemoryEstimate:
    """Expected peak memory of one process, by component, in bytes."""

    runtime: int
    """Python + libraries (CPU), or the CUDA context (GPU)."""
    weights: int
    """The base model's parameters."""
    adapters: int
    """LoRA parameters of every role, plus scalar heads."""
    gradients: int
    """Gradients of the trainable parameters."""
    optimizer: int
    """AdamW's two states per trainable parameter."""
    activations: int
    """Training step: tensors saved for backward, freed memory the allocator keeps, the LM head."""
    kv_cache: int
    """PPO generation's key/value cache (freed before scoring and training)."""
    merged_copy: int
    """PPO generation with ``merge_for_generation``: the copy of every LoRA-wrapped base weight kept
    while the policy adapter is folded into them (freed with the KV cache)."""
    total: int
    """Expected peak: runtime + weights + adapters + optimizer + the larger of gradients and
    activations (SFT, reward), or PPO's largest phase (:attr:`phases`)."""
    trainable_params: int = 0
    """Parameters the optimizer updates."""
    evaluation: int = 0
    """PPO's final evaluation: its KV cache and reply logits at ``eval_batch_size`` prompts."""
    phases: dict[str, int] = field(default_factory=dict)
    """PPO: each phase's expected peak (training, rollout, evaluation); ``total`` is the largest."""
    notes: list[str] = field(default_factory=list)
    """Caveats about this stage/method combination."""

    COMPONENTS = ("runtime", "weights", "adapters", "gradients", "optimizer", "activations", "kv_cache",
                  "merged_copy", "evaluation")

    def components(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COMPONENTS}


PPO_COMPONENTS = ("kv_cache", "merged_copy", "evaluation")
"""Components only PPO has (the table leaves them out for SFT and reward)."""


# ----------------------------------------------------------------------------------------------
# The architecture, read off a meta-device model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs from a model: exact parameter counts and the activation sizes."""

    params: int
    """Unique parameters of the causal LM (tied embeddings counted once)."""
    untied_head_params: int
    """Parameters of an output embedding that is not tied to the input one (0 when tied)."""
    linear_weights: int
    """Weights of the linear layers QLoRA quantises (those LoRA adapts: all but the heads)."""
    linear_rows: int
    """Output rows of those layers (LLM.int8 keeps a float32 scale per row)."""
    lora_shapes: tuple[tuple[int, int], ...]
    """(in, out) features of every linear layer LoRA adapts."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    """SwiGLU-style MLP (gate and up projections) rather than fc -> activation -> fc."""

    def lora_params(self, r: int) -> int:
        """Parameters of one LoRA adapter of rank ``r``: A (r x in) and B (out x r) per layer."""
        return sum(r * (i + o) for i, o in self.lora_shapes)


def architecture(config) -> Architecture:
    """Build ``config``'s causal LM on the meta device and read its sizes (exact, any architecture)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from rlhf.core.models import find_target_modules

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise UserError(f"model config ({type(config).__name__}): expected a causal LM architecture, found: {e}") from e
    params = sum(p.numel() for p in model.parameters())  # a tied weight is one parameter
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is None or embed is None or head.weight is embed.weight
    targets = set(find_target_modules(model))
    shapes, weights, rows = [], 0, 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            n_in, n_out = module.weight.shape
        elif isinstance(module, nn.Linear):
            n_in, n_out = module.in_features, module.out_features
        else:
            continue
        shapes.append((int(n_in), int(n_out)))
        weights += n_in * n_out
        rows += n_out
    text = config.get_text_config()
    hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = (getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                    or max(max(s) for s in shapes))
    gated = any("gate" in t for t in targets) or {"w1", "w3"} <= targets
    return Architecture(
        params=params, untied_head_params=0 if tied else head.weight.numel(), linear_weights=weights,
        linear_rows=rows, lora_shapes=tuple(shapes), layers=layers, hidden=hidden, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        intermediate=int(intermediate), vocab=text.vocab_size, gated_mlp=gated,
    )


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def saved_bytes_per_token_layer(arch: Architecture, *, width: int, trainable_base: bool, lora_r: int,
                                lora_dropout: bool, act_bytes: int, device: str, autocast: bool = False,
                                bf16_forwards: bool = False) -> float:
    """Bytes one decoder layer saves for backward, per token.

    Derived from what autograd keeps in a pre-norm block (checked tensor by tensor with
    ``torch.autograd.graph.saved_tensors_hooks`` on the default model), with h = hidden,
    i = intermediate, q = heads x head_dim, kv = kv_heads x head_dim:

    - two RMSNorms: their inputs, upcast to float32 (2h x 4 bytes), and float32 rstd (2); with
      trainable norm weights also the normalised input (2h), which the weight's gradient needs;
    - attention (SDPA) on a padded batch (the usual case; PPO's left-padded rollouts always): q, and
      k and v repeated to every query head, since transformers only lets SDPA share KV heads when
      there is no mask, the output (4q), the (t x t) mask (t = ``width`` per token), float32
      logsumexp (heads);
    - gated MLP: gate output, activation output, up output (3i); plain MLP: fc output (i);
    - linear inputs: a trainable base weight needs its input: attention input (h, shared by q/k/v),
      MLP input (h, shared by gate/up), down input (i); o_proj's input is the attention output;
    - LoRA: each adapted linear saves lora_B's input (r, float32) and lora_A's input. Without dropout
      and with a float32 base, that is the shared linear input above; on a bf16/fp16 base peft first
      casts the input to the adapter's float32, one copy per module; with dropout (training mode, SFT
      and reward) each module saves its dropped-out input (float32) and the dropout mask (a float
      tensor on CPU, a byte mask on CUDA). Under bf16/fp16 autocast (SFT and reward with ``bf16:
      true`` on a bf16 base) the float32 copy is cast back for the matmul and the half-precision
      copy is what is saved, rank-r intermediate included (checked the same way: 5,971 bytes per
      token against 5,928 from this formula on a 1-layer bf16 model);
    - QLoRA under autocast (``act_bytes`` 4: the upcast norms and embeddings keep the residual
      stream in float32): attention runs in half precision, the MLP outputs come back from
      bitsandbytes in float32, the LoRA inputs are saved as half-precision copies (7,507 bytes per
      token-layer measured on a 2-layer 4-bit model, 7,464 from this formula);
    - PPO's ``bf16_forwards`` (autocast with peft's input cast off, ``AdapterRegistry.computing_in``):
      each adapter reads its layer's own half-precision input, so the linear inputs are saved once
      each (2h + i, shared by q/k/v and by gate/up, as for a trainable base) in half precision, and
      so is the rank-r intermediate (tests/test_memory.py checks it against autograd).
    """
    h, i, q = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    per_layer = len(arch.lora_shapes) / arch.layers
    lora_in = sum(n_in for n_in, _ in arch.lora_shapes) / arch.layers  # summed input features per layer
    elements = 4 * q + width + (3 * i if arch.gated_mlp else i)
    fp32 = (2 * h + 2 + arch.heads) * 4  # norm inputs (upcast), rstd x 2, logsumexp
    linear_inputs = 2 * h + i
    if trainable_base:
        return (elements + linear_inputs + 2 * h) * act_bytes + fp32
    if autocast and act_bytes == 4:  # QLoRA: see the docstring
        mlp = 3 * i if arch.gated_mlp else i
        return (4 * q + width) * 2 + mlp * 4 + fp32 + (lora_in + per_layer * lora_r) * 2
    if bf16_forwards:
        return (elements + linear_inputs + per_layer * lora_r) * act_bytes + fp32
    lora = per_layer * lora_r * 4
    if lora_dropout:
        mask = 4 if device == "cpu" else 1
        lora += lora_in * (4 + mask)
    elif act_bytes == 4:
        elements += linear_inputs
    elif autocast:
        lora = per_layer * lora_r * act_bytes + lora_in * act_bytes
    else:
        lora += lora_in * 4
    return elements * act_bytes + fp32 + lora


def body_activations(arch: Architecture, *, sequences: int, width: int, gradient_checkpointing: bool,
                     act_bytes: int, device: str, **layer) -> float:
    """Bytes one forward through the transformer body saves for backward: ``sequences`` x ``width``
    tokens; ``layer`` holds the other arguments of :func:`saved_bytes_per_token_layer`."""
    tokens = sequences * width
    per_layer = saved_bytes_per_token_layer(arch, width=width, act_bytes=act_bytes, device=device, **layer)
    if gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input and recomputes one layer at a time.
        saved = tokens * (arch.layers * arch.hidden * act_bytes + per_layer)
    else:
        saved = tokens * arch.layers * per_layer
    return saved + tokens * 4 * arch.hidden * act_bytes  # embedding output, final norm, head input


def fused_head_bytes(arch: Architecture, tokens: int, *, trainable_head: bool, act_bytes: int, device: str) -> float:
    """Working set of TRL's fused LM head (SFT): the vocabulary logits one tile at a time."""
    tile = min(tokens, FUSED_TOKENS) * min(arch.vocab, FUSED_VOCAB)
    working = FUSED_TILES[device] * tile * (4 if device == "cpu" else act_bytes)
    working += tokens * arch.hidden * 4  # float32 gradient of the head's input
    if trainable_head:
        working += arch.vocab * arch.hidden * 4  # float32 gradient accumulator of the (tied) head weight
    return working


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------


def _check(stage: str, method: str, dtype: str, device: str, qlora_bits: int, sizes: dict[str, int]) -> None:
    if stage not in STAGES:
        raise UserError(f"stage: expected one of {', '.join(STAGES)}, found {stage!r}")
    if method not in METHODS:
        raise UserError(f"method: expected one of {', '.join(METHODS)}, found {method!r}")
    if dtype not in DTYPES:
        raise UserError(f"dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    if device not in DEVICES:
        raise UserError(f"device: expected cpu or cuda, found {device!r}")
    if qlora_bits not in QUANT_BYTES:
        raise UserError(f"bits: expected 4 or 8, found {qlora_bits!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name}: expected a positive integer, found {value!r}")


def estimate_memory(config, stage: str, method: str, *, batch_size: int = 8, seq_len: int = 256,
                    max_new_tokens: int = 48, lora_r: int = 16, dtype: str = "float32", qlora_bits: int = 4,
                    gradient_checkpointing: bool = False, device: str = "cpu", micro_batch_size: int | None = None,
                    lora_dropout: float = 0.0, merge_for_generation: str | bool = "auto",
                    ram_bytes: int | None = None, ppo_epochs: int = 1, bf16_forwards: str | bool = "auto",
                    eval_prompts: int = PPO_EVAL_PROMPTS, eval_batch_size: int = PPO_EVAL_BATCH_SIZE,
                    value_model: str = "critic", entropy_coef: float = 0.0,
                    arch: Architecture | None = None) -> MemoryEstimate:
    """Expected peak memory of ``stage`` trained with ``method`` on the model ``config`` describes.

    Args:
        config: a transformers ``PretrainedConfig`` (only read).
        stage: sft, reward or ppo.
        method: full, lora or qlora (with ``qlora_bits`` 4 or 8).
        batch_size: sequences per step (sft), preference pairs per step (reward: 2 x batch_size
            sequences), prompts per rollout (ppo).
        seq_len: prompt + reply tokens (sft, reward); prompt tokens (ppo).
        max_new_tokens: reply tokens PPO generates (the estimate assumes every reply is this long).
        lora_r: LoRA rank of every adapter.
        dtype: weights dtype: float32, bfloat16 or float16.
        gradient_checkpointing: recompute activations in the backward pass.
        device: cpu (the estimate is the process's peak RSS) or cuda (GPU memory, nvidia-smi).
        micro_batch_size: PPO replies per forward/backward (default: batch_size).
        ppo_epochs: PPO epochs per rollout batch. One epoch over one micro-batch (PPO's defaults) is
            the single-pass update: one policy graph per step, so the allocator keeps less.
        lora_dropout: LoRA dropout of SFT/reward training (PPO forces every dropout to 0).
        merge_for_generation: PPO's setting (auto, true, false): sampling with the policy LoRA
            folded into the base weights keeps a copy of every wrapped weight meanwhile
            (``rlhf.core.adapters.AdapterRegistry.merged``), in host memory, so on CUDA it costs no GPU
            memory; on CPU ``auto`` merges only when that copy is at most 10 % of ``ram_bytes``
            (default: this machine's RAM), as ``rlhf.ppo.trainer.merge_backup_device`` decides. Never on a
            quantized base.
        bf16_forwards: PPO's setting (auto, true, false): the scoring and training forwards under
            bf16 autocast, each adapter saving its layer's own bf16 input instead of a float32 copy
            per adapted layer. auto = on for a bfloat16 base without QLoRA, as
            ``rlhf.ppo.trainer.forward_dtype`` decides; true on another base is refused there and here.
        eval_prompts, eval_batch_size: PPO's final evaluation (``rlhf ppo``'s defaults: 32 held-out
            prompts, 16 at a time; 0 prompts = none, as in configs/ppo.yaml): reference and policy
            sample and score ``min(eval_batch_size, eval_prompts)`` prompts at a time, on top of the
            memory the updates left to the allocator.
        value_model: PPO's value model: critic (a fourth LoRA adapter, trained, with its own head) or
            policy_head (a head on the policy's hidden states: three adapters, one trained). The
            update's activations are the same either way: one role's graph is alive at a time.
        entropy_coef: PPO's entropy bonus; above 0 the policy's graph keeps two float32 copies more
            of the micro-batch's reply logits.
        arch: :func:`architecture` of ``config``, when the caller already has it.

    Returns:
        A :class:`MemoryEstimate` in bytes.
    """
    micro = batch_size if micro_batch_size is None else micro_batch_size
    _check(stage, method, dtype, device, qlora_bits,
           dict(batch_size=batch_size, seq_len=seq_len, max_new_tokens=max_new_tokens, lora_r=lora_r,
                micro_batch_size=micro, ppo_epochs=ppo_epochs, eval_batch_size=eval_batch_size))
    if not isinstance(eval_prompts, int) or eval_prompts < 0:
        raise UserError(f"eval_prompts: expected 0 or a positive integer, found {eval_prompts!r}")
    if value_model not in PPO_VALUE_MODELS:
        raise UserError(f"value_model: expected one of {', '.join(PPO_VALUE_MODELS)}, found {value_model!r}")
    if stage == "ppo" and batch_size % micro:
        raise UserError(f"micro_batch_size: expected a divisor of batch_size ({batch_size}), found {micro}")
    arch = arch or architecture(config)
    notes: list[str] = []
    w_bytes = DTYPES[dtype]
    # Weights. The reward model swaps an untied LM head for a (hidden -> 1) score head.
    params = arch.params
    if stage == "reward":
        params += arch.hidden - arch.untied_head_params
    if method == "qlora":
        other = params - arch.linear_weights
        weights = arch.linear_weights * QUANT_BYTES[qlora_bits] + other * 4  # the rest upcast to float32
        if qlora_bits == 8:
            weights += arch.linear_rows * 4
        act_bytes = 4  # float32 norms and embeddings promote every activation to float32
    else:
        weights = params * w_bytes
        act_bytes = w_bytes
    # Adapters and heads (float32), and what trains.
    lora = arch.lora_params(lora_r) * 4
    head = arch.hidden * 4
    full = method == "full"
    if stage == "sft":
        adapters = 0 if full else lora
        trainable, trainable_bytes = (params, w_bytes) if full else (arch.lora_params(lora_r), 4)
    elif stage == "reward":
        # peft trains a copy of the score head (modules_to_save); full fine-tuning trains the model.
        adapters = 0 if full else lora + head
        trainable, trainable_bytes = (params, w_bytes) if full else (arch.lora_params(lora_r) + arch.hidden, 4)
    else:
        # policy, reference (the frozen SFT adapter), reward, and the critic's adapter unless the value
        # head reads the policy's hidden states; reward and value heads.
        trained_adapters = {"critic": 2, "policy_head": 1}[value_model]
        adapters = (2 + trained_adapters) * lora + 2 * head
        trainable, trainable_bytes = trained_adapters * arch.lora_params(lora_r) + arch.hidden, 4
        if full:
            notes.append(
                "our PPO trains LoRA roles on one shared base: with a fully fine-tuned SFT model, that model is the "
                "base, the policy is a fresh LoRA adapter on it and the reference is the base with adapters off, "
                "so this estimate is for LoRA roles. Full-parameter PPO would hold four models (policy and value "
                f"with gradients and AdamW state): about {_mib(_four_models(params, w_bytes)):,.0f} MiB more."
            )
    gradients = trainable * trainable_bytes
    optimizer = 2 * trainable * trainable_bytes
    # Activations of the training phase: saved tensors, what the allocator keeps, the LM head.
    trains_base = full and stage != "ppo"
    # SFT and reward train a half-precision base with autocast (bf16: true, as the configs say for
    # GPUs); PPO runs the bf16 base as it is, with float32 adapters, or under bf16_forwards.
    fwd16 = stage == "ppo" and _bf16_forwards_on(bf16_forwards, dtype, method)
    layer = dict(trainable_base=trains_base, lora_r=lora_r, act_bytes=act_bytes, device=device,
                 lora_dropout=lora_dropout > 0 and not trains_base and stage != "ppo",
                 autocast=stage != "ppo" and dtype != "float32", bf16_forwards=fwd16)
    if trains_base:
        retention_key = "full"
    elif method == "qlora" and stage != "ppo":
        retention_key = "qlora" if dtype == "float32" else "qlora-half"
    elif stage == "ppo":
        retention_key = "ppo" if ppo_epochs != 1 or micro != batch_size else (
            "ppo-single-pass-ckpt" if gradient_checkpointing else "ppo-single-pass")
    else:
        retention_key = stage
    retention = RETENTION[device][retention_key]

    def forward(sequences: int, width: int) -> float:
        saved = body_activations(arch, sequences=sequences, width=width,
                                 gradient_checkpointing=gradient_checkpointing, **layer)
        unchecked = body_activations(arch, sequences=sequences, width=width, gradient_checkpointing=False, **layer)
        return saved + retention * unchecked

    kv_cache = scoring = merged_copy = evaluation = 0
    phases: dict[str, float] = {}
    if stage == "sft":
        activations = forward(batch_size, seq_len) + fused_head_bytes(
            arch, batch_size * seq_len, trainable_head=trains_base, act_bytes=act_bytes, device=device)
    elif stage == "reward":
        # Chosen and rejected replies go through the model as one batch of 2 x batch_size; the score
        # head reads hidden states, so there are no vocabulary logits.
        activations = forward(2 * batch_size, seq_len)
    else:
        width = seq_len + max_new_tokens
        # Each micro-batch runs the policy forward and backward, then the value forward and backward,
        # so one role's graph is alive at a time; the policy's is the larger, with the LM head on the
        # reply positions only: (micro, t, v) logits.
        copies = PPO_LOGIT_COPIES + (PPO_ENTROPY_LOGIT_COPIES if entropy_coef > 0 else 0)
        activations = forward(micro, width) + copies * micro * max_new_tokens * arch.vocab * 4
        if fwd16:
            # Autocast's bf16 copies of the trained role's LoRA weights, kept for its backward.
            activations += arch.lora_params(lora_r) * 2
        kv_cache = _kv_cache_bytes(arch, batch_size, width, act_bytes)
        # AdapterRegistry.merged keeps the wrapped layers' original weights to restore them bit for
        # bit: every adapted linear weight once more, in host memory, while sampling.
        backup = arch.linear_weights * w_bytes
        if device == "cpu" and method != "qlora" and _merges_on_cpu(merge_for_generation, backup, ram_bytes):
            merged_copy = backup
        # Scoring (no gradients): the whole batch's reply logits, log-softmaxed one row at a time.
        scoring = (batch_size * act_bytes + 4) * max_new_tokens * arch.vocab
        # The phases of a step, each on top of the persistent memory. The rollout's and the final
        # evaluation's small blocks (KV cache, merged copy, no-grad forwards) land in the holes the
        # updates' activations left in the heap (the allocator keeps them: docs/memory.md, "The
        # allocator"; CUDA's caching allocator keeps its blocks too), so from the second step on
        # they hold the larger of that heap and their own; and the last update's gradients stay
        # until the next update sets them to None.
        heap = max(activations, kv_cache + merged_copy, scoring)
        phases["training"] = max(gradients, activations)
        phases["rollout"] = heap + gradients
        eval_rows = min(eval_batch_size, eval_prompts)
        if eval_rows:
            # Reference, then policy, sample eval_rows prompts (KV cache, the LM head at the last
            # prefill position) and read their reply logits (eval_rows, t, v) without gradients.
            evaluation = (_kv_cache_bytes(arch, eval_rows, width, act_bytes)
                          + eval_rows * max_new_tokens * arch.vocab * act_bytes)
            phases["evaluation"] = heap + gradients + evaluation
    if method == "qlora" and device == "cpu":
        notes.append("QLoRA on CPU runs bitsandbytes' CPU kernels: memory as estimated, but much slower than LoRA.")
    if dtype != "float32" and device == "cpu":
        notes.append(f"{dtype} on CPU works but is slow on most CPUs; the toolkit's CPU default is float32.")
    runtime = (RUNTIME_CPU_PPO if stage == "ppo" else RUNTIME_CPU) if device == "cpu" else RUNTIME_CUDA
    persistent = runtime + weights + adapters + optimizer
    if phases:
        total = persistent + max(phases.values())
    else:
        # Gradients are set to None after every optimizer step and grow during the backward while the
        # activations are freed, so the training phase holds about the larger of the two.
        total = persistent + max(gradients, activations)
    return MemoryEstimate(runtime=int(runtime), weights=int(weights), adapters=int(adapters), gradients=int(gradients),
                          optimizer=int(optimizer), activations=int(activations), kv_cache=int(kv_cache),
                          merged_copy=int(merged_copy), evaluation=int(evaluation),
                          total=int(total), trainable_params=int(trainable),
                          phases={name: int(persistent + value) for name, value in phases.items()}, notes=notes)


def _kv_cache_bytes(arch: Architecture, rows: int, width: int, act_bytes: int) -> float:
    """Generation's key/value cache: 2 x layers x rows x width x kv_heads x head_dim x bytes."""
    return 2 * arch.layers * rows * width * arch.kv_heads * arch.head_dim * act_bytes


def _bf16_forwards_on(setting: str | bool, dtype: str, method: str) -> bool:
    """Whether PPO's forwards run under bf16 autocast (rlhf.ppo.trainer.forward_dtype): auto = when the
    weights the adapters wrap are bfloat16, i.e. a bfloat16 base without QLoRA."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise UserError(f"bf16_forwards: expected auto, true or false, found {setting!r}")
    bf16_base = dtype == "bfloat16" and method != "qlora"
    if setting == "true" and not bf16_base:
        raise UserError(f"bf16_forwards: true needs a bfloat16 base (dtype bfloat16, method lora or full), found "
                        f"{dtype} / {method}; set bf16_forwards auto or false")
    return setting != "false" and bf16_base


def estimate_separate_models_ppo(config, *, batch_size: int = 8, seq_len: int = 64, max_new_tokens: int = 48,
                                 lora_r: int = 16, dtype: str = "float32", device: str = "cpu",
                                 gradient_checkpointing: bool = False,
                                 arch: Architecture | None = None) -> MemoryEstimate:
    """Expected peak of the PPO layout of TRL 0.19's ``PPOTrainer`` with a LoRA policy, for comparison.

    That layout (rebuilt in ``bench/bench_scale.py``, row ``trl019-lora``): the policy is the base
    + a LoRA adapter, the reference is the policy with its adapter off, and the reward model and the
    value model are two more full copies of the model with a score head; the value model trains in
    full, so it has gradients and AdamW state in its dtype. Its update runs the value backbone and
    the policy in one forward and backpropagates the sum of the losses, so both graphs are alive at
    once, and it computes the LM head over the whole sequence. Generation keeps every step's
    float32 scores ``(b, t, v)``.
    """
    sizes = dict(batch_size=batch_size, seq_len=seq_len, max_new_tokens=max_new_tokens, lora_r=lora_r)
    _check("ppo", "lora", dtype, device, 4, sizes)
    arch = arch or architecture(config)
    w_bytes = DTYPES[dtype]
    scorer = arch.params + arch.hidden - arch.untied_head_params  # a model with a (hidden -> 1) score head
    lora = arch.lora_params(lora_r)
    weights = (arch.params + 2 * scorer) * w_bytes
    gradients = lora * 4 + scorer * w_bytes
    optimizer = 2 * gradients
    b, t, width = batch_size, max_new_tokens, seq_len + max_new_tokens
    common = dict(sequences=b, width=width, lora_r=lora_r, lora_dropout=False, act_bytes=w_bytes, device=device)
    saved = (body_activations(arch, gradient_checkpointing=gradient_checkpointing, trainable_base=False, **common)
             + body_activations(arch, gradient_checkpointing=gradient_checkpointing, trainable_base=True, **common))
    unchecked = (body_activations(arch, gradient_checkpointing=False, trainable_base=False, **common)
                 + body_activations(arch, gradient_checkpointing=False, trainable_base=True, **common))
    # Full-sequence logits, then on reply positions: the temperature-scaled copy, the float32
    # log-softmax logprobs_from_logits saves, and the logits' gradient.
    logits = b * width * arch.vocab * w_bytes + b * t * arch.vocab * (w_bytes + 4 + 4)
    activations = saved + logits + RETENTION[device]["separate"] * unchecked
    kv_cache = 2 * arch.layers * b * width * arch.kv_heads * arch.head_dim * w_bytes + b * t * arch.vocab * 4
    scoring = b * width * arch.vocab * w_bytes + b * t * arch.vocab * (4 + 4)  # reference logits + the scores
    runtime = RUNTIME_CPU if device == "cpu" else RUNTIME_CUDA
    total = runtime + weights + lora * 4 + optimizer + max(gradients, activations, kv_cache, scoring)
    return MemoryEstimate(runtime=int(runtime), weights=int(weights), adapters=int(lora * 4), gradients=int(gradients),
                          optimizer=int(optimizer), activations=int(activations), kv_cache=int(kv_cache),
                          merged_copy=0, total=int(total), trainable_params=int(lora + scorer),
                          notes=["TRL 0.19's PPO layout: a LoRA policy (reference = adapter off), full reward and "
                                 "value models, the value model trained in full"])


def _merges_on_cpu(setting: str | bool, backup: float, ram_bytes: int | None) -> bool:
    """Whether PPO on a CPU merges the policy for sampling (rlhf.ppo.trainer.merge_backup_device)."""
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise UserError(f"merge_for_generation: expected auto, true or false, found {setting!r}")
    if setting != "auto":
        return setting == "true"
    if ram_bytes is None:
        import psutil

        ram_bytes = psutil.virtual_memory().total
    return backup <= CPU_MERGE_RAM_SHARE * ram_bytes


def _four_models(params: int, w_bytes: int) -> int:
    """Extra bytes of full-parameter PPO over one shared base: 3 more model copies, and gradients +
    AdamW state for the policy and value models."""
    return 3 * params * w_bytes + 2 * 3 * params * w_bytes


def _mib(n: float) -> float:
    return n / MiB


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

_DEFAULT_SEQ_LEN = {"sft": 256, "reward": 256, "ppo": 64}


@dataclass
class EstimateArguments:
    """Settings of ``rlhf estimate-memory``."""

    model: str = "smollm2-135m-instruct"  # rlhf.core.models.DEFAULT_MODEL, not imported: this module needs no torch
    """A model directory, a hub id, or smollm2-135m-instruct (the embedded default model)."""
    stage: str = "sft"
    """sft, reward or ppo."""
    method: str = "lora"
    """full, lora or qlora."""
    bits: int = 4
    """QLoRA weight bits: 4 or 8."""
    batch_size: int = 8
    """Sequences (sft), preference pairs (reward) or prompts (ppo) per step."""
    seq_len: int | None = None
    """Prompt + reply tokens (sft, reward; null = 256) or prompt tokens (ppo; null = 64)."""
    max_new_tokens: int = 48
    """PPO reply length."""
    micro_batch_size: int | None = None
    """PPO replies per forward/backward (null = batch_size)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_dropout: float = 0.0
    """LoRA dropout (SFT and reward)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    merge_for_generation: str = "auto"
    """PPO: auto, true or false (true on a CPU keeps a copy of the wrapped weights)."""
    bf16_forwards: str = "auto"
    """PPO: auto, true or false (auto = on for a bfloat16 base without QLoRA: bf16 LoRA inputs saved)."""
    ppo_epochs: int = 1
    """PPO epochs per rollout batch."""
    eval_prompts: int = PPO_EVAL_PROMPTS
    """PPO's final evaluation: held-out prompts (0 = none, as configs/ppo.yaml sets)."""
    eval_batch_size: int = PPO_EVAL_BATCH_SIZE
    """PPO's final evaluation: prompts sampled and scored at a time."""
    value_model: str = "critic"
    """PPO: critic (its own LoRA adapter) or policy_head (a head on the policy)."""
    entropy_coef: float = 0.0
    """PPO: the entropy bonus's weight (above 0 keeps two float32 copies more of the reply logits)."""
    device: str | None = None
    """cpu or cuda (null = cuda when available)."""
    trust_remote_code: bool = False
    """Allow a hub config's own code."""


def estimate_command(argv: list[str]) -> int:
    """``rlhf estimate-memory``: print the breakdown as a table."""
    from rlhf.core.config import build_config

    (args,), _ = build_config([EstimateArguments], argv, prog="rlhf estimate-memory",
                              description="Expected peak memory of a stage, broken down by component.")
    device = args.device or _default_device()
    seq_len = args.seq_len or _DEFAULT_SEQ_LEN.get(args.stage, 256)
    _check(args.stage, args.method, args.dtype, device, args.bits, {})
    config = load_config(args.model, args.trust_remote_code)
    estimate = estimate_memory(
        config, args.stage, args.method, batch_size=args.batch_size, seq_len=seq_len,
        max_new_tokens=args.max_new_tokens, lora_r=args.lora_r, dtype=args.dtype, qlora_bits=args.bits,
        gradient_checkpointing=args.gradient_checkpointing, device=device, micro_batch_size=args.micro_batch_size,
        lora_dropout=args.lora_dropout, merge_for_generation=args.merge_for_generation,
        bf16_forwards=args.bf16_forwards, ppo_epochs=args.ppo_epochs, eval_prompts=args.eval_prompts,
        eval_batch_size=args.eval_batch_size, value_model=args.value_model, entropy_coef=args.entropy_coef,
    )
    method = f"qlora {args.bits}-bit" if args.method == "qlora" else args.method
    if args.method != "full" or args.stage == "ppo":
        method += f" (r={args.lora_r})"
    shape = (f"{args.batch_size} x {seq_len} tokens" if args.stage == "sft" else
             f"{args.batch_size} pairs (2 x {args.batch_size} sequences) x {seq_len} tokens" if args.stage == "reward"
             else f"{args.batch_size} prompts x ({seq_len} + {args.max_new_tokens}) tokens, micro-batch "
                  f"{args.micro_batch_size or args.batch_size}, bf16 forwards "
                  f"{'on' if _bf16_forwards_on(args.bf16_forwards, args.dtype, args.method) else 'off'}, "
                  + (f"final evaluation of {args.eval_prompts} prompts, {min(args.eval_batch_size, args.eval_prompts)} "
                     "at a time" if args.eval_prompts else "no final evaluation"))
    print(f"Expected peak memory of {args.stage} / {method}: {args.model}, {args.dtype} on {device}")
    print(f"{shape}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"{estimate.trainable_params:,} trainable parameters")
    print(format_table(estimate))
    for note in estimate.notes:
        print(f"note: {note}")
    return 0


def format_table(estimate: MemoryEstimate) -> str:
    """Component, MiB and share of the total, then the total (and PPO's phases)."""
    lines = [f"{'component':<12} {'MiB':>10} {'share':>7}"]
    for name, value in estimate.components().items():
        if name in PPO_COMPONENTS and not estimate.phases:
            continue
        lines.append(f"{name:<12} {_mib(value):>10,.1f} {value / estimate.total:>7.1%}")
    lines.append(f"{'total':<12} {_mib(estimate.total):>10,.1f}")
    if not estimate.phases:
        lines.append("total = runtime + weights + adapters + optimizer + the larger of gradients and activations "
                     "(gradients grow as activations are freed)")
        return "\n".join(lines)
    lines.append("total = runtime + weights + adapters + optimizer + the largest phase (they never overlap):")
    heap = "the heap the updates leave (the largest of activations, kv_cache + merged_copy, scoring)"
    what = {"training": "the larger of activations and gradients",
            "rollout": f"{heap} + gradients",
            "evaluation": "that heap + gradients + evaluation"}
    peak = max(estimate.phases, key=estimate.phases.get)
    for name, value in estimate.phases.items():
        lines.append(f"  {name:<10} {_mib(value):>10,.1f}  {what[name]}{'  <- peak' if name == peak else ''}")
    return "\n".join(lines)


def load_config(model: str, trust_remote_code: bool = False):
    """The model's config only: no weights are read."""
    from transformers import AutoConfig

    from rlhf.core.models import resolve_model_path

    path = resolve_model_path(model)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model: could not read a config from {model!r} ({path}): {str(e).splitlines()[0]}") from e


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"
