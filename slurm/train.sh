#!/bin/bash
# Train MGN on a Slurm cluster: one srun task per GPU, each running train.py (DeepSpeed data parallel).
#
#   mkdir -p runs/mgn-paper                     # Slurm does not create the directory of its logs
#   sbatch -J mgn-paper slurm/train.sh --preset paper
#   sbatch -J big -p gpu --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --time=2-00:00:00 \
#       slurm/train.sh --preset paper --train.micro_batch 64
#
# Submit from the repository root. Arguments after the script go to train.py, after two defaults
# this script puts first (a later flag wins):
#   --train.run_name <job name>  the run directory is runs/<job name>/, beside Slurm's logs
#   --train.resume auto          a requeued job continues from its latest checkpoint
# Reusing a job name therefore continues that run; pick a new name for a new run.
#
# Rank environment: each task is one rank; mgn/distributed.py maps SLURM_PROCID / SLURM_LOCALID /
# SLURM_STEP_NUM_TASKS to RANK / LOCAL_RANK / WORLD_SIZE. This script exports MASTER_ADDR (first node
# of the allocation) and MASTER_PORT (12000 + job id % 20000, below Linux's ephemeral ports 32768-60999,
# as mgn/distributed.py's slurm_port) and prints the world it resolved.
#
# Time limit and preemption: Slurm sends USR2 to every task 5 minutes before the limit (--signal).
# The trainer finishes its step, all ranks agree, all save a checkpoint, rank 0 runs
# `scontrol requeue`, and the next start resumes. A SIGTERM (scancel, preemption) saves and stops.
# --requeue also lets Slurm requeue the job after a node failure; --open-mode=append keeps the log of
# every start in one file. If a rank dies, srun (--kill-on-bad-exit) stops the others at once and the
# job fails with the rank's error instead of hanging until the time limit.
#
# Overrides: every #SBATCH value from the sbatch command line, or from SBATCH_* variables where Slurm
# has one (SBATCH_TIMELIMIT, SBATCH_PARTITION, SBATCH_GPUS_PER_NODE, SBATCH_JOB_NAME, SBATCH_SIGNAL,
# SBATCH_OUTPUT, SBATCH_ERROR, ...). Keep --ntasks-per-node equal to --gpus-per-node. On CPU-only
# nodes pass --gpus-per-node=0. Variables read by this script:
#   MGN_REPO         directory with train.py (default: the submission directory)
#   PYTHON           interpreter (default: python)
#   MGN_MASTER_PORT  rendezvous port (default: 12000 + job id % 20000)
#   OMP_NUM_THREADS  torch threads per rank (default, train.py's own rule: --cpus-per-task minus the
#                    loader workers on a GPU, all of them on CPU nodes; this script does not set it)
#
#SBATCH --job-name=mgn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/%x/slurm-%j.out
#SBATCH --error=runs/%x/slurm-%j.err
set -uo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/train.sh: submit with sbatch (see the usage at the top of this file)" >&2
    exit 2
fi
REPO=${MGN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
if [ ! -f "$REPO/train.py" ]; then
    echo "slurm/train.sh: no train.py in $REPO: submit from the repository root or set MGN_REPO" >&2
    exit 2
fi

# The rank environment comes from Slurm in each task; variables of the submitting shell (sbatch
# exports its environment) must not shadow it.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MGN_MASTER_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

train=("$PYTHON" -u "$REPO/train.py" --train.run_name "$SLURM_JOB_NAME" --train.resume auto "$@")
echo "MGN slurm: job $SLURM_JOB_ID '$SLURM_JOB_NAME' start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date -Is)"
echo "MGN slurm: world nodes=$SLURM_JOB_NUM_NODES ($SLURM_JOB_NODELIST) ranks=$SLURM_NTASKS" \
    "tasks/node=$SLURM_TASKS_PER_NODE gpus/node=${SLURM_GPUS_PER_NODE:-0} cpus/task=${SLURM_CPUS_PER_TASK:-1}" \
    "master=$MASTER_ADDR:$MASTER_PORT"
# Arguments go to srun as an array ("$@", never eval'd); the echo quotes them as a shell would need them.
echo "MGN slurm: $(printf '%q ' "${train[@]}")"

# srun does not inherit --cpus-per-task from the batch step (Slurm >= 22.05): pass it on.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${train[@]}"
status=$?
if [ $status -ne 0 ]; then
    echo "MGN slurm: FAILED: srun exited with status $status in job $SLURM_JOB_ID" \
        "(start $((${SLURM_RESTART_COUNT:-0} + 1))); the failing task's error is above and in" \
        "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdErr=//p')" >&2
fi
echo "MGN slurm: job $SLURM_JOB_ID finished with status $status at $(date -Is)"
exit $status
