# Sourced by the slurm/*.sbatch templates.
#
# NCCL and gloo on real clusters (uncomment what your site needs):
# export NCCL_SOCKET_IFNAME=ib0          # the interface NCCL bootstraps over (not lo/docker0)
# export GLOO_SOCKET_IFNAME=ib0          # the same for gloo (the MNIST barrier and the stop check, even on
#                                        # GPU runs); unset, each rank sets it to the interface that
#                                        # NCCL_SOCKET_IFNAME selects, or gloo binds to what the hostname
#                                        # resolves to (cnn/distributed/launch.py follow_nccl_socket_ifname)
# export NCCL_IB_DISABLE=0               # use InfiniBand when present
# export NCCL_DEBUG=WARN                 # INFO when diagnosing hangs
# TORCH_NCCL_ASYNC_ERROR_HANDLING is left at torch's default, 3 (SkipCleanUp, since torch 2.2): a failed or
# timed-out collective ends the process. 1 (TearDown) first calls ncclCommAbort, which can itself hang
# (ProcessGroupNCCL.hpp); dist.timeout_s bounds how long a dead peer is waited for.
export PYTHONUNBUFFERED=1

# A rendezvous port derived from the job id: concurrent jobs sharing a node don't collide
# (cnn.distributed.slurm_port() is the same formula for srun_direct.sbatch). 20000..31999: below
# Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), where any
# outgoing connection on the node may already hold the port.
job_port() { echo $(( 20000 + SLURM_JOB_ID % 12000 )); }

# CPUs for every task: each srun in the templates passes --cpus-per-task="$CPUS_PER_TASK".
# Slurm 22.05 stopped srun from inheriting the job's --cpus-per-task (CHANGELOG/slurm-22.05.md:
# "srun no longer inherits SLURM_CPUS_PER_TASK. It now will only inherit SRUN_CPUS_PER_TASK";
# sbatch(1), 22.05: "srun will not inherit the --cpus-per-task value requested by salloc or
# sbatch. It must be requested again with the call to srun or set with the SRUN_CPUS_PER_TASK
# environment variable"): a step then gets 1 CPU per task. 23.11 reads SLURM_CPUS_PER_TASK again
# and no longer SRUN_CPUS_PER_TASK (CHANGELOG/slurm-23.11.md: "Replace SRUN_CPUS_PER_TASK with
# SLURM_CPUS_PER_TASK"). The option works on every version, and a command-line option wins over
# the environment; SRUN_CPUS_PER_TASK is exported too, for an srun you add to a copy of a
# template on 22.05/23.02.
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
fi

# bound_compile_threads RANKS_PER_TASK: train.compile=true starts inductor compile workers in every
# rank, TORCHINDUCTOR_COMPILE_THREADS of them, else min(32, the CPUs the rank may run on)
# (torch/_inductor/config.py, decide_compile_threads) -- on a node that binds no CPUs to tasks,
# 32 per rank. Bound them to the task's CPUs shared by its ranks (at least 1: inductor then
# compiles in the rank itself). A value exported before submitting wins.
bound_compile_threads() {
  local n=$(( CPUS_PER_TASK / $1 ))
  [ "$n" -ge 1 ] || n=1
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$n}
}

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
