#!/usr/bin/env bash
# One node, several GPUs, through the DeepSpeed launcher (NCCL, bf16 from the preset).
#   NUM_GPUS=8 scripts/train_multi_gpu.sh --preset small run.zero_stage=3
# The interpreter is the project's .venv/bin/python unless PYTHON is set (scripts/python_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" \
  --master_port "${MASTER_PORT:-29500}" --module cpd_mtp.training.trainer "$@"
