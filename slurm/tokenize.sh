#!/usr/bin/env bash
# Tokenize a dataset as a Slurm array: task i encodes slice i of the (shuffled) inputs on its GPU, then a
# merge job (afterok on the whole array) joins the per-rank manifests into manifest.json.
#
#   sbatch --array=0-15 slurm/tokenize.sh --source imagenet --input /data/imagenet/train \
#          --tokenizer sd-vae --tokenizer-path stabilityai/sd-vae-ft-ema --out /data/shards/in256-sdvae
#   sbatch slurm/tokenize.sh --source digits --out shards/digits        (no --array: one task, merged at once)
#
# Arguments are data_prep/tokenize.py's, passed through untouched. Rank and world size come from the
# array (task id minus the first id, task count; tokenize.py reads them), so the array must be a
# contiguous range (0-15 or 0-15%4, not 0,2,4). The array's first task submits the merge job
# (`--dependency=afterok:<array job>`): it starts once every task succeeded; if a task fails it is
# cancelled, and rerunning the array (finished shards are skipped) plus `tokenize.py --merge --out DIR`
# completes the data set. Env file and logs as in train_large.sh: $ELT_ENV_FILE or slurm/env.sh;
# slurm/logs/<job name>-<array job>_<task>.out and $ELT_LOG_DIR/<job name>-<array job>_merge.out.
#
#SBATCH --job-name=elt-tokenize
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=slurm/logs/%x-%A_%a.out
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi

# sbatch runs a copy of this script from the spool directory: find the checkout from the submit dir.
cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [ ! -f slurm/job_setup.sh ]; then
  echo "tokenize.sh: submit from the elt-scale checkout (no slurm/job_setup.sh in $PWD)" >&2
  exit 2
fi
source slurm/job_setup.sh tokenize.sh data_prep/tokenize.py   # checks the checkout, sources the env file

if [ "${ELT_TOKENIZE_MERGE:-0}" = 1 ]; then
  # The merge job: a plain job, whatever array variables its submitter's environment carried.
  unset SLURM_ARRAY_TASK_ID SLURM_ARRAY_TASK_MIN SLURM_ARRAY_TASK_MAX SLURM_ARRAY_TASK_COUNT SLURM_ARRAY_JOB_ID
  echo "tokenize.sh: merging rank manifests (job $SLURM_JOB_ID)"
  exec python data_prep/tokenize.py "$@" --merge
fi

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  span=$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))
  if [ "$span" -ne "$SLURM_ARRAY_TASK_COUNT" ]; then
    echo "tokenize.sh: --array must be a contiguous range (ids $SLURM_ARRAY_TASK_MIN..$SLURM_ARRAY_TASK_MAX," \
         "$SLURM_ARRAY_TASK_COUNT tasks)" >&2
    exit 2
  fi
  echo "tokenize.sh: array job $SLURM_ARRAY_JOB_ID task $SLURM_ARRAY_TASK_ID:" \
       "rank $((SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN)) of $SLURM_ARRAY_TASK_COUNT on $(hostname -s)"
  if [ "$SLURM_ARRAY_TASK_ID" = "$SLURM_ARRAY_TASK_MIN" ] && [ "$SLURM_ARRAY_TASK_COUNT" -gt 1 ]; then
    log_dir="${ELT_LOG_DIR:-slurm/logs}"
    mkdir -p "$log_dir"
    merge_job=$(sbatch --parsable --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes \
      --job-name="$SLURM_JOB_NAME-merge" --partition="$SLURM_JOB_PARTITION" --nodes=1 --ntasks=1 \
      --gpus-per-node=0 --cpus-per-task=1 --time=1:00:00 \
      --output="$log_dir/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID}_merge.out" \
      --export=ALL,ELT_TOKENIZE_MERGE=1 slurm/tokenize.sh "$@")
    echo "tokenize.sh: merge job $merge_job waits for array job $SLURM_ARRAY_JOB_ID"
  fi
fi
exec python data_prep/tokenize.py "$@"
