# Cluster settings for slurm/train_large.sh and slurm/tokenize.sh, sourced by bash in the batch job
# (working directory: the checkout you submitted from). Copy to slurm/env.sh (not tracked by git)
# or point ELT_ENV_FILE at your copy. Nothing from the command line is read here.

# Software: modules and the Python environment.
# module load cuda/12.4 nccl/2.21
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
# source "$HOME/venvs/elt/bin/activate"

# Network: which interface the rendezvous and collectives use; which InfiniBand HCAs NCCL uses.
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
# export NCCL_DEBUG=WARN

# DeepSpeed's op builder cannot parse some images' TORCH_CUDA_ARCH_LIST (e.g. 9.0a).
# export TORCH_CUDA_ARCH_LIST=9.0

# Where per-node logs go (default slurm/logs); the batch log follows #SBATCH --output.
# export ELT_LOG_DIR=/scratch/$USER/elt-logs
# export WANDB_MODE=offline
