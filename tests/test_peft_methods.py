"""Every PEFT method trains a step through the SFT stage, saves, and loads back for generation.

The trained model's logits on a fixed input are recorded inside the run (a TrainerCallback at the
start and at the end of training); the saved output, loaded with ``load_for_generation``, must give
the end-of-training logits and its trainable tensors must equal the trained ones, and training must
have moved the logits away from the start.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from rlhf.core.data import write_jsonl
from rlhf.core.hooks import with_trainer_callbacks
from rlhf.core.formatting import encode_prompt_reply
from rlhf.core.generation import load_for_generation
from rlhf.core.models import ModelArguments, build_peft_config, find_target_modules, load_base_model, load_tokenizer
from sft.train import run

LLAMA_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
WORDS = ["coffee", "tea", "pizza", "bread", "cheese", "apple", "mango", "pasta"]


class Recorder(TrainerCallback):
    """Logits on ``input_ids`` (eval mode, no grad) at train begin/end, and the trained tensors."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids
        self.logits: dict[str, torch.Tensor] = {}
        self.trained: dict[str, torch.Tensor] = {}

    def _logits(self, model) -> torch.Tensor:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ids = self.input_ids.to(next(model.parameters()).device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()
        model.train(was_training)
        return out

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.logits["begin"] = self._logits(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits["end"] = self._logits(model)
        self.trained = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft-data") / "sft.jsonl"
    write_jsonl(path, [{"prompt": f"write a short review of the {w}", "completion": f"the {w} is good ."}
                       for w in WORDS])
    return path


@pytest.mark.parametrize("method", ["full", "lora", "qlora-4bit", "qlora-8bit", "prefix", "prompt", "ia3"])
@pytest.mark.slow
def test_method_trains_saves_and_loads(method, sft_file, tiny_model_dir, tiny_model_dir_4bit, tmp_path):
    model_dir = tiny_model_dir_4bit if method == "qlora-4bit" else tiny_model_dir
    tokenizer = load_tokenizer(str(model_dir))
    ids, _ = encode_prompt_reply(tokenizer, "write a short review of the tea", "the tea is good .")
    recorder = Recorder(torch.tensor([ids]))
    out = tmp_path / method
    metrics = run(argv=[
        "--model_name_or_path", str(model_dir), "--train_file", str(sft_file), "--output_dir", str(out),
        "--peft_method", method, "--validation_size", "0", "--test_size", "0",
        "--max_steps", "1", "--warmup_steps", "0", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--lora_r", "4", "--lora_alpha", "8", "--num_virtual_tokens", "4", "--lora_dropout", "0",
    ], hooks=with_trainer_callbacks(recorder))
    assert metrics["peft_method"] == method
    assert 0 < metrics["trainable_parameters"] <= metrics["total_parameters"]
    if method == "full":
        assert metrics["trainable_parameters"] == metrics["total_parameters"]
        assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    else:
        assert metrics["trainable_parameters"] < metrics["total_parameters"] / 2
        assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

    # Training changed the model.
    assert (recorder.logits["end"] - recorder.logits["begin"]).abs().max() > 1e-6

    model, _ = load_for_generation(str(out))
    loaded = dict(model.named_parameters())
    assert recorder.trained
    for name, tensor in recorder.trained.items():
        torch.testing.assert_close(loaded[name].detach().float(), tensor, rtol=0, atol=0, msg=name)
    # Same weights, same logits: QLoRA adapters load onto the same quantised base they trained on
    # (bitsandbytes' inference kernels differ from its training ones in the last digits).
    tolerance = 1e-2 if method.startswith("qlora") else 1e-5
    torch.testing.assert_close(recorder._logits(model), recorder.logits["end"], rtol=tolerance, atol=tolerance)


# ----------------------------------------------------------------------------------------------
# find_target_modules
# ----------------------------------------------------------------------------------------------


def test_targets_of_llama_causal_lm_and_score_model(tiny_model_dir):
    args = ModelArguments(model_name_or_path=str(tiny_model_dir), peft_method="full")
    assert find_target_modules(load_base_model(args, "causal-lm")) == LLAMA_LINEAR  # not lm_head
    assert find_target_modules(load_base_model(args, "seq-cls")) == LLAMA_LINEAR  # not score


def test_targets_of_4bit_llama(tiny_model_dir_4bit):
    model = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir_4bit), peft_method="qlora-4bit"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert find_target_modules(model) == LLAMA_LINEAR


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def test_targets_of_gpt2_conv1d_layers_and_lora_trains_them():
    model = _gpt2()
    # GPT-2's projections are transformers' Conv1D, not nn.Linear; the head (lm_head) is left out.
    assert find_target_modules(model) == ["c_attn", "c_fc", "c_proj"]

    from peft import get_peft_model

    peft_model = get_peft_model(model, build_peft_config(ModelArguments(peft_method="lora", lora_r=4), model))
    adapted = {n.split(".lora_A")[0] for n, p in peft_model.named_parameters() if "lora_A" in n}
    assert any(n.endswith("attn.c_attn") for n in adapted) and any(n.endswith("mlp.c_fc") for n in adapted)
    assert not any("lm_head" in n for n, _ in peft_model.named_parameters() if "lora" in n)
    ids = torch.randint(0, 64, (2, 8))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_targets_of_opt():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                     vocab_size=64, word_embed_proj_dim=32, max_position_embeddings=32))
    assert find_target_modules(model) == ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"]
