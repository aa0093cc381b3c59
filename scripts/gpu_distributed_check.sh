#!/usr/bin/env bash
# Runs the SFT and reward stages under every accelerate config that needs a GPU (FSDP, DeepSpeed
# ZeRO-2/3 with and without offload), a few steps each, on the demo data. For a GPU machine:
#   bash scripts/gpu_distributed_check.sh [NUM_GPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$(nvidia-smi -L | wc -l)}
PY=${PY:-.venv/bin/python}
$PY -c "import deepspeed" 2>/dev/null || $PY -m pip install -q deepspeed
for cfg in fsdp deepspeed_zero2 deepspeed_zero2_offload deepspeed_zero3 deepspeed_zero3_offload; do
  for stage in sft reward; do
    out=runs/gpu-check/$cfg/$stage
    rm -rf "$out" "$out.tmp"
    echo "== $cfg / $stage"
    $PY -m accelerate.commands.launch --config_file configs/accelerate/$cfg.yaml --num_processes "$N" \
      scripts/$stage.py --config configs/$stage.yaml --output_dir "$out" --max_steps 5 --eval_steps 5 \
      --save_steps 5 --torch_dtype bfloat16 --bf16 true
    test -f "$out/metrics.json"
  done
done
echo "== ppo (DDP, bf16)"
$PY -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes "$N" scripts/ppo.py \
  --config configs/ppo.yaml --sft_model runs/gpu-check/fsdp/sft --reward_model runs/gpu-check/fsdp/reward \
  --output_dir runs/gpu-check/ppo --max_steps 3 --torch_dtype bfloat16
echo "all GPU distributed checks passed"
