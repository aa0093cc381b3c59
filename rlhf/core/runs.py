"""Reading a stage's output directory, loading it for inference, and checking that PPO's roles can share it.

Every stage writes the same kind of directory (rlhf/core/outputs.py): at its root either a peft adapter
(``adapter_config.json``) or a full model (``config.json``), the tokenizer, and ``config.yaml``, the
stage's resolved settings. The adapter file records the path of the base it was trained on but not
how that base was loaded; ``config.yaml`` does (``peft_method: qlora-4bit`` / ``qlora-8bit``,
``torch_dtype``), so a QLoRA adapter goes back onto the same quantised base it learned against.

    info = read_run("runs/demo/sft")                       # kind, adapter or full model, base, quantisation
    model, tokenizer = load_run("runs/demo/reward", "seq-cls")   # for inference, on the base it trained on
    check_shared_base(sft_dir, reward_dir, model_args)     # PPO: can these roles live on one base?
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from rlhf.core.adapters import HEAD_FILE
from rlhf.core.config import load_yaml
from rlhf.core.errors import UserError
from rlhf.core.models import DEFAULT_MODEL, ModelArguments, default_model_dir, fetch_default_model

TASKS = ("causal-lm", "seq-cls")
LORA_METHODS = ("lora", "qlora-4bit", "qlora-8bit")
# peft_method -> how the base is quantised; every other method loads it unquantised.
QUANTISATION = {"qlora-4bit": "4-bit", "qlora-8bit": "8-bit"}
_KIND_NAMES = {"sft": "an SFT stage output", "reward": "a reward stage output", "ppo": "a PPO stage output"}
_PEFT_NAMES = {"LORA": "LoRA", "PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning",
               "P_TUNING": "p-tuning", "IA3": "IA3"}
_EXPECTED = {
    "causal-lm": "a causal LM (an SFT or PPO stage output, or a model directory)",
    "seq-cls": "a reward model (a reward stage output: an adapter with a score head, or a sequence-classification model)",
}


@dataclass(frozen=True)
class RunInfo:
    """What a stage output directory (or a plain model directory, or a hub id) holds."""

    path: str
    """The directory (``~`` expanded; the embedded default model's cache directory), or the hub id."""
    kind: str | None
    """'sft', 'reward' or 'ppo'; None when no stage wrote it (no config.yaml)."""
    is_adapter: bool
    """A peft adapter (adapter_config.json) rather than a full model (config.json)."""
    peft_type: str | None
    """peft's name of the adapter: LORA, PREFIX_TUNING, PROMPT_TUNING, IA3...; None for a full model."""
    task: str | None
    """'causal-lm' or 'seq-cls' (a score head); None for a hub id, known only once loaded."""
    has_score_head: bool
    """A scalar head comes with it: a SEQ_CLS adapter or model, or a score_head.safetensors beside the adapter."""
    base_model: str
    """What the weights load onto: the adapter's base_model_name_or_path, or the model directory itself."""
    peft_method: str | None
    """The stage's peft_method from its config.yaml; None without one."""
    torch_dtype: str
    """The stage's torch_dtype from its config.yaml; float32 without one."""

    @property
    def quantisation(self) -> str | None:
        """How the base was loaded in training: '4-bit', '8-bit' or 'none'; None when unknown (no config.yaml)."""
        if self.peft_method is None:
            return None
        return QUANTISATION.get(self.peft_method, "none")

    def base_args(self) -> ModelArguments:
        """How to load the base for inference: the stage's quantisation and dtype, no new adapter."""
        method = self.peft_method if self.peft_method in QUANTISATION else "full"
        return ModelArguments(model_name_or_path=self.base_model, peft_method=method, torch_dtype=self.torch_dtype)

    def describe(self) -> str:
        """E.g. 'an SFT stage output (a LoRA adapter for a causal LM)'."""
        if self.is_adapter:
            what = f"a {_PEFT_NAMES.get(self.peft_type, self.peft_type)} adapter"
        else:
            what = "a full model" if self.task else "a hub model"
        if self.has_score_head:
            what += " with a score head"
        elif self.task == "causal-lm":
            what += " for a causal LM"
        return f"{_KIND_NAMES[self.kind]} ({what})" if self.kind else what


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: expected valid JSON, found a syntax error ({e.msg})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def read_run(run_dir: str | os.PathLike) -> RunInfo:
    """Read a stage output directory, a model directory, the embedded default model's name, or a hub id."""
    name = str(run_dir)
    path = Path(name).expanduser()
    if not path.exists():
        if name == DEFAULT_MODEL:
            path = fetch_default_model()
        elif name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
            raise UserError(f"{name}: expected a stage output or model directory (or a hub id), found no such directory")
        else:  # a hub id: nothing to read before loading it
            return RunInfo(path=name, kind=None, is_adapter=False, peft_type=None, task=None, has_score_head=False,
                           base_model=name, peft_method=None, torch_dtype="float32")
    # config.yaml: the stage's resolved settings (ModelArguments among them); absent in a plain model dir.
    stage = load_yaml(path / "config.yaml") if (path / "config.yaml").exists() else None
    if (path / "adapter_config.json").exists():
        config = _read_json(path / "adapter_config.json")
        if not config.get("base_model_name_or_path"):
            raise UserError(f"{path / 'adapter_config.json'}: expected a base_model_name_or_path key, found none")
        seq_cls = config.get("task_type") == "SEQ_CLS"
        is_adapter, peft_type, base = True, config.get("peft_type"), str(config["base_model_name_or_path"])
        has_head = seq_cls or (path / HEAD_FILE).exists()
    elif (path / "config.json").exists():
        architectures = _read_json(path / "config.json").get("architectures") or []
        seq_cls = any(a.endswith("ForSequenceClassification") for a in architectures)
        is_adapter, peft_type, base, has_head = False, None, str(path), seq_cls
    else:
        raise UserError(f"{path}: expected a stage output or model directory (adapter_config.json or config.json), "
                        "found neither")
    if stage is None:
        kind = None
    elif "sft_model" in stage or "reward_model" in stage:
        kind = "ppo"
    else:
        kind = "reward" if has_head else "sft"
    return RunInfo(
        path=str(path), kind=kind, is_adapter=is_adapter, peft_type=peft_type,
        task="seq-cls" if seq_cls else "causal-lm", has_score_head=has_head, base_model=base,
        peft_method=None if stage is None else stage.get("peft_method"),
        torch_dtype=str((stage or {}).get("torch_dtype") or "float32"),
    )


def load_run(run: str | os.PathLike | RunInfo, task: str = "causal-lm", device: str | None = None):
    """(model, tokenizer) of a stage output (or model directory, or hub id), in eval mode, for ``task``.

    An adapter is loaded onto the base it was trained on, loaded as its stage loaded it: a QLoRA
    adapter onto the same 4-/8-bit base, in the stage's dtype (its config.yaml), so it computes
    with the weights it learned against. A reward model needs ``task='seq-cls'``; a stage output of
    the other task is refused rather than given a fresh, random head.
    """
    from peft import PeftModel

    from rlhf.core.models import load_base_model, load_tokenizer

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    info = run if isinstance(run, RunInfo) else read_run(run)
    if info.task is not None and info.task != task:
        raise UserError(f"{info.path}: expected {_EXPECTED[task]}, found {info.describe()}")
    model = load_base_model(info.base_args(), task)
    if info.is_adapter:
        model = PeftModel.from_pretrained(model, info.path)
    own_tokenizer = (Path(info.path) / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(info.path if own_tokenizer or not info.is_adapter else info.base_model)
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# PPO: four roles on one base
# ----------------------------------------------------------------------------------------------


def _local_model_dir(name: str) -> Path | None:
    if name == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _weights_fingerprint(directory: Path) -> str | None:
    """A digest of a model directory's weight files (model*.safetensors, pytorch_model*.bin, *.gguf).

    Files up to 64 MiB are hashed whole; larger ones by their size and 64 chunks of 64 KiB spread
    over the file: a copy matches, while fine-tuning changes (nearly) every weight, so any chunk
    inside a tensor differs. None when the directory holds no weight files.
    """
    files = sorted(p for p in directory.iterdir() if p.is_file() and (
        p.name.startswith(("model", "pytorch_model")) and p.suffix in (".safetensors", ".bin") or p.suffix == ".gguf"))
    if not files:
        return None
    digest = hashlib.sha256()
    chunk, whole = 1 << 16, 1 << 26
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with file.open("rb") as f:
            if size <= whole:
                digest.update(f.read())
                continue
            for i in range(64):
                f.seek((size - chunk) * i // 63)
                digest.update(f.read(chunk))
    return digest.hexdigest()


def same_model(a: str, b: str) -> bool:
    """Whether two model names/paths are the same weights: the same directory, or copies of it."""
    da, db = _local_model_dir(a), _local_model_dir(b)
    if da is None or db is None:
        return a == b
    if da.resolve() == db.resolve():
        return True
    fa = _weights_fingerprint(da)
    return fa is not None and fa == _weights_fingerprint(db)


def _quantised(q: str) -> str:
    return "an unquantised" if q == "none" else f"a {q} quantised"


class SharedBase(NamedTuple):
    """The two stage outputs PPO starts from, and how to load the one base they share."""

    sft: RunInfo
    reward: RunInfo
    base_args: ModelArguments
    """PPO's model settings with model_name_or_path set to the base: the SFT adapter's base, or the full SFT model."""


def check_shared_base(sft_dir: str | os.PathLike, reward_dir: str | os.PathLike,
                      model_args: ModelArguments) -> SharedBase:
    """Refuse, before anything is loaded, SFT and reward outputs whose roles cannot share one base.

    PPO puts policy and reference (from the SFT output) and reward and value (from the reward
    output) on ONE base model loaded with PPO's ``model_args``. That is only right when:

    - the SFT output is a LoRA adapter or a full model (peft cannot mix prefix/prompt/IA3 adapters
      with the LoRA reward and value adapters on one model);
    - the reward output is a LoRA adapter with a score head;
    - both adapters were trained on the same base: the SFT adapter's base, or, for a full SFT
      model (which becomes the base), that SFT model itself;
    - every adapter was trained on the base quantised as PPO loads it (``peft_method`` in the
      stages' config.yaml against PPO's own).

    Each refusal is a :class:`UserError` that says what to run instead.
    """
    sft_dir, reward_dir = Path(sft_dir), Path(reward_dir)
    for what, stage, path in (("sft_model", "sft", sft_dir), ("reward_model", "reward", reward_dir)):
        if not path.exists():
            raise UserError(f"{what}: expected the output directory of the {stage} stage, "
                            f"found no {path} (run that stage first)")
    sft, reward = read_run(sft_dir), read_run(reward_dir)

    # What each output is.
    if sft.has_score_head:
        raise UserError(f"sft_model: expected an SFT stage output in {sft_dir}, found {sft.describe()}")
    if not reward.is_adapter:
        raise UserError(f"reward_model: expected a LoRA reward adapter in {reward_dir} so it can share the base, "
                        f"found {reward.describe()} (train the reward stage with peft_method: lora)")
    if not reward.has_score_head:
        raise UserError(f"reward_model: expected a reward stage output (a LoRA adapter with a score head) in "
                        f"{reward_dir}, found {reward.describe()}")
    if reward.peft_type != "LORA":
        raise UserError(f"reward_model: expected a LoRA reward adapter in {reward_dir}, found {reward.describe()}, "
                        "which peft cannot combine with the policy's LoRA on one base "
                        "(train the reward stage with peft_method: lora, qlora-4bit or qlora-8bit)")
    if sft.is_adapter and sft.peft_type != "LORA":
        method = f" (peft_method: {sft.peft_method})" if sft.peft_method else ""
        raise UserError(f"sft_model: PPO needs a LoRA SFT adapter or a fully fine-tuned SFT model, found "
                        f"{sft.describe()}{method} in {sft_dir}, which peft cannot combine with the LoRA reward and "
                        "value adapters on one base; run the SFT stage with peft_method: lora, qlora-4bit, "
                        "qlora-8bit or full")
    if not sft.is_adapter and model_args.peft_method not in LORA_METHODS:
        raise UserError(f"peft_method: the SFT output {sft_dir} is a full model, on which PPO trains a new policy "
                        f"adapter: expected one of {', '.join(LORA_METHODS)}, found {model_args.peft_method!r}")

    # One base for both.
    if sft.is_adapter:
        base_path = sft.base_model
        if not same_model(reward.base_model, sft.base_model):
            raise UserError(f"reward_model: the roles share one base, but the reward adapter in {reward_dir} was "
                            f"trained on {reward.base_model} and the SFT adapter in {sft_dir} on {sft.base_model}; "
                            f"train the reward stage with model_name_or_path: {sft.base_model}")
    else:
        base_path = str(sft_dir)
        if not same_model(reward.base_model, base_path):
            raise UserError(f"reward_model: the SFT output {sft_dir} is a fully fine-tuned model, which becomes "
                            f"PPO's base, but the reward adapter in {reward_dir} was trained on {reward.base_model}, "
                            f"so it would score with weights it never saw; train the reward stage with "
                            f"model_name_or_path: {sft_dir} (the SFT run, or a merged SFT model)")

    # The same quantisation for every adapter and for PPO's base.
    adapters = ([("SFT", sft_dir, sft)] if sft.is_adapter else []) + [("reward", reward_dir, reward)]
    known = [(name, path, info) for name, path, info in adapters if info.quantisation is not None]
    if len({info.quantisation for _, _, info in known}) > 1:
        (n1, p1, i1), (n2, p2, i2) = known
        raise UserError(f"reward_model: the roles share one base, but the {n2} adapter in {p2} was trained on "
                        f"{_quantised(i2.quantisation)} base (peft_method: {i2.peft_method} in its config.yaml) "
                        f"and the {n1} adapter in {p1} on {_quantised(i1.quantisation)} one (peft_method: "
                        f"{i1.peft_method}); train both stages with the same peft_method")
    ppo_quantisation = QUANTISATION.get(model_args.peft_method, "none")
    for name, path, info in known:
        if info.quantisation != ppo_quantisation:
            expected = {"4-bit": "qlora-4bit", "8-bit": "qlora-8bit"}.get(info.quantisation, "lora")
            raise UserError(f"peft_method: the {name} adapter in {path} was trained on "
                            f"{_quantised(info.quantisation)} base (peft_method: {info.peft_method} in its "
                            f"config.yaml) and PPO must load the base the same way: expected {expected}, "
                            f"found {model_args.peft_method}")
    base_args = ModelArguments(**{**asdict(model_args), "model_name_or_path": base_path})
    return SharedBase(sft, reward, base_args)
