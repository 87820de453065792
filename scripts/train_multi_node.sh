#!/usr/bin/env bash
# Several nodes through the DeepSpeed launcher and a hostfile (one "host slots=N" line per node,
# see scripts/hostfile.example). Run on the first node; it reaches the others over passwordless
# ssh, and every node needs the same checkout, environment and data cache path.
#   HOSTFILE=scripts/hostfile scripts/train_multi_node.sh --preset small run.out_dir=/shared/run1
# The interpreter is the project's .venv/bin/python unless PYTHON is set (scripts/python_env.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"
HOSTFILE=${HOSTFILE:-scripts/hostfile}
if [ ! -f "$HOSTFILE" ]; then
  echo "error: hostfile $HOSTFILE not found (copy scripts/hostfile.example)" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module cpd_mtp.training.trainer "$@"
