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

# A rendezvous port derived from the job id: concurrent jobs sharing a node don't collide.
job_port() { echo $(( 20000 + SLURM_JOB_ID % 20000 )); }

STEP_PID=""
PREEMPTED=0
# USR1 (--signal=B:USR1@T, or `scancel --signal=USR1 --batch JOB`): ask every task to
# checkpoint at its next step boundary (SIGTERM is what train_ddp.py handles), wait for
# it, then put the job back in the queue. It resumes from runs/$SLURM_JOB_ID.
on_preempt() {
  PREEMPTED=1
  echo "$(date +%T) preemption signal: checkpointing and requeueing job $SLURM_JOB_ID"
  # without --batch, scancel signals the job's steps (the training), not this shell
  [ -n "$STEP_PID" ] && scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null
}
trap on_preempt USR1

# run_step PID: wait for the training step; after a preemption, requeue.
run_step() {
  STEP_PID=$1
  local rc
  while :; do
    wait "$STEP_PID"; rc=$?
    # wait returns early (rc > 128) when a trapped signal arrives; loop until the step ends
    kill -0 "$STEP_PID" 2>/dev/null || break
  done
  if [ "$PREEMPTED" = 1 ]; then
    echo "$(date +%T) step ended (exit $rc) after preemption; requeueing"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "$(date +%T) training step finished with exit code $rc"
  exit "$rc"
}
