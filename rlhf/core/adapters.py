"""One base model in memory, several named roles: the adapter registry shared by every stage.

PPO needs four models: policy, reference, reward and value. Here they are one base model with peft
adapters (``policy``, ``value``, ``reward`` and optionally ``reference``) plus small scalar heads;
the reference can also be the base with every adapter switched off (TRL's ``use_adapter`` idea). A
role is entered through :meth:`AdapterRegistry.use`, which always restores the previous adapter.

peft's ``set_adapter`` marks only the active adapter as trainable; we train two adapters (policy and
value) in one step, so the registry re-applies each adapter's own trainable flag after every switch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf.core.errors import UserError

HEAD_FILE = "score_head.safetensors"


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost token that is not padding, per row: ``(b, s) -> (b,)``.

    The same rule as transformers' sequence-classification heads, so a reward adapter scores a PPO
    sequence exactly where it scored its training pairs (left or right padding alike). Rows made
    only of padding give 0.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return ((input_ids != pad_token_id).long() * positions).argmax(-1)


def read_score_head(adapter_dir: str | os.PathLike) -> torch.Tensor | None:
    """The (1, hidden) score weight a SEQ_CLS adapter saved beside its LoRA weights, if any."""
    adapter_dir = Path(adapter_dir)
    head_file = adapter_dir / HEAD_FILE
    if head_file.exists():
        return load_file(str(head_file))["weight"]
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return None
    tensors = load_file(str(weights))
    for key, value in tensors.items():
        if key.endswith("score.weight") or key.endswith("score.modules_to_save.weight"):
            return value
    return None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: ``(b, s) -> (b, s)``.

    With left padding the first real token must sit at position 0, as it does during ``generate``
    and in right-padded training batches; otherwise logprobs and scores shift with the pad width.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_for(attention_mask: torch.Tensor, attn_implementation: str | None) -> torch.Tensor:
    """The mask to pass a forward over padded rows: ``(b, s)`` as is, or for SDPA ``(b, 1, s, s)``.

    Under SDPA a left pad's query sees no key (causal, and every earlier key is a pad too). On a
    GPU the fused kernels' backward turns such a fully masked row into NaN gradients for every
    weight, although the row's output is masked out of every loss (seen on an H200 with torch 2.11:
    PPO's first step, non-finite gradient norm with left-padded prompts only). So for SDPA the
    causal padding mask is built here, with each query that would see no key attending to itself
    instead; every other query's row is the one transformers builds, so real tokens' outputs do
    not change. Eager attention (finite fill values) and flash attention (unpadded rows) need nothing.
    """
    if attn_implementation != "sdpa" or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return attention_mask
    keys = attention_mask.bool()
    s = keys.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=keys.device).tril()
    mask = causal & keys[:, None, :]  # (b, s, s): query i sees the real keys at or before i
    blind = ~mask.any(-1)  # (b, s): queries that would see nothing
    mask |= torch.eye(s, dtype=torch.bool, device=keys.device) & blind[:, :, None]
    return mask[:, None]


class AdapterRegistry:
    """Named peft adapters and scalar heads on one base model."""

    def __init__(self, base_model: nn.Module):
        self.base_model = base_model
        self.peft_model = None
        self.heads = nn.ModuleDict()
        self.trainable: dict[str, bool] = {}
        self._params_by_adapter: dict[str, list[nn.Parameter]] | None = None
        self._role: str | None = None  # the role entered last through use(); None = the base
        self.compute_dtype: torch.dtype | None = None
        """What :meth:`hidden_states` computes in (see :meth:`computing_in`); None = each layer's own dtype."""
        self._computing: torch.dtype | None = None  # the dtype computing_in() runs in now
        self.sharded = False
        """Whether :meth:`shard` split the base's decoder layers over processes (every forward is then
        a collective: all processes run the same forwards, and generation runs until all are done)."""

    # -- building ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.trainable)

    def add(self, name: str, peft_config, trainable: bool = True) -> None:
        """A fresh adapter ``name`` from a peft config."""
        from peft import get_peft_model

        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base_model, peft_config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, peft_config)
        self.trainable[name] = trainable
        self._params_by_adapter = None
        self._apply_trainable()

    def load(self, name: str, adapter_dir: str | os.PathLike, trainable: bool = False) -> None:
        """Load a saved adapter (and its score head, if it has one) as ``name``."""
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").exists():
            raise UserError(f"{adapter_dir}: expected a peft adapter (adapter_config.json), found none")
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(
                self.base_model, str(adapter_dir), adapter_name=name, is_trainable=trainable
            )
        else:
            self.peft_model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        head = read_score_head(adapter_dir)
        if head is not None:
            self.add_head(name, head, trainable=trainable)
        self.trainable[name] = trainable
        self._params_by_adapter = None
        self._apply_trainable()

    def add_head(self, name: str, weight: torch.Tensor | None = None, trainable: bool = True) -> nn.Linear:
        """A ``Linear(hidden, 1, bias=False)`` scalar head for role ``name``."""
        hidden = self.base_model.config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1, bias=False)
        if weight is not None:
            head.weight.data.copy_(weight.reshape(1, hidden).float())
        else:
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1))
        head.to(next(self.base_model.parameters()).device)
        head.requires_grad_(trainable)
        self.heads[name] = head
        return head

    def _adapter_params(self) -> dict[str, list[nn.Parameter]]:
        # Matching every parameter name against every adapter costs more than the switch itself
        # (PPO switches seven times a step), so it is done once per set of adapters.
        if self._params_by_adapter is None:
            self._params_by_adapter = {name: [] for name in self.trainable}
            for param_name, param in self.peft_model.named_parameters():
                for adapter in self.trainable:
                    if f".{adapter}." in param_name:
                        self._params_by_adapter[adapter].append(param)
        return self._params_by_adapter

    def _apply_trainable(self) -> None:
        for adapter, params in self._adapter_params().items():
            for param in params:
                param.requires_grad = self.trainable[adapter]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """Trainable parameters of adapter ``name`` and its head."""
        params = [p for p in self._adapter_params().get(name, []) if p.requires_grad]
        if name in self.heads:
            params += [p for p in self.heads[name].parameters() if p.requires_grad]
        return params

    # -- switching ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[nn.Module]:
        """Run with adapter ``name`` active (None: all adapters off, i.e. the base model)."""
        outer = self._role
        self._role = name
        try:
            if name is None:
                try:
                    with self.peft_model.disable_adapter():
                        yield self.peft_model
                finally:
                    # peft re-enables the adapter layers on exit through set_adapter, which freezes
                    # every adapter but the active one (the value adapter would silently stop training).
                    self._apply_trainable()
                return
            if name not in self.trainable:
                raise KeyError(f"no adapter named {name!r}; have {self.names}")
            previous = self.peft_model.active_adapter
            self.peft_model.set_adapter(name)
            self._apply_trainable()
            try:
                yield self.peft_model
            finally:
                self.peft_model.set_adapter(previous)
                self._apply_trainable()
        finally:
            self._role = outer

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each decoder layer's activations in the backward pass, under the role that ran it.

        Non-reentrant recomputation runs during backward with whatever adapter is active then: a
        value loss backpropagated after the registry switched back to the policy would be recomputed
        under the policy adapter and give silently wrong gradients. The checkpoint's ``context_fn``
        captures the role at forward time and re-enters it for the recomputation. Like every
        transformers model, it only checkpoints in training mode (see disable_dropout). The compute
        dtype of :meth:`computing_in` is captured and re-entered the same way.
        """
        registry = self

        @contextlib.contextmanager
        def recompute(role, dtype):
            with registry.use(role), registry.computing_in(dtype):
                yield

        def role_contexts():
            return contextlib.nullcontext(), recompute(registry._role, registry._computing)

        kwargs = {"use_reentrant": False, "context_fn": role_contexts}
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before activation_checkpointing_enable (5.17 has only the older name)
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def can_merge(self, name: str) -> bool:
        """Whether :meth:`merged` can fold adapter ``name`` into the base weights exactly (not into
        sharded ones: each process holds a slice of them)."""
        from peft import PeftType

        if self.sharded:
            return False
        config = self.peft_model.peft_config.get(name)
        quantized = getattr(self.base_model, "hf_quantizer", None) is not None or any(
            getattr(self.base_model, flag, False) for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"))
        return config is not None and config.peft_type == PeftType.LORA and not quantized

    def _lora_layers(self, name: str) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.peft_model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]

    def wrapped_dtypes(self, name: str) -> set[torch.dtype]:
        """Dtypes of the base weights adapter ``name`` wraps (uint8 / int8 for a quantized base)."""
        return {layer.get_base_layer().weight.dtype for layer in self._lora_layers(name)}

    def merge_backup_bytes(self, name: str) -> int:
        """Bytes :meth:`merged` keeps aside for adapter ``name``: every base weight its LoRA wraps."""
        return sum(p.numel() * p.element_size() for layer in self._lora_layers(name)
                   for p in layer.get_base_layer().parameters(recurse=False))

    @contextlib.contextmanager
    def merged(self, name: str, backup_device: torch.device | str | None = None) -> Iterator[nn.Module]:
        """Inference with LoRA adapter ``name`` folded into the base weights, restored bit for bit after.

        Unmerged, every wrapped layer runs two extra small matmuls (and peft's Python around them)
        per forward; when decoding a few tokens at a time that is 15-20 % of a step. peft's unmerge
        subtracts the update again, which leaves rounding errors in the base weights that the frozen
        roles share, so the merged layers' original weights are kept meanwhile and copied back: a
        transient copy of the wrapped weights (:meth:`merge_backup_bytes`), on ``backup_device``
        (default: where the weights are; host memory keeps it off a GPU). Not for training (no
        gradient reaches the adapter).
        """
        if not self.can_merge(name):
            raise ValueError(f"adapter {name!r} cannot be merged exactly (not LoRA, or a quantized base)")
        layers = self._lora_layers(name)
        originals = [{k: v.detach().to(backup_device, copy=True)
                      for k, v in layer.get_base_layer().named_parameters(recurse=False)} for layer in layers]
        try:
            self.peft_model.merge_adapter([name])
            yield self.peft_model
        finally:
            self.peft_model.unmerge_adapter()
            with torch.no_grad():
                for layer, saved in zip(layers, originals):
                    for key, param in layer.get_base_layer().named_parameters(recurse=False):
                        param.copy_(saved[key])

    # -- forward passes -----------------------------------------------------------------------

    def _body(self) -> nn.Module:
        # The transformer without its LM head (LlamaModel inside LlamaForCausalLM): reward and value
        # need hidden states only, and the vocabulary projection is the most expensive matmul.
        return self.peft_model.get_base_model().base_model

    @contextlib.contextmanager
    def computing_in(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Forward passes with every matmul in ``dtype`` (None: each layer's own dtype, no change).

        peft keeps LoRA weights in float32 on a bf16 base and casts each adapted layer's input up to
        them, so every adapted layer saves a float32 copy of its input for the backward pass (q, k
        and v one each of the same input). Here the forward runs under ``torch.autocast(dtype)`` with
        peft's input cast switched off: the adapter reads the layer's own bf16 input and saves that
        tensor itself (one for q, k and v together), and autocast casts the float32 LoRA weights for
        the matmul (once per forward). The weights, their gradients and the optimizer state stay
        float32; outputs differ from the float32 adapter compute by the bf16 rounding of the
        adapter's weights and rank-r intermediate (the layer's output is rounded to bf16 either way).
        """
        if dtype is None:
            yield
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.peft_model.modules() if isinstance(m, BaseTunerLayer)]
        casting = [getattr(layer, "cast_input_dtype_enabled", True) for layer in layers]
        outer, self._computing = self._computing, dtype
        device_type = next(self.base_model.parameters()).device.type
        try:
            for layer in layers:
                layer.cast_input_dtype_enabled = False
            with torch.autocast(device_type, dtype=dtype):
                yield
        finally:
            for layer, cast in zip(layers, casting):
                layer.cast_input_dtype_enabled = cast
            self._computing = outer

    def hidden_states(self, name: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``(b, s, h)`` under adapter ``name`` (None = base model), computed in
        :attr:`compute_dtype`; heads run outside, in their own dtype."""
        with self.use(name), self.computing_in(self.compute_dtype):
            return self._body()(
                input_ids=input_ids,
                attention_mask=attention_mask_for(attention_mask, self.base_model.config._attn_implementation),
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            ).last_hidden_state

    def lm_head(self) -> nn.Module:
        return self.peft_model.get_base_model().get_output_embeddings()

    def score(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        """Scalar score ``(b,)`` of each sequence at its last non-pad token (reward model)."""
        hidden = self.hidden_states(name, input_ids, attention_mask)  # (b, s, h)
        index = last_non_pad_index(input_ids, pad_token_id)  # (b,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (b, h)
        return self.heads[name](last.to(self.heads[name].weight.dtype)).squeeze(-1)

    # -- sharding -----------------------------------------------------------------------------

    def shard(self, mesh, reshard_after_forward: bool | int = True, layer_classes: list[str] | None = None) -> None:
        """Shard the frozen base over the processes of ``mesh`` with FSDP2: each decoder layer is one
        unit (its weights gathered for its forward and backward, then freed), the rest of the body one
        more. Every adapter, the heads, the token embeddings and the LM head stay whole on every process.

        Only frozen weights are split, so everything else works as in plain data parallelism: roles
        switch by adapter name, gradients exist for whole adapters only and are summed by the caller,
        checkpoints hold whole adapters. The embeddings and LM head stay whole because the roles call
        the LM head outside the body's forward (on reply positions only), where FSDP would not gather it.
        ``layer_classes``: class names of the units (default: the model's ``_no_split_modules``, its
        decoder layers). Call after every adapter and head is added; forwards then run on every
        process together.
        """
        from torch.distributed.fsdp import fully_shard

        body = self._body()
        split = set(layer_classes or getattr(self.base_model, "_no_split_modules", None) or ())
        layers = [m for m in body.modules() if type(m).__name__ in split]
        if not layers:
            raise UserError(f"sharding: no module of {type(self.base_model).__name__} is of the classes to shard "
                            f"({', '.join(sorted(split)) or 'none known'}); name its decoder layer class in "
                            "fsdp_transformer_layer_cls_to_wrap, or launch with plain data parallelism (ddp.yaml)")
        whole = {p for params in self._adapter_params().values() for p in params}
        whole |= set(body.get_input_embeddings().parameters()) | set(self.lm_head().parameters())
        trained = [n for n, p in self.peft_model.named_parameters() if p.requires_grad and p not in whole]
        if trained:
            raise UserError(f"sharding: only frozen base weights are sharded, but {trained[0]} trains; shard a "
                            "LoRA-only model")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole)
        fully_shard(body, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=whole)
        self.sharded = True

    # -- saving -------------------------------------------------------------------------------

    def save(self, name: str, directory: str | os.PathLike) -> None:
        """Save adapter ``name`` (and its head, or only a head) so :meth:`load` or peft can read it back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if name in self.trainable:  # else a head without an adapter of its own (a value head on the policy)
            self.peft_model.save_pretrained(str(directory), selected_adapters=[name])
            nested = directory / name  # peft nests non-default adapter names in a sub-folder
            if nested.is_dir():
                for item in nested.iterdir():
                    os.replace(item, directory / item.name)
                nested.rmdir()
        if name in self.heads:
            save_file({"weight": self.heads[name].weight.detach().cpu().contiguous()}, str(directory / HEAD_FILE))

