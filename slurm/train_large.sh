#!/usr/bin/env bash
# Multi-node ELT training: one srun task per GPU, each a rank of `python -m elt_scale.train`.
#
#   sbatch slurm/train_large.sh RECIPE.yaml [key.sub=value ...]          (submit from the checkout)
#   sbatch --nodes 16 slurm/train_large.sh recipes/imagenet256_masked_elt_xl_7x4.yaml
#   ELT_DRY_RUN=1 sbatch slurm/train_large.sh RECIPE.yaml ...   print each node's exact commands, train nothing
#   ELT_DRY_RUN=1 bash slurm/train_large.sh RECIPE.yaml ...     the same without a cluster: the default layout
#                                                               below (2 nodes × 8 = 16 ranks) on nodes node0..;
#                                                               SLURM_JOB_NUM_NODES=16 for what --nodes 16 runs
#
# Ranks: srun starts --ntasks-per-node tasks on every node (one per GPU); slurm/task_env.sh turns
# SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID into RANK/WORLD_SIZE/LOCAL_RANK. Rendezvous: the first host
# of the allocation, on a port derived from the job id. Every rank is a direct child of Slurm, so a
# signal from Slurm reaches every rank itself (no launcher in between that could die of it).
#
# Preemption: `--signal=USR1@300` (no B: prefix) sends USR1 to every process of the job *steps*, i.e.
# to each rank, 5 minutes before the time limit; `scancel --signal=USR1 JOB` does the same by hand.
# The trainer then checkpoints at the next step boundary and exits 75; this script requeues the job
# (`scontrol requeue`), and the requeued job resumes from the checkpoint (train.resume=auto). The batch
# shell is deliberately not signalled: it keeps waiting for srun and sees the exit code.
#
# Faults: every attempt is one `srun --kill-on-bad-exit=1` step, so one dead rank ends all of them at
# once. A failed attempt (a rank killed, OOM, a collective timeout, the step watchdog) is restarted in
# the same allocation as a new step on a new rendezvous port, resuming from the last complete
# checkpoint, up to $ELT_MAX_RESTARTS times (default 3); that includes exit 69 (storage unreachable for
# data.io_retry_s: the restart resumes once it is back). Exit 2 (bad recipe/data), 3 (numerics guard) and
# 74 (a checkpoint or log could not be written: disk full, quota) are never retried. When the allocation
# itself is broken (a node down, srun cannot start the step) the job requeues instead (also counted).
#
# The restart budget belongs to one submission of the job, kept across its requeues, not to its job id:
# ids start again at 1 on a re-created cluster, and a new job must not inherit an old job's count. It is
# counted in <log dir>/restarts.<submitted>, <submitted> being the SubmitTime (YYYYMMDDTHHMMSS) that the
# job's first run sees (SLURM_RESTART_COUNT unset: a new submission); <log dir>/restarts links to it. A
# requeued run (SLURM_RESTART_COUNT >= 1) follows that link back to its submission's count: it cannot ask
# Slurm, which resets SubmitTime at every requeue. The batch log names the submission it counts for.
#
# Cluster settings (modules, venv, NCCL/GLOO interfaces, IB HCAs) live in an env file, not here:
# $ELT_ENV_FILE, else slurm/env.sh if present (see slurm/env.example.sh).
# Logs: slurm/logs/<job name>-<job id>.out (this script) and $ELT_LOG_DIR (default slurm/logs)/<job
# name>-<job id>/node<i>-<host>.log (all ranks of the job's i-th node, lines prefixed with the rank);
# a requeued run appends to both.
#
# Defaults a user edits in one place (or overrides on the sbatch command line):
#SBATCH --job-name=elt-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
set -euo pipefail

PREEMPT_EXIT_CODE=75   # elt_scale.engine.preemption.PREEMPT_EXIT_CODE
NEVER_RETRIED=(2 3 74) # bad recipe/data/resume path, numerics guard, disk full: the same again on a restart
MAX_RESTARTS="${ELT_MAX_RESTARTS:-3}"

if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  sed -n '2,/^# Defaults a user edits/p' "${BASH_SOURCE[0]}" | head -n -2 | sed 's/^# \{0,1\}//'
  exit 2
fi

# sbatch runs a copy of this script from the spool directory: find the checkout from the submit dir.
cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [ ! -f slurm/job_setup.sh ]; then
  echo "train_large.sh: submit from the elt-scale checkout (no slurm/job_setup.sh in $PWD)" >&2
  exit 2
fi
source slurm/job_setup.sh train_large.sh slurm/task_env.sh   # checks the checkout, sources the env file
DRY_RUN="${ELT_DRY_RUN:-0}"
export ELT_DRY_RUN="$DRY_RUN"

# Outside a job only a dry run makes sense: show it for a made-up allocation of the layout sbatch would give,
# the #SBATCH defaults at the top (SLURM_JOB_NUM_NODES / SLURM_NTASKS_PER_NODE, as `sbatch --nodes N
# --ntasks-per-node T` would set them, override those), on nodes named node0, node1, ...
sbatch_default() { sed -n "s/^#SBATCH --$1=\([0-9][0-9]*\)\$/\1/p" "${BASH_SOURCE[0]}" | head -n 1; }
if [ -z "${SLURM_JOB_ID:-}" ]; then
  [ "$DRY_RUN" = 1 ] || { echo "train_large.sh: not inside a Slurm job; use sbatch (or ELT_DRY_RUN=1)" >&2; exit 2; }
  num_nodes="${SLURM_JOB_NUM_NODES:-$(sbatch_default nodes)}"
  NODES=()
  for ((i = 0; i < num_nodes; i++)); do NODES+=("node$i"); done
  TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$(sbatch_default ntasks-per-node)}"
  export SLURM_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-$(sbatch_default cpus-per-task)}"
  SLURM_JOB_ID=0 SLURM_JOB_NAME=elt-train
else
  mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / ${#NODES[@]}))}"   # --ntasks-per-node, or spread --ntasks
fi

export MASTER_ADDR="${NODES[0]}"
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))   # the first attempt's; a restart moves it (below)
LOG_DIR="${ELT_LOG_DIR:-slurm/logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"
TRAIN=(python -m elt_scale.train "$@")
SRUN=(srun --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=1 --label
      --output="$LOG_DIR/node%n-%N.log" --open-mode=append slurm/task_env.sh "${TRAIN[@]}")

echo "train_large.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${#NODES[@]} nodes (${NODES[*]})," \
     "$TASKS_PER_NODE ranks per node, rendezvous $MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR/"
printf 'command:'; printf ' %q' "${SRUN[@]}"; printf '\n'

if [ "$DRY_RUN" = 1 ]; then
  if [ "$SLURM_JOB_ID" = 0 ]; then         # no cluster: run task_env.sh for every would-be task here
    for node_rank in "${!NODES[@]}"; do
      for ((local = 0; local < TASKS_PER_NODE; local++)); do
        SLURMD_NODENAME="${NODES[$node_rank]}" SLURM_NODEID="$node_rank" SLURM_LOCALID="$local" \
        SLURM_PROCID=$((node_rank * TASKS_PER_NODE + local)) SLURM_NTASKS=$((${#NODES[@]} * TASKS_PER_NODE)) \
          slurm/task_env.sh "${TRAIN[@]}"
      done
    done
  else                                     # every task prints its own line from its own node
    srun --ntasks-per-node="$TASKS_PER_NODE" --kill-on-bad-exit=0 slurm/task_env.sh "${TRAIN[@]}" | sort
  fi
  exit 0
fi

mkdir -p "$LOG_DIR"
SRUN_ERR="$LOG_DIR/srun.err"          # srun's own messages of the last attempt: which task ended how

# Which submission of this job id the restart budget is counted for (see the header): the SubmitTime of
# its first run, recorded as the target of the link <log dir>/restarts for its requeued runs.
RESTARTS_LINK="$LOG_DIR/restarts"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] && [[ "$(readlink "$RESTARTS_LINK" 2>/dev/null)" =~ ^restarts\.([0-9]{8}T[0-9]{6})$ ]]; then
  SUBMITTED="${BASH_REMATCH[1]}"       # requeued: the submission its first run recorded
else                                   # a new submission (or a requeue that never ran this far): start at 0
  SUBMITTED=$(squeue -h -j "$SLURM_JOB_ID" -o %V 2>/dev/null | head -n 1) || true
  [[ "$SUBMITTED" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$ ]] || SUBMITTED=$(date +%FT%T)
  SUBMITTED="${SUBMITTED//[-:]/}"
  echo 0 > "$LOG_DIR/restarts.$SUBMITTED"
  ln -sfn "restarts.$SUBMITTED" "$RESTARTS_LINK"
fi
RESTARTS_FILE="$LOG_DIR/restarts.$SUBMITTED"  # restarts so far, across requeues of this submission
INSTANCE="job $SLURM_JOB_ID submitted ${SUBMITTED:0:4}-${SUBMITTED:4:2}-${SUBMITTED:6:2}T${SUBMITTED:9:2}:${SUBMITTED:11:2}:${SUBMITTED:13:2}"

# The checkpoint a restart resumes from, for the log ("step N (...)"); needs only the recipe.
resume_point() {
  local run_dir tag
  run_dir=$(python -c 'import sys; from elt_scale.config import load_recipe
print(load_recipe(sys.argv[1], sys.argv[2:]).run_dir)' "${TRAIN[@]:3}" 2>/dev/null) || true
  tag=$(cat "$run_dir/ckpt/latest" 2>/dev/null) || true
  if [[ "$tag" =~ ^step_0*([0-9]+)$ ]]; then
    echo "step ${BASH_REMATCH[1]} ($run_dir/ckpt/$tag)"
  else
    echo "the start (no checkpoint yet)"
  fi
}

# srun reports each failed task as "srun: error: NODE: task N: Exited with exit code C" / "...: Killed".
task_exits() { grep -oE '[^ ]+: tasks? [0-9,-]+: .*' "$SRUN_ERR" || true; }
task_exited_with() { grep -qE ": tasks? [0-9,-]+: Exited with exit code $1\$" "$SRUN_ERR"; }

# The allocation cannot run a step any more: one of its nodes is down, draining or not responding.
allocation_broken() {
  local states
  states=$(sinfo -h -N -n "$SLURM_JOB_NODELIST" -o "%N %t" 2>/dev/null) || return 1
  grep -qE ' (down|drain|drng|fail|failg|boot|unk|npc)|\*' <<<"$states"
}

requeue() {
  echo "train_large.sh: $1; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"     # ends this run; the job comes back PENDING and resumes
  exit 0
}

restarts=$(cat "$RESTARTS_FILE" 2>/dev/null || echo 0)
echo "train_large.sh: restart budget of $INSTANCE: $restarts of $MAX_RESTARTS used (ELT_MAX_RESTARTS), counted in $RESTARTS_FILE"
while true; do
  # A new rendezvous port per attempt: the last one may still be held by a dying rank's socket.
  export MASTER_PORT=$((20000 + (SLURM_JOB_ID + 101 * restarts) % 20000))
  set +e
  "${SRUN[@]}" 2>"$SRUN_ERR"
  rc=$?
  set -e
  cat "$SRUN_ERR" >&2
  if [ "$rc" -eq 0 ]; then
    exit 0
  fi
  if [ "$rc" -eq "$PREEMPT_EXIT_CODE" ] || task_exited_with "$PREEMPT_EXIT_CODE"; then
    requeue "training saved a checkpoint and exited $PREEMPT_EXIT_CODE (preempted)"
  fi
  for code in "${NEVER_RETRIED[@]}"; do
    if [ "$rc" -eq "$code" ] || task_exited_with "$code"; then
      echo "train_large.sh: training exited $code (2: bad recipe, data or resume path; 3: numerics guard;" \
           "74: a checkpoint or log could not be written, free space first): not restarted, a restart would" \
           "fail the same way; see $LOG_DIR/"
      exit "$code"
    fi
  done
  cause=$(task_exits | head -n 3 | paste -sd ';' -)
  cause="srun exited $rc${cause:+ ($cause)}"
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "train_large.sh: $cause; giving up after $restarts restart(s) (ELT_MAX_RESTARTS=$MAX_RESTARTS) of $INSTANCE:" \
         "the run keeps failing (a crash loop?); see $LOG_DIR/, fix the cause, then resubmit to resume"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "$restarts" > "$RESTARTS_FILE"
  if allocation_broken || [ -z "$(task_exits)" ]; then     # no task ran to an exit: srun could not start
    requeue "$cause; the allocation is broken (a node down, or the step could not launch): restart $restarts of $MAX_RESTARTS of $INSTANCE"
  fi
  echo "train_large.sh: $cause; restart $restarts of $MAX_RESTARTS (ELT_MAX_RESTARTS) of $INSTANCE in this allocation," \
       "resuming from $(resume_point) at $(date -u +%FT%TZ)"
done
