"""rlhf export: a standalone model directory that bare transformers loads and that decodes like the run.

The SFT run is the tiny preset (configs/tiny/sft.yaml) on the tiny random model. Four steps move a
LoRA adapter too little to change a random model's greedy replies, so after training its lora_B
matrices are replaced by random ones: the adapter then changes the replies (checked against the
base), and an export that dropped or mis-scaled it would not match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.app.cli import main
from rlhf.core.formatting import encode_prompt
from rlhf.core.generation import SamplingArguments, load_for_generation

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["write a short review of the tea", "describe the river", "what do you think of the city ?",
           "give one sentence about a good book"]


def _tiny_sft(model_dir: Path, out: Path, *extra: str) -> Path:
    from sft.train import run

    run(argv=["--config", str(REPO / "configs/tiny/sft.yaml"), "--model_name_or_path", str(model_dir),
              "--output_dir", str(out), "--train_file", str(REPO / "data/demo/sft_train.jsonl"),
              "--validation_file", str(REPO / "data/demo/sft_validation.jsonl"),
              "--test_file", str(REPO / "data/demo/sft_test.jsonl"), *extra])
    return out


def _randomise_lora_b(run_dir: Path, scale: float = 0.3) -> None:
    weights_file = run_dir / "adapter_model.safetensors"
    weights = load_file(weights_file)
    gen = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(tensor.shape, generator=gen) * scale
    save_file(weights, weights_file)


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> list[int]:
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    kwargs = SamplingArguments(do_sample=False, max_new_tokens=max_new_tokens).generation_kwargs(tokenizer)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = _tiny_sft(tiny_model_dir, tmp_path_factory.mktemp("export") / "sft")
    _randomise_lora_b(run_dir)
    return run_dir


@pytest.mark.slow
def test_export_loads_with_bare_transformers_and_decodes_like_the_adapter(sft_run, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert main(["export", str(sft_run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "adapter_config.json" not in names and not (tmp_path / "exported.tmp").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the chat template travels with the model
    adapter_model, adapter_tokenizer = load_for_generation(str(sft_run))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    moved = 0
    for prompt in PROMPTS:
        assert encode_prompt(tokenizer, prompt) == encode_prompt(adapter_tokenizer, prompt)
        expected = _greedy(adapter_model, adapter_tokenizer, prompt)
        assert _greedy(merged, tokenizer, prompt) == expected, prompt
        moved += _greedy(base, tokenizer, prompt) != expected
    assert moved > 0, "the adapter should change the greedy replies, or the test proves nothing"

    # The toolkit's sampling settings, spelled out for a bare generate().
    gen = json.loads((out / "generation_config.json").read_text())
    defaults = SamplingArguments()
    assert gen["eos_token_id"] == tokenizer.eos_token_id and gen["pad_token_id"] == tokenizer.pad_token_id
    assert (gen["max_new_tokens"], gen["temperature"], gen["do_sample"]) == (
        defaults.max_new_tokens, defaults.temperature, True)


@pytest.mark.slow
def test_export_bfloat16(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    assert main(["export", str(sft_run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "export.json").read_text())["dtype"] == "bfloat16"


def test_full_model_is_copied(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "copy"
    assert main(["export", str(tiny_model_dir), "--out", str(out)]) == 0
    original = load_file(tiny_model_dir / "model.safetensors")
    copied = load_file(out / "model.safetensors")
    assert original.keys() == copied.keys() and all(torch.equal(original[k], copied[k]) for k in original)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert _greedy(AutoModelForCausalLM.from_pretrained(out), tokenizer, PROMPTS[0]) == \
        _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, PROMPTS[0])


@pytest.mark.slow
def test_push_to_hub_without_a_hub_is_one_line_and_writes_nothing(sft_run, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    out = tmp_path / "pushed"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["export", str(sft_run), "--out", str(out), "--push_to_hub", "someone/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --push_to_hub someone/tiny: expected a reachable hub") and "\n" not in err
    # Not offline by setting, but no network (these machines reach no hub): the same kind of line.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["export", str(sft_run), "--out", str(out), "--push_to_hub", "someone/tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --push_to_hub someone/tiny: expected a reachable hub") and "\n" not in err
    assert not out.exists() and not (tmp_path / "pushed.tmp").exists()


@pytest.mark.slow
def test_a_failure_while_writing_leaves_nothing(sft_run, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken)
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        main(["export", str(sft_run), "--out", str(out)])
    assert not out.exists() and not (tmp_path / "broken.tmp").exists()


def _fake_adapter(path: Path, base: Path, **config) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), **config}))
    return path


@pytest.mark.parametrize("config, expected", [
    ({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"}, "expected a LoRA or IA3 adapter"),
    ({"peft_type": "LORA", "task_type": "SEQ_CLS"}, "expected a causal LM"),
])
def test_unmergeable_runs_are_refused(config, expected, tiny_model_dir, tmp_path, capsys):
    run_dir = _fake_adapter(tmp_path / "run", tiny_model_dir, **config)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(run_dir) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["export", str(tiny_model_dir), "--out", str(tmp_path / "out")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_run_merges_into_its_dequantised_base(tiny_model_dir_4bit, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = _tiny_sft(tiny_model_dir_4bit, tmp_path / "sft", "--peft_method", "qlora-4bit", "--max_steps", "1",
                        "--eval_steps", "1", "--save_steps", "1")
    _randomise_lora_b(run_dir, scale=0.05)
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    qlora, tokenizer = load_for_generation(str(run_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir_4bit).eval()
    ids = torch.tensor([encode_prompt(tokenizer, p) for p in PROMPTS[:1]])
    with torch.no_grad():
        want, got, before = qlora(ids).logits, merged(ids).logits, base(ids).logits
    # The 4-bit kernel and the dequantised float weights agree up to rounding; the adapter moved far more.
    assert (got - want).abs().max() < 2e-2 < (before - want).abs().max()
