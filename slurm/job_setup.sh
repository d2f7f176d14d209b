# The start every batch script shares, once it has cd'd to the checkout it was submitted from:
#
#   source slurm/job_setup.sh SCRIPT_NAME MARKER_FILE
#
# fails (exit 2, naming SCRIPT_NAME) unless MARKER_FILE, the file the script needs from the checkout,
# is there, then loads the cluster settings: $ELT_ENV_FILE (an error if set but missing), else
# slurm/env.sh if present (see slurm/env.example.sh).
#
# Why the caller must cd first: sbatch runs a copy of the batch script from its spool directory, so
# the script cannot find this file next to itself; it finds it from the submit dir.
# Why a sourced file and not a function: the env file is sourced here, and in a function a `declare`
# in it would make a local variable that vanishes on return; here it runs at the script's top level.
# Keep $1/$2 unmodified: a `set --`/`shift` in this file would also clobber the caller's arguments.

if [ ! -f "$2" ]; then
  echo "$1: submit from the elt-scale checkout (no $2 in $PWD)" >&2
  exit 2
fi
if [ -n "${ELT_ENV_FILE:-}" ]; then
  [ -f "$ELT_ENV_FILE" ] || { echo "$1: ELT_ENV_FILE=$ELT_ENV_FILE does not exist" >&2; exit 2; }
  source "$ELT_ENV_FILE"
elif [ -f slurm/env.sh ]; then
  source slurm/env.sh
fi
