"""Would one forward over several roles' rows beat one forward per role? Side by side in one process.

    .venv/bin/python bench/bench_role_batching.py [--batch_size 8 --seq_len 89 --repeats 3]

PPO's step 3 runs three no-grad forwards over the same rollout: reward, reference and value, each a
LoRA adapter on the one base (``AdapterRegistry.hidden_states``). peft can instead run one forward
over the rows of all three, each row with its own adapter (its ``adapter_names`` mixed batch): the
base matmuls then see three times the rows. Same FLOPs; the question is whether the bigger matmuls
run faster on this machine. Prints the seconds of each way (median of ``--repeats``), their ratio,
and the largest difference between their hidden states. Default model, LoRA on every linear layer
(r 16, random B so the adapters differ), float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROLES = ("reference", "reward", "value")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="rows per role (PPO's batch)")
    p.add_argument("--seq_len", type=int, default=89, help="prompt + reply tokens (bench_ppo's rollouts: about 89)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch
    from peft import LoraConfig

    from rlhf.core.adapters import AdapterRegistry
    from rlhf.core.models import ModelArguments, build_peft_config, load_base_model

    torch.manual_seed(0)
    model_args = ModelArguments()
    base = load_base_model(model_args)
    registry = AdapterRegistry(base)
    config: LoraConfig = build_peft_config(model_args, base)
    config.init_lora_weights = False  # random B: the three adapters really differ
    for role in ROLES:
        registry.add(role, config, trainable=False)
    model = registry.peft_model.eval()
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))
    mask = torch.ones_like(ids)

    def per_role() -> list[torch.Tensor]:
        return [registry.hidden_states(role, ids, mask) for role in ROLES]

    def mixed() -> list[torch.Tensor]:
        names = [role for role in ROLES for _ in range(args.batch_size)]
        # The hook peft's own forward installs for `adapter_names`; entered here so that the
        # transformer body runs without the LM head, as in hidden_states.
        with model.base_model._enable_peft_forward_hooks(adapter_names=names):
            hidden = model.get_base_model().base_model(input_ids=ids.repeat(len(ROLES), 1),
                                                       attention_mask=mask.repeat(len(ROLES), 1),
                                                       use_cache=False).last_hidden_state
        return list(hidden.split(args.batch_size))

    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(per_role(), mixed()))
        seconds: dict[str, list[float]] = {"per_role": [], "mixed": []}
        for _ in range(args.repeats):  # taking turns, so that a busy machine slows both alike
            for name, fn in (("per_role", per_role), ("mixed", mixed)):
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    one, together = statistics.median(seconds["per_role"]), statistics.median(seconds["mixed"])
    print(f"{len(ROLES)} roles x {args.batch_size} rows x {args.seq_len} tokens, {torch.get_num_threads()} threads")
    print(f"  one forward per role   {one:.2f} s")
    print(f"  one mixed forward      {together:.2f} s")
    print(f"  mixed / per role       {together / one:.2f}  (below 1 = batching the roles would pay)")
    print(f"  max |hidden difference| {diff:.2e}")


if __name__ == "__main__":
    main()
