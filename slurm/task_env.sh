#!/usr/bin/env bash
# One training rank: torch.distributed's variables from Slurm's, then the command, unchanged.
#
# srun starts this once per task (one task per GPU). RANK and LOCAL_RANK differ between tasks, so the
# batch script cannot set them; Slurm's per-task variables carry them here. MASTER_ADDR/MASTER_PORT
# come from train_large.sh. The command arrives as "$@" and is exec'd as-is: nothing is re-parsed.
# With ELT_DRY_RUN=1 the exact command line (with its environment) is printed instead of run.
set -euo pipefail

: "${SLURM_PROCID:?task_env.sh runs under srun (or train_large.sh dry run)}"
: "${MASTER_ADDR:?MASTER_ADDR is set by train_large.sh}"
: "${MASTER_PORT:?MASTER_PORT is set by train_large.sh}"
export RANK="$SLURM_PROCID"
export WORLD_SIZE="$SLURM_NTASKS"
export LOCAL_RANK="$SLURM_LOCALID"
export NODE_RANK="$SLURM_NODEID"
# One intra-op thread pool per CPU the task was given (torchrun's default is 1): without it every
# rank spins up a thread per core of the node and the ranks of one node oversubscribe it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

if [ "${ELT_DRY_RUN:-0}" = 1 ]; then
  line=(env "RANK=$RANK" "WORLD_SIZE=$WORLD_SIZE" "LOCAL_RANK=$LOCAL_RANK" "NODE_RANK=$NODE_RANK"
        "OMP_NUM_THREADS=$OMP_NUM_THREADS" "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "$@")
  printf 'dry-run %s rank %s: ' "${SLURMD_NODENAME:-$(hostname -s)}" "$RANK"
  printf '%q ' "${line[@]}"
  printf '\n'
  exit 0
fi
exec "$@"
