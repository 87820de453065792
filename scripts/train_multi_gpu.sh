#!/usr/bin/env bash
# One node, several GPUs, through the DeepSpeed launcher (NCCL, bf16 from the preset).
#   NUM_GPUS=8 scripts/train_multi_gpu.sh --preset small run.zero_stage=3
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
  --module cpd_mtp.training.trainer "$@"
