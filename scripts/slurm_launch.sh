#!/usr/bin/env bash
# Run one stage on several nodes of a SLURM cluster with accelerate (one task per node).
#
#   sbatch --nodes 2 --gres gpu:8 scripts/slurm_launch.sh ppo configs/ppo.yaml
#   sbatch --nodes 4 --gres gpu:8 scripts/slurm_launch.sh sft configs/sft.yaml configs/accelerate/fsdp.yaml
#
# Arguments: STAGE (sft | reward | ppo), STAGE_CONFIG, optional ACCELERATE_CONFIG (default ddp.yaml),
# then any --key value overrides for the stage.
#SBATCH --job-name=rlhf
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

STAGE=${1:?stage: sft, reward or ppo}
STAGE_CONFIG=${2:?stage config, e.g. configs/ppo.yaml}
ACCEL_CONFIG=${3:-configs/accelerate/ddp.yaml}
shift $(( $# >= 3 ? 3 : $# ))

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
VENV=${VENV:-.venv}

# srun starts one launcher per node; each learns its rank from SLURM_NODEID.
srun bash -c "$VENV/bin/accelerate launch \
  --config_file $ACCEL_CONFIG \
  --num_machines $NNODES \
  --num_processes $(( NNODES * GPUS_PER_NODE )) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MASTER_ADDR \
  --main_process_port $MASTER_PORT \
  scripts/$STAGE.py --config $STAGE_CONFIG $*"
