#!/usr/bin/env bash
# What a GPU machine must check that a CPU machine cannot: FSDP and DeepSpeed ZeRO-2/3 (with and
# without CPU offload) for SFT and reward, and PPO data-parallel and FSDP-sharded on CUDA. For a GPU machine:
#   bash scripts/gpu_distributed_check.sh [NUM_GPUS]
# 1. tests/test_distributed.py's GPU tests: a tiny model under each sharded config in fp32, held
#    against one process on the same global batch (losses and the LoRA update match, the adapter is
#    saved whole at the output's root). With 2 or more GPUs, the whole file: the 2-process PPO tests
#    then run on NCCL.
# 2. The demo configs in bf16 under each sharded config, a few steps each, then PPO under DDP from
#    the FSDP runs' outputs; every run must finish with finite metrics and a LoRA update that is not zero.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$(nvidia-smi -L | wc -l)}
PY=${PY:-.venv/bin/python}
$PY -c "import deepspeed" 2>/dev/null || $PY -m pip install -q deepspeed

echo "== tests/test_distributed.py on $N GPU(s)"
if [ "$N" -ge 2 ]; then
  $PY -m pytest -q -rs tests/test_distributed.py
else
  $PY -m pytest -q -rs -m gpu tests/test_distributed.py
fi

check_run() {  # a complete run: finite metrics, an adapter at the root with finite weights and a LoRA update
  $PY - "$1" <<'EOF'
import json, math, sys
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
metrics = json.loads((out / "metrics.json").read_text())
bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
assert not bad, f"{out}: non-finite metrics {bad}"
weights = load_file(str(out / "adapter_model.safetensors"))
assert all(v.float().isfinite().all() for v in weights.values()), f"{out}: non-finite adapter weights"
lora_b = [v for k, v in weights.items() if "lora_B" in k]  # peft starts lora_B at zero
assert lora_b and any(v.float().abs().max() > 0 for v in lora_b), f"{out}: the LoRA update is zero"
print(f"{out}: ok, train_loss {metrics.get('train_loss')}")
EOF
}

$PY -m rlhf.app.cli model fetch
for cfg in fsdp deepspeed_zero2 deepspeed_zero2_offload deepspeed_zero3 deepspeed_zero3_offload; do
  for stage in sft reward; do
    out=runs/gpu-check/$cfg/$stage
    rm -rf "$out" "$out.tmp"
    echo "== $cfg / $stage"
    $PY -m accelerate.commands.launch --config_file configs/accelerate/$cfg.yaml --num_processes "$N" \
      scripts/$stage.py --config configs/$stage.yaml --output_dir "$out" --max_steps 5 --eval_steps 5 \
      --save_steps 5 --torch_dtype bfloat16 --bf16 true
    check_run "$out"
  done
done
check_ppo() {  # PPO from the FSDP runs' outputs under accelerate config $1, 3 steps in bf16, into runs/gpu-check/$2
  out=runs/gpu-check/$2
  rm -rf "$out" "$out.tmp"
  $PY -m accelerate.commands.launch --config_file configs/accelerate/$1.yaml --num_processes "$N" scripts/ppo.py \
    --config configs/ppo.yaml --sft_model runs/gpu-check/fsdp/sft --reward_model runs/gpu-check/fsdp/reward \
    --output_dir "$out" --max_steps 3 --torch_dtype bfloat16
  check_run "$out"
}
echo "== ppo (DDP, bf16)"
check_ppo ddp ppo
if [ "$N" -ge 2 ]; then  # one process shards nothing (PPO refuses it)
  echo "== ppo (FSDP2: the shared base sharded, bf16)"
  check_ppo ppo_fsdp ppo_fsdp
fi
echo "all GPU distributed checks passed"
