#!/usr/bin/env bash
# Multi-process training on CPU: torchrun, the gloo backend, DeepSpeed's CPU accelerator.
#   NPROC=2 scripts/train_cpu.sh --preset tiny run.zero_stage=3
# CI's multi-process tests launch through this script. The interpreter is the project's
# .venv/bin/python unless PYTHON is set (scripts/python_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
NPROC=${NPROC:-2}
export DS_ACCELERATOR=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC" \
  --master_port "${MASTER_PORT:-29500}" -m cpd_mtp.training.trainer "$@"
