# Sourced by the slurm/*.sbatch templates.
#
# NCCL and gloo on real clusters (uncomment what your site needs):
# export NCCL_SOCKET_IFNAME=ib0          # the interface NCCL bootstraps over (not lo/docker0)
# export GLOO_SOCKET_IFNAME=ib0          # the same for gloo: the once-per-node MNIST barrier runs on gloo
#                                        # even on GPU runs, and binds to what the hostname resolves to
# export NCCL_IB_DISABLE=0               # use InfiniBand when present
# export NCCL_DEBUG=WARN                 # INFO when diagnosing hangs
# TORCH_NCCL_ASYNC_ERROR_HANDLING is left at torch's default, 3 (SkipCleanUp, since torch 2.2): a failed or
# timed-out collective ends the process. 1 (TearDown) first calls ncclCommAbort, which can itself hang
# (ProcessGroupNCCL.hpp); dist.timeout_s bounds how long a dead peer is waited for.
export PYTHONUNBUFFERED=1

# A rendezvous port derived from the job id: concurrent jobs sharing a node don't collide
# (cnn.distributed.slurm_port() is the same formula for srun_direct.sbatch).
job_port() { echo $(( 20000 + SLURM_JOB_ID % 20000 )); }

# The id that addresses this job, or only this task of a job array. For an array task,
# scancel/scontrol given the bare array id ($SLURM_ARRAY_JOB_ID, which is also one task's
# $SLURM_JOB_ID) act on EVERY task of the array (Lightning fixed the same bug in its
# PR #15040). Each task also gets its own run folder (= cnn.rundir.job_id()).
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  JOB_REF=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
  JOB_REF=${SLURM_JOB_ID:-}
fi
RUN_DIR=${RUN_ROOT:-runs}/$JOB_REF
# Requeue after a preemption at most this many times (SLURM_RESTART_COUNT counts them):
# a job that is preempted or runs out of time on every attempt must not loop forever.
MAX_REQUEUES=${MAX_REQUEUES:-3}

STEP_PID=""
PREEMPTED=0
# USR1 (--signal=B:USR1@T, or `scancel --signal=USR1 --batch JOB`): ask every task to
# checkpoint at its next step boundary (SIGTERM is what train_ddp.py handles), wait for
# it, then put the job (or this array task) back in the queue. It resumes from $RUN_DIR.
on_preempt() {
  PREEMPTED=1
  echo "$(date +%T) preemption signal: checkpointing job $JOB_REF"
  # without --batch, scancel signals the job's steps (the training), not this shell
  [ -n "$STEP_PID" ] && scancel --signal=TERM "$JOB_REF" 2>/dev/null
}
trap on_preempt USR1

# run_step PID: wait for the training step; after a preemption, requeue (up to MAX_REQUEUES).
run_step() {
  STEP_PID=$1
  local rc restarts=${SLURM_RESTART_COUNT:-0}
  while :; do
    wait "$STEP_PID"; rc=$?
    # wait returns early (rc > 128) when a trapped signal arrives; loop until the step ends
    kill -0 "$STEP_PID" 2>/dev/null || break
  done
  if [ "$PREEMPTED" = 1 ]; then
    if [ "$restarts" -ge "$MAX_REQUEUES" ]; then
      echo "$(date +%T) step ended (exit $rc) after preemption; NOT requeueing $JOB_REF: already requeued" \
           "$restarts times (MAX_REQUEUES=$MAX_REQUEUES). Its checkpoint is in $RUN_DIR: resubmit with" \
           "run.dir=$RUN_DIR to continue"
      exit "$rc"
    fi
    echo "$(date +%T) step ended (exit $rc) after preemption; requeueing $JOB_REF" \
         "(requeue $((restarts + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$JOB_REF"
    exit 0
  fi
  echo "$(date +%T) training step finished with exit code $rc"
  exit "$rc"
}
